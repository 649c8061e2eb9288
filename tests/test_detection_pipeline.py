"""The detection pipeline end to end on ``spp_scenes/tiny`` (``detection_tiny``).

One ``detect-train`` run (:func:`trained_workdir`, shared with
``tests/test_detect_cli.py``) feeds every test: the files of each stage, the
metrics, a rerun that skips every stage, the resume of interrupted stages (on a
copy of the workdir), and the detector on bad input (no proposals, an image
smaller than a conv5 cell, a very long one, images without objects).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("cv2")
pytest.importorskip("sklearn")

from spp_jax.detection import detector, features, finetune, pipeline, stages

# The backbone as short as the tiny classification run allows (one epoch, one size);
# fine-tuning 4 steps with a validation mAP every 2 (detection_tiny's own); no SVD row
# (the default rank 128 exceeds the tiny head's 32-wide fc6/fc7).
TRAIN_SETS = (
    'backbone_overrides={"num_epochs": 1, "eval_every_epochs": 0, "eval_sizes": (),'
    ' "size_schedule": "single", "train_sizes": (48,)}',
    "finetune.steps=4",
    "finetune.eval_every=2",
    "test.svd_rank=0",
)
TRAINING_STAGES = ("backbone", "proposals", "finetune", "svm_pretrained", "svm", "bbox")


class LogCapture(logging.Handler):
    """``with LogCapture() as logs:`` collects the ``spp_jax`` log lines (INFO and up)
    emitted inside, in ``logs.lines``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(record.getMessage())

    def __enter__(self) -> LogCapture:
        self._logger = logging.getLogger("spp_jax")
        self._level = self._logger.level
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)

    def text(self) -> str:
        return "\n".join(self.lines)


_TRAINED: dict = {}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained_workdir(tmp_path_factory) -> dict:
    """``spp-jax detect-train --config detection_tiny`` once per test session, in a
    fresh process: ``{"workdir", "output" (its stdout and stderr), "seconds"}``.

    A subprocess with one CPU device: the backbone's pmapped training on the 4 forced
    host devices of conftest.py can miss XLA's 40 s all-reduce rendezvous on a loaded
    2-core machine and abort the whole test process (as tests/test_sweep.py notes).
    The other stages and every test below run in this process (plain jit, one device).
    """
    if not _TRAINED:
        workdir = str(tmp_path_factory.mktemp("detect_tiny") / "run")
        args = ["detect-train", "--config", "detection_tiny", "--workdir", workdir]
        for s in TRAIN_SETS:
            args += ["--set", s]
        env = dict(os.environ, PYTHONPATH=REPO)
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        t0 = time.perf_counter()
        run = subprocess.run(
            [sys.executable, "-m", "spp_jax", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        _TRAINED.update(
            workdir=workdir, rc=run.returncode, output=run.stdout + run.stderr,
            seconds=time.perf_counter() - t0,
        )  # fmt: skip
    assert _TRAINED["rc"] == 0, _TRAINED["output"][-5000:]
    return _TRAINED


def last_metrics(workdir: str) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


_DETECTOR: dict = {}


def trained_detector(workdir: str) -> detector.Detector:
    """``load_detector(workdir)``, once."""
    if workdir not in _DETECTOR:
        _DETECTOR[workdir] = pipeline.load_detector(workdir)
    return _DETECTOR[workdir]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def det(trained):
    return trained_detector(trained["workdir"])


def _config(workdir: str):
    return pipeline.load_run_config(workdir)


def _stages_run(logs: LogCapture) -> set[str]:
    """The training stages that ran (logged ``stage NAME done in ... s``)."""
    return {
        s for s in TRAINING_STAGES if any(m.startswith(f"stage {s} done in ") for m in logs.lines)
    }


# ------------------------------------------------------------------- the stages' files


def test_every_stage_writes_its_files(trained):
    wd = trained["workdir"]
    for stage in TRAINING_STAGES:
        record = stages.stage_done(wd, stage)
        assert record is not None, stage
        assert record["seconds"] >= 0
    for name in (
        "config.json", "metrics.jsonl", "finetune/best.msgpack", "finetune/state.msgpack",
        "svm.npz", "svm_pretrained.npz", "bbox.npz", "eval/ap_table.md", "eval/pr_curves.png",
        "proposals/params.json",
    ):  # fmt: skip
        assert os.path.getsize(os.path.join(wd, name)) > 0, name
    drawn = [f for f in os.listdir(os.path.join(wd, "eval")) if f.startswith("detections_")]
    assert len(drawn) == _config(wd).test.draw_images and all(f.endswith(".png") for f in drawn)
    with open(os.path.join(wd, "eval", "pr_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(wd, "eval", "ap_table.md")) as f:
        assert "| method | mAP VOC07 | mAP area |" in f.read()


def test_metrics_are_aps_in_unit_interval(trained):
    wd = trained["workdir"]
    m = last_metrics(wd)
    config = _config(wd)
    k = stages.num_classes_of(config.dataset, config.data_dir)
    test = stages.load_split(config.dataset, config.test_split, config.data_dir)
    present = set()
    for labels, difficult in zip(test.labels, test.difficult, strict=True):
        present |= set(labels[~difficult].tolist())
    for key in ("map_voc07", "map_area"):
        assert math.isfinite(m[key]) and 0.0 <= m[key] <= 1.0, (key, m[key])
    for key in ("ap_voc07", "ap_area"):
        ap = np.asarray(m[key], np.float64)
        assert ap.shape == (k,)
        # NaN exactly for the classes without a (non-difficult) box in the tiny test split.
        np.testing.assert_array_equal(np.isfinite(ap), [c in present for c in range(k)])
        assert ((ap[np.isfinite(ap)] >= 0) & (ap[np.isfinite(ap)] <= 1)).all()
    assert math.isclose(m["map_voc07"], float(np.nanmean(m["ap_voc07"])), rel_tol=1e-6)
    assert m["main"] and m["table"]
    for name, row in m["table"].items():
        assert 0.0 <= row["map_voc07"] <= 1.0 and 0.0 <= row["map_area"] <= 1.0, name
        assert all(v >= 0 for v in row["seconds_per_image"].values()), name


# The four test images give an mAP near chance whatever the detector; on its own six
# training images the SVM detector of the tiny run reaches about 0.056, and the same run
# with the SVM scores' sign flipped about 0.016: the floor sits between, with margin.
TRAIN_MAP_FLOOR = 0.03


def test_svm_detector_finds_the_objects_it_was_trained_on(trained):
    got = pipeline.evaluate_detector_workdir(trained["workdir"], split="train", scorer="svm")
    assert got["map_voc07"] >= TRAIN_MAP_FLOOR, (got["map_voc07"], got["ap_voc07"])


def test_rerun_of_a_finished_workdir_skips_every_stage(trained):
    wd = trained["workdir"]
    before = last_metrics(wd)
    with LogCapture() as logs:
        t0 = time.perf_counter()
        metrics = pipeline.detect_train(_config(wd), wd)
        seconds = time.perf_counter() - t0
    assert _stages_run(logs) == set(), logs.text()
    assert not [line for line in logs.lines if line.startswith("fine-tun")], logs.text()
    for key in ("map_voc07", "map_area"):
        assert metrics[key] == before[key], key
    np.testing.assert_array_equal(metrics["ap_voc07"], before["ap_voc07"])
    assert seconds < trained["seconds"], (seconds, trained["seconds"])


def test_interrupted_stages_resume(trained, tmp_path):
    """Fine-tuning interrupted after its step-2 checkpoint and the SVM stage cut
    short: a rerun resumes fine-tuning at step 2 and runs only those stages again."""
    import flax.serialization

    wd = str(tmp_path / "copy")
    shutil.copytree(trained["workdir"], wd)
    ckpt = os.path.join(wd, "finetune", "state.msgpack")
    with open(ckpt, "rb") as f:
        saved = flax.serialization.msgpack_restore(f.read())
    assert int(saved["state"]["step"]) == 4
    saved["state"]["step"] = np.asarray(2, np.int32)  # as if stopped after step 2's save
    with open(ckpt, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(saved))
    for name in ("stages/finetune.json", "stages/svm.json", "svm.npz"):
        os.remove(os.path.join(wd, name))
    with LogCapture() as logs:
        metrics = pipeline.detect_train(_config(wd), wd)
    text = logs.text()
    assert _stages_run(logs) == {"finetune", "svm"}, text
    assert "fine-tuning resumes at step 2" in logs.lines, text
    assert any(line.startswith("fine-tune step 4:") for line in logs.lines), text
    assert not any(line.startswith("fine-tune step 2:") for line in logs.lines), text
    for stage in ("finetune", "svm"):
        assert stages.stage_done(wd, stage) is not None
    assert stages.stage_done(wd, "finetune")["steps"] == 4
    assert os.path.exists(os.path.join(wd, "svm.npz"))
    assert 0.0 <= metrics["map_voc07"] <= 1.0
    assert last_metrics(wd)["map_voc07"] == metrics["map_voc07"]


def test_killed_at_any_moment_ends_as_an_uninterrupted_run(trained, tmp_path):
    """``detect-train`` killed with SIGKILL in the backbone's training, selective search,
    fine-tuning, the SVMs and the test evaluation, and rerun each time with the same
    command, ends with the uninterrupted run's metrics, bit for bit."""
    from tests import killing

    args = ["detect-train", "--config", "detection_tiny", "--workdir", str(tmp_path / "run")]
    for s in TRAIN_SETS:
        args += ["--set", s]
    kills = [
        ("saved checkpoint at step 5", 0.0),  # the backbone saved, its stage not done
        ("stage proposals ...", 1.0),  # in selective search
        ("fine-tune step 2:", 0.0),
        ("SVM class 3:", 0.0),  # in the first SVM stage
        (": test ", 0.0),  # the first test row written
    ]
    outputs = killing.run_killed(args, killing.one_device_env(), kills)
    assert "fine-tuning resumes at step 2" in "".join(outputs)
    want, got = last_metrics(trained["workdir"]), last_metrics(str(tmp_path / "run"))
    for key in ("map_voc07", "map_area", "ap_voc07", "ap_area", "main"):
        assert got[key] == want[key], key


# -------------------------------------------------------------------------- bad input


def _scene(h: int, w: int, channels: int = 3) -> np.ndarray:
    rng = np.random.default_rng(h * w + channels)
    image = np.full((h, w, channels), 90, np.uint8)
    image[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = rng.integers(150, 255, (1, 1, channels))
    return image


def _assert_detections(out: dict, size: tuple[int, int], k: int) -> None:
    n = len(out["scores"])
    assert out["boxes"].shape == (n, 4) and out["labels"].shape == (n,)
    assert np.isfinite(out["boxes"]).all() and np.isfinite(out["scores"]).all()
    assert ((out["labels"] >= 0) & (out["labels"] < k)).all()
    h, w = size
    assert (out["boxes"] >= -1e-3).all()
    assert (out["boxes"][:, [0, 2]] <= w + 1e-3).all() and (
        out["boxes"][:, [1, 3]] <= h + 1e-3
    ).all()


@pytest.mark.parametrize("scorer", ["svm", "softmax"])
def test_no_proposals_no_detections(det, scorer):
    image = _scene(64, 80)
    for empty in (np.zeros((0, 4), np.float32), []):
        out = det.detect(image, empty, scorer=scorer)
        assert out["boxes"].shape == (0, 4) and out["scores"].shape == (0,)
        assert out["labels"].shape == (0,) and out["labels"].dtype == np.int32


def test_image_smaller_than_a_conv5_cell_is_upscaled(det):
    image = _scene(10, 10)  # below one 16-pixel conv5 cell
    scale = det.config.single_scale
    m = det.conv5(image, scale)
    assert m.size == (scale, scale) and min(m.fmap.shape[:2]) >= 1
    assert np.isfinite(m.fmap).all()
    boxes = np.asarray([[0, 0, 10, 10], [2, 2, 8, 8]], np.float32)
    out = det.detect(image, boxes, num_scales=5)
    _assert_detections(out, (10, 10), det.num_classes)
    for shape in ((10, 10), (10, 10, 1), (10, 10, 4)):  # grayscale, RGBA: converted
        gray = det.detect(np.full(shape, 120, np.uint8), boxes)
        _assert_detections(gray, (10, 10), det.num_classes)


def test_very_long_image_is_capped_at_max_side(det):
    max_side = det.config.max_side
    assert features.resized_size((5000, 300), 128, max_side) == (max_side, 120)
    assert features.resized_size((300, 5000), 600, max_side) == (120, max_side)
    image = np.zeros((5000, 300, 3), np.uint8)
    m = det.conv5(image, 128)
    assert m.size == (max_side, 120)  # not (2133, 128)
    assert m.fmap.shape[0] <= max_side // det.stride + 1 and np.isfinite(m.fmap).all()
    out = det.detect(image, np.asarray([[0, 0, 300, 5000], [50, 100, 250, 900]], np.float32))
    _assert_detections(out, (5000, 300), det.num_classes)


def test_image_below_the_trunk_minimum_after_the_cap_is_a_clear_error(det):
    assert det.min_input == 23  # ZF-5: 23 x 23 pixels give a 1 x 1 conv5
    image = np.zeros((5000, 20, 3), np.uint8)  # capped: 2000 x 8 at any scale
    with pytest.raises(ValueError, match=r"image 5000x20 resized to 2000x8 .* minimum input 23x23"):
        det.conv5(image, det.config.single_scale)
    with pytest.raises(ValueError, match="5000x20"):
        det.detect(image, np.asarray([[0, 0, 20, 5000]], np.float32))


_SPLIT_FIELDS = ("ids", "images", "boxes", "labels", "difficult")


def test_training_copes_with_images_without_objects_or_proposals(det, trained, tmp_path):
    """The window sampler, the SVMs (mining) and box regression on the training
    split plus an image without objects and one without proposals either."""
    wd = trained["workdir"]
    config = _config(wd)
    train = stages.load_split(config.dataset, config.train_split, config.data_dir)
    props = stages.workdir_proposals(config, wd, train)
    empty_image = _scene(96, 128)
    for props_i in (props[0][:30], np.zeros((0, 4), np.float32)):
        train.ids.append(f"no_objects_{len(train.ids)}")
        train.images.append(empty_image)
        train.boxes.append(np.zeros((0, 4), np.float32))
        train.labels.append(np.zeros((0,), np.int32))
        train.difficult.append(np.zeros((0,), bool))
        props.append(props_i)
    sampler = finetune.WindowSampler(props, train.boxes, train.labels, train.sizes, 0.5, 0.1, 0.5)
    assert not np.isin(sampler.foreground[:, 0], [len(train) - 2, len(train) - 1]).any()
    batch = sampler.sample(np.random.default_rng(0), 16, 0.25)
    assert batch["boxes"].shape == (16, 4)
    maps = stages.split_maps(det, train, det.scales(1))
    out = str(tmp_path)
    svms = stages.stage_svm(config, out, det, "svm", det.head_params, train, props, maps)
    assert stages.stage_done(out, "svm") is not None
    assert np.isfinite(np.asarray(svms.scores(np.zeros((2, det.head.fc_dim), np.float32)))).all()
    # Box regression on one training image and the two (each solve is a 1601-wide
    # Cholesky per class: the whole split's ten classes would take seconds).
    keep = [0, len(train) - 2, len(train) - 1]
    small = stages.Split(*([getattr(train, f)[i] for i in keep] for f in _SPLIT_FIELDS))
    small_maps = [[m[i] for i in keep] for m in maps]
    small_props = [props[i] for i in keep]
    regressors = stages.stage_bbox(config, out, det, small, small_props, small_maps)
    assert stages.stage_done(out, "bbox") is not None
    boxes = np.asarray([[4, 4, 40, 40], [10, 20, 60, 50]], np.float32)
    pooled = det.pool([small_maps[0][0]], det.scales(1), boxes, small.sizes[0])
    moved = regressors.apply(pooled, boxes, np.asarray([1, 2], np.int32), small.sizes[0])
    assert np.isfinite(np.asarray(moved)).all()
    # No object anywhere: a clear error, not a crash deep inside.
    nothing = stages.Split(*(getattr(train, f)[-2:] for f in _SPLIT_FIELDS))
    with pytest.raises(ValueError, match="no ground-truth boxes"):
        stages.stage_svm(
            config, str(tmp_path / "none"), det, "svm", det.head_params, nothing, props[-2:],
            [m[-2:] for m in maps],
        )  # fmt: skip
