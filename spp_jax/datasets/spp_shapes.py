"""``spp_shapes``: a synthetic, offline image classification dataset for SPP-net.

Every image holds one class-defining object, one of ten shape/texture primitives
(:data:`CLASS_NAMES`: filled circle, ring, square outline, filled triangle, plus,
X, horizontal stripes, vertical stripes, checkerboard, concentric squares),
drawn with a random size, position, small rotation and colour on a noisy,
cluttered background. The clutter (small dots and short line segments) is the
same for every class, and colours are drawn independently of the class, so only
the object's *shape* tells the classes apart.

Why: SPP-net's claims are about scale and aspect ratio. Here the object's size
ranges over a factor of four (:data:`SCALE_RANGE`, relative to the image's
short side, log-uniform), so a model must recognise it at many scales, and the
images themselves vary in size and aspect ratio (:data:`SIZE_RANGE`,
:data:`MAX_ASPECT`), so full-image evaluation (no crop, no warp) is meaningful.
The task is learnable by a small ConvNet in a few CPU minutes but not trivial
(the smallest objects are about 13 pixels across).

Nothing is downloaded: every example is computed with NumPy from its split and
index (:func:`make_example`, seeded by ``np.random.default_rng([DATASET_SEED,
split_id, index])``), so every build holds the same examples (byte-identical
for a given NumPy and TensorFlow). Build it into ``$TFDS_DATA_DIR`` (default
``~/tensorflow_datasets``) with::

    python -c "import spp_jax.datasets, tensorflow_datasets as tfds; \
tfds.builder('spp_shapes').download_and_prepare()"

(:func:`spp_jax.data.get_builder` also builds it on first use.)

Configs (``tfds.builder("spp_shapes/<config>")``):

* ``default``: 3000 train and 1000 test examples (about 100 MB of PNGs; builds in
  seconds).
* ``tiny``: 40 train and 20 test examples, the first examples of the default
  config's splits; for tests.

Features: ``image`` (uint8 ``(H, W, 3)`` PNG, ``H`` and ``W`` in
:data:`SIZE_RANGE`), ``label`` (:class:`tfds.features.ClassLabel` over
:data:`CLASS_NAMES`, balanced: ``index % 10``), ``index`` (int64, the example's
index in its split) and ``scale`` (float32, the object's size over the image's
short side). ``supervised_keys`` is ``("image", "label")``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

__all__ = [
    "CLASS_NAMES",
    "DATASET_SEED",
    "MAX_ASPECT",
    "NUM_CLASSES",
    "SCALE_RANGE",
    "SIZE_RANGE",
    "SPLIT_IDS",
    "SppShapes",
    "SppShapesConfig",
    "make_example",
]

CLASS_NAMES: tuple[str, ...] = (
    "filled_circle",
    "ring",
    "square_outline",
    "filled_triangle",
    "plus",
    "x_cross",
    "h_stripes",
    "v_stripes",
    "checkerboard",
    "concentric_squares",
)
NUM_CLASSES = len(CLASS_NAMES)

#: Inclusive range of image heights and widths, in pixels.
SIZE_RANGE: tuple[int, int] = (64, 176)
#: Largest ratio of the long side to the short side of an image.
MAX_ASPECT = 2.0
#: Range of the object's size (its bounding square's side) over the short side.
SCALE_RANGE: tuple[float, float] = (0.2, 0.8)
#: Base seed of the generator; example ``i`` of split ``s`` uses
#: ``np.random.default_rng([DATASET_SEED, SPLIT_IDS[s], i])``.
DATASET_SEED = 1406_4729
SPLIT_IDS: dict[str, int] = {"train": 0, "test": 1}

_MAX_ROTATION = math.radians(15.0)  # small, so that plus/X and h/v stripes stay distinct
_MIN_CONTRAST = 80.0  # Euclidean RGB distance between object and mean background
_MIN_PERIOD_PX = 4.0  # thinnest stripe pair / checker cell pair, in pixels

_DESCRIPTION = """\
Synthetic shapes for SPP-net experiments, generated offline with NumPy. Each image
(height and width in [64, 176], aspect ratio at most 2:1) shows one of ten shape or
texture primitives (the class) at a random scale (20% to 80% of the short side,
log-uniform), position, small rotation and colour, on a noisy background with small
dots and line segments common to all classes. Classes are balanced and defined by
shape only.
"""

Sdf = Callable[[np.ndarray, np.ndarray, np.random.Generator, float], np.ndarray]


# ---------------------------------------------------------------------------
# Shapes as signed distances in normalised object coordinates.
#
# Each function maps object coordinates ``(u, v)`` (the object's bounding square is
# ``[-1, 1]^2``; ``v`` points down) to an approximate signed distance to the shape's
# boundary in the same units (negative inside). ``r`` is the object's half-size in
# pixels, used to keep stripes and checks resolvable on small objects.
# ---------------------------------------------------------------------------


def _cheb(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v))


def _bars(u: np.ndarray, v: np.ndarray, t: float) -> np.ndarray:
    """A plus sign: two bars of half-thickness ``t`` and half-length 0.95."""
    horizontal = np.maximum(np.abs(v) - t, np.abs(u) - 0.95)
    vertical = np.maximum(np.abs(u) - t, np.abs(v) - 0.95)
    return np.minimum(horizontal, vertical)


def _stripes(w: np.ndarray, half: float, rng: np.random.Generator, r: float) -> np.ndarray:
    """Signed distance to alternating stripes along ``w`` inside ``[-half, half]``."""
    max_periods = max(2, int(2 * half * r / _MIN_PERIOD_PX))
    periods = int(rng.integers(2, min(5, max_periods) + 1))
    k = math.pi * periods / half  # sin(k (w + half)) has `periods` periods in the patch
    return -np.sin(k * (w + half)) / k


def _sdf_filled_circle(u, v, rng, r):
    return np.hypot(u, v) - rng.uniform(0.85, 0.95)


def _sdf_ring(u, v, rng, r):
    return np.abs(np.hypot(u, v) - 0.72) - rng.uniform(0.1, 0.2)


def _sdf_square_outline(u, v, rng, r):
    return np.abs(_cheb(u, v) - 0.8) - rng.uniform(0.08, 0.15)


def _sdf_filled_triangle(u, v, rng, r):
    if rng.random() < 0.5:  # pointing up or down
        v = -v
    big_r = 0.95  # circumradius; centroid at the origin, apex at v = -big_r
    d = np.maximum(v, 0.8660254 * u - 0.5 * v)
    d = np.maximum(d, -0.8660254 * u - 0.5 * v)
    return d - big_r / 2


def _sdf_plus(u, v, rng, r):
    return _bars(u, v, rng.uniform(0.15, 0.25))


def _sdf_x_cross(u, v, rng, r):
    s = 0.70710678
    return _bars(s * (u + v), s * (u - v), rng.uniform(0.15, 0.25))


def _sdf_h_stripes(u, v, rng, r):
    return np.maximum(_cheb(u, v) - 0.85, _stripes(v, 0.85, rng, r))


def _sdf_v_stripes(u, v, rng, r):
    return np.maximum(_cheb(u, v) - 0.85, _stripes(u, 0.85, rng, r))


def _sdf_checkerboard(u, v, rng, r):
    half = 0.85
    max_cells = max(3, int(2 * half * r / (_MIN_PERIOD_PX * 0.75)))
    cells = int(rng.integers(3, min(6, max_cells) + 1))
    k = math.pi * cells / (2 * half)  # one cell per half period of sin
    a = np.sin(k * (u + half))
    b = np.sin(k * (v + half))
    checks = -np.sign(a * b) * np.minimum(np.abs(a), np.abs(b)) / k
    return np.maximum(_cheb(u, v) - half, checks)


def _sdf_concentric_squares(u, v, rng, r):
    q = _cheb(u, v)
    frame = np.abs(q - 0.82) - rng.uniform(0.08, 0.13)
    core = q - rng.uniform(0.3, 0.4)
    return np.minimum(frame, core)


_SDFS: tuple[Sdf, ...] = (
    _sdf_filled_circle,
    _sdf_ring,
    _sdf_square_outline,
    _sdf_filled_triangle,
    _sdf_plus,
    _sdf_x_cross,
    _sdf_h_stripes,
    _sdf_v_stripes,
    _sdf_checkerboard,
    _sdf_concentric_squares,
)
assert len(_SDFS) == NUM_CLASSES


# ---------------------------------------------------------------------------
# Drawing helpers.
# ---------------------------------------------------------------------------


def _interp_matrix(n: int, g: int) -> np.ndarray:
    """``(n, g)`` weights that linearly interpolate ``g`` grid values to ``n`` points."""
    t = np.linspace(0.0, g - 1.0, n)
    return np.maximum(0.0, 1.0 - np.abs(t[:, None] - np.arange(g)[None, :])).astype(np.float32)


def _upsample(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinearly resizes ``grid`` ``(gh, gw, c)`` to ``(h, w, c)``."""
    gh, gw, c = grid.shape
    rows = _interp_matrix(h, gh) @ grid.reshape(gh, gw * c)  # (h, gw * c)
    rows = rows.reshape(h, gw, c).transpose(0, 2, 1)  # (h, c, gw)
    return (rows @ _interp_matrix(w, gw).T).transpose(0, 2, 1)  # (h, w, c)


def _blend(canvas: np.ndarray, y0: int, x0: int, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blends ``colour`` into ``canvas[y0:, x0:]`` over ``alpha``'s extent, in place."""
    h, w = alpha.shape
    patch = canvas[y0 : y0 + h, x0 : x0 + w]
    patch += alpha[..., None] * (colour - patch)


def _window(cy: float, cx: float, extent: float, h: int, w: int):
    """Integer pixel window ``[y0, y1) x [x0, x1)`` around a centre, clipped to the image."""
    y0 = max(0, math.floor(cy - extent))
    y1 = min(h, math.ceil(cy + extent) + 1)
    x0 = max(0, math.floor(cx - extent))
    x1 = min(w, math.ceil(cx + extent) + 1)
    return y0, y1, x0, x1


def _grid(y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
    """Broadcastable pixel coordinates ``(y1 - y0, 1)`` and ``(1, x1 - x0)``, float32."""
    return (
        np.arange(y0, y1, dtype=np.float32)[:, None],
        np.arange(x0, x1, dtype=np.float32)[None, :],
    )


def _coverage(d_px: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage from a signed distance in pixels (1-pixel ramp)."""
    return np.clip(0.5 - d_px, 0.0, 1.0)


def _shape_coverage(sdf: Sdf, py, px, rotation: float, r: float, stretch: float, rng):
    """Coverage of the shape ``sdf`` at pixel offsets ``(py, px)`` from its centre:
    half-size ``r`` pixels, rotated by ``rotation``, stretched by ``stretch``."""
    cos, sin = math.cos(rotation), math.sin(rotation)
    u = (px * cos + py * sin) / (r * stretch)
    v = (-px * sin + py * cos) / (r / stretch)
    return _coverage(sdf(u, v, rng, r) * r)


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` pixel edges of a non-empty bool mask's true pixels."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _image_size(rng: np.random.Generator, size_range: tuple[int, int], max_aspect: float):
    """``(h, w)`` uniform over the pairs of sides in ``size_range`` whose aspect ratio is
    at most ``max_aspect``, by rejection."""
    lo, hi = size_range
    while True:
        h, w = (int(s) for s in rng.integers(lo, hi + 1, size=2))
        if max(h, w) <= max_aspect * min(h, w):
            return h, w


def _background(rng: np.random.Generator, h: int, w: int, blotches: int):
    """A linear gradient between two nearby colours plus coarse blotches (a random
    ``blotches x blotches`` grid, upsampled): ``(canvas float32 (h, w, 3), mean colour)``."""
    c0 = rng.uniform(0, 255, 3).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0, 45, 3), 0, 255).astype(np.float32)
    phi = rng.uniform(0, 2 * math.pi)
    ry = (np.arange(h, dtype=np.float32) - h / 2) * (math.sin(phi) / h)
    rx = (np.arange(w, dtype=np.float32) - w / 2) * (math.cos(phi) / w)
    ramp = (ry[:, None] + rx[None, :] + 1) / 2  # in [0, 1] along phi
    canvas = c0 + ramp[..., None] * (c1 - c0)
    canvas += _upsample(rng.normal(0, 12, (blotches, blotches, 3)).astype(np.float32), h, w)
    return canvas, (c0 + c1) / 2


def _draw_distractors(
    canvas: np.ndarray, rng: np.random.Generator, fg: np.ndarray, short: int
) -> int:
    """Draws small dots and short line segments, the same for every class."""
    h, w = canvas.shape[:2]
    count = 3 + int(rng.poisson(h * w / 1500))
    for _ in range(count):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        # Some distractors share the object's colour, so colour never gives it away.
        colour = fg + rng.normal(0, 12, 3) if rng.random() < 0.3 else rng.uniform(0, 255, 3)
        colour = colour.astype(np.float32)
        if rng.random() < 0.5:  # dot
            radius = rng.uniform(1.0, min(3.0, 0.035 * short))
            y0, y1, x0, x1 = _window(cy, cx, radius + 1, h, w)
            yy, xx = _grid(y0, y1, x0, x1)
            d = np.hypot(yy - cy, xx - cx) - radius
        else:  # short segment
            half_len = rng.uniform(2.0, min(7.0, 0.06 * short))
            theta = rng.uniform(0, math.pi)
            dy, dx = math.sin(theta), math.cos(theta)
            half_thick = rng.uniform(0.4, 1.0)
            y0, y1, x0, x1 = _window(cy, cx, half_len + 2, h, w)
            yy, xx = _grid(y0, y1, x0, x1)
            along = (yy - cy) * dy + (xx - cx) * dx
            across = -(yy - cy) * dx + (xx - cx) * dy
            d = np.maximum(np.abs(along) - half_len, np.abs(across) - half_thick)
        _blend(canvas, y0, x0, _coverage(d), colour)
    return count


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def make_example(
    index: int, split: str = "train", *, seed: int = DATASET_SEED
) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Computes example ``index`` of ``split``, deterministically, with NumPy only.

    The label is ``index % NUM_CLASSES`` (so any run of ``NUM_CLASSES``
    consecutive indices holds every class once); everything else (image size,
    colours, clutter, the object's scale, position, rotation and details) comes
    from ``np.random.default_rng([seed, SPLIT_IDS[split], index])``.

    Args:
      index: the example's index within its split, ``>= 0``.
      split: ``"train"`` or ``"test"``; the splits use different random streams.
      seed: base seed; the dataset uses :data:`DATASET_SEED`.

    Returns:
      ``(image, label, meta)``: ``image`` uint8 ``(H, W, 3)`` with ``H`` and ``W``
      in :data:`SIZE_RANGE` and aspect ratio at most :data:`MAX_ASPECT`;
      ``label`` an int in ``[0, NUM_CLASSES)``; ``meta`` a dict with ``scale``
      (the object's size over the image's short side, in :data:`SCALE_RANGE`),
      ``center`` (``(y, x)`` in pixels), ``bbox`` (``(y0, x0, y1, x1)``, the
      object's pixels with coverage >= 0.5, end-exclusive), ``rotation`` (radians),
      ``num_distractors``, ``class_name`` and ``colour`` (the object's RGB before the
      final pixel noise).

    Raises:
      ValueError: unknown ``split`` or negative ``index``.

    Examples:
      >>> image, label, meta = make_example(12, "train")
      >>> image.dtype, image.ndim, image.shape[2], label, meta["class_name"]
      (dtype('uint8'), 3, 3, 2, 'square_outline')
      >>> bool((make_example(12, "train")[0] == image).all())
      True
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_IDS)}")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    label = index % NUM_CLASSES
    h, w = _image_size(rng, SIZE_RANGE, MAX_ASPECT)
    short = min(h, w)
    canvas, mean_bg = _background(rng, h, w, 5)

    # Object colour: anything far enough from the mean background.
    while True:
        fg = rng.uniform(0, 255, 3)
        if np.linalg.norm(fg - mean_bg) >= _MIN_CONTRAST:
            break

    num_distractors = _draw_distractors(canvas, rng, fg, short)

    # Object: log-uniform size, bounding square (plus rotation slack) inside the image.
    scale = float(math.exp(rng.uniform(*np.log(SCALE_RANGE))))
    r = scale * short / 2
    margin = min(1.3 * r, short / 2)  # rotated, stretched square corners reach ~1.28 r
    cy = float(rng.uniform(margin, h - margin))
    cx = float(rng.uniform(margin, w - margin))
    rotation = float(rng.uniform(-_MAX_ROTATION, _MAX_ROTATION))
    stretch = float(rng.uniform(0.9, 1.1))  # mild anisotropy
    y0, y1, x0, x1 = _window(cy, cx, 1.45 * r, h, w)
    py, px = _grid(y0, y1, x0, x1)
    alpha = _shape_coverage(_SDFS[label], py - cy, px - cx, rotation, r, stretch, rng)
    colour = (fg + rng.normal(0, 10, 3)).astype(np.float32)
    _blend(canvas, y0, x0, alpha, colour)
    ex1, ey1, ex2, ey2 = _extent(alpha >= 0.5)
    bbox = (y0 + ey1, x0 + ex1, y0 + ey2, x0 + ex2)

    canvas += rng.uniform(1, 4) * rng.standard_normal(canvas.shape, dtype=np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    meta = {
        "scale": scale,
        "center": (cy, cx),
        "bbox": bbox,
        "rotation": rotation,
        "num_distractors": num_distractors,
        "class_name": CLASS_NAMES[label],
        "colour": tuple(float(c) for c in colour),
    }
    return image, label, meta


@dataclasses.dataclass(eq=False)
class SppShapesConfig(tfds.core.BuilderConfig):
    """A size of :class:`SppShapes`.

    Attributes:
      num_train: examples in the ``train`` split (indices ``0 .. num_train - 1``).
      num_test: examples in the ``test`` split.
    """

    num_train: int = 3000
    num_test: int = 1000


class SppShapes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of ``spp_shapes`` (see the module docstring); needs no network."""

    name = "spp_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release: 10 shape classes, configs 'default' and 'tiny'.",
    }
    BUILDER_CONFIGS: ClassVar[list[SppShapesConfig]] = [
        SppShapesConfig(
            name="default",
            description="3000 train and 1000 test images.",
            num_train=3000,
            num_test=1000,
        ),
        SppShapesConfig(
            name="tiny",
            description="40 train and 20 test images (the first of 'default'); for tests.",
            num_train=40,
            num_test=20,
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=_DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": _png_feature(),
                    "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
                    "index": tfds.features.Scalar(
                        dtype=np.int64, doc="Index of the example within its split."
                    ),
                    "scale": tfds.features.Scalar(
                        dtype=np.float32,
                        doc="Size of the class-defining object over the image's short side.",
                    ),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://arxiv.org/abs/1406.4729",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # nothing to download
        config = self.builder_config
        return {s: self._generate_examples(s, getattr(config, f"num_{s}")) for s in SPLIT_IDS}

    def _generate_examples(self, split: str, num_examples: int) -> Iterator[tuple[int, dict]]:
        for index in range(num_examples):
            image, label, meta = make_example(index, split)
            png = _encode_png(image)
            yield index, {"image": png, "label": label, "index": index, "scale": meta["scale"]}


def _png_feature() -> tfds.features.Image:
    return tfds.features.Image(shape=(None, None, 3), dtype=np.uint8, encoding_format="png")


def _encode_png(image: np.ndarray) -> bytes:
    import tensorflow as tf  # TFDS imports it anyway

    # zlib level 1: much faster to encode than TFDS's default level, a little larger.
    return tf.io.encode_png(image, compression=1).numpy()
