"""RoIAlign and position-sensitive RoI pooling: torchvision's ops in pure JAX.

SPP-net's window pooling, with one level, is Fast R-CNN's RoI pooling; Mask R-CNN's
RoIAlign replaces its snapped cells and maxima by bilinear samples averaged per bin,
and R-FCN's position-sensitive pooling reads each output bin from its own group of
channels. :func:`roi_align`, :func:`ps_roi_align` and :func:`ps_roi_pool` equal
``torchvision.ops`` of the same names, boxes outside the map, inverted and smaller than
a cell included.

Each op is, per box and per channel, two contractions: ``out = A_y @ F @ A_x^T``, where
row ``p`` of ``A_y`` (``oh x H``) holds the weights output row ``p`` gives each map row
(the summed bilinear weights of its samples, or a bin's averaging weights), and ``A_x``
(``ow x W``) the same for columns. This is exact because a bilinear weight is a row
weight times a column weight, and torchvision's out-of-map rule (a sample outside
``[-1, H] x [-1, W]`` counts 0) is a row test and a column test. An adaptive sampling
grid (``sampling_ratio <= 0``: ``ceil(roi_size / output_size)`` samples per bin, a
count that depends on the box) needs no data-dependent shape: samples of one bin lie
more than half a cell apart, so at most ``2 H + 3`` of them fall in ``[-1, H]``, and a
static number are enumerated from the first that can; new boxes never recompile.

What follows from it: the ops are ``jnp`` code, so they compose with every JAX
transformation, to any order of derivatives, for the boxes too; gradients are dot
products with no scatter, hence bitwise deterministic on every backend; nothing lowers
to a custom call, so they run unchanged on CPU, GPU and TPU; and boxes go through
``lax.map`` in chunks, so memory stays bounded for any number of boxes. The cost per
box grows with the map's area (``oh * B * H * W * C`` multiply-adds for ``A_y @ F``,
where the one-hot pick of the box's image brings the batch size ``B``): right for the
maps detection heads pool (tens of cells a side), wasteful on maps hundreds of cells
wide, where a gather-based kernel touches only the sampled cells.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax.pooling import as_nhwc, check_options
from spp_jax.roi import (
    _check_boxes,
    _check_indices,
    _check_spatial_scale,
    _per_window,
    _round_half_away,
)

__all__ = ["ps_roi_align", "ps_roi_pool", "roi_align"]

OutputSize = int | Sequence[int]

# Temporaries of one chunk of boxes: small enough that a chunk's rows of ``A_y @ F`` stay in
# cache until ``@ A_x^T`` reads them, large enough that the loop over chunks costs little.
_CHUNK_BYTES = 8 * 2**20


def _output_size(output_size: Any) -> tuple[int, int]:
    """``(oh, ow)`` from an int or a pair; raises naming a bad value."""
    pair = (output_size, output_size) if np.ndim(output_size) == 0 else tuple(output_size)
    if len(pair) != 2 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in pair
    ):
        raise ValueError(
            f"output_size must be a positive int or a pair (oh, ow) of them, got {output_size!r}"
        )
    return int(pair[0]), int(pair[1])


def _check_sampling_ratio(sampling_ratio: Any) -> int:
    if not isinstance(sampling_ratio, int | np.integer) or isinstance(sampling_ratio, bool):
        raise TypeError(
            f"sampling_ratio must be an int (samples per bin side; <= 0: adaptive, "
            f"ceil(roi_size / output_size)), got {sampling_ratio!r}"
        )
    return int(sampling_ratio)


# --------------------------------------------------------------------------------------
# One axis of one box: the weights each output row (or column) gives each map row.
# --------------------------------------------------------------------------------------


def _sample_weights(
    start: jax.Array, bin_size: jax.Array, grid: jax.Array, n_out: int, size: int, samples: int
) -> jax.Array:
    """``(n_out, size)``: per bin, the summed bilinear weights of its samples on each cell.

    Bin ``p`` samples ``y = start + p * bin_size + (i + 0.5) * bin_size / grid`` for
    ``i < grid``, in torchvision's order of operations. A sample outside ``[-1, size]``
    counts 0; one in ``[-1, 0]`` reads cell 0, one at or past ``size - 1`` the last
    cell. ``samples``: how many of a bin's samples to enumerate, ``grid`` itself when it
    is static (a fixed sampling ratio), else ``-1``: ``2 * size + 5`` from one before the
    first sample that can reach ``-1``.
    """
    dt = start.dtype
    base = start + jnp.arange(n_out, dtype=dt) * bin_size  # (n_out,)
    grid_f = grid.astype(dt)
    if samples > 0:
        first = jnp.zeros((n_out,), jnp.int32)
    else:
        step = bin_size / jnp.maximum(grid_f, 1.0)
        first = jnp.ceil((-1.0 - base) / jnp.where(step > 0, step, 1.0) - 0.5) - 1.0
        first = jnp.clip(first, 0.0, 2.0**30).astype(jnp.int32)
        samples = 2 * size + 5
    i = first[:, None] + jnp.arange(samples, dtype=jnp.int32)[None, :]  # (n_out, S)
    # a bin without samples (grid 0) is masked below; dividing by 1 keeps its derivatives finite
    y = base[:, None] + (i.astype(dt) + 0.5) * bin_size / jnp.maximum(grid_f, 1.0)
    inside = (i < grid) & (y >= -1.0) & (y <= size)
    y = jnp.maximum(y, 0.0)
    low = jnp.clip(y, 0.0, size).astype(jnp.int32)
    top = low >= size - 1
    low = jnp.where(top, size - 1, low)
    high = jnp.where(top, size - 1, low + 1)
    frac = jnp.where(top, 0.0, y - low.astype(dt))
    cells = jnp.arange(size, dtype=jnp.int32)[None, None, :]
    w_low = jnp.where(inside, 1.0 - frac, 0.0)[..., None] * (low[..., None] == cells).astype(dt)
    w_high = jnp.where(inside, frac, 0.0)[..., None] * (high[..., None] == cells).astype(dt)
    return jnp.sum(w_low + w_high, axis=1)


def _divide(a: jax.Array, n: int) -> jax.Array:
    """``a / n`` rounded as IEEE division rounds it. XLA turns a division by a constant
    (or a broadcast) into a multiplication by its reciprocal, which can be an ulp off and
    move a bin edge that torchvision's ``floor``/``ceil`` put on a whole cell; a divisor
    computed from ``a`` behind an optimization barrier is divided by for real."""
    return a / lax.optimization_barrier(a * 0 + n)


def _range_weights(start: jax.Array, end: jax.Array, size: int, dtype: Any) -> jax.Array:
    """``(n, size)``: 1 on the cells ``[start[p], end[p])`` of each bin ``p``, else 0."""
    cells = jnp.arange(size, dtype=jnp.int32)
    return ((cells[None, :] >= start[:, None]) & (cells[None, :] < end[:, None])).astype(dtype)


# --------------------------------------------------------------------------------------
# The contraction, chunked over boxes.
# --------------------------------------------------------------------------------------


def _pool_boxes(
    x: jax.Array,
    per_box: dict[str, jax.Array],
    weights: Callable[[dict[str, jax.Array]], tuple[jax.Array, jax.Array]],
    out_hw: tuple[int, int],
    position_sensitive: bool,
    temp_per_box: int,
) -> jax.Array:
    """``(R, oh, ow, C_out)``: ``A_y @ x[b] @ A_x^T`` for every box.

    ``per_box`` holds ``(R,)`` arrays, among them ``"image"`` (each box's batch element);
    ``weights`` maps one box's entries to its ``A_y (oh, H)`` and ``A_x (ow, W)``, the
    normalisation folded in. Position-sensitive: output bin ``(p, q)`` of channel ``c``
    reads input channel ``(c * oh + p) * ow + q``, as torchvision's ``ps_`` ops do.
    """
    n, h, w, c = x.shape
    oh, ow = out_hw
    if position_sensitive:  # (oh, B, H, W, C_out, ow): bin row p reads its own channels
        x = jnp.transpose(x.reshape(n, h, w, c // (oh * ow), oh, ow), (4, 0, 1, 2, 3, 5))
    hi = lax.Precision.HIGHEST

    def one_box(box: dict[str, jax.Array]) -> jax.Array:
        a_y, a_x = weights(box)
        pick = (box["image"] == jnp.arange(n)).astype(x.dtype)
        a_yb = a_y.astype(x.dtype)[:, None, :] * pick[None, :, None]  # (oh, B, H)
        a_x = a_x.astype(x.dtype)
        # A_y @ F is one matrix product for a chunk of boxes; @ A_x^T, a batch of tiny
        # ones, runs faster as a fused multiply and sum.
        if position_sensitive:
            rows = jnp.einsum("pbh,pbhwcq->pwcq", a_yb, x, precision=hi)
            return jnp.sum(rows * a_x.T[None, :, None, :], axis=1).transpose(0, 2, 1)
        rows = jnp.einsum("pbh,bhwc->pwc", a_yb, x, precision=hi)
        return jnp.sum(rows[:, None] * a_x[None, :, :, None], axis=2)

    chunk = max(1, _CHUNK_BYTES // max(1, temp_per_box * x.dtype.itemsize))
    return lax.map(jax.checkpoint(one_box), per_box, batch_size=chunk)


def _prepare(
    features: Any,
    boxes: Any,
    box_indices: Any,
    valid: Any,
    output_size: Any,
    spatial_scale: float,
    data_format: str,
    position_sensitive: bool,
):
    """Checked arguments: the NHWC map, the boxes in the weights' dtype (invalid rows
    zeroed), each box's image and validity, and ``(oh, ow)``."""
    check_options("avg", "adaptive", data_format)
    x = as_nhwc(features, "features", data_format)
    out_hw = _output_size(output_size)
    _check_spatial_scale(spatial_scale)
    _check_boxes(boxes)
    n, _, _, c = x.shape
    if position_sensitive and c % (out_hw[0] * out_hw[1]):
        raise ValueError(
            f"position-sensitive pooling needs channels divisible by oh * ow = "
            f"{out_hw[0] * out_hw[1]} (output_size {out_hw}), got {c} channels"
        )
    dt = jnp.promote_types(x.dtype, jnp.float32)
    boxes = jnp.asarray(boxes, dt)
    r = boxes.shape[0]
    image = _check_indices(box_indices, r, n)
    live = jnp.ones((r,), bool) if valid is None else jnp.asarray(_per_window(valid, "valid", r))
    if live.dtype != bool:
        raise TypeError(f"valid must be a bool array, got dtype {live.dtype}")
    boxes = jnp.where(live[:, None], boxes, jnp.zeros((), dt))
    return x, boxes, image, live, out_hw


def _finish(out: jax.Array, live: jax.Array, dtype: Any, data_format: str) -> jax.Array:
    out = jnp.where(live[:, None, None, None], out, jnp.zeros((), out.dtype)).astype(dtype)
    return jnp.transpose(out, (0, 3, 1, 2)) if data_format == "NCHW" else out


def _bilinear_pool(
    x, boxes, image, live, out_hw, spatial_scale, sampling_ratio, aligned, position_sensitive
):
    """RoIAlign's sampling (shared by :func:`roi_align` and :func:`ps_roi_align`)."""
    _, h, w, c = x.shape
    oh, ow = out_hw
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] * spatial_scale - offset for i in range(4))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # torchvision's legacy rule: every box at least one cell
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    bin_h, bin_w = roi_h / oh, roi_w / ow
    if sampling_ratio > 0:
        grid_h = grid_w = jnp.full(boxes.shape[:1], sampling_ratio, jnp.int32)
    else:
        grid_h = jnp.clip(jnp.ceil(roi_h / oh), 0, 2**30).astype(jnp.int32)
        grid_w = jnp.clip(jnp.ceil(roi_w / ow), 0, 2**30).astype(jnp.int32)
    count = jnp.maximum(grid_h * grid_w, 1).astype(boxes.dtype)
    per_box = dict(
        image=image, y1=y1, x1=x1, bin_h=bin_h, bin_w=bin_w, grid_h=grid_h, grid_w=grid_w,
        scale=live.astype(boxes.dtype) / count,
    )  # fmt: skip

    def weights(b):
        a_y = _sample_weights(b["y1"], b["bin_h"], b["grid_h"], oh, h, sampling_ratio)
        a_x = _sample_weights(b["x1"], b["bin_w"], b["grid_w"], ow, w, sampling_ratio)
        return a_y * b["scale"], a_x

    adaptive = 0 if sampling_ratio > 0 else (2 * h + 5) * h * oh + (2 * w + 5) * w * ow
    c_rows = c // (oh * ow) if position_sensitive else c
    temp = oh * w * c_rows * (ow if position_sensitive else 1) + adaptive
    return _pool_boxes(x, per_box, weights, out_hw, position_sensitive, temp)


def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    box_indices: jax.Array | None = None,
    *,
    output_size: OutputSize,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    valid: jax.Array | None = None,
    data_format: str = "NHWC",
) -> jax.Array:
    """RoIAlign (Mask R-CNN): each box's bins as averages of bilinear samples.

    Equal to ``torchvision.ops.roi_align(features, cat([box_indices, boxes]),
    output_size, spatial_scale, sampling_ratio, aligned)``. A box is scaled by
    ``spatial_scale`` (minus half a cell with ``aligned``), split into ``oh x ow`` bins,
    and each bin averages ``grid_h x grid_w`` bilinear samples on a regular grid
    (``sampling_ratio`` per side, or ``ceil(roi_size / output_size)`` when it is ``<= 0``).
    Without ``aligned`` a box is at least one cell wide and high (torchvision's legacy
    rule); samples outside ``[-1, H] x [-1, W]`` count 0, those in the border band read
    the edge cells.

    Args:
      features: ``(B, H, W, C)`` (``data_format="NHWC"``) or ``(B, C, H, W)``.
      boxes: ``(R, 4)`` float ``(x1, y1, x2, y2)`` in image pixels.
      box_indices: ``(R,)`` int, each box's batch element (default all 0).
      output_size: ``oh`` (square) or ``(oh, ow)``.
      spatial_scale: feature cells per image pixel (``1 / stride``).
      sampling_ratio: samples per bin side; ``<= 0``: adaptive, per box.
      aligned: shift boxes by half a cell so that pixel centres align (Detectron2's
        fix), and drop the one-cell minimum.
      valid: optional ``(R,)`` bool; False rows are padding: zeros, no gradient.
      data_format: ``"NHWC"`` or ``"NCHW"``.

    Returns:
      ``(R, oh, ow, C)`` for NHWC, ``(R, C, oh, ow)`` for NCHW, in the features' dtype.

    R is static (pad boxes to a bucket and pass ``valid``); box values never
    recompile. Derivatives flow to ``features`` and ``boxes``, to any order.

    Example:
      >>> import jax.numpy as jnp
      >>> f = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> roi_align(f, jnp.array([[0.0, 0.0, 2.0, 2.0]]), output_size=1, sampling_ratio=2,
      ...           aligned=True)[0, 0, 0, 0]
      Array(2.5, dtype=float32)
    """
    x, boxes, image, live, out_hw = _prepare(
        features, boxes, box_indices, valid, output_size, spatial_scale, data_format, False
    )
    sampling_ratio = _check_sampling_ratio(sampling_ratio)
    out = _bilinear_pool(
        x, boxes, image, live, out_hw, spatial_scale, sampling_ratio, bool(aligned), False
    )
    return _finish(out, live, x.dtype, data_format)


def ps_roi_align(
    features: jax.Array,
    boxes: jax.Array,
    box_indices: jax.Array | None = None,
    *,
    output_size: OutputSize,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    valid: jax.Array | None = None,
    data_format: str = "NHWC",
) -> jax.Array:
    """Position-sensitive RoIAlign (R-FCN with RoIAlign's sampling).

    Equal to ``torchvision.ops.ps_roi_align``: as :func:`roi_align` with
    ``aligned=True`` (torchvision's ``ps_roi_align`` always shifts by half a cell), but
    output bin ``(p, q)`` of channel ``c`` averages input channel
    ``(c * oh + p) * ow + q``, so ``C = C_out * oh * ow``. A bin without samples gives 0
    (torchvision divides 0 by 0 there).

    Args:
      features: ``(B, H, W, C_out * oh * ow)`` (NHWC) or ``(B, C_out * oh * ow, H, W)``.
      boxes, box_indices, spatial_scale, sampling_ratio, valid, data_format: as
        :func:`roi_align`.
      output_size: ``oh`` (square) or ``(oh, ow)``.

    Returns:
      ``(R, oh, ow, C_out)`` for NHWC, ``(R, C_out, oh, ow)`` for NCHW.

    Example:
      >>> import jax.numpy as jnp
      >>> f = jnp.ones((1, 8, 8, 2 * 3 * 3))
      >>> ps_roi_align(f, jnp.array([[0.0, 0.0, 6.0, 6.0]]), output_size=3).shape
      (1, 3, 3, 2)
    """
    x, boxes, image, live, out_hw = _prepare(
        features, boxes, box_indices, valid, output_size, spatial_scale, data_format, True
    )
    sampling_ratio = _check_sampling_ratio(sampling_ratio)
    out = _bilinear_pool(x, boxes, image, live, out_hw, spatial_scale, sampling_ratio, True, True)
    return _finish(out, live, x.dtype, data_format)


def ps_roi_pool(
    features: jax.Array,
    boxes: jax.Array,
    box_indices: jax.Array | None = None,
    *,
    output_size: OutputSize,
    spatial_scale: float = 1.0,
    valid: jax.Array | None = None,
    data_format: str = "NHWC",
) -> jax.Array:
    """Position-sensitive RoI pooling (R-FCN): bin averages over whole cells.

    Equal to ``torchvision.ops.ps_roi_pool``. A box's corners are rounded to cells
    (``round(v * spatial_scale)``, halves away from zero), the box is at least one cell,
    bin ``(p, q)`` covers cells ``[floor(p * bin_h), ceil((p + 1) * bin_h))`` from the
    box's corner (likewise for columns) clipped to ``[0, H - 1)`` as torchvision's
    forward clips them, and averages input channel ``(c * oh + p) * ow + q`` over them; an
    empty bin gives 0.

    Args:
      features: ``(B, H, W, C_out * oh * ow)`` (NHWC) or ``(B, C_out * oh * ow, H, W)``.
      boxes, box_indices, spatial_scale, valid, data_format: as :func:`roi_align`.
      output_size: ``oh`` (square) or ``(oh, ow)``.

    Returns:
      ``(R, oh, ow, C_out)`` for NHWC, ``(R, C_out, oh, ow)`` for NCHW.

    Derivatives flow to ``features`` (bin membership is piecewise constant in the
    boxes). They are the gradient of this forward: where a bin reaches the map's last
    row or column, torchvision's backward also spreads into that row, which its forward
    does not read.

    Example:
      >>> import jax.numpy as jnp
      >>> f = jnp.ones((1, 8, 8, 4))
      >>> ps_roi_pool(f, jnp.array([[0.0, 0.0, 4.0, 4.0]]), output_size=2).shape
      (1, 2, 2, 1)
    """
    x, boxes, image, live, out_hw = _prepare(
        features, boxes, box_indices, valid, output_size, spatial_scale, data_format, True
    )
    _, h, w, c = x.shape
    oh, ow = out_hw
    corner = _round_half_away(boxes * jnp.asarray(spatial_scale, boxes.dtype))
    corner = jnp.clip(jnp.where(jnp.isnan(corner), 0.0, corner), -(2.0**30), 2.0**30)
    corner = corner.astype(jnp.int32)
    x1, y1, x2, y2 = (corner[:, i] for i in range(4))
    bin_h = _divide(jnp.maximum(y2 - y1, 1).astype(boxes.dtype), oh)
    bin_w = _divide(jnp.maximum(x2 - x1, 1).astype(boxes.dtype), ow)

    def edges(origin, bin_size, n, size):  # (R, n) starts and ends, clipped as torchvision
        p = jnp.arange(n, dtype=bin_size.dtype)
        lo = jnp.floor(p[None, :] * bin_size[:, None]).astype(jnp.int32) + origin[:, None]
        hi = jnp.ceil((p[None, :] + 1) * bin_size[:, None]).astype(jnp.int32) + origin[:, None]
        return jnp.clip(lo, 0, size - 1), jnp.clip(hi, 0, size - 1)

    hs, he = edges(y1, bin_h, oh, h)
    ws, we = edges(x1, bin_w, ow, w)

    def inverse_length(lo, hi):  # a bin's area is its height times its width
        return jnp.where(hi > lo, 1.0 / jnp.maximum(hi - lo, 1).astype(boxes.dtype), 0.0)

    per_box = dict(
        image=image, hs=hs, he=he, ws=ws, we=we,
        inv_h=inverse_length(hs, he) * live.astype(boxes.dtype)[:, None],
        inv_w=inverse_length(ws, we),
    )  # fmt: skip

    def weights(b):
        a_y = _range_weights(b["hs"], b["he"], h, boxes.dtype) * b["inv_h"][:, None]
        return a_y, _range_weights(b["ws"], b["we"], w, boxes.dtype) * b["inv_w"][:, None]

    out = _pool_boxes(x, per_box, weights, out_hw, True, w * c)
    return _finish(out, live, x.dtype, data_format)
