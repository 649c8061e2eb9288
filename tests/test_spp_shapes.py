"""Tests of the built-in, offline ``spp_shapes`` TFDS dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import spp_jax.datasets  # noqa: E402  (registers spp_shapes)
from spp_jax.datasets.spp_shapes import (  # noqa: E402
    CLASS_NAMES,
    MAX_ASPECT,
    NUM_CLASSES,
    SCALE_RANGE,
    SIZE_RANGE,
    SppShapes,
    make_example,
)

N_CHECK = 200  # examples of the default label assignment checked without TFDS


@pytest.fixture(scope="module")
def examples() -> list[tuple[np.ndarray, int, dict]]:
    return [make_example(i, "train") for i in range(N_CHECK)]


@pytest.fixture(scope="module")
def tiny_builds(tmp_path_factory) -> list[tuple[str, tfds.core.DatasetBuilder]]:
    """The tiny config built twice, in two data directories: ``[(data_dir, builder)]``."""
    builds = []
    for k in range(2):
        data_dir = str(tmp_path_factory.mktemp(f"tfds{k}"))
        builder = tfds.builder("spp_shapes/tiny", data_dir=data_dir)
        builder.download_and_prepare()
        builds.append((data_dir, builder))
    return builds


def _read(builder, split: str) -> dict[int, dict]:
    return {
        int(ex["index"]): ex
        for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
    }


# --------------------------------------------------------------------------- make_example


def test_images_have_varied_sizes_within_range(examples):
    lo, hi = SIZE_RANGE
    shapes = set()
    for image, _, _ in examples:
        assert image.dtype == np.uint8
        assert image.ndim == 3 and image.shape[2] == 3
        h, w = image.shape[:2]
        assert lo <= h <= hi and lo <= w <= hi
        assert max(h, w) <= MAX_ASPECT * min(h, w)
        shapes.add((h, w))
    assert len(shapes) > N_CHECK // 2
    aspects = [im.shape[1] / im.shape[0] for im, _, _ in examples]
    assert min(aspects) < 0.7 and max(aspects) > 1.4  # portrait and landscape
    # Not blank: real contrast in every image.
    assert all(int(im.max()) - int(im.min()) > 60 for im, _, _ in examples)


def test_labels_balanced_and_all_classes_present(examples):
    labels = np.array([label for _, label, _ in examples])
    assert labels.min() >= 0 and labels.max() < NUM_CLASSES
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    np.testing.assert_array_equal(counts, N_CHECK // NUM_CLASSES)
    # The documented assignment: example i has class i % NUM_CLASSES.
    np.testing.assert_array_equal(labels, np.arange(N_CHECK) % NUM_CLASSES)
    assert [meta["class_name"] for _, _, meta in examples[:NUM_CLASSES]] == list(CLASS_NAMES)


def test_object_present_at_varied_scales(examples):
    scales = np.array([meta["scale"] for _, _, meta in examples])
    assert SCALE_RANGE[0] <= scales.min() and scales.max() <= SCALE_RANGE[1]
    assert scales.min() < 0.25 and scales.max() > 0.7  # spans most of a factor of 4
    # Each class on its own also spans small and large sizes.
    labels = np.array([label for _, label, _ in examples])
    for c in range(NUM_CLASSES):
        assert scales[labels == c].max() / scales[labels == c].min() > 1.5
    for image, _, meta in examples:
        h, w = image.shape[:2]
        y0, x0, y1, x1 = meta["bbox"]
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        # The drawn object's extent matches its declared scale.
        ratio = max(y1 - y0, x1 - x0) / (meta["scale"] * min(h, w))
        assert 0.6 < ratio < 1.3, (meta, ratio)


def test_object_drawn_in_its_box_in_its_colour(examples):
    # Pixels close to the object's colour fill a good part of its box (at least 15% for
    # the thinnest outline) and almost nothing elsewhere (the object colour is far from
    # the background's; only some distractors share it): the object is drawn, where the
    # box says, in the colour meta says.
    for image, label, meta in examples:
        y0, x0, y1, x1 = meta["bbox"]
        near = np.linalg.norm(image - np.array(meta["colour"], np.float32), axis=-1) < 20
        box = near[y0:y1, x0:x1]
        inside = box.mean()
        outside = (near.sum() - box.sum()) / max(1, near.size - box.size)
        assert inside > 0.1 and outside < 0.02, (label, meta, inside, outside)


def test_make_example_is_deterministic():
    a, la, ma = make_example(7, "train")
    b, lb, mb = make_example(7, "train")
    np.testing.assert_array_equal(a, b)
    assert la == lb and ma == mb
    c, _, _ = make_example(7, "test")
    d, _, _ = make_example(8, "train")
    assert a.shape != c.shape or not np.array_equal(a, c)
    assert a.shape != d.shape or not np.array_equal(a, d)


def test_make_example_rejects_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        make_example(0, "validation")
    with pytest.raises(ValueError, match="index"):
        make_example(-1, "train")


# --------------------------------------------------------------------------- TFDS builder


def test_registered_with_configs():
    assert "spp_shapes" in tfds.list_builders()
    assert tfds.builder_cls("spp_shapes") is SppShapes
    configs = {c.name: c for c in SppShapes.BUILDER_CONFIGS}
    assert set(configs) == {"default", "tiny"}
    assert (configs["default"].num_train, configs["default"].num_test) == (3000, 1000)
    assert str(SppShapes.VERSION) == "1.0.0"
    assert "1.0.0" in SppShapes.RELEASE_NOTES
    assert spp_jax.datasets.SppShapes is SppShapes


def test_tiny_build_offline(tiny_builds):
    _, builder = tiny_builds[0]
    config = builder.builder_config
    info = builder.info
    assert info.splits["train"].num_examples == config.num_train == 40
    assert info.splits["test"].num_examples == config.num_test == 20
    assert info.supervised_keys == ("image", "label")
    assert info.features["label"].num_classes == NUM_CLASSES
    assert info.features["label"].names == list(CLASS_NAMES)
    assert str(info.version) == "1.0.0"

    lo, hi = SIZE_RANGE
    for split, n in (("train", 40), ("test", 20)):
        examples = _read(builder, split)
        assert sorted(examples) == list(range(n))
        shapes = set()
        for index, ex in examples.items():
            image = ex["image"]
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert lo <= image.shape[0] <= hi and lo <= image.shape[1] <= hi
            assert 0 <= ex["label"] < NUM_CLASSES
            shapes.add(image.shape)
            # PNG is lossless: the stored example is exactly make_example's.
            expected, label, meta = make_example(index, split)
            np.testing.assert_array_equal(image, expected)
            assert ex["label"] == label
            assert math.isclose(float(ex["scale"]), meta["scale"], rel_tol=1e-6)
        assert len(shapes) > n // 2
        assert set(int(ex["label"]) for ex in examples.values()) == set(range(NUM_CLASSES))


def test_two_builds_identical(tiny_builds):
    (_, first), (_, second) = tiny_builds
    assert first.data_dir != second.data_dir
    for split in ("train", "test"):
        a, b = _read(first, split), _read(second, split)
        assert a.keys() == b.keys()
        for index in a:
            np.testing.assert_array_equal(a[index]["image"], b[index]["image"])
            assert a[index]["label"] == b[index]["label"]
            assert a[index]["scale"] == b[index]["scale"]
        # Same records in the same order (TFDS's shuffle is keyed, hence deterministic).
        order_a = [int(ex["index"]) for ex in tfds.as_numpy(first.as_dataset(split=split))]
        order_b = [int(ex["index"]) for ex in tfds.as_numpy(second.as_dataset(split=split))]
        assert order_a == order_b


def test_tfds_load_reads_back(tiny_builds):
    data_dir, _ = tiny_builds[0]
    ds = tfds.load("spp_shapes/tiny", split="test", data_dir=data_dir, as_supervised=True)
    pairs = list(tfds.as_numpy(ds))
    assert len(pairs) == 20
    for image, label in pairs:
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert 0 <= label < NUM_CLASSES


def test_split_generators_download_nothing(tmp_path, monkeypatch):
    # Any attempt to download fails the build; building still works.
    def no_download(*args, **kwargs):
        raise AssertionError("spp_shapes must not download anything")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", no_download)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", no_download)
    builder = SppShapes(config="tiny", data_dir=str(tmp_path))
    builder.download_and_prepare()
    assert builder.info.splits["test"].num_examples == 20
