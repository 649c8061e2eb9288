"""The ``spp-jax`` command line: its subcommands end to end, what a user sees on the
terminal, and the one-line errors for bad paths and values."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from spp_jax import cli


def test_demo_runs_and_padded_batch_matches():
    out = cli.demo(levels=(2, 1), channels=3, batch=1)
    assert out["dim"] == 15 and out["padded_max_abs_diff"] == 0.0


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

    # A checkpoint that does not fit the model its config.json describes.
    other = tmp_path / "other"
    shutil.copytree(workdir, other)
    config = json.loads((other / "config.json").read_text())
    config["model"]["width"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    message = _one_line_error(["eval", "--workdir", str(other)], "eval")
    assert "does not fit the model" in message and "conv1/" in message, message


def _one_line_error(argv, command) -> str:
    """``spp-jax ARGV`` in this process: it must exit with one line naming the command."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    message = exc.value.code
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"spp-jax {command}: error: "), message
    return message


def test_every_bad_path_or_value_is_one_line(tmp_path, monkeypatch):
    """Each mistake exits with one line that names the bad path or value and what is
    accepted; nothing is read or trained first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    det = tmp_path / "det"
    det.mkdir()
    (det / "config.json").write_text(json.dumps({"backbone_config": "default"}))
    cls = tmp_path / "cls"
    (cls / "checkpoints").mkdir(parents=True)
    (cls / "config.json").write_text(json.dumps({"model": {"arch": "zf5"}}))
    cases = [
        (["eval", "--workdir", "empty"], "'empty' is not a workdir"),
        (["eval", "--workdir", "missing"], "'missing' does not exist"),
        (["eval", "--workdir", "afile"], "'afile' is a file"),
        (["eval", "--workdir", "det"], "'det' is a detection workdir"),
        (["eval", "--workdir", "cls"], "'cls' has no checkpoint yet"),
        (["extract", "--workdir", "missing", "--images", "x", "--out", "o.npz"], "'missing'"),
        (["detect", "--workdir", "cls", "--images", "x", "--out", "o"], "classification workdir"),
        (["detect-eval", "--workdir", "empty"], "'empty' is not a workdir"),
        (["train", "--config", "tiny", "--workdir", "afile"], "'afile' is a file"),
        (["train", "--config", "tiny", "--workdir", "det"], "holds a detection run"),
        (["detect-train", "--workdir", "cls"], "holds a classification run"),
        (["train", "--config", "tiny", "--workdir", "w", "--set", "learning_rate=-1"],
         "config key learning_rate: got -1.0; accepted: a number > 0"),
        (["train", "--config", "tiny", "--workdir", "w", "--set", "min_crop_area=1.5"],
         "min_crop_area: got 1.5; accepted: a number in (0, 1]"),
        (["train", "--config", "tiny", "--workdir", "w", "--set", "lr_schedule=linear"],
         "lr_schedule: got 'linear'; accepted: one of 'step', 'cosine'"),
        (["train", "--config", "tiny", "--workdir", "w", "--set", "train_sizes=(0, 48)"],
         "train_sizes: got (0, 48)"),
        (["detect-train", "--workdir", "w", "--set", "finetune.bg_iou=(0.5, 0.1)"],
         "finetune.bg_iou"),
        (["detect-train", "--workdir", "w", "--set", "backbone_overrides.num_epochs=0"],
         "backbone_overrides.num_epochs: got 0"),
        (["eval", "--workdir", "missing", "--sizes", "0,x"], "'missing'"),
    ]  # fmt: skip
    for argv, expected in cases:
        message = _one_line_error(argv, argv[0])
        assert expected in message, (argv, message)
    assert not (tmp_path / "w").exists()  # a bad config is refused before the workdir
    # A file where the output folder or file should be, in a classification workdir's
    # place: found before any model is loaded.
    cls_trained = tmp_path / "cls2"
    (cls_trained / "checkpoints" / "5").mkdir(parents=True)
    (cls_trained / "config.json").write_text(json.dumps({"model": {"arch": "zf5"}}))
    args = ["extract", "--workdir", str(cls_trained), "--images", "x", "--out", "empty"]
    assert "'empty' is a folder" in _one_line_error(args, "extract")
    det_done = tmp_path / "det2"
    (det_done / "stages").mkdir(parents=True)
    (det_done / "config.json").write_text(json.dumps({"backbone_config": "default"}))
    args = ["detect", "--workdir", str(det_done), "--images", "x", "--out", "afile"]
    assert "--out 'afile' is a file" in _one_line_error(args, "detect")


def test_an_error_exits_1_with_one_line_and_no_traceback(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "spp_jax", "eval", "--workdir", str(tmp_path / "nope")],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if not NOISE.search(line)]
    assert lines == [
        f"spp-jax eval: error: workdir {str(tmp_path / 'nope')!r} does not exist: give the "
        "--workdir of a finished `spp-jax train` run"
    ], run.stderr


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
