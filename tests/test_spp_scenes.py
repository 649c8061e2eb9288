"""Tests of the built-in, offline ``spp_scenes`` TFDS detection dataset."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import spp_jax.datasets  # noqa: E402  (registers spp_scenes)
from spp_jax.datasets import spp_scenes  # noqa: E402
from spp_jax.datasets.spp_scenes import (  # noqa: E402
    CLASS_NAMES,
    DIFFICULT_HIDDEN,
    DIFFICULT_MIN_SIDE,
    MAX_ASPECT,
    MAX_OBJECTS,
    NUM_CLASSES,
    OBJECT_SIZE_RANGE,
    SIZE_RANGE,
    SppScenes,
    make_scene,
    voc_bbox,
)
from spp_jax.detection import voc  # noqa: E402

N_CHECK = 60  # scenes checked without TFDS (about 15 ms each)


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, dict, dict]]:
    return [make_scene(i, "train") for i in range(N_CHECK)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tfds.core.DatasetBuilder:
    """spp_scenes/tiny built once, with every download attempt failing the build."""

    def no_download(*args, **kwargs):
        raise AssertionError("spp_scenes must not download anything")

    data_dir = str(tmp_path_factory.mktemp("tfds_scenes"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfds.download.DownloadManager, "download", no_download)
        mp.setattr(tfds.download.DownloadManager, "download_and_extract", no_download)
        builder = tfds.builder("spp_scenes/tiny", data_dir=data_dir)
        builder.download_and_prepare()
    return builder


# --------------------------------------------------------------------------- make_scene


def test_images_and_object_counts(scenes):
    lo, hi = SIZE_RANGE
    counts = []
    for image, objects, _ in scenes:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        h, w = image.shape[:2]
        assert lo <= h <= hi and lo <= w <= hi and max(h, w) <= MAX_ASPECT * min(h, w)
        n = len(objects["labels"])
        counts.append(n)
        assert 1 <= n <= MAX_OBJECTS
        assert objects["boxes"].shape == (n, 4) and objects["boxes"].dtype == np.float32
        assert objects["labels"].dtype == np.int64
        assert objects["is_difficult"].dtype == bool and objects["is_truncated"].dtype == bool
        assert ((objects["labels"] >= 0) & (objects["labels"] < NUM_CLASSES)).all()
        x1, y1, x2, y2 = objects["boxes"].T
        assert (x1 >= 0).all() and (x1 < x2).all() and (x2 <= w).all()
        assert (y1 >= 0).all() and (y1 < y2).all() and (y2 <= h).all()
        np.testing.assert_array_equal(objects["boxes"], np.rint(objects["boxes"]))
        assert int(image.max()) - int(image.min()) > 60
    # Every count from 1 to MAX_OBJECTS occurs, and every class.
    assert set(counts) == set(range(1, MAX_OBJECTS + 1))
    labels = np.concatenate([o["labels"] for _, o, _ in scenes])
    assert set(labels.tolist()) == set(range(NUM_CLASSES))


def test_sizes_occlusion_truncation_difficulty(scenes):
    sizes = np.concatenate([m["sizes"] for _, _, m in scenes])
    shorts = np.concatenate([[min(im.shape[:2])] * len(m["sizes"]) for im, _, m in scenes])
    assert (sizes >= OBJECT_SIZE_RANGE[0] - 1e-6).all()
    assert (sizes <= OBJECT_SIZE_RANGE[1] * shorts + 1e-6).all()
    assert sizes.min() < 24 and (sizes / shorts).max() > 0.6  # both ends are used
    hidden = np.concatenate([m["hidden"] for _, _, m in scenes])
    difficult = np.concatenate([o["is_difficult"] for _, o, _ in scenes])
    truncated = np.concatenate([o["is_truncated"] for _, o, _ in scenes])
    boxes = np.concatenate([o["boxes"] for _, o, _ in scenes])
    longer = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    # The documented difficult rule, exactly.
    np.testing.assert_array_equal(
        difficult, (hidden > DIFFICULT_HIDDEN) | (longer < DIFFICULT_MIN_SIDE)
    )
    # A real mix: occluded, truncated and difficult objects, most objects easy.
    assert ((hidden > 0.2) & ~truncated).mean() > 0.05  # occluded by something drawn over it
    assert 0.05 < truncated.mean() < 0.4
    assert 0 < difficult.mean() < 0.2
    assert sum(m["num_distractor_shapes"] for _, _, m in scenes) > N_CHECK // 2


def _extent(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


def _shown(layout, k: int) -> np.ndarray:
    """How much of item k shows at each pixel, measured from rendered pixels alone.

    A rendered pixel is affine in item k's colour with slope k's visible coverage
    (everything drawn over it included), so rendering k in white and in black
    differs by exactly that coverage times 255 (up to rounding and clipping).
    """
    renders = []
    for colour in (255.0, 0.0):
        items = list(layout.items)
        items[k] = dataclasses.replace(items[k], colour=np.full(3, colour, np.float32))
        image, _ = spp_scenes._render(dataclasses.replace(layout, items=tuple(items)))
        renders.append(image.astype(np.float32))
    return (renders[0] - renders[1]).mean(axis=2) / 255.0


def test_boxes_match_what_was_drawn():
    # The box holds every pixel where the object clearly shows (coverage >= 0.55)
    # and lies within the extent of those where it may show (>= 0.45).
    checked = 0
    for index in range(25):
        _, objects, meta, layout = spp_scenes._make(index, "test", spp_scenes.DATASET_SEED)
        for box, k in zip(objects["boxes"], meta["item_index"], strict=True):
            shown = _shown(layout, int(k))
            inner, outer = _extent(shown >= 0.55), _extent(shown >= 0.45)
            assert (box[:2] <= inner[:2]).all() and (box[2:] >= inner[2:]).all(), (index, k)
            assert (box[:2] >= outer[:2]).all() and (box[2:] <= outer[2:]).all(), (index, k)
            checked += 1
    assert checked > 50


def test_hidden_objects_are_not_annotated():
    # A drawn object without an annotation shows (coverage >= 0.45) at fewer than
    # MIN_VISIBLE_PIXELS pixels, plus a margin for the measurement.
    unannotated = 0
    for split, index in [("train", 52), ("train", 169), ("validation", 62), ("validation", 106)]:
        _, _, meta, layout = spp_scenes._make(index, split, spp_scenes.DATASET_SEED)
        annotated = set(meta["item_index"].tolist())
        for k, item in enumerate(layout.items):
            if item.label >= 0 and k not in annotated:
                unannotated += 1
                assert (_shown(layout, k) >= 0.45).sum() < spp_scenes.MIN_VISIBLE_PIXELS + 5
    assert unannotated >= 4  # these scenes each hide an object (found by search)


def test_make_scene_is_deterministic_and_splits_differ():
    a, oa, _ = make_scene(4, "train")
    b, ob, _ = make_scene(4, "train")
    np.testing.assert_array_equal(a, b)
    for key in oa:
        np.testing.assert_array_equal(oa[key], ob[key])
    for other in (make_scene(4, "test")[0], make_scene(5, "train")[0]):
        assert a.shape != other.shape or not np.array_equal(a, other)


def test_make_scene_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split 'val'"):
        make_scene(0, "val")
    with pytest.raises(ValueError, match="index must be >= 0, got -1"):
        make_scene(-1)


def test_voc_bbox_convention():
    # A box over pixel columns 0..9 and rows 5..24 is VOC (1, 6, 10, 25), normalised.
    got = voc_bbox(np.array([[0, 5, 10, 25]]), (50, 20))
    np.testing.assert_allclose(got, [[6 / 50, 1 / 20, 25 / 50, 10 / 20]], rtol=1e-6)


# --------------------------------------------------------------------------- TFDS builder


def test_registered_with_configs():
    assert "spp_scenes" in tfds.list_builders()
    assert tfds.builder_cls("spp_scenes") is SppScenes
    assert spp_jax.datasets.SppScenes is SppScenes
    configs = {c.name: c for c in SppScenes.BUILDER_CONFIGS}
    assert set(configs) == {"default", "tiny"}
    d = configs["default"]
    assert (d.num_train, d.num_validation, d.num_test) == (300, 100, 300)


def test_tiny_build_matches_make_scene(tiny):
    info = tiny.info
    config = tiny.builder_config
    sizes = {
        "train": config.num_train,
        "validation": config.num_validation,
        "test": config.num_test,
    }
    assert sizes == {"train": 6, "validation": 4, "test": 4}
    assert info.features["objects"]["label"].names == list(CLASS_NAMES)
    assert set(info.features.keys()) == {
        "image",
        "image/filename",
        "objects",
        "labels",
        "labels_no_difficult",
    }
    assert set(info.features["objects"].keys()) == {"bbox", "label", "is_difficult", "is_truncated"}
    for split, n in sizes.items():
        assert info.splits[split].num_examples == n
        ds = tiny.as_dataset(split=split, shuffle_files=False)
        seen = set()
        for ex in tfds.as_numpy(ds):
            name = ex["image/filename"].decode()
            assert name.startswith(f"{split}_") and name.endswith(".png")
            index = int(name[len(split) + 1 : -4])
            seen.add(index)
            image, objects, _ = make_scene(index, split)
            np.testing.assert_array_equal(ex["image"], image)  # PNG is lossless
            # The shared VOC reader recovers the exact pixel boxes.
            got = voc.example_boxes(ex)
            np.testing.assert_array_equal(got["boxes"], objects["boxes"])
            np.testing.assert_array_equal(got["labels"], objects["labels"])
            np.testing.assert_array_equal(got["difficult"], objects["is_difficult"])
            np.testing.assert_array_equal(got["truncated"], objects["is_truncated"])
            np.testing.assert_array_equal(ex["labels"], np.unique(objects["labels"]))
            np.testing.assert_array_equal(
                ex["labels_no_difficult"],
                np.unique(objects["labels"][~objects["is_difficult"]]),
            )
        assert seen == set(range(n))
