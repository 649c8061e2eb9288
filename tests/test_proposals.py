"""Tests of selective-search proposals and their on-disk cache."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

from spp_jax.data import BadImageError
from spp_jax.detection import proposals
from spp_jax.detection.proposals import ProposalCache, selective_search

cv2 = pytest.importorskip("cv2")
if not hasattr(cv2, "ximgproc"):
    pytest.skip("OpenCV without contrib modules", allow_module_level=True)


def _image(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A small RGB test image: a few flat rectangles on a noisy background."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 110, (h, w, 3)).astype(np.uint8)
    for _ in range(4):
        y0, x0 = int(rng.integers(0, h - 8)), int(rng.integers(0, w - 8))
        y1, x1 = int(rng.integers(y0 + 6, h + 1)), int(rng.integers(x0 + 6, w + 1))
        image[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    return image


def _opencv_boxes(image: np.ndarray, mode: str = "fast") -> set[tuple[float, ...]]:
    """OpenCV's own output as a set of (x, y, x + w, y + h) boxes."""
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image[..., ::-1]))
    ss.switchToSelectiveSearchFast() if mode == "fast" else ss.switchToSelectiveSearchQuality()
    return {(x, y, x + w, y + h) for x, y, w, h in ss.process().tolist()}


def _as_set(boxes: np.ndarray) -> set[tuple[float, ...]]:
    return {tuple(b) for b in boxes.tolist()}


# --------------------------------------------------------------------------- selective_search


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boxes_are_opencvs_in_pixel_edges(seed):
    image = _image(seed)
    boxes = selective_search(image, max_boxes=None, min_size=0)
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(_as_set(boxes)) == len(boxes)  # no duplicates
    assert _as_set(boxes) == _opencv_boxes(image)
    h, w = image.shape[:2]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 3] <= h).all() and (boxes[:, 2] > boxes[:, 0]).all()
    assert (boxes[:, 3] > boxes[:, 1]).all()
    assert (0, 0, w, h) in _as_set(boxes)  # the top of a hierarchy: the whole image


def test_a_flat_rectangle_is_found_exactly():
    image = np.full((40, 56, 3), 30, np.uint8)
    image[5:25, 12:44] = (200, 40, 90)  # pixel rows 5..24, columns 12..43
    assert (12, 5, 44, 25) in _as_set(selective_search(image, min_size=0))


def test_deterministic_order_whatever_the_c_random_state():
    image = _image(3)
    first = selective_search(image, max_boxes=None, min_size=0)
    libc = ctypes.CDLL(None)
    libc.srand(12345)
    for _ in range(7):
        libc.rand()
    second = selective_search(image, max_boxes=None, min_size=0)
    np.testing.assert_array_equal(first, second)  # same boxes, same order
    other = selective_search(image, max_boxes=None, min_size=0, seed=7)
    assert _as_set(other) == _as_set(first)  # the seed changes the order only
    assert not np.array_equal(other, first)


def test_max_boxes_and_min_size():
    image = _image(4, 64, 80)
    everything = selective_search(image, max_boxes=None, min_size=0)
    big = selective_search(image, max_boxes=None, min_size=12)
    widths, heights = big[:, 2] - big[:, 0], big[:, 3] - big[:, 1]
    assert (widths >= 12).all() and (heights >= 12).all()
    keep = ((everything[:, 2:] - everything[:, :2]) >= 12).all(axis=1)
    assert 0 < keep.sum() < len(everything)
    np.testing.assert_array_equal(big, everything[keep])  # same order, small ones dropped
    np.testing.assert_array_equal(selective_search(image, max_boxes=5, min_size=12), big[:5])
    assert len(selective_search(image, max_boxes=10**6, min_size=0)) == len(everything)


def test_max_side_searches_a_downscaled_copy_and_maps_the_boxes_back():
    image = np.full((400, 600, 3), 30, np.uint8)
    image[120:280, 200:440] = (220, 200, 40)
    boxes = selective_search(image, min_size=8, max_side=150)  # a 150 x 100 copy
    assert len(boxes) > 0 and len(np.unique(boxes, axis=0)) == len(boxes)
    assert (boxes >= 0).all() and (boxes[:, 2:] <= [600, 400]).all()
    assert (boxes[:, 2:] - boxes[:, :2] >= 8).all()  # min_size in the image's pixels
    assert (np.abs(boxes - [200, 120, 440, 280]).max(axis=1) <= 4).any()  # 1 px of the copy
    np.testing.assert_array_equal(  # no larger than max_side: the image itself
        selective_search(image, min_size=8, max_side=600), selective_search(image, min_size=8)
    )
    with pytest.raises(ValueError, match="max_side=8"):
        selective_search(image, max_side=8)


def test_compute_proposals_passes_every_setting_to_the_cache(tmp_path):
    image = _image(3, 96, 128)
    cache = proposals.compute_proposals(
        [("a", image)], tmp_path, min_size=4, max_boxes=20, max_side=64, num_workers=0,
        progress=False,
    )  # fmt: skip
    assert ProposalCache.open(tmp_path).params == cache.params
    assert (cache.params["max_side"], cache.params["max_boxes"]) == (64, 20)
    np.testing.assert_array_equal(
        cache.get("a"), selective_search(image, min_size=4, max_boxes=20, max_side=64)
    )


def test_input_conversions():
    rgb = _image(5)
    gray = rgb[..., 1].copy()
    ref = selective_search(np.repeat(gray[..., None], 3, axis=2), max_boxes=None)
    np.testing.assert_array_equal(selective_search(gray, max_boxes=None), ref)
    np.testing.assert_array_equal(selective_search(gray[..., None], max_boxes=None), ref)
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 17, np.uint8)], axis=2)
    ref_rgb = selective_search(rgb, max_boxes=None)
    np.testing.assert_array_equal(selective_search(rgba, max_boxes=None), ref_rgb)
    deep = (rgb.astype(np.uint16) << 8) | 0xAB  # 16-bit: the high byte counts
    np.testing.assert_array_equal(selective_search(deep, max_boxes=None), ref_rgb)
    # Channel order matters (OpenCV converts from BGR to HSV and Lab): RGB is expected.
    assert selective_search(rgb[..., ::-1].copy(), max_boxes=None).shape[1] == 4


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\) is not an image"),
        (np.zeros((2, 4, 4, 3), np.uint8), r"shape \(2, 4, 4, 3\)"),
        (np.zeros(5, np.uint8), r"shape \(5,\)"),
        (np.zeros((0, 4, 3), np.uint8), r"shape \(0, 4, 3\) is empty"),
        (np.zeros((4, 4, 3), np.float32), "dtype float32 is not supported; expected uint8"),
        (np.zeros((4, 4, 3), bool), "dtype bool"),
    ],
)
def test_bad_images(image, match):
    with pytest.raises(ValueError, match=match):
        selective_search(image)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "slow"}, "mode='slow' is not supported; expected one of"),
        ({"max_boxes": 0}, "max_boxes=0"),
        ({"max_boxes": 2.5}, "max_boxes=2.5"),
        ({"min_size": -1}, "min_size=-1"),
        ({"min_size": float("nan")}, "min_size=nan"),
        ({"seed": -1}, "seed=-1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        selective_search(_image(0), **kwargs)


def test_quality_mode_finds_more():
    image = _image(6)
    fast = selective_search(image, max_boxes=None, min_size=0)
    quality = selective_search(image, mode="quality", max_boxes=None, min_size=0)
    assert _as_set(quality) == _opencv_boxes(image, "quality")
    assert len(quality) > len(fast)


def test_importing_detection_does_not_import_opencv_or_tensorflow():
    code = (
        "import sys, spp_jax.detection, spp_jax.detection.proposals;"
        "assert 'cv2' not in sys.modules, 'cv2';"
        "assert 'tensorflow' not in sys.modules, 'tensorflow'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- ProposalCache


def _encode(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return buf.tobytes()


def test_cache_reads_back_what_selective_search_gives(tmp_path):
    images = {f"img{i}": _image(10 + i) for i in range(4)}
    png_path = str(tmp_path / "img3.png")
    with open(png_path, "wb") as f:
        f.write(_encode(images["img3"]))
    sources = [
        ("img0", images["img0"]),  # array
        ("img1", _encode(images["img1"])),  # encoded bytes
        ("dir/img 2", images["img2"]),  # ids may hold any character
        ("img3", png_path),  # a path
    ]
    cache = ProposalCache(tmp_path / "cache", min_size=4)
    stats = cache.compute(sources, num_workers=0, progress=False)
    assert (stats.computed, stats.cached, stats.skipped) == (4, 0, [])
    assert stats.seconds > 0 and stats.seconds_per_image == stats.seconds / 4
    assert cache.ids() == sorted(["img0", "img1", "dir/img 2", "img3"]) and len(cache) == 4
    for image_id, image in zip(["img0", "img1", "dir/img 2", "img3"], images.values(), strict=True):
        assert image_id in cache
        np.testing.assert_array_equal(cache.get(image_id), selective_search(image, min_size=4))
    # Read back by a fresh handle with the stored settings.
    reopened = ProposalCache.open(tmp_path / "cache")
    assert reopened.params["min_size"] == 4.0
    np.testing.assert_array_equal(reopened.get("img1"), cache.get("img1"))
    with pytest.raises(KeyError, match="no proposals for image 'img9'"):
        cache.get("img9")
    assert "img9" not in cache


def test_cache_resumes_and_keeps_finished_work(tmp_path):
    images = [(f"im{i}", _image(20 + i)) for i in range(5)]
    cache = ProposalCache(tmp_path)
    bad = ("im_bad", b"\x89PNG\r\n\x1a\n truncated")
    # An interrupted run: the corrupt image stops it after the first two images.
    with pytest.raises(BadImageError, match="cannot read image im_bad"):
        cache.compute([*images[:2], bad, *images[2:]], num_workers=0, progress=False)
    assert cache.ids() == ["im0", "im1"]
    stamps = {i: os.stat(cache.path(i)).st_mtime_ns for i in cache.ids()}
    # A half-written file of a killed run is not an entry.
    (tmp_path / "boxes" / ".tmp-999-im2.npy").write_bytes(b"\x93NUMPY partial")
    assert "im2" not in cache and cache.ids() == ["im0", "im1"]
    stats = cache.compute([*images, bad], num_workers=0, progress=False, on_bad_image="skip")
    assert (stats.computed, stats.cached, stats.skipped) == (3, 2, ["im_bad"])
    assert cache.ids() == [f"im{i}" for i in range(5)]
    assert {i: os.stat(cache.path(i)).st_mtime_ns for i in stamps} == stamps  # not redone
    again = cache.compute(images, num_workers=0, progress=False)
    assert (again.computed, again.cached) == (0, 5)


def test_cache_process_pool_equals_in_process(tmp_path, capsys):
    images = [(f"p{i}", _encode(_image(30 + i))) for i in range(6)]
    serial = ProposalCache(tmp_path / "serial")
    serial.compute(images, num_workers=0, progress=False)
    pooled = ProposalCache(tmp_path / "pooled")
    stats = pooled.compute(iter(images), num_workers=2, total=6, progress=True)
    assert stats.computed == 6
    assert "selective search" in capsys.readouterr().err  # the progress bar
    for image_id, _ in images:
        np.testing.assert_array_equal(pooled.get(image_id), serial.get(image_id))
    # A corrupt file in the pool is reported by its path.
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(BadImageError, match=r"broken\.jpg"):
        pooled.compute([("b", str(bad))], num_workers=2, progress=False)


def test_cache_rejects_other_settings_and_bad_input(tmp_path):
    ProposalCache(tmp_path, max_boxes=100)
    with pytest.raises(ValueError, match=r"other settings.*max_boxes"):
        ProposalCache(tmp_path, max_boxes=200)
    cache = ProposalCache(tmp_path, max_boxes=100)
    with pytest.raises(ValueError, match="image id 'x' appears twice"):
        cache.compute([("x", _image(0)), ("x", _image(1))], num_workers=0, progress=False)
    with pytest.raises(ValueError, match="num_workers=-1"):
        cache.compute([], num_workers=-1)
    with pytest.raises(BadImageError, match=r"cannot read image y: y: shape \(3, 3, 2\)"):
        cache.compute([("y", np.zeros((3, 3, 2), np.uint8))], num_workers=0, progress=False)
    with pytest.raises(FileNotFoundError, match="not a proposal cache"):
        ProposalCache.open(tmp_path / "missing")
