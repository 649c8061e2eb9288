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
count that depends on the box) needs no data-dependent shape: its samples lie more than
half a cell apart, so each cell enumerates the few that can reach it; new boxes never
recompile.

:func:`roi_align` computes its value a second way, reading only the cells its samples
touch, as torchvision does: with a fixed sampling ratio ``s``, bin ``(p, q)`` gathers
the ``2 s x 2 s`` cells between which its row and column samples fall and adds them up
weighted, one gather per cell, in one pass that XLA fuses; with the adaptive grid, a
bin's cells are read a small window at a time, in a loop until the box's largest bin is
covered. Like torchvision's kernel, it reads what grows with the samples, not with the
map. A gather's transpose is a scatter, so the value comes from the gathers
and the derivatives, of every order, from the contraction (a ``jax.custom_jvp`` whose
tangent is the contraction's).

What follows from it: the ops are ``jnp`` code, so they compose with every JAX
transformation, to any order of derivatives, for the boxes too; gradients are dot
products with no scatter, hence bitwise deterministic on every backend; nothing lowers
to a custom call, so they run unchanged on CPU, GPU and TPU; and boxes go through
``lax.map`` in chunks, so memory stays bounded for any number of boxes. The
contraction's cost per box grows with the map's area (``oh * B * H * W * C``
multiply-adds for ``A_y @ F``, where the one-hot pick of the box's image brings the
batch size ``B``): that is what derivatives, the position-sensitive ops and sampling
ratios above 4 cost; right for the maps detection heads pool (tens of cells a side),
wasteful on maps hundreds of cells wide.
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
# The gathered forward's chunks: each box's sum stays in cache while its terms are added.
_GATHER_CHUNK_BYTES = 2**20
# Cells per side an adaptive bin's window is read by at a time (_gather_boxes).
_WINDOW = 3
# Most taps per bin (2 s x 2 s for sampling ratio s) that the gathered forward unrolls;
# beyond, the dense contraction gives the value too.
_MAX_TAPS = 64


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


def _samples(
    start: jax.Array, bin_size: jax.Array, grid: jax.Array, n_out: int, i: jax.Array
) -> jax.Array:
    """Positions (``i``'s shape) of samples ``i[p, ...]`` of bins ``p < n_out``: bin ``p``
    samples ``y = start + p * bin_size + (i + 0.5) * bin_size / grid`` for ``i < grid``,
    in torchvision's order of operations."""
    dt = start.dtype
    base = start + jnp.arange(n_out, dtype=dt) * bin_size
    # a bin without samples (grid 0) is masked by _bilinear; dividing by 1 keeps its
    # derivatives finite
    grid_f = jnp.maximum(grid.astype(dt), 1.0)
    return jnp.expand_dims(base, tuple(range(1, i.ndim))) + (i.astype(dt) + 0.5) * bin_size / grid_f


def _bilinear(
    y: jax.Array, i: jax.Array, grid: jax.Array, size: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The two cells samples ``y`` (indices ``i``) read, low and high, and their weights.

    A sample outside ``[-1, size]`` (or not one of its bin's ``grid``) weighs 0; one in
    ``[-1, 0]`` reads cell 0, one at or past ``size - 1`` the last cell."""
    inside = (i >= 0) & (i < grid) & (y >= -1.0) & (y <= size)
    y = jnp.maximum(y, 0.0)
    low = jnp.clip(y, 0.0, size).astype(jnp.int32)
    top = low >= size - 1
    low = jnp.where(top, size - 1, low)
    high = jnp.where(top, size - 1, low + 1)
    frac = jnp.where(top, 0.0, y - low.astype(y.dtype))
    return low, high, jnp.where(inside, 1.0 - frac, 0.0), jnp.where(inside, frac, 0.0)


def _first_sample(
    start: jax.Array, bin_size: jax.Array, grid: jax.Array, n_out: int, at: jax.Array
) -> jax.Array:
    """Per bin (``at``: ``(n_out, ...)``), one before the index of the first sample at
    or past ``at`` by the closed form (which rounding can move by one), at least 0."""
    dt = start.dtype
    base = start + jnp.arange(n_out, dtype=dt) * bin_size
    step = bin_size / jnp.maximum(grid.astype(dt), 1.0)
    base = jnp.expand_dims(base, tuple(range(1, at.ndim)))
    first = jnp.ceil((at - base) / jnp.where(step > 0, step, 1.0) - 0.5) - 1.0
    return jnp.clip(first, 0.0, 2.0**30).astype(jnp.int32)


def _cell_weights(
    start: jax.Array,
    bin_size: jax.Array,
    grid: jax.Array,
    n_out: int,
    size: int,
    cells: jax.Array,
    samples: int,
) -> jax.Array:
    """``cells``' shape ``(n_out, G)``: the summed bilinear weights bin ``p``'s samples
    give cell ``cells[p, g]``.

    ``samples``: the samples per bin when that is static (a fixed sampling ratio), all
    enumerated for every cell; else ``-1``: each cell enumerates the samples that can
    reach it, those in ``[c - 1, c + 1]``. An adaptive grid (``grid =
    ceil(bin_size)``) has one sample per bin or samples more than half a cell apart, so
    at most 4 lie there; 6 are enumerated from one before the first, for rounding.
    """
    if samples > 0:
        i = jnp.broadcast_to(jnp.arange(samples, dtype=jnp.int32), (*cells.shape, samples))
    else:
        first = _first_sample(start, bin_size, grid, n_out, cells.astype(start.dtype) - 1.0)
        i = first[..., None] + jnp.arange(6, dtype=jnp.int32)[None, None, :]
    low, high, w_low, w_high = _bilinear(_samples(start, bin_size, grid, n_out, i), i, grid, size)
    c = cells[..., None]
    return jnp.sum(jnp.where(low == c, w_low, 0.0) + jnp.where(high == c, w_high, 0.0), axis=-1)


def _sample_weights(
    start: jax.Array, bin_size: jax.Array, grid: jax.Array, n_out: int, size: int, samples: int
) -> jax.Array:
    """``(n_out, size)``: per bin, the summed bilinear weights of its samples on each
    cell (:func:`_cell_weights` of every cell)."""
    cells = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (n_out, size))
    return _cell_weights(start, bin_size, grid, n_out, size, cells, samples)


def _sample_taps(
    start: jax.Array, bin_size: jax.Array, grid: jax.Array, n_out: int, size: int, samples: int
) -> tuple[jax.Array, jax.Array]:
    """``(n_out, 2 * samples)`` cells and weights: the low and the high cell each of a
    bin's ``samples`` samples reads (a fixed sampling ratio) and their weights."""
    i = jnp.broadcast_to(jnp.arange(samples, dtype=jnp.int32), (n_out, samples))
    low, high, w_low, w_high = _bilinear(_samples(start, bin_size, grid, n_out, i), i, grid, size)
    return jnp.concatenate([low, high], 1), jnp.concatenate([w_low, w_high], 1)


def _bin_window(
    start: jax.Array, bin_size: jax.Array, grid: jax.Array, n_out: int, size: int
) -> tuple[jax.Array, jax.Array]:
    """``(n_out,)`` first cell and number of cells that each bin's samples read: from the
    low cell of its first sample in ``[-1, size]`` to the high cell of its last (0 cells
    if none is)."""
    dt = start.dtype
    base = start + jnp.arange(n_out, dtype=dt) * bin_size
    step = bin_size / jnp.maximum(grid.astype(dt), 1.0)
    last = jnp.floor((size - base) / jnp.where(step > 0, step, 1.0) - 0.5)
    last = jnp.minimum(jnp.clip(last, -2.0, 2.0**30).astype(jnp.int32), grid - 1)
    # the analytic first and last, and their neighbours: rounding can move them by one
    near = jnp.arange(-1, 3, dtype=jnp.int32)[None, :]
    first = _first_sample(start, bin_size, grid, n_out, jnp.full((n_out,), -1.0, dt))
    i = jnp.concatenate([first[:, None] + near, last[:, None] + near - 1], 1)  # (n_out, 8)
    y = _samples(start, bin_size, grid, n_out, i)
    ok = (i >= 0) & (i < grid) & (y >= -1.0) & (y <= size)
    i_first = jnp.min(jnp.where(ok, i, 2**30), axis=1)
    i_last = jnp.max(jnp.where(ok, i, -1), axis=1)
    any_ = i_first <= i_last
    i_first, i_last = jnp.where(any_, i_first, 0), jnp.where(any_, i_last, 0)
    lo, _, _, _ = _bilinear(_samples(start, bin_size, grid, n_out, i_first[:, None]),
                            i_first[:, None], grid, size)  # fmt: skip
    _, hi, _, _ = _bilinear(_samples(start, bin_size, grid, n_out, i_last[:, None]),
                            i_last[:, None], grid, size)  # fmt: skip
    return lo[:, 0], jnp.where(any_, jnp.clip(hi[:, 0] - lo[:, 0] + 1, 0, size), 0)


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
        # A_y @ F is one matrix product for a chunk of boxes. @ A_x^T is another for
        # roi_align: as a fused multiply and sum, XLA:CPU has given its gradient NaNs.
        # Position-sensitive, a batch of tiny ones, it runs faster as that multiply and sum.
        if position_sensitive:
            rows = jnp.einsum("pbh,pbhwcq->pwcq", a_yb, x, precision=hi)
            return jnp.sum(rows * a_x.T[None, :, None, :], axis=1).transpose(0, 2, 1)
        rows = jnp.einsum("pbh,bhwc->pwc", a_yb, x, precision=hi)
        return jnp.einsum("pwc,qw->pqc", rows, a_x, precision=hi)

    chunk = max(1, _CHUNK_BYTES // max(1, temp_per_box * x.dtype.itemsize))
    return lax.map(jax.checkpoint(one_box), per_box, batch_size=chunk)


def _tap_sum(
    cells: jax.Array, rows: jax.Array, w_rows: jax.Array, cols: jax.Array, w_cols: jax.Array
) -> jax.Array:
    """``(oh, ow, C)``: ``sum_ij cells[rows[p, i] + cols[q, j]] * w_rows[p, i] * w_cols[q, j]``,
    one gather per ``(i, j)`` and a sum of terms that XLA fuses into one pass."""

    def term(i: int, j: int) -> jax.Array:
        weight = (w_rows[:, i, None] * w_cols[None, :, j])[..., None]
        return cells[rows[:, i, None] + cols[None, :, j]].astype(weight.dtype) * weight

    pairs = [(i, j) for i in range(rows.shape[1]) for j in range(cols.shape[1])]
    out = term(*pairs[0])
    for i, j in pairs[1:]:
        out = out + term(i, j)
    return out


def _gather_boxes(
    x: jax.Array, per_box: dict[str, jax.Array], out_hw: tuple[int, int], sampling_ratio: int
) -> jax.Array:
    """``(R, oh, ow, C)``: RoIAlign's bins as weighted sums of the map cells their samples
    read, gathered, in the boxes' dtype.

    A fixed sampling ratio ``s``: bin ``(p, q)`` reads the ``2 s`` row cells of its row
    samples (:func:`_sample_taps`) times the ``2 s`` column cells of its column samples,
    as torchvision reads the four neighbours of each sample. Adaptive: the cells a bin
    reads span a window (:func:`_bin_window`) that grows with the bin, so it is read
    ``_WINDOW x _WINDOW`` cells at a time, each cell once, weighted by the sum of what
    its samples give it (:func:`_cell_weights`), until the box's largest window is
    covered: like torchvision's, the reads grow with the bin's area, not the map's.
    """
    n, h, w, c = x.shape
    oh, ow = out_hw
    cells = x.reshape(n * h * w, c)
    g = _WINDOW
    offsets = jnp.arange(g, dtype=jnp.int32)[None, :]

    def one_box(b: dict[str, jax.Array]) -> jax.Array:
        if sampling_ratio > 0:
            iy, wy = _sample_taps(b["y1"], b["bin_h"], b["grid_h"], oh, h, sampling_ratio)
            ix, wx = _sample_taps(b["x1"], b["bin_w"], b["grid_w"], ow, w, sampling_ratio)
            return _tap_sum(cells, (b["image"] * h + iy) * w, wy * b["scale"], ix, wx)
        y0, ny = _bin_window(b["y1"], b["bin_h"], b["grid_h"], oh, h)
        x0, nx = _bin_window(b["x1"], b["bin_w"], b["grid_w"], ow, w)
        steps_x = jnp.maximum((jnp.max(nx) + g - 1) // g, 1)
        steps = (jnp.max(ny) + g - 1) // g * steps_x

        def window(k, out):  # cells [y0 + g * (k // steps_x), ...) x [x0 + g * (k % steps_x), ...)
            ry = y0[:, None] + g * (k // steps_x) + offsets  # (oh, g)
            rx = x0[:, None] + g * (k % steps_x) + offsets  # (ow, g)
            ry, in_y = jnp.minimum(ry, h - 1), ry < (y0 + ny)[:, None]
            rx, in_x = jnp.minimum(rx, w - 1), rx < (x0 + nx)[:, None]
            wy = _cell_weights(b["y1"], b["bin_h"], b["grid_h"], oh, h, ry, -1)
            wx = _cell_weights(b["x1"], b["bin_w"], b["grid_w"], ow, w, rx, -1)
            wy, wx = jnp.where(in_y, wy, 0.0) * b["scale"], jnp.where(in_x, wx, 0.0)
            return out + _tap_sum(cells, (b["image"] * h + ry) * w, wy, rx, wx)

        return lax.fori_loop(0, steps, window, jnp.zeros((oh, ow, c), b["scale"].dtype))

    temp = 2 * oh * ow * c  # a box's sum and one term
    chunk = max(1, _GATHER_CHUNK_BYTES // max(1, temp * per_box["scale"].dtype.itemsize))
    return lax.map(one_box, per_box, batch_size=chunk)


def _dense_derivatives(
    value: Callable[..., jax.Array], dense: Callable[..., jax.Array]
) -> Callable[..., jax.Array]:
    """``value``, whose derivatives (of every order) are ``dense``'s: two computations
    of the same function, the first read by gathers, the second by dot products whose
    transposes are dot products too, so gradients never scatter."""
    fn = jax.custom_jvp(value)

    def jvp(primals, tangents):
        leaves, tree = jax.tree.flatten(primals)
        zero = jax.custom_derivatives.SymbolicZero
        dots = jax.tree.leaves(tangents, is_leaf=lambda t: isinstance(t, zero))
        moving = [k for k, t in enumerate(dots) if not isinstance(t, zero)]

        def restricted(*vals):  # dense as a function of the inputs that have tangents
            full = list(leaves)
            for k, v in zip(moving, vals, strict=True):
                full[k] = v
            return dense(*jax.tree.unflatten(tree, full))

        out = fn(*primals)
        if not moving:
            return out, jnp.zeros_like(out)
        _, out_dot = jax.jvp(restricted, [leaves[k] for k in moving], [dots[k] for k in moving])
        return out, out_dot

    fn.defjvp(jvp, symbolic_zeros=True)
    return fn


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

    adaptive = 0 if sampling_ratio > 0 else 6 * (h * oh + w * ow)
    c_rows = c // (oh * ow) if position_sensitive else c
    temp = oh * w * c_rows * (ow if position_sensitive else 1) + adaptive

    def dense(x, per_box):
        return _pool_boxes(x, per_box, weights, out_hw, position_sensitive, temp)

    if position_sensitive or (2 * sampling_ratio) ** 2 > _MAX_TAPS:
        return dense(x, per_box)

    def value(x, per_box):
        return _gather_boxes(x, per_box, out_hw, sampling_ratio).astype(x.dtype)

    return _dense_derivatives(value, dense)(x, per_box)


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
