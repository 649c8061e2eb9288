from spp_jax import cli


def test_demo_runs_and_padded_batch_matches():
    out = cli.demo(levels=(2, 1), channels=3, batch=1)
    assert out["dim"] == 15 and out["padded_max_abs_diff"] == 0.0


def test_main_exit_code():
    assert cli.main(["demo", "--levels", "2,1", "--channels", "4"]) == 0


# ------------------------------------------------- train / eval / extract, end to end

import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_load_config_overrides_and_errors():
    config = cli.load_config("tiny", ["model.width=0.5", "train_sizes=(40, 32)", "num_epochs=3"])
    assert config.model.width == 0.5 and config.train_sizes == (40, 32) and config.num_epochs == 3
    with pytest.raises(SystemExit, match=r"no key 'model\.widht'"):
        cli.load_config("tiny", ["model.widht=0.5"])
    with pytest.raises(SystemExit, match="config 'nope' not found"):
        cli.load_config("nope")
    # Booleans: Python's spelling or JSON's; anything else names the key and its type.
    for text, want in [("False", False), ("false", False), ("TRUE", True)]:
        assert cli.load_config("tiny", [f"model.center_input={text}"]).model.center_input is want
    with pytest.raises(SystemExit, match=r"model\.center_input is a bool .*got 'maybe'"):
        cli.load_config("tiny", ["model.center_input=maybe"])


def test_cli_train_eval_extract_end_to_end(tmp_path, monkeypatch, caplog):
    pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    workdir = str(tmp_path / "run")
    sets = [
        "--set",
        "num_epochs=1",
        "--set",
        "eval_every_epochs=0",
        "--set",
        "eval_sizes=(48,)",
        "--set",
        "size_schedule=single",
        "--set",
        "train_sizes=(48,)",
    ]
    assert cli.main(["train", "--config", "tiny", "--workdir", workdir, *sets]) == 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"final"' in lines[-1]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "5"))
    assert cli.main(["eval", "--workdir", workdir, "--sizes", "40"]) == 0

    # A folder of images of different sizes and aspect ratios.
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(30, 50), (64, 40), (48, 48)]):
        png = tf.io.encode_png(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).numpy()
        (folder / f"img{i}.png").write_bytes(png)
    out = str(tmp_path / "feats.npz")
    # A corrupt file stops the extraction with one error line naming it, or is skipped.
    (folder / "img3.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    extract = ["extract", "--workdir", workdir, "--images", str(folder), "--out", out]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spp_jax"):
        assert cli.main(extract) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "img3.jpg" in errors[0] and "\n" not in errors[0], errors
    assert "--skip-bad-images" in errors[0] and not os.path.exists(out)
    assert cli.main([*extract, "--skip-bad-images"]) == 0
    feats = np.load(out)
    assert [os.path.basename(n) for n in feats["skipped"]] == ["img3.jpg"]
    dim = 32 * (36 + 9 + 4 + 1)  # tiny ZF-5: conv5 has round(256 / 8) = 32 channels
    assert feats["features"].shape == (3, dim) and np.isfinite(feats["features"]).all()
    assert [os.path.basename(n) for n in feats["names"]] == ["img0.png", "img1.png", "img2.png"]
    # Short side resized to the crop size (48), aspect kept.
    np.testing.assert_array_equal(feats["sizes"], [[48, 80], [77, 48], [48, 48]])

    out2 = str(tmp_path / "tfds_feats.npz")
    args = ["extract", "--workdir", workdir, "--images", "spp_shapes/tiny", "--out", out2]
    assert cli.main([*args, "--limit", "5", "--batch-size", "4"]) == 0
    tf_feats = np.load(out2)
    assert tf_feats["features"].shape == (5, dim) and tf_feats["labels"].shape == (5,)


# ------------------------------------------------------ what a user sees on the terminal

# Start-up and progress lines of TensorFlow, absl, JAX, orbax and tfds.
NOISE = re.compile(
    r"oneDNN|cpu_feature_guard|absl|InitializeLog|^[IWE]\d{4} |tensorflow|xla_bridge|"
    r"Unable to initialize backend|WARNING"
)
OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d spp_jax[\w.]*: ")


def _run_cli(args, env):
    return subprocess.run(
        [sys.executable, "-m", "spp_jax", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _assert_only_our_lines(run):
    assert run.returncode == 0, run.stderr[-3000:]
    lines = (run.stdout + run.stderr).splitlines()
    assert lines, "no output at all"
    noise = [line for line in lines if NOISE.search(line)]
    assert not noise, noise
    # Every line is one of ours, or the indented continuation of one (a results table).
    foreign = [line for line in lines if not (OUR_LINE.match(line) or line.startswith("  "))]
    assert not foreign, foreign


def test_cli_output_is_the_projects_own_log_lines(tmp_path):
    """``spp-jax train`` in a fresh process: TensorFlow, absl and JAX start-up lines
    (oneDNN notices, cpu_feature_guard, absl warnings, backend probing) do not show."""
    pytest.importorskip("tensorflow_datasets")
    from spp_jax import data

    data_dir = str(tmp_path / "tfds")
    data.get_builder("spp_shapes/tiny", data_dir)  # built here: its build prints are tfds's
    env = dict(os.environ, TFDS_DATA_DIR=data_dir, PYTHONPATH=REPO)
    for key in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS"):
        env.pop(key, None)
    sets = ["num_epochs=1", "eval_every_epochs=0", "eval_sizes=(48,)", "size_schedule=single"]
    sets.append("train_sizes=(48,)")
    args = ["train", "--config", "tiny", "--workdir", str(tmp_path / "run")]
    run = _run_cli([*args, *(a for s in sets for a in ("--set", s))], env)
    _assert_only_our_lines(run)
    assert "spp_jax.train: epoch 1/1 size 48" in run.stderr
    _assert_only_our_lines(_run_cli(["demo", "--levels", "2,1", "--channels", "4"], env))


def test_a_coordinator_address_without_the_process_count_is_a_clear_error(monkeypatch):
    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(SystemExit, match="pass --num-processes and --process-id"):
        cli.main(["train", "--config", "tiny", "--workdir", "/nonexistent/never/written"])
