"""Spatial pyramid pooling on static bins: the pure JAX core (no Flax).

How it is computed (measured choices, see ``experiments/benchmarks/spp_layer.py``):

* **Separable.** A 2-D bin is a product of a row range and a column range, so
  each level is reduced over columns first, then over rows. Each stage is a chain
  of elementwise ``max``/``+`` over static slices of the input, which XLA fuses
  into one loop per stage. Where the bins of a stage are equally long and start
  at a fixed stride (e.g. 13 cells into 6 bins: width 3, stride 2) the slices are
  strided and need no concatenation, which is several times faster on CPU than
  per-bin slices glued by ``concatenate``.
* **Coarse levels from the finest.** For max pooling a coarse bin that is
  exactly the union of a run of fine bins (always so for the adaptive rule when
  the coarse count divides the fine count, as in (6, 3, 2, 1)) is reduced from
  the fine level's small output instead of from the input. So the input is read
  about once whatever the number of levels. Levels that are not such unions are
  reduced from the input. Average pooling always reduces each level from the
  input (sums of overlapping bins do not compose), accumulating in float32.
* **Gradients.** The fast forward computes values only. A ``custom_jvp`` rule
  recomputes the reduction with a key per candidate (its row-major cell index)
  and selects, per bin, the value with the largest value and then the smallest
  key: the first maximum in row-major order, PyTorch's rule, also under ties and
  whatever the order in which stages and levels combine. The tangent follows the
  same selections, so reverse mode (by JAX's transposition of the JVP) routes
  each bin's cotangent to exactly one cell, with no scatter. NaN counts as the
  largest value: a bin holding NaN yields NaN, and its gradient goes to the first
  NaN of the bin in row-major order.
* **Padded batches** (``valid_sizes``): the bins of each example are computed
  in-graph from its size, and cells outside a bin are masked out, so changing the
  sizes never recompiles and the padding (even inf or NaN) never leaks in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax import geometry
from spp_jax.geometry import Level, LevelsLike

MODES = ("max", "avg")
DATA_FORMATS = ("NHWC", "NCHW")

_BIG_KEY = np.iinfo(np.int32).max
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)

Ranges = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------------------
# The static plan: which level is reduced from what.
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _plan(h: int, w: int, levels: tuple[Level, ...], rule: str, mode: str, dynamic: bool):
    """Static reduction plan for one shape bucket.

    Returns ``(base, steps)``: ``base`` is the index of the level reduced from the
    input that other levels are built from (None if none is), and ``steps[l]`` is
    ``("input", rows, cols)`` (bins in input cells) or ``("base", rows, cols)``
    (runs of base bins) for level ``l``.
    """
    bins = geometry._pyramid_bins(h, w, levels, rule)

    def covers(fine: int, coarse: int):
        if mode != "max":
            return None
        if dynamic:
            # The bins move with each example's size: use the size-independent
            # rule (coarse count divides fine count, adaptive bins).
            (fh, fw), (ch, cw) = levels[fine], levels[coarse]
            if fh % ch or fw % cw:
                return None
            kh, kw = fh // ch, fw // cw
            return (
                tuple((i * kh, (i + 1) * kh) for i in range(ch)),
                tuple((j * kw, (j + 1) * kw) for j in range(cw)),
            )
        rows = geometry.cover_ranges(bins[fine].rows, bins[coarse].rows)
        cols = geometry.cover_ranges(bins[fine].cols, bins[coarse].cols)
        return None if rows is None or cols is None else (rows, cols)

    base, best = None, 0
    order = sorted(range(len(levels)), key=lambda i: -levels[i][0] * levels[i][1])
    for cand in order:
        covered = sum(1 for other in range(len(levels)) if other != cand and covers(cand, other))
        if covered > best:
            base, best = cand, covered
    steps = []
    for i, lb in enumerate(bins):
        cover = covers(base, i) if base is not None and i != base else None
        if cover is not None:
            steps.append(("base", *cover))
        else:
            steps.append(("input", lb.rows, lb.cols))
    return base, tuple(steps)


# --------------------------------------------------------------------------------------
# Reducing one axis over static ranges.
# --------------------------------------------------------------------------------------

Carry = tuple[jax.Array, ...]
Combine = Callable[[Carry, Carry], Carry]


def _strided(ranges: Ranges) -> tuple[int, int, int] | None:
    """``(first_start, stride, length)`` if all ranges are equally long and evenly spaced."""
    lengths = {e - s for s, e in ranges}
    if len(lengths) != 1:
        return None
    if len(ranges) == 1:
        return ranges[0][0], 1, lengths.pop()
    stride = ranges[1][0] - ranges[0][0]
    if stride < 1 or any(ranges[i + 1][0] - ranges[i][0] != stride for i in range(len(ranges) - 1)):
        return None
    return ranges[0][0], stride, lengths.pop()


def _reduce_axis(arrays: Carry, axis: int, ranges: Ranges, combine: Combine) -> Carry:
    """Reduces aligned ``arrays`` along ``axis`` over each static range.

    ``combine(acc, item)`` folds one candidate into the accumulator, candidates
    coming in order of increasing cell index. The result has ``len(ranges)``
    entries along ``axis``.
    """
    if ranges == tuple((i, i + 1) for i in range(arrays[0].shape[axis])):
        return arrays  # identity: one cell per range
    strided = _strided(ranges)
    if strided is not None:
        # Offset o of every range at once: one strided slice, no concatenate.
        start, stride, length = strided
        stop = (len(ranges) - 1) * stride + 1
        acc = None
        for lo in range(start, start + length):
            item = tuple(lax.slice_in_dim(a, lo, lo + stop, stride, axis) for a in arrays)
            acc = item if acc is None else combine(acc, item)
        return acc
    parts = []
    for s, e in ranges:
        acc = None
        for c in range(s, e):
            item = tuple(lax.slice_in_dim(a, c, c + 1, 1, axis) for a in arrays)
            acc = item if acc is None else combine(acc, item)
        parts.append(acc)
    return tuple(jnp.concatenate([p[i] for p in parts], axis) for i in range(len(arrays)))


def _max2(a: Carry, b: Carry) -> Carry:
    return (jnp.maximum(a[0], b[0]),)


def _sum2(a: Carry, b: Carry) -> Carry:
    return (a[0] + b[0],)


def _better(va, ka, vb, kb):
    """True where candidate b beats a: larger value, then smaller key; NaN is largest."""
    a_nan, b_nan = jnp.isnan(va), jnp.isnan(vb)
    smaller_key = kb < ka
    return (b_nan & (~a_nan | smaller_key)) | (~a_nan & ((vb > va) | ((vb == va) & smaller_key)))


def _select2(a: Carry, b: Carry) -> Carry:
    """Combines (value, key, tangent[, ...]) by the first-maximum rule."""
    take = _better(a[0], a[1], b[0], b[1])
    return tuple(jnp.where(take, y, x) for x, y in zip(a, b, strict=False))


def _select_in_order(a: Carry, b: Carry) -> Carry:
    """:func:`_select2` for candidates that arrive in increasing key order.

    Then the smaller key is always the earlier candidate, so b wins only by a
    strictly larger value (or a first NaN): 3 comparisons instead of 9.
    """
    take = ~jnp.isnan(a[0]) & (jnp.isnan(b[0]) | (b[0] > a[0]))
    return tuple(jnp.where(take, y, x) for x, y in zip(a, b, strict=False))


def _separable(arrays: Carry, rows: Ranges, cols: Ranges, combine: Combine) -> Carry:
    """Reduces NHWC-aligned arrays over columns (axis 2), then rows (axis 1)."""
    return _reduce_axis(_reduce_axis(arrays, 2, cols, combine), 1, rows, combine)


# --------------------------------------------------------------------------------------
# Max stages with first-maximum gradients.
# --------------------------------------------------------------------------------------


def _route(g: jax.Array, pos: jax.Array, axis: int, windows: Ranges, length: int) -> jax.Array:
    """Transpose of a max stage: sends each output's cotangent to its winning cell.

    ``pos`` holds, for each output, the absolute index (along ``axis``) of the cell
    that won; ``windows[p]`` is a static range that contains every cell output
    ``p`` can pick. Built as one elementwise expression per input cell, which XLA
    fuses into a single loop (no scatter).
    """
    parts = []
    for c in range(length):
        acc = None
        for p, (s, e) in enumerate(windows):
            if s <= c < e:
                term = jnp.where(
                    lax.slice_in_dim(pos, p, p + 1, 1, axis) == c,
                    lax.slice_in_dim(g, p, p + 1, 1, axis),
                    jnp.zeros((), g.dtype),
                )
                acc = term if acc is None else acc + term
        if acc is None:  # a cell no bin reads (possible with rule="sliding")
            acc = jnp.zeros_like(lax.slice_in_dim(g, 0, 1, 1, axis))
        parts.append(acc)
    return jnp.concatenate(parts, axis)


def _positions(v: jax.Array, axis: int) -> jax.Array:
    return lax.broadcasted_iota(jnp.int32, v.shape, axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _max_stage(v: jax.Array, k: jax.Array, axis: int, ranges: Ranges, in_order: bool):
    """Max over static ranges along ``axis``: returns ``(values, keys)``.

    ``keys`` are the row-major input cell indices of the winners (first maximum);
    they only decide ties in later stages and are removed by XLA when unused.
    ``in_order`` says that keys increase along ``axis`` inside every range (true
    for stages that read the input), which allows a cheaper comparison.
    """
    (out_v,) = _reduce_axis((v,), axis, ranges, _max2)
    _, (out_k, _) = _max_stage_fwd(v, k, axis, ranges, in_order)
    return out_v, out_k


def _max_stage_fwd(v, k, axis, ranges, in_order):
    select = _select_in_order if in_order else _select2
    out_v, out_k, pos = _reduce_axis((v, k, _positions(v, axis)), axis, ranges, select)
    return (out_v, out_k), (pos, v.shape[axis])


def _max_stage_bwd(axis, ranges, in_order, res, ct):
    pos, length = res
    g, _ = ct
    return _route(g, pos, axis, ranges, length), None


_max_stage.defvjp(_max_stage_fwd, _max_stage_bwd)


def _masked_windows(length: int, n: int) -> Ranges:
    # Adaptive bin p of any size <= length lies inside [0, ceil((p + 1) * length / n)).
    return tuple((0, -((-(p + 1) * length) // n)) for p in range(n))


def _masked_reduce(
    arrays: Carry, axis: int, size: jax.Array, n: int, combine: Combine, fill: Carry
):
    """Reduces NHWC-aligned arrays along ``axis`` into the ``n`` adaptive bins of
    each example's own ``size``. Cells outside a bin are replaced by ``fill``
    (the identity of ``combine``), so the padding never contributes."""
    start, end = _dynamic_bins(size, n)
    parts = []
    for p, (lo, hi) in enumerate(_masked_windows(arrays[0].shape[axis], n)):
        acc = None
        for c in range(lo, hi):
            inside = ((start[:, p] <= c) & (c < end[:, p])).reshape((-1, 1, 1, 1))
            item = tuple(
                jnp.where(inside, lax.slice_in_dim(a, c, c + 1, 1, axis), f)
                for a, f in zip(arrays, fill, strict=False)
            )
            acc = item if acc is None else combine(acc, item)
        parts.append(acc)
    return tuple(jnp.concatenate([p[i] for p in parts], axis) for i in range(len(arrays)))


def _keyed_fill(v: jax.Array) -> Carry:
    return (jnp.array(-jnp.inf, v.dtype), jnp.int32(_BIG_KEY), jnp.int32(0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _masked_max_stage(v, k, size, axis: int, n: int):
    """Like :func:`_max_stage` over the adaptive bins of traced per-example sizes."""
    neg = jnp.array(-jnp.inf, v.dtype)
    (out_v,) = _masked_reduce((v,), axis, size, n, _max2, (neg,))
    carry = (v, k, _positions(v, axis))
    _, out_k, _ = _masked_reduce(carry, axis, size, n, _select2, _keyed_fill(v))
    return out_v, out_k


def _masked_max_stage_fwd(v, k, size, axis, n):
    carry = (v, k, _positions(v, axis))
    out_v, out_k, pos = _masked_reduce(carry, axis, size, n, _select2, _keyed_fill(v))
    return (out_v, out_k), (pos, v.shape[axis])


def _masked_max_stage_bwd(axis, n, res, ct):
    pos, length = res
    g, _ = ct
    return _route(g, pos, axis, _masked_windows(length, n), length), None, None


_masked_max_stage.defvjp(_masked_max_stage_fwd, _masked_max_stage_bwd)


# --------------------------------------------------------------------------------------
# Whole pyramids.
# --------------------------------------------------------------------------------------


def _input_keys(x: jax.Array) -> jax.Array:
    """Row-major cell index ``h * W + w`` of every element of an NHWC array."""
    w = x.shape[2]
    return _positions(x, 1) * w + _positions(x, 2)


def _run_plan(
    plan, from_input: Callable[[int], Carry], from_base: Callable[[Carry, Ranges, Ranges], Carry]
):
    """Evaluates a plan: each level from the input, or from the base level's output."""
    base, steps = plan
    outs: list[Carry | None] = [None] * len(steps)
    if base is not None:
        outs[base] = from_input(base)
    for i, (source, rows, cols) in enumerate(steps):
        if outs[i] is None:
            outs[i] = from_base(outs[base], rows, cols) if source == "base" else from_input(i)
    return outs


def _max_from_base(carry: Carry, rows: Ranges, cols: Ranges) -> Carry:
    v, k = carry
    v, k = _max_stage(v, k, 2, cols, False)
    return _max_stage(v, k, 1, rows, False)


def _max_static(x: jax.Array, plan) -> tuple[jax.Array, ...]:
    keys = _input_keys(x)
    steps = plan[1]

    def from_input(i):
        _, rows, cols = steps[i]
        v, k = _max_stage(x, keys, 2, cols, True)
        return _max_stage(v, k, 1, rows, True)

    return tuple(o[0] for o in _run_plan(plan, from_input, _max_from_base))


def _max_dynamic(x: jax.Array, sizes: jax.Array, plan, levels) -> tuple[jax.Array, ...]:
    keys = _input_keys(x)

    def from_input(i):
        nh, nw = levels[i]
        v, k = _masked_max_stage(x, keys, sizes[:, 1], 2, nw)
        return _masked_max_stage(v, k, sizes[:, 0], 1, nh)

    return tuple(o[0] for o in _run_plan(plan, from_input, _max_from_base))


def _avg_static(x: jax.Array, plan) -> tuple[jax.Array, ...]:
    xf = x.astype(jnp.float32)
    outs = []
    for _, rows, cols in plan[1]:
        (s,) = _separable((xf,), rows, cols, _sum2)
        area = np.array([[(re - rs) * (ce - cs) for cs, ce in cols] for rs, re in rows])
        outs.append((s / area[None, :, :, None].astype(np.float32)).astype(x.dtype))
    return tuple(outs)


def _dynamic_bins(size: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Adaptive bins for traced sizes ``(B,)``: ``start, end`` of shape ``(B, n)``."""
    i = jnp.arange(n, dtype=jnp.int32)[None, :]
    a = size[:, None]
    return (i * a) // n, -((-(i + 1) * a) // n)


def _avg_dynamic(x: jax.Array, sizes: jax.Array, levels) -> tuple[jax.Array, ...]:
    xf = x.astype(jnp.float32)
    outs = []
    for nh, nw in levels:
        (s,) = _masked_reduce((xf,), 2, sizes[:, 1], nw, _sum2, (0.0,))
        (s,) = _masked_reduce((s,), 1, sizes[:, 0], nh, _sum2, (0.0,))
        hs, he = _dynamic_bins(sizes[:, 0], nh)
        ws, we = _dynamic_bins(sizes[:, 1], nw)
        area = ((he - hs)[:, :, None] * (we - ws)[:, None, :]).astype(jnp.float32)
        outs.append((s / area[..., None]).astype(x.dtype))
    return tuple(outs)


# --------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------


def _check_args(x: Any, mode: str, rule: str, data_format: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted modes are {MODES}")
    geometry.check_rule(rule)
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"unknown data_format {data_format!r}; accepted formats are {DATA_FORMATS}"
        )
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"x must be an array, got {type(x).__name__}")
    if x.ndim != 4:
        layout = "(B, H, W, C)" if data_format == "NHWC" else "(B, C, H, W)"
        raise ValueError(
            f"x must have rank 4, {layout} for data_format={data_format!r}; "
            f"got shape {tuple(x.shape)} (rank {x.ndim})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must have a floating dtype (float32, bfloat16, float16), got {x.dtype}")


def spatial_pyramid_pool(
    x: jax.Array,
    levels: LevelsLike = (6, 3, 2, 1),
    *,
    mode: str = "max",
    rule: str = "adaptive",
    data_format: str = "NHWC",
    valid_sizes: jax.Array | Sequence[Sequence[int]] | None = None,
    channel_major: bool = False,
) -> jax.Array:
    """Pools a feature map into a fixed-length vector per example (SPP-net).

    Each level ``(n_h, n_w)`` splits the map into ``n_h x n_w`` bins (by ``rule``)
    and pools each bin over every channel; the levels are flattened and
    concatenated in the order given. The output length depends only on ``C`` and
    ``levels``, never on ``H`` or ``W``.

    Args:
      x: ``(B, H, W, C)`` if ``data_format="NHWC"`` (default, fastest) or
        ``(B, C, H, W)`` if ``"NCHW"``. float32, bfloat16 or float16.
      levels: ints ``n`` (``n x n`` bins) or pairs ``(n_h, n_w)``.
      mode: ``"max"`` or ``"avg"`` (accumulates in float32).
      rule: ``"adaptive"`` (PyTorch ``adaptive_*_pool2d``, any size),
        ``"sliding"`` (paper section 2.3, only where it gives exactly ``n``
        windows) or ``"partition"`` (non-overlapping, needs ``H, W >= n``).
      data_format: ``"NHWC"`` or ``"NCHW"``.
      valid_sizes: optional int array ``(B, 2)``: the true ``(h, w)`` of each
        example in a padded batch. Example ``i`` is pooled over
        ``x[i, :h_i, :w_i]`` only, whatever the padding holds; values are clipped
        into ``[1, H] x [1, W]``. Changing the values never recompiles. Only with
        ``rule="adaptive"``.
      channel_major: flatten order of each level: False gives ``(n_h, n_w, C)``,
        True gives ``(C, n_h, n_w)`` (PyTorch's ``adaptive_max_pool2d(x).flatten(1)``).

    Returns:
      ``(B, C * sum(n_h * n_w))``, the dtype of ``x``.

    Max pooling routes each bin's gradient to one cell, the first maximum in
    row-major order (PyTorch's rule); average pooling spreads it over the bin.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(2 * 7 * 5 * 3, dtype=jnp.float32).reshape(2, 7, 5, 3)
      >>> spatial_pyramid_pool(x, (2, 1)).shape  # 3 * (4 + 1)
      (2, 15)
    """
    _check_args(x, mode, rule, data_format)
    lv = geometry.normalize_levels(levels)
    x = jnp.asarray(x)
    if data_format == "NCHW":
        x = jnp.transpose(x, (0, 2, 3, 1))
    b, h, w, c = x.shape
    if h < 1 or w < 1:
        raise ValueError(f"cannot pool an empty feature map: H={h}, W={w} (both must be >= 1)")
    if b == 0 or c == 0:  # nothing to pool
        return jnp.zeros((b, c * sum(nh * nw for nh, nw in lv)), x.dtype)

    if valid_sizes is None:
        plan = _plan(h, w, lv, rule, mode, False)
        outs = _max_static(x, plan) if mode == "max" else _avg_static(x, plan)
    else:
        if rule != "adaptive":
            raise ValueError(
                f'valid_sizes needs rule="adaptive" (the only rule valid for every size), '
                f"got rule={rule!r}"
            )
        sizes = _check_sizes(valid_sizes, b, h, w)
        if mode == "max":
            outs = _max_dynamic(x, sizes, _plan(h, w, lv, rule, mode, True), lv)
        else:
            outs = _avg_dynamic(x, sizes, lv)

    return _flatten_levels(outs, channel_major)


def _flatten_levels(outs: Sequence[jax.Array], channel_major: bool) -> jax.Array:
    """Flattens per-level ``(B, n_h, n_w, C)`` outputs and concatenates them.

    The concatenation runs on a ``(B, rows, g)`` view, ``g`` the largest common
    divisor of the level sizes: XLA's CPU backend concatenates long rows of a 2-D
    array several times slower than many short rows of equal width.
    """
    b = outs[0].shape[0]
    flat = [jnp.transpose(o, (0, 3, 1, 2)) if channel_major else o for o in outs]
    sizes = [int(np.prod(o.shape[1:])) for o in flat]
    g = functools.reduce(math.gcd, sizes)
    out = jnp.concatenate([o.reshape(b, -1, g) for o in flat], axis=1)
    return out.reshape(b, -1)


def _check_sizes(valid_sizes: Any, b: int, h: int, w: int) -> jax.Array:
    sizes = jnp.asarray(valid_sizes)
    if sizes.shape != (b, 2):
        raise ValueError(
            f"valid_sizes must have shape (B, 2) = ({b}, 2) holding each example's (h, w), "
            f"got shape {tuple(sizes.shape)}"
        )
    if not jnp.issubdtype(sizes.dtype, jnp.integer):
        raise TypeError(f"valid_sizes must be an integer array, got dtype {sizes.dtype}")
    sizes = sizes.astype(jnp.int32)
    return jnp.stack([jnp.clip(sizes[:, 0], 1, h), jnp.clip(sizes[:, 1], 1, w)], axis=1)
