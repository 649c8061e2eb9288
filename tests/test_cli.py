from spp_jax import cli


def test_demo_runs_and_padded_batch_matches():
    out = cli.demo(levels=(2, 1), channels=3, batch=1)
    assert out["dim"] == 15 and out["padded_max_abs_diff"] == 0.0


def test_main_exit_code():
    assert cli.main(["demo", "--levels", "2,1", "--channels", "4"]) == 0


# ------------------------------------------------- train / eval / extract, end to end

import os  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def test_load_config_overrides_and_errors():
    config = cli.load_config("tiny", ["model.width=0.5", "train_sizes=(40, 32)", "num_epochs=3"])
    assert config.model.width == 0.5 and config.train_sizes == (40, 32) and config.num_epochs == 3
    with pytest.raises(SystemExit, match=r"no key 'model\.widht'"):
        cli.load_config("tiny", ["model.widht=0.5"])
    with pytest.raises(SystemExit, match="config 'nope' not found"):
        cli.load_config("nope")


def test_cli_train_eval_extract_end_to_end(tmp_path, monkeypatch):
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
    assert cli.main(["extract", "--workdir", workdir, "--images", str(folder), "--out", out]) == 0
    feats = np.load(out)
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
