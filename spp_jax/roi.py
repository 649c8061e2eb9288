"""Window (RoI) pyramid pooling for SPP-net detection: JAX, no Flax.

SPP-net computes the conv feature map of an image once and pools a fixed-length
pyramid vector for each of ~2,000 candidate windows (paper section 4). Each
window is projected onto the map (:func:`project_boxes`; onto each map's valid
region when ``valid_sizes`` says the maps are padded, or not at all when the
caller gives cells: ``projected``), split into the bins of every pyramid level,
and every bin is max- (or average-) pooled. :func:`select_scales` picks each
window's scale and :func:`multiscale_roi_pyramid_pool` pools every window from
its scale's map. How the bins are pooled (the CPU kernel, sparse tables of block
maxima, a summed-area table) and what it costs: ``docs/windows.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax import _windows
from spp_jax._cpu import native as _native
from spp_jax.geometry import LevelsLike, normalize_levels
from spp_jax.pooling import (
    _check_sizes,
    _dynamic_bins,
    _flat_bins,
    _kernel_pyramid,
    as_nhwc,
    check_options,
)

PROJECTIONS = ("sppnet", "roi_pool")
SCALES = (480, 576, 688, 864, 1200)
SCALE_RULES = ("paper", "code")

Size = int | jax.Array  # a map's valid height or width: static, or one per window

__all__ = [
    "PROJECTIONS",
    "SCALE_RULES",
    "multiscale_roi_pyramid_pool",
    "project_boxes",
    "roi_pyramid_pool",
    "select_scales",
]


# --------------------------------------------------------------------------------------
# Projection of boxes onto the feature map.
# --------------------------------------------------------------------------------------


def _round_half_away(v: jax.Array) -> jax.Array:
    """C's ``round``: halves away from zero (``jnp.round`` rounds half to even)."""
    whole = jnp.trunc(v)
    frac = v - whole  # exact in floating point
    return whole + jnp.where(jnp.abs(frac) >= 0.5, jnp.sign(v), 0)


def _stride(spatial_scale: float) -> float:
    """``1 / spatial_scale``, snapped to an int when it is one (1/16 -> 16)."""
    s = 1.0 / spatial_scale
    return float(round(s)) if abs(s - round(s)) < 1e-6 else s


def _floor_div(v: jax.Array, s: float) -> jax.Array:
    """``floor(v / s)`` exactly: XLA's vectorised CPU division can be an ulp off,
    which would move a box sitting exactly on a cell boundary."""
    q = _to_int(jnp.floor(v / jnp.float32(s)))
    v = jnp.where(jnp.isnan(v), 0.0, v)
    q = jnp.where((q + 1).astype(jnp.float32) * s <= v, q + 1, q)
    return jnp.where(q.astype(jnp.float32) * s > v, q - 1, q)


def _to_int(v: jax.Array) -> jax.Array:
    # NaN coordinates count as 0; huge ones saturate (then get clamped to the map).
    v = jnp.where(jnp.isnan(v), 0.0, v)
    return jnp.clip(v, -(2.0**30), 2.0**30).astype(jnp.int32)


def project_boxes(
    boxes: jax.Array,
    spatial_scale: float = 1 / 16,
    projection: str = "sppnet",
    feature_size: tuple[int, int] | None = None,
) -> jax.Array:
    """Projects image-pixel boxes onto feature-map cells.

    Args:
      boxes: ``(R, 4)`` float ``(x1, y1, x2, y2)`` in image pixels.
      spatial_scale: feature cells per image pixel (``1 / total stride``).
      projection: ``"sppnet"`` (paper Appendix: ``left = floor(x1 / S) + 1``,
        ``right = ceil(x2 / S) - 1``, same for top/bottom, clamped into the map,
        an empty window collapsed to its midpoint) or ``"roi_pool"``
        (torchvision: ``round(x * spatial_scale)``, halves away from zero, not
        clamped; the map clips the bins later).
      feature_size: ``(H, W)`` of the map; needed for ``"sppnet"``.

    Returns:
      int32 ``(R, 4)``: inclusive feature cells ``(x1', y1', x2', y2')``. A NaN
      coordinate counts as 0.

    >>> import jax.numpy as jnp
    >>> project_boxes(jnp.array([[0.0, 0.0, 160.0, 100.0]]), 1 / 16, "sppnet", (38, 50)).tolist()
    [[1, 1, 9, 6]]
    """
    check_projection(projection)
    boxes = _check_boxes(boxes)
    _check_spatial_scale(spatial_scale)
    if projection == "sppnet" and feature_size is None:
        raise ValueError('projection="sppnet" needs feature_size=(H, W) to clamp the windows')
    h, w = feature_size if feature_size is not None else (0, 0)
    return _project(boxes, spatial_scale, projection, h, w)


def _check_spatial_scale(spatial_scale: float) -> None:
    if not spatial_scale > 0:
        raise ValueError(
            f"spatial_scale must be a positive number (feature cells per image pixel, e.g. "
            f"1/16), got {spatial_scale!r}"
        )


def _project(
    boxes: jax.Array, spatial_scale: float, projection: str, h: Size, w: Size
) -> jax.Array:
    """:func:`project_boxes` on checked arguments; ``h``, ``w``: the map's valid size,
    ints or ``(R,)`` arrays (each window's own map region)."""
    if projection == "roi_pool":
        return _to_int(_round_half_away(boxes * jnp.float32(spatial_scale)))
    s = _stride(spatial_scale)
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    left, top = _floor_div(x1, s) + 1, _floor_div(y1, s) + 1
    right, bottom = -_floor_div(-x2, s) - 1, -_floor_div(-y2, s) - 1
    return _clamp_cells(jnp.stack([left, top, right, bottom], axis=1), h, w)


def _clamp_cells(cells: jax.Array, h: Size, w: Size) -> jax.Array:
    """The paper's windows kept inside an ``h x w`` map: every side clamped into it, an
    empty window collapsed to its midpoint (``h``, ``w``: ints or ``(R,)`` arrays)."""
    left, top, right, bottom = (cells[:, i] for i in range(4))
    left, right = jnp.clip(left, 0, w - 1), jnp.clip(right, 0, w - 1)
    top, bottom = jnp.clip(top, 0, h - 1), jnp.clip(bottom, 0, h - 1)
    mid_x = (left + right) // 2  # floor: both are >= 0
    mid_y = (top + bottom) // 2
    left, right = jnp.where(left > right, mid_x, left), jnp.where(left > right, mid_x, right)
    top, bottom = jnp.where(top > bottom, mid_y, top), jnp.where(top > bottom, mid_y, bottom)
    return jnp.stack([left, top, right, bottom], axis=1)


def _window_bins(cells: jax.Array, levels, projection: str, valid_hw: tuple, cap: int):
    """Every level's row and column bins of every window, as the CPU kernel takes them:
    ``(R, sum n_h, 2)`` and ``(R, sum n_w, 2)`` half-open ``[start, end)`` feature cells.
    ``valid_hw``: the map's valid size, ints or ``(R,)`` arrays; ``cap``: the longest
    roi_pool window whose bins come from host tables."""
    x1, y1, x2, y2 = (cells[:, i] for i in range(4))

    def spp_axis(lo, hi, n, size):
        # Adaptive bins of the inclusive window [lo, hi]: never empty.
        start, end = _dynamic_bins(hi - lo + 1, n)
        return lo[:, None] + start, lo[:, None] + end

    def roi_axis(lo, hi, n, size):
        # torchvision roi_pool: float32 bin size L / n, floor / ceil of p * size,
        # offset by the roi start, clipped to the map. XLA's vectorised division
        # is not always correctly rounded, so the float32 results come from
        # tables made on the host for L up to a cap, and from the exact integer
        # formula beyond it (windows over 4x the map: there the two can differ
        # only where p * L / n lies within an ulp of an integer).
        size = size[:, None] if isinstance(size, jax.Array) else size
        length = jnp.maximum(hi - lo + 1, 1)
        starts, ends = _roi_pool_tables(n, cap)
        i = jnp.arange(n, dtype=jnp.int32)[None, :]
        big = length[:, None] > cap
        idx = jnp.minimum(length, cap)
        start = jnp.where(big, (i * length[:, None]) // n, jnp.asarray(starts)[idx])
        end = jnp.where(big, -((-(i + 1) * length[:, None]) // n), jnp.asarray(ends)[idx])
        return jnp.clip(start + lo[:, None], 0, size), jnp.clip(end + lo[:, None], 0, size)

    axis = spp_axis if projection == "sppnet" else roi_axis
    rows = [axis(y1, y2, nh, valid_hw[0]) for nh, _ in levels]
    cols = [axis(x1, x2, nw, valid_hw[1]) for _, nw in levels]
    return _native.bounds(rows), _native.bounds(cols)


@functools.lru_cache(maxsize=256)
def _roi_pool_tables(n: int, cap: int):
    """torchvision's float32 bin limits ``floor(p * (L / n))``, ``ceil((p + 1) * (L / n))``
    for every roi length ``L <= cap``, computed with IEEE float32 on the host."""
    length = np.arange(cap + 1, dtype=np.float32)[:, None]
    size = length / np.float32(n)
    p = np.arange(n, dtype=np.float32)[None, :]
    starts = np.floor(p * size).astype(np.int32)
    ends = np.ceil((p + 1) * size).astype(np.int32)
    return starts, ends


# --------------------------------------------------------------------------------------
# Pooling one feature map.
# --------------------------------------------------------------------------------------


def _roi_avg(x: jax.Array, bidx: jax.Array, bins: _windows.Bins) -> jax.Array:
    """Mean over every (window, bin) by a float32 summed-area table: ``(R, n_h, n_w, C)``."""
    _b, h, w, c = x.shape
    sat = jnp.cumsum(jnp.cumsum(x.astype(jnp.float32), axis=1), axis=2)
    sat = jnp.pad(sat, ((0, 0), (1, 0), (1, 0), (0, 0)))  # S[i, j] = sum x[:i, :j]
    flat = sat.reshape(-1, c)
    hs, he, ws, we = bins
    bb = bidx[:, None, None]

    def at(hh, ww):
        return jnp.take(flat, ((bb * (h + 1) + hh) * (w + 1) + ww).reshape(-1), axis=0)

    total = at(he, we) - at(hs, we) - at(he, ws) + at(hs, ws)
    area = jnp.maximum((he - hs) * (we - ws), 1).astype(jnp.float32).reshape(-1, 1)
    return (total / area).reshape(*hs.shape, c)


def _pool_bins(x, box_b, rows, cols, levels, mode: str, projection: str) -> jax.Array:
    """Every bin of every window, ``(R, NB, C)`` in the dtype of ``x``: the max by the
    CPU kernel or by sparse tables, the mean by a summed-area table. A bin empty after
    clipping gives 0 and no derivative."""
    if mode == "avg":
        return _windows.pool_bounds(x, box_b, rows, cols, levels, _roi_avg).astype(x.dtype)

    def pure_jax(x):
        return _windows.pool_bounds(x, box_b, rows, cols, levels)

    if not _native.kernel_chosen("roi"):
        return pure_jax(x)

    def cpu_kernel(x):
        _, h, w, _ = x.shape
        # sppnet windows have adaptive bins (never empty): a coarse level whose
        # count divides a finer one's is reduced from that level's bins.
        if projection == "sppnet":
            pyr = _kernel_pyramid(h, w, levels, "adaptive", True)
        else:
            pyr = _native.pyramid(levels, [None] * len(levels))
        pure = _native.Pure(_windows.pool_bounds, (levels,))
        flat = _native.window_max(x.astype(jnp.float32), box_b, rows, cols, pyr, pure)
        return flat.astype(x.dtype)

    # Each platform's lowering takes its branch: the kernel on CPU, JAX elsewhere.
    return lax.platform_dependent(x, cpu=cpu_kernel, default=pure_jax)


# --------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------


def check_projection(projection: str) -> None:
    """Raises a ValueError naming an unknown ``projection``."""
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; accepted are {PROJECTIONS}")


def _check_boxes(boxes: Any) -> jax.Array:
    if not hasattr(boxes, "shape"):
        boxes = np.asarray(boxes)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(
            f"boxes must have shape (R, 4) holding (x1, y1, x2, y2), got {tuple(boxes.shape)}"
        )
    if not jnp.issubdtype(boxes.dtype, jnp.floating) and not jnp.issubdtype(
        boxes.dtype, jnp.integer
    ):
        raise TypeError(f"boxes must be a float (or int) array, got dtype {boxes.dtype}")
    return jnp.asarray(boxes, jnp.float32)


def _per_window(value: Any, name: str, r: int) -> Any:
    """``value`` (an array, or as a NumPy array) after checking its shape is ``(R,)``."""
    value = value if hasattr(value, "shape") else np.asarray(value)
    if value.shape != (r,):
        raise ValueError(f"{name} must have shape (R,) = ({r},), got {tuple(value.shape)}")
    return value


def _check_indices(box_indices: Any, r: int, b: int) -> jax.Array:
    if box_indices is None:
        return jnp.zeros((r,), jnp.int32)
    idx = _per_window(box_indices, "box_indices", r)
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"box_indices must be an integer array, got dtype {idx.dtype}")
    if not isinstance(idx, jax.core.Tracer):
        concrete = np.asarray(idx)
        bad = concrete[(concrete < 0) | (concrete >= b)]
        if bad.size:
            raise ValueError(
                f"box_indices must lie in [0, {b}) (the batch size); got {bad[:5].tolist()}"
            )
    return jnp.clip(jnp.asarray(idx, jnp.int32), 0, b - 1)


def roi_pyramid_pool(
    features: jax.Array,
    boxes: jax.Array,
    box_indices: jax.Array | None = None,
    *,
    levels: LevelsLike = (6, 3, 2, 1),
    spatial_scale: float = 1 / 16,
    projection: str = "sppnet",
    mode: str = "max",
    data_format: str = "NHWC",
    valid: jax.Array | None = None,
    channel_major: bool = False,
    valid_sizes: jax.Array | Sequence[Sequence[int]] | None = None,
    projected: bool = False,
) -> jax.Array:
    """Pools a fixed-length pyramid vector for every window of a feature map.

    Args:
      features: ``(B, H, W, C)`` (``data_format="NHWC"``) or ``(B, C, H, W)``.
      boxes: ``(R, 4)`` float ``(x1, y1, x2, y2)`` in image pixels (or, with
        ``projected``, inclusive feature cells).
      box_indices: ``(R,)`` int, the batch element of each box (default all 0).
      levels: ints ``n`` or pairs ``(n_h, n_w)``.
      spatial_scale: feature cells per image pixel (``1 / total stride``).
      projection: ``"sppnet"`` (the paper's rule, adaptive bins, never empty) or
        ``"roi_pool"`` (torchvision's ``roi_pool`` exactly; empty bins give 0).
        See :func:`project_boxes`.
      mode: ``"max"`` or ``"avg"``.
      data_format: ``"NHWC"`` or ``"NCHW"``.
      valid: optional ``(R,)`` bool; False rows are padding: zeros, no gradient.
      channel_major: flatten order per level, as in ``spatial_pyramid_pool``.
      valid_sizes: optional int ``(B, 2)``: the ``(h, w)`` of each map's valid
        region, the rest being zero padding (e.g. the sizes
        :class:`~spp_jax.models.ConvTrunk` returns for a padded batch). Each
        window is projected onto its map's valid region, as if the map were
        unpadded; default the whole ``H x W``.
      projected: ``boxes`` are already inclusive feature cells ``(x1', y1', x2',
        y2')`` (ints, e.g. from :func:`project_boxes` or a caller's own rule), not
        pixels: ``spatial_scale`` is not used, and ``"sppnet"`` windows are only
        kept inside the valid region (clamped, an empty window collapsed to its
        midpoint).

    Returns:
      ``(R, C * sum(n_h * n_w))`` in the dtype of ``features``.

    R is static: pad the boxes to a bucket of R and pass ``valid``; box values
    and valid sizes never recompile. Derivatives flow to ``features`` only,
    under every JAX transformation; max pooling's go to each bin's first maximum
    in row-major order. A NaN box coordinate counts as 0.

    Example:
      >>> import jax.numpy as jnp
      >>> f = jnp.ones((1, 38, 50, 8))
      >>> roi_pyramid_pool(f, jnp.array([[0.0, 0.0, 320.0, 240.0]]), levels=(2, 1)).shape
      (1, 40)
    """
    check_projection(projection)
    check_options(mode, "adaptive", data_format)
    x = as_nhwc(features, "features", data_format)
    lv = normalize_levels(levels)
    b, h, w, c = x.shape
    boxes = _check_boxes(boxes)
    r = boxes.shape[0]
    box_b = _check_indices(box_indices, r, b)
    valid = None if valid is None else jnp.asarray(_per_window(valid, "valid", r), bool)
    _check_spatial_scale(spatial_scale)
    valid_hw: tuple[Size, Size] = (h, w)
    if valid_sizes is not None:
        sizes = _check_sizes(valid_sizes, b, h, w)[box_b]
        valid_hw = (sizes[:, 0], sizes[:, 1])
    if r == 0 or c == 0:  # nothing to pool
        return jnp.zeros((r, c * sum(nh * nw for nh, nw in lv)), x.dtype)
    cells = _cells(boxes, spatial_scale, projection, projected, valid_hw)
    # roi_pool windows up to 4x the map read host tables
    rows, cols = _window_bins(cells, lv, projection, valid_hw, cap=4 * max(h, w))
    flat = _pool_bins(x, box_b, rows, cols, lv, mode, projection)
    if valid is not None:
        flat = jnp.where(valid[:, None, None], flat, jnp.zeros((), flat.dtype))
    return _flat_bins(flat, lv, channel_major)


def _cells(boxes, spatial_scale: float, projection: str, projected: bool, valid_hw) -> jax.Array:
    """The windows in inclusive feature cells: projected from pixels, or (``projected``)
    taken as cells, with ``"sppnet"`` windows kept inside the valid region."""
    if not projected:
        return _project(boxes, spatial_scale, projection, *valid_hw)
    if projection == "sppnet":
        return _clamp_cells(_to_int(boxes), *valid_hw)
    return _to_int(boxes)


def select_scales(
    boxes: Any,
    image_size: tuple[int, int],
    scales: Sequence[int] = SCALES,
    target: int = 224,
    *,
    rule: str = "paper",
) -> Any:
    """Index of the scale at which to pool each box.

    Scale ``s`` resizes the image so its shorter side is ``s`` (paper section 4.2):
    a box of area ``A`` in original pixels has area ``A * (s / min(image_size))**2``
    there. A side of no length counts as ``1e-6`` pixels.

    Args:
      boxes: ``(R, 4)`` ``(x1, y1, x2, y2)`` in original-image pixels. A JAX array
        is computed in float32 with ``jax.numpy`` (jit-able); anything else (NumPy,
        lists) in float64 with NumPy on the host.
      image_size: ``(height, width)`` of the original image.
      scales: the shorter side of each scale.
      target: the window side the network was trained on (224 in the paper).
      rule: ``"paper"``: the scale where the box's area is closest to
        ``target**2``; ``"code"``: the official SPP-net code's rule, the scale
        nearest to ``round(target * 13/14 * min(image_size) / sqrt(area))`` (208 for
        224), ties to the earlier scale.

    Returns:
      int32 ``(R,)``, a JAX array for JAX input, a NumPy array otherwise.

    >>> select_scales([[0.0, 0.0, 100.0, 100.0]], (480, 640)).tolist()
    [4]
    """
    if rule not in SCALE_RULES:
        raise ValueError(f"unknown window scale rule {rule!r}; accepted: {SCALE_RULES}")
    if len(scales) == 0:
        raise ValueError("scales must name at least one scale")
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be a positive (height, width), got {image_size!r}")
    xp: Any = jnp if isinstance(boxes, jax.Array) else np
    dtype = jnp.float32 if xp is jnp else np.float64
    boxes = xp.asarray(boxes, dtype).reshape(-1, 4)
    short = float(min(image_size))
    width = xp.maximum(boxes[:, 2] - boxes[:, 0], 1e-6)
    area = width * xp.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    if rule == "paper":
        factors = xp.asarray([(s / short) ** 2 for s in scales], dtype)
        diff = xp.abs(area[:, None] * factors[None, :] - float(target) ** 2)
    else:
        expected = xp.round(target * 13 / 14 * short / xp.sqrt(area))
        diff = xp.abs(expected[:, None] - xp.asarray(scales, dtype)[None, :])
    return xp.argmin(diff, axis=1).astype(xp.int32)  # the first of equals: the earlier scale


def multiscale_roi_pyramid_pool(
    features_per_scale: Sequence[jax.Array],
    boxes: jax.Array,
    scale_index: jax.Array,
    image_size: tuple[int, int] | None = None,
    scales: Sequence[int] = SCALES,
    box_indices: jax.Array | None = None,
    *,
    factors: Sequence[jax.Array] | None = None,
    valid_sizes: Sequence[jax.Array] | None = None,
    **kwargs: Any,
) -> jax.Array:
    """Pools each box from the feature map of its own scale.

    Every box is pooled at every scale with the boxes of other scales masked out
    (``valid``), so the shapes are static and the op composes with ``jit``,
    ``vmap`` and ``grad``; host code that knows the scales can instead pool each
    scale's boxes alone with :func:`roi_pyramid_pool`.

    Args:
      features_per_scale: one feature map per scale (shapes may differ).
      boxes: ``(R, 4)`` in original-image pixels; multiplied by scale ``k``'s
        factor before projection onto map ``k``.
      scale_index: ``(R,)`` int, e.g. from :func:`select_scales`.
      image_size: ``(height, width)`` of the original image: scale ``k``'s factor
        is ``scales[k] / min(image_size)``. Give it or ``factors``.
      scales: the shorter side of each scale.
      box_indices: ``(R,)`` batch element of each box.
      factors: per scale, float ``(B, 2)``: ``(fy, fx)``, resized pixels per
        original pixel of each batch element's image (for resized sizes that are
        rounded or capped, or images of different sizes).
      valid_sizes: per scale, the ``valid_sizes`` of :func:`roi_pyramid_pool`
        (each map's valid region), or None.
      **kwargs: as :func:`roi_pyramid_pool` (``valid`` included).

    Returns:
      ``(R, C * sum(n_h * n_w))``.
    """
    n = len(features_per_scale)
    if (factors is None) == (image_size is None):
        raise ValueError("give image_size (with scales) or factors (one per scale), not both")
    if factors is None and len(scales) != n:
        raise ValueError(f"got {n} feature maps for {len(scales)} scales; give one map per scale")
    for name, per_scale in (("factors", factors), ("valid_sizes", valid_sizes)):
        if per_scale is not None and len(per_scale) != n:
            raise ValueError(f"got {n} feature maps and {len(per_scale)} {name}; give one per map")
    boxes = _check_boxes(boxes)
    scale_index = jnp.asarray(_per_window(scale_index, "scale_index", boxes.shape[0]))
    valid = kwargs.pop("valid", None)
    bidx = None if box_indices is None else jnp.asarray(box_indices)
    pooled = []
    for k, feat in enumerate(features_per_scale):
        if factors is None:
            assert image_size is not None
            at_scale = boxes * jnp.float32(scales[k] / min(image_size))
        else:
            f = jnp.asarray(factors[k], jnp.float32)
            f = f[jnp.zeros(len(boxes), jnp.int32) if bidx is None else bidx]
            at_scale = boxes * f[:, jnp.asarray([1, 0, 1, 0])]  # (fx, fy, fx, fy)
        here = scale_index == k
        if valid is not None:
            here = here & jnp.asarray(valid, bool)
        pooled.append(
            roi_pyramid_pool(
                feat,
                at_scale,
                box_indices,
                valid=here,
                valid_sizes=None if valid_sizes is None else valid_sizes[k],
                **kwargs,
            )
        )
    return functools.reduce(jnp.add, pooled)  # each box is non-zero at one scale only
