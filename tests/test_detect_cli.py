"""``spp-jax detect-train``, ``detect-eval`` and ``detect`` on the tiny detection run
that ``tests/test_detection_pipeline.py`` trains once per session."""

from __future__ import annotations

import json
import logging
import os
import re

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("cv2")
pytest.importorskip("sklearn")

from spp_jax import cli, configs
from spp_jax.detection import report
from tests.test_detection_pipeline import LogCapture, trained_workdir

# Start-up lines of TensorFlow, absl and JAX that the command filters out.
NOISE = re.compile(r"oneDNN|cpu_feature_guard|absl|InitializeLog|^[IWE]\d{4} |xla_bridge")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


def _class_names(workdir: str) -> list[str]:
    return report.class_names(len(json.loads(_last_line(workdir))["ap_voc07"]))


def _last_line(workdir: str) -> str:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.read().splitlines()[-1]


# ----------------------------------------------------------------------- detect-train


def test_load_config_detection_names_paths_and_overrides(tmp_path):
    c = cli.load_config("detection_tiny", ["finetune.steps=3", "test.scales=(1,)"], "detection")
    assert c.finetune.steps == 3 and c.test.scales == (1,)
    c = cli.load_config(
        "detection_tiny",
        ["backbone_overrides.num_epochs=1", "backbone_overrides.model.width=0.25"],
        kind="detection",
    )
    assert c.backbone_overrides.to_dict() == {"num_epochs": 1, "model": {"width": 0.25}}
    c = cli.load_config("detection", ['backbone_overrides={"num_epochs": 2}'], "detection")
    assert c.backbone_overrides.num_epochs == 2
    with pytest.raises(SystemExit, match=r"no key 'finetune\.stesp'"):
        cli.load_config("detection_tiny", ["finetune.stesp=3"], "detection")
    with pytest.raises(SystemExit, match=r"config 'tiny' not found.*'detection_tiny'"):
        cli.load_config("tiny", kind="detection")  # a classification config
    mine = tmp_path / "mine.py"
    mine.write_text(
        "from spp_jax.configs import detection_tiny\n\n"
        "def get_config():\n    c = detection_tiny.get_config()\n    c.seed = 7\n    return c\n"
    )
    assert cli.load_config(str(mine), ["svm.C=1"], "detection").seed == 7
    assert "detection_tiny" in configs.available("detection")


def test_detect_train_logs_each_stage_and_the_ap_table(trained):
    """The session's run: ``spp-jax detect-train`` in a fresh process."""
    out = trained["output"]
    lines = out.splitlines()
    for stage in ("backbone", "proposals", "finetune", "svm_pretrained", "svm", "bbox"):
        assert re.search(rf"^\d\d:\d\d:\d\d spp_jax: stage {stage} done in [\d.]+ s$", out, re.M), (
            stage
        )
    assert not [line for line in lines if NOISE.search(line)]  # TensorFlow's and absl's
    start = [
        i for i, line in enumerate(lines) if "spp_jax: average precision (%) on the test" in line
    ]
    assert len(start) == 1
    table = []
    for line in lines[start[0] + 1 :]:
        if not line.startswith("  "):
            break
        table.append(line)
    names = _class_names(trained["workdir"])
    assert all(n in table[0] for n in names)
    assert any(row.startswith("  | ft fc7 + SVM + bbox, 1 scale | ") for row in table)
    m = json.loads(_last_line(trained["workdir"]))
    assert f"spp_jax: mAP {m['map_voc07']:.4f} (VOC07), {m['map_area']:.4f} (area)" in out


def test_detect_train_without_backbone_or_data_is_one_line(tmp_path):
    args = ["detect-train", "--config", "detection_tiny", "--workdir", str(tmp_path / "w")]
    with pytest.raises(SystemExit, match=r"detect-train: .*nope"):
        cli.main([*args, "--set", f"backbone_workdir={tmp_path / 'nope'}"])


# ------------------------------------------------------------------------ detect-eval


def test_detect_eval_prints_the_ap_table(trained):
    wd = trained["workdir"]
    names = _class_names(wd)
    with LogCapture() as logs:
        assert cli.main(["detect-eval", "--workdir", wd]) == 0
    text = logs.text()
    assert all(n in text for n in names) and "| ft fc7 + SVM + bbox, 1 scale |" in text
    # The main row of detect-train's table, reproduced by the reloaded detector.
    main = json.loads(_last_line(wd))["table"]["ft fc7 + SVM + bbox, 1 scale"]
    assert f"mAP {main['map_voc07']:.4f} (VOC07), {main['map_area']:.4f} (area)" in text
    report_md = os.path.join(wd, "eval", "test_1scale.md")
    with open(report_md) as f:
        assert "| method | mAP VOC07 | mAP area |" in f.read()
    with LogCapture() as logs:
        args = ["detect-eval", "--workdir", wd, "--scales", "5", "--split", "validation"]
        assert cli.main([*args, "--scorer", "softmax", "--no-bbox"]) == 0
    assert "| ft softmax, 3 scales |" in logs.text()  # detection_tiny has 3 scales
    assert os.path.exists(os.path.join(wd, "eval", "validation_3scales.md"))


def test_detect_eval_of_a_missing_workdir_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"detect-eval: error: .* is not a workdir"):
        cli.main(["detect-eval", "--workdir", str(tmp_path)])


# ----------------------------------------------------------------------------- detect


def _write_png(path, image: np.ndarray) -> None:
    import cv2

    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., [2, 1, 0, 3]]  # RGBA -> BGRA for OpenCV
    assert cv2.imwrite(str(path), image)


def _scene(h: int, w: int) -> np.ndarray:
    image = np.full((h, w, 3), 60, np.uint8)
    image[h // 5 : h // 2, w // 6 : w // 2] = (220, 40, 40)
    image[h // 2 : 4 * h // 5, w // 2 : 5 * w // 6] = (40, 200, 60)
    return image


def test_detect_grayscale_rgba_and_tiny_files(trained, tmp_path):
    wd = trained["workdir"]
    gray = tmp_path / "in" / "gray.png"
    rgba = tmp_path / "in" / "sub" / "rgba.png"
    tiny = tmp_path / "tiny.png"  # 8 x 8: no proposal reaches min_size, below a conv5 cell
    rgba.parent.mkdir(parents=True)
    _write_png(gray, _scene(120, 160).mean(axis=2).astype(np.uint8))
    alpha = np.full((96, 144, 1), 255, np.uint8)
    _write_png(rgba, np.concatenate([_scene(96, 144), alpha], axis=2))
    _write_png(tiny, _scene(8, 8))
    out = tmp_path / "out"
    args = ["detect", "--workdir", wd, "--images", str(gray), str(rgba), str(tiny)]
    assert cli.main([*args, "--out", str(out)]) == 0
    res = json.loads((out / "detections.json").read_text())
    names = _class_names(wd)
    assert res["class_names"] == names and res["skipped"] == []
    paths = [os.path.basename(r["path"]) for r in res["images"]]
    assert paths == ["gray.png", "rgba.png", "tiny.png"]
    for r, size in zip(res["images"], [(120, 160), (96, 144), (8, 8)], strict=True):
        assert r["size"] == list(size)
        with open(r["output"], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        n = len(r["scores"])
        boxes = np.asarray(r["boxes"], np.float64).reshape(-1, 4)
        assert boxes.shape == (n, 4) and len(r["labels"]) == n == len(r["class_names"])
        assert r["scores"] == sorted(r["scores"], reverse=True)
        pairs = zip(r["labels"], r["class_names"], strict=True)
        assert all(0 <= c < len(names) and names[c] == cn for c, cn in pairs)
        h, w = size
        assert (boxes >= -0.01).all() and (boxes[:, 2] <= w + 0.01).all()
        assert (boxes[:, 3] <= h + 0.01).all()
    assert res["images"][0]["num_proposals"] > 0 and res["images"][1]["num_proposals"] > 0
    assert any(r["scores"] for r in res["images"][:2])  # SVM scores above -1.5 (the code's)
    assert res["images"][2]["num_proposals"] == 0 and res["images"][2]["scores"] == []
    drawn = ["gray_detections.png", "rgba_detections.png", "tiny_detections.png"]
    assert sorted(os.listdir(out)) == ["detections.json", "detections.jsonl", *drawn]

    # A folder (searched recursively), 5 scales, a score threshold nothing reaches.
    out2 = tmp_path / "out2"
    args = ["detect", "--workdir", wd, "--images", str(tmp_path / "in"), "--out", str(out2)]
    assert cli.main([*args, "--scales", "5", "--min-score", "1e9"]) == 0
    res = json.loads((out2 / "detections.json").read_text())
    assert len(res["images"]) == 2 and all(r["scores"] == [] for r in res["images"])
    assert len(res["scales"]) == 3 and (out2 / "gray_detections.png").exists()


def test_detect_a_big_photo_at_reduced_size_and_a_rerun_skips_what_is_done(
    trained, tmp_path, caplog
):
    """A JPEG far larger than the detector's scales is decoded at a reduced size, its
    boxes reported in the original's pixels; a second call with the same output folder
    runs nothing again and writes the same results."""
    from PIL import Image

    wd = trained["workdir"]
    big = tmp_path / "photo.jpg"
    Image.fromarray(_scene(1200, 1600)).save(big, quality=95)
    small = tmp_path / "small.png"
    _write_png(small, _scene(90, 120))
    out = tmp_path / "out"
    args = ["detect", "--workdir", wd, "--images", str(big), str(small), "--out", str(out)]
    assert cli.main(args) == 0
    res = json.loads((out / "detections.json").read_text())
    photo = res["images"][0]
    assert photo["size"] == [1200, 1600]
    h, w = photo["decoded_size"]
    assert h <= 600 and w <= 800 and h * 1600 == w * 1200  # 1/2, 1/4 or 1/8, aspect kept
    assert photo["num_proposals"] > 0 and photo["scores"], photo
    boxes = np.asarray(photo["boxes"]).reshape(-1, 4)
    assert (boxes >= -0.01).all() and (boxes[:, [0, 2]] <= 1600.01).all()
    assert (boxes[:, [1, 3]] <= 1200.01).all() and boxes[:, 2].max() > w  # mapped back
    assert res["images"][1]["size"] == res["images"][1]["decoded_size"] == [90, 120]
    lines = (out / "detections.jsonl").read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == [str(big), str(small)]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spp_jax"):
        assert cli.main(args) == 0
    assert "2 image(s) already done" in caplog.text
    assert json.loads((out / "detections.json").read_text()) == res
    assert len((out / "detections.jsonl").read_text().splitlines()) == 2


def test_detect_corrupt_file_is_one_line_naming_it(trained, tmp_path, caplog):
    wd = trained["workdir"]
    good = tmp_path / "good.png"
    _write_png(good, _scene(64, 80))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "out"
    args = ["detect", "--workdir", wd, "--images", str(good), str(bad), "--out", str(out)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spp_jax"):
        assert cli.main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "bad.png" in errors[0] and "\n" not in errors[0], errors
    assert "--skip-bad-images" in errors[0] and not (out / "detections.json").exists()
    assert cli.main([*args, "--skip-bad-images"]) == 0
    res = json.loads((out / "detections.json").read_text())
    assert [os.path.basename(p) for p in res["skipped"]] == ["bad.png"]
    assert [os.path.basename(r["path"]) for r in res["images"]] == ["good.png"]
    with pytest.raises(SystemExit, match=r"detect: error: no such file or folder: .*missing\.png"):
        cli.main(
            [
                "detect",
                "--workdir",
                wd,
                "--images",
                str(tmp_path / "missing.png"),
                "--out",
                str(out),
            ]
        )


def test_backbone_overrides_apply_to_the_default_backbone_only():
    """``detection`` trains its backbone longer and with wider crops than the
    classification default; ``detection_tiny`` keeps the ``tiny`` config's own values."""
    from spp_jax.detection import stages

    default, tiny = configs.get_config("default"), configs.get_config("tiny")
    full = stages.backbone_config(cli.load_config("detection", kind="detection"))
    assert (full.num_epochs, full.min_crop_area, full.seed) == (48, 0.35, 0)
    assert (default.num_epochs, default.min_crop_area) == (16, 0.8)
    small = stages.backbone_config(cli.load_config("detection_tiny", kind="detection"))
    assert (small.num_epochs, small.min_crop_area) == (tiny.num_epochs, tiny.min_crop_area)
    voc = cli.load_config("detection_voc07", kind="detection")
    assert voc.backbone_overrides.to_dict() == {}


def test_backbone_seed_is_the_runs_unless_overridden():
    from spp_jax.detection import stages

    seeded = cli.load_config("detection", ["seed=3"], "detection")
    assert stages.backbone_config(seeded).seed == 3
    pinned = cli.load_config("detection", ["seed=3", "backbone_overrides.seed=7"], "detection")
    assert stages.backbone_config(pinned).seed == 7
