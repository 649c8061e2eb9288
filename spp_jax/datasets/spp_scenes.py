"""``spp_scenes``: a synthetic, offline object detection dataset for SPP-net.

Each image is a cluttered scene holding 1 to 6 objects of the ten
:mod:`~spp_jax.datasets.spp_shapes` classes (:data:`CLASS_NAMES`, drawn with the
same code), so a classifier trained on ``spp_shapes`` is this dataset's
"ImageNet pre-training", as in SPP-net's detection (paper section 4). What makes
it a test of detection rather than a toy:

* Object sizes (the side of the object's bounding square) from 16 px to 80 % of
  the image's short side, log-uniform (:data:`OBJECT_SIZE_RANGE`); images of
  varied size and aspect ratio (:data:`SIZE_RANGE`, :data:`MAX_ASPECT`).
* Occlusion in z-order: objects and unlabelled distractor shapes (ellipse,
  crescent, star, L-shape: not classes) are drawn in a random order over each
  other; each object's colour differs from those drawn before it.
* Truncation: about 30 % of objects may cross the image border.
* Clutter: a colour gradient with coarse blotches, soft patches of grating or
  noise texture, and small dots and line segments (some in an object's colour).

Annotations follow TFDS ``voc`` (features ``image``, ``image/filename``,
``objects/{bbox, label, is_difficult, is_truncated}``, ``labels``,
``labels_no_difficult``), with the same box convention, so one reader
(:func:`spp_jax.detection.voc.example_boxes`) serves both datasets:

* An object's box is the **visible** extent of the object: the pixels where its
  drawn coverage, after everything drawn over it, is at least 0.5, clipped to
  the image. In continuous pixel edges it is ``(x1, y1, x2, y2)`` (integers; the
  box covers pixel columns ``x1 .. x2 - 1``).
* ``objects/bbox`` stores it as VOC's 1-based inclusive pixel indices
  normalised like TFDS ``voc`` does:
  ``((y1 + 1) / H, (x1 + 1) / W, y2 / H, x2 / W)``.
* ``is_truncated``: some of the object lies outside the image.
* ``is_difficult``: more than :data:`DIFFICULT_HIDDEN` of the object's area is
  hidden (occluded, or outside the image), or its visible box is under
  :data:`DIFFICULT_MIN_SIDE` px on its longer side. VOC's evaluation ignores
  these (neither true nor false positives).
* Objects hidden entirely (fewer than :data:`MIN_VISIBLE_PIXELS` visible pixels)
  are not annotated; every image keeps at least one annotated object.

Nothing is downloaded: every example is a function of its split and index
(:func:`make_scene`, seeded by ``np.random.default_rng([DATASET_SEED, 1,
SPLIT_IDS[split], index])``), so every build holds the same examples. It is built as
:mod:`~spp_jax.datasets.spp_shapes` is, with ``tfds.builder('spp_scenes')``.

Configs (``tfds.builder("spp_scenes/<config>")``):

* ``default``: 300 train, 100 validation and 300 test images (builds in
  seconds). Sized for the detection system's default run (train a backbone on
  ``spp_shapes``, selective search, fine-tuning, SVMs, evaluation) in under 20
  minutes on two CPU cores: images about 240 x 240 keep selective search to a
  few minutes for the 700 images, once (cached); the 300 test
  images hold about 1,070 objects (1,019 not difficult), so each class's AP
  rests on about 100 ground truths, and the training images as many, enough for
  per-class SVMs and box regressors.
* ``tiny``: 6 train, 4 validation and 4 test images (the first of ``default``'s);
  for tests.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

from spp_jax.datasets import spp_shapes as _shapes
from spp_jax.datasets.spp_shapes import CLASS_NAMES, DATASET_SEED, NUM_CLASSES

__all__ = [
    "CLASS_NAMES",
    "DATASET_SEED",
    "DIFFICULT_HIDDEN",
    "DIFFICULT_MIN_SIDE",
    "DISTRACTOR_NAMES",
    "MAX_ASPECT",
    "MAX_OBJECTS",
    "MIN_VISIBLE_PIXELS",
    "NUM_CLASSES",
    "OBJECT_SIZE_RANGE",
    "SIZE_RANGE",
    "SPLIT_IDS",
    "SppScenes",
    "SppScenesConfig",
    "make_scene",
    "voc_bbox",
]

#: Inclusive range of image heights and widths, in pixels.
SIZE_RANGE: tuple[int, int] = (160, 320)
#: Largest ratio of the long side to the short side of an image.
MAX_ASPECT = 2.0
#: Objects per image (drawn; those hidden entirely are not annotated).
MAX_OBJECTS = 6
#: Object size range: smallest side in pixels, largest as a fraction of the short side.
OBJECT_SIZE_RANGE: tuple[float, float] = (16.0, 0.8)
#: An object with more than this fraction of its area hidden is difficult.
DIFFICULT_HIDDEN = 0.6
#: An object whose visible box's longer side is under this many pixels is difficult.
DIFFICULT_MIN_SIDE = 12
#: Objects with fewer visible pixels than this are not annotated.
MIN_VISIBLE_PIXELS = 10
#: Example ``i`` of split ``s`` uses ``np.random.default_rng([DATASET_SEED, 1, SPLIT_IDS[s], i])``.
SPLIT_IDS: dict[str, int] = {"train": 0, "validation": 1, "test": 2}
#: Unlabelled distractor shapes (none of them is a class).
DISTRACTOR_NAMES: tuple[str, ...] = ("ellipse", "crescent", "star", "l_shape")

_TRUNCATE_PROB = 0.3  # objects whose centre may lie anywhere in the image
_MIN_CONTRAST = 80.0  # RGB distance between an item's colour and the mean background
_MIN_ITEM_CONTRAST = 60.0  # ... and the colours of the items drawn before it
_WINDOW = 1.45  # drawing window half-size over the object's half-size

_DESCRIPTION = """\
Synthetic detection scenes for SPP-net experiments, generated offline with NumPy. Each
image (sides in [160, 320], aspect ratio at most 2:1) holds 1-6 objects of the ten
spp_shapes classes, 16 px to 80% of the short side (log-uniform), occluding each other
and unlabelled distractor shapes in z-order, some truncated at the borders, on textured,
cluttered backgrounds. Boxes are the visible extent of each object; heavily hidden or
tiny objects are marked difficult. Features and box convention follow TFDS voc.
"""


# ---------------------------------------------------------------------------
# Distractor shapes (signed distances in object coordinates, as in spp_shapes).
# ---------------------------------------------------------------------------


def _box_sdf(u: np.ndarray, v: np.ndarray, cu: float, cv: float, hu: float, hv: float):
    return np.maximum(np.abs(u - cu) - hu, np.abs(v - cv) - hv)


def _sdf_ellipse(u, v, rng, r):
    b = rng.uniform(0.3, 0.55)  # semi-minor axis; semi-major 0.95: clearly not a circle
    return (np.hypot(u / 0.95, v / b) - 1.0) * b


def _sdf_crescent(u, v, rng, r):
    outer = np.hypot(u, v) - 0.9
    inner = np.hypot(u - rng.uniform(0.3, 0.5), v) - 0.75
    return np.maximum(outer, -inner)


def _sdf_star(u, v, rng, r):
    points = int(rng.integers(5, 8))
    theta = np.arctan2(v, u)
    radius = 0.62 + 0.3 * np.cos(points * theta)
    return (np.hypot(u, v) - radius) * 0.6


def _sdf_l_shape(u, v, rng, r):
    t = rng.uniform(0.25, 0.4)
    upright = _box_sdf(u, v, -0.9 + t, 0.0, t, 0.9)
    foot = _box_sdf(u, v, 0.0, 0.9 - t, 0.9, t)
    return np.minimum(upright, foot)


_DISTRACTOR_SDFS = (_sdf_ellipse, _sdf_crescent, _sdf_star, _sdf_l_shape)


# ---------------------------------------------------------------------------
# Layout (every random choice) and rendering (a function of the layout).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Item:
    """A shape to draw: an object (``label >= 0``) or a distractor (``label < 0``)."""

    label: int  # class, or -1 - distractor index
    cy: float
    cx: float
    r: float  # half of the bounding square's side, pixels
    rotation: float
    stretch: float
    colour: np.ndarray
    seed: int  # the shape's own details (radii, stripe counts, ...)

    def alpha(self) -> tuple[int, int, np.ndarray]:
        """Coverage over the item's unclipped window: ``(y0, x0, (wh, ww) float32)``."""
        extent = _WINDOW * self.r
        y0, x0 = math.floor(self.cy - extent), math.floor(self.cx - extent)
        y1, x1 = math.ceil(self.cy + extent) + 1, math.ceil(self.cx + extent) + 1
        py, px = _shapes._grid(y0, y1, x0, x1)
        sdf = _shapes._SDFS[self.label] if self.label >= 0 else _DISTRACTOR_SDFS[-1 - self.label]
        rng = np.random.default_rng(self.seed)
        a = _shapes._shape_coverage(
            sdf, py - self.cy, px - self.cx, self.rotation, self.r, self.stretch, rng
        )
        return y0, x0, a.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Layout:
    background: np.ndarray  # float32 (H, W, 3): gradient, blotches, texture, dots
    items: tuple[_Item, ...]  # in drawing (z) order, bottom first
    noise_seed: int
    noise_std: float


def _pick_colour(rng: np.random.Generator, mean_bg: np.ndarray, others: list[np.ndarray]):
    colour = rng.uniform(0, 255, 3)
    for _ in range(100):
        if np.linalg.norm(colour - mean_bg) >= _MIN_CONTRAST and all(
            np.linalg.norm(colour - o) >= _MIN_ITEM_CONTRAST for o in others
        ):
            break
        colour = rng.uniform(0, 255, 3)
    return colour.astype(np.float32)


def _add_texture(canvas: np.ndarray, rng: np.random.Generator, short: int) -> None:
    """Adds 1-3 soft-edged patches of grating or value-noise texture, in place."""
    h, w = canvas.shape[:2]
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        sigma = rng.uniform(0.1, 0.3) * short
        window = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma**2))
        if rng.random() < 0.5:  # grating with a random orientation and period
            theta = rng.uniform(0, math.pi)
            period = rng.uniform(4.0, 16.0)
            pattern = np.cos(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
        else:  # value noise, a few pixels per cell
            cells = max(2, int(min(h, w) / rng.uniform(3.0, 8.0)))
            pattern = _shapes._upsample(
                rng.normal(0, 1, (cells, cells, 1)).astype(np.float32), h, w
            )
            pattern = pattern[..., 0] / max(1e-6, float(np.abs(pattern).max()))
        direction = rng.normal(0, 1, 3)
        direction /= np.linalg.norm(direction)
        amplitude = rng.uniform(10.0, 30.0)
        canvas += (window * pattern)[..., None] * (amplitude * direction).astype(np.float32)


def _place(rng: np.random.Generator, r: float, h: int, w: int, truncate: bool):
    """A centre ``(cy, cx)``: anywhere in the image, or keeping the object inside."""
    if truncate:
        return float(rng.uniform(0, h)), float(rng.uniform(0, w))
    my, mx = min(1.3 * r, h / 2), min(1.3 * r, w / 2)
    return float(rng.uniform(my, h - my)), float(rng.uniform(mx, w - mx))


def _layout(rng: np.random.Generator) -> _Layout:
    h, w = _shapes._image_size(rng, SIZE_RANGE, MAX_ASPECT)
    short = min(h, w)
    canvas, mean_bg = _shapes._background(rng, h, w, 6)
    _add_texture(canvas, rng, short)

    # Objects and distractor shapes, in a random z-order.
    num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
    num_distractors = int(rng.integers(0, 4))
    kinds = [int(rng.integers(NUM_CLASSES)) for _ in range(num_objects)]
    kinds += [-1 - int(rng.integers(len(DISTRACTOR_NAMES))) for _ in range(num_distractors)]
    order = rng.permutation(len(kinds))
    log_lo, log_hi = math.log(OBJECT_SIZE_RANGE[0]), math.log(OBJECT_SIZE_RANGE[1] * short)
    items: list[_Item] = []
    for k in order:
        label = kinds[k]
        if label >= 0:
            size = math.exp(rng.uniform(log_lo, log_hi))
            rotation = float(rng.uniform(-_shapes._MAX_ROTATION, _shapes._MAX_ROTATION))
            truncate = bool(rng.random() < _TRUNCATE_PROB)
        else:
            size = math.exp(rng.uniform(math.log(12.0), math.log(0.5 * short)))
            rotation = float(rng.uniform(0, 2 * math.pi))
            truncate = bool(rng.random() < _TRUNCATE_PROB)
        r = size / 2
        cy, cx = _place(rng, r, h, w, truncate)
        colour = _pick_colour(rng, mean_bg, [it.colour for it in items])
        items.append(
            _Item(
                label=label,
                cy=cy,
                cx=cx,
                r=r,
                rotation=rotation,
                stretch=float(rng.uniform(0.9, 1.1)),
                colour=colour,
                seed=int(rng.integers(2**63)),
            )
        )

    # Small dots and segments under everything; some share the first object's colour.
    first_object = next(it for it in items if it.label >= 0)
    _shapes._draw_distractors(canvas, rng, first_object.colour, short)
    return _Layout(
        background=canvas,
        items=tuple(items),
        noise_seed=int(rng.integers(2**63)),
        noise_std=float(rng.uniform(1, 4)),
    )


def _clip_window(y0: int, x0: int, a: np.ndarray, h: int, w: int):
    """The part of window ``a`` at ``(y0, x0)`` inside ``(h, w)``: ``(ys, xs, sub)``."""
    ys = slice(max(0, y0), min(h, y0 + a.shape[0]))
    xs = slice(max(0, x0), min(w, x0 + a.shape[1]))
    sub = a[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return ys, xs, sub


def _render(layout: _Layout, omit: int | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draws the layout (skipping item ``omit``); returns the image and each item's coverage.

    Each entry of the list describes one item (in z-order): ``full`` (pixels with
    coverage >= 0.5 anywhere, also outside the image), ``inside`` (those inside
    the image) and ``visible`` (a bool ``(H, W)`` map: coverage after everything
    drawn over it >= 0.5).
    """
    canvas = layout.background.copy()
    h, w = canvas.shape[:2]
    windows = [it.alpha() for it in layout.items]
    for k, (item, (y0, x0, a)) in enumerate(zip(layout.items, windows, strict=True)):
        if k == omit:
            continue
        ys, xs, sub = _clip_window(y0, x0, a, h, w)
        patch = canvas[ys, xs]
        patch += sub[..., None] * (item.colour - patch)
    coverage = []
    for k, (y0, x0, a) in enumerate(windows):
        visible = np.zeros((h, w), np.float32)
        ys, xs, sub = _clip_window(y0, x0, a, h, w)
        visible[ys, xs] = sub
        for y0j, x0j, aj in windows[k + 1 :]:
            ysj, xsj, subj = _clip_window(y0j, x0j, aj, h, w)
            visible[ysj, xsj] *= 1.0 - subj
        coverage.append(
            {
                "full": int((a >= 0.5).sum()),
                "inside": int((sub >= 0.5).sum()),
                "visible": visible >= 0.5,
            }
        )
    noise = np.random.default_rng(layout.noise_seed).standard_normal(canvas.shape, np.float32)
    canvas += layout.noise_std * noise
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), coverage


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def make_scene(
    index: int, split: str = "train", *, seed: int = DATASET_SEED
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Computes scene ``index`` of ``split``, deterministically, with NumPy only.

    Args:
      index: the example's index within its split, ``>= 0``.
      split: ``"train"``, ``"validation"`` or ``"test"`` (different random streams).
      seed: base seed; the dataset uses :data:`DATASET_SEED`.

    Returns:
      ``(image, objects, meta)``. ``image``: uint8 ``(H, W, 3)``, ``H`` and ``W``
      in :data:`SIZE_RANGE`. ``objects`` (``n >= 1`` annotated objects, bottom
      first in z-order): ``boxes`` float32 ``(n, 4)`` visible extents as
      ``(x1, y1, x2, y2)`` integer pixel edges, ``labels`` int64 ``(n,)`` in
      ``[0, NUM_CLASSES)``, ``is_difficult`` and ``is_truncated`` bool ``(n,)``.
      ``meta``: ``hidden`` float ``(n,)`` (fraction of each object's area not
      visible: occluded or outside the image), ``sizes`` float ``(n,)`` (the
      object's bounding-square side in pixels), ``item_index`` int ``(n,)``
      (each object's position in the drawing order, distractors included),
      ``num_items`` and ``num_distractor_shapes``.

    Raises:
      ValueError: unknown ``split`` or negative ``index``.

    Examples:
      >>> image, objects, meta = make_scene(3, "train")
      >>> image.dtype, image.shape[2], objects["boxes"].shape[1]
      (dtype('uint8'), 3, 4)
      >>> 1 <= len(objects["labels"]) <= MAX_OBJECTS
      True
      >>> bool((make_scene(3, "train")[0] == image).all())
      True
    """
    image, objects, meta, _ = _make(index, split, seed)
    return image, objects, meta


def _make(index: int, split: str, seed: int):
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, 1, SPLIT_IDS[split], index])
    while True:  # a new layout in the (rare) case that every object is hidden
        layout = _layout(rng)
        image, coverage = _render(layout)
        rows: list[tuple] = []
        for k, (item, cov) in enumerate(zip(layout.items, coverage, strict=True)):
            n_visible = int(cov["visible"].sum())
            if item.label < 0 or n_visible < MIN_VISIBLE_PIXELS:
                continue
            box = _shapes._extent(cov["visible"])
            hidden = 1.0 - n_visible / cov["full"]
            longer = max(box[2] - box[0], box[3] - box[1])
            difficult = hidden > DIFFICULT_HIDDEN or longer < DIFFICULT_MIN_SIDE
            rows.append((box, item.label, difficult, cov["inside"] < cov["full"], hidden, k))
        if rows:
            break
    objects = {
        "boxes": np.array([r[0] for r in rows], np.float32).reshape(-1, 4),
        "labels": np.array([r[1] for r in rows], np.int64),
        "is_difficult": np.array([r[2] for r in rows], bool),
        "is_truncated": np.array([r[3] for r in rows], bool),
    }
    meta = {
        "hidden": np.array([r[4] for r in rows], np.float64),
        "sizes": np.array([2 * layout.items[r[5]].r for r in rows], np.float64),
        "item_index": np.array([r[5] for r in rows], np.int64),
        "num_items": len(layout.items),
        "num_distractor_shapes": sum(it.label < 0 for it in layout.items),
    }
    return image, objects, meta, layout


def voc_bbox(boxes: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """Pixel-edge boxes to TFDS ``voc``'s stored ``bbox`` (normalised 1-based inclusive).

    Args:
      boxes: ``(n, 4)`` ``(x1, y1, x2, y2)`` integer pixel edges (``x2 > x1``).
      image_size: ``(H, W)``.

    Returns:
      float32 ``(n, 4)``: ``((y1 + 1) / H, (x1 + 1) / W, y2 / H, x2 / W)``, what
      TFDS ``voc`` stores for a VOC box ``(xmin, ymin, xmax, ymax) = (x1 + 1,
      y1 + 1, x2, y2)``.

    Examples:
      >>> voc_bbox(np.array([[0, 10, 20, 50]]), (100, 40)).tolist()
      [[0.10999999940395355, 0.02500000037252903, 0.5, 0.5]]
    """
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = image_size
    out = np.stack([(b[:, 1] + 1) / h, (b[:, 0] + 1) / w, b[:, 3] / h, b[:, 2] / w], axis=1)
    return out.astype(np.float32)


@dataclasses.dataclass(eq=False)
class SppScenesConfig(tfds.core.BuilderConfig):
    """A size of :class:`SppScenes`.

    Attributes:
      num_train: images in ``train`` (indices ``0 .. num_train - 1``).
      num_validation: images in ``validation``.
      num_test: images in ``test``.
    """

    num_train: int = 300
    num_validation: int = 100
    num_test: int = 300


class SppScenes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of ``spp_scenes`` (see the module docstring); needs no network."""

    name = "spp_scenes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: scenes of the 10 spp_shapes classes, TFDS voc features.",
    }
    BUILDER_CONFIGS: ClassVar[list[SppScenesConfig]] = [
        SppScenesConfig(
            name="default",
            description="300 train, 100 validation and 300 test images.",
            num_train=300,
            num_validation=100,
            num_test=300,
        ),
        SppScenesConfig(
            name="tiny",
            description="6 train, 4 validation, 4 test images (the first of 'default').",
            num_train=6,
            num_validation=4,
            num_test=4,
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        label = tfds.features.ClassLabel(names=list(CLASS_NAMES))
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": _shapes._png_feature(),
                    "image/filename": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "label": label,
                            "bbox": tfds.features.BBoxFeature(),
                            "is_truncated": np.bool_,
                            "is_difficult": np.bool_,
                        }
                    ),
                    "labels": tfds.features.Sequence(label),
                    "labels_no_difficult": tfds.features.Sequence(label),
                }
            ),
            homepage="https://arxiv.org/abs/1406.4729",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # nothing to download
        config = self.builder_config
        return {s: self._generate_examples(s, getattr(config, f"num_{s}")) for s in SPLIT_IDS}

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[str, dict]]:
        for index in range(num_examples):
            image, objects, _ = make_scene(index, split)
            filename = f"{split}_{index:05d}.png"
            labels = objects["labels"]
            bbox = voc_bbox(objects["boxes"], image.shape[:2])
            yield (
                filename,
                {
                    "image": _shapes._encode_png(image),
                    "image/filename": filename,
                    "objects": {
                        "label": labels,
                        "bbox": bbox,
                        "is_truncated": objects["is_truncated"],
                        "is_difficult": objects["is_difficult"],
                    },
                    "labels": sorted(set(labels.tolist())),
                    "labels_no_difficult": sorted(set(labels[~objects["is_difficult"]].tolist())),
                },
            )
