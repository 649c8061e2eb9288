"""Spatial pyramid pooling on static bins: the pure JAX core (no Flax).

On CPU, max pooling may run the compiled kernel of ``spp_jax/_cpu/native.py``
instead (``docs/pooling.md``, "How it is computed"). What follows is the pure-JAX
code, which GPU and TPU run, average pooling uses and CPU falls back to; both are
tested against the same NumPy references.

How the pure-JAX code computes (each choice measured on CPU with
``experiments/benchmarks/spp_layer.py``; XLA's CPU backend decides most of it):

* **Separable stages.** A 2-D bin is a product of a row range and a column
  range, so each level is reduced over columns (a "stage" along axis 2), then
  over rows (axis 1). A stage is a chain of elementwise ops over static slices,
  which XLA fuses into one loop. Where all bins of a stage have one width and a
  fixed stride (13 cells into 6 bins: width 3, stride 2) each offset is one
  strided slice and no ``concatenate`` is needed.
* **Coarse levels from the finest.** For max pooling, a coarse bin that is the
  union of a run of fine bins (always so for the adaptive rule when the coarse
  count divides the fine count, as in (6, 3, 2, 1)) is reduced from the fine
  level's small output, so the input is read about once for all levels. Other
  levels, and every level of average pooling, are reduced from the input.
* **Max derivatives** (``custom_jvp`` on the whole pyramid). The forward pass
  computes values only. Under differentiation every stage also finds, per bin,
  the winner's key (its row-major input cell index) and its position along the
  stage's axis (``_stage_argmax``), in the total order of
  :func:`spp_jax._windows.better` (largest value, then smallest key, NaN largest),
  so stages and levels combine in any order and still pick PyTorch's first
  maximum, ties included. The tangent of each stage reads the input tangent at
  the winner (``_pick``); reverse mode transposes that into ``_route``, one
  elementwise term per cell, no scatter. Both are linear primitives (``_prims.py``
  says how they compose with every transformation, at every order).
* **Average pooling** accumulates in float32. A stage sum is a linear primitive
  whose transpose spreads each bin's cotangent over the bin's cells (autodiff
  of the slices would not fuse), and vice versa.
* **Padded batches** (``valid_sizes``). Each example's adaptive bins are
  computed in-graph from its size; a stage folds over a static window that holds
  a bin at every size, and cells outside the example's bin are masked. Changing
  the sizes never recompiles and padding (even inf or NaN) never leaks in.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad

from spp_jax import _prims, geometry
from spp_jax._cpu import native
from spp_jax._windows import better
from spp_jax.geometry import Level, LevelsLike

MODES = ("max", "avg")
DATA_FORMATS = ("NHWC", "NCHW")

_BIG_KEY = np.iinfo(np.int32).max
_PACK_LIMIT = _BIG_KEY  # keys packed with positions must stay below this

Ranges = tuple[tuple[int, int], ...]
Carry = tuple[jax.Array, ...]


# --------------------------------------------------------------------------------------
# The static plan: which level is reduced from what.
# --------------------------------------------------------------------------------------


def _covers(bins, levels: tuple[Level, ...], fine: int, coarse: int, dynamic: bool):
    """Each bin of level ``coarse`` as runs ``(rows, cols)`` of level ``fine``'s
    bins, or None where some coarse bin is not such a union (then max pooling
    cannot build the coarse level from the fine one)."""
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
        return None if mode != "max" else _covers(bins, levels, fine, coarse, dynamic)

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
        elif dynamic:  # static windows that hold the bins of every size; masks pick cells
            steps.append(("input", _windows(h, lb.n_h), _windows(w, lb.n_w)))
        else:
            steps.append(("input", lb.rows, lb.cols))
    return base, tuple(steps)


@functools.lru_cache(maxsize=1024)
def _kernel_pyramid(h: int, w: int, levels: tuple[Level, ...], rule: str, dynamic: bool):
    """The CPU kernel's plan: each level is reduced from the covering level that
    needs the fewest reads (chains allowed, e.g. 1x1 from 2x2 from 6x6), or from
    the input where that reads less. ``dynamic``: bins that move with each
    window's size (valid_sizes, RoI windows), costed at the full ``h x w``."""
    bins = geometry._pyramid_bins(h, w, levels, rule)
    steps: list = []
    for i, lb in enumerate(bins):
        best, best_cost = None, sum(e - s for s, e in lb.rows) * sum(e - s for s, e in lb.cols)
        for f, (fh, fw) in enumerate(levels):
            cover = _covers(bins, levels, f, i, dynamic) if fh * fw > lb.n_h * lb.n_w else None
            if cover is None:
                continue
            cost = sum(e - s for s, e in cover[0]) * sum(e - s for s, e in cover[1])
            if cost < best_cost:
                best, best_cost = (f, *cover), cost
        steps.append(best)
    return native.pyramid(levels, steps)


def _windows(length: int, n: int) -> Ranges:
    # Adaptive bin p of any size <= length lies in [0, ceil((p + 1) * length / n)).
    return tuple((0, -((-(p + 1) * length) // n)) for p in range(n))


# --------------------------------------------------------------------------------------
# One stage: reduce one axis into bins.
# --------------------------------------------------------------------------------------


class _Stage(NamedTuple):
    """Static description of reducing ``axis`` (of length ``length``) into bins.

    ``ranges[p]`` is the half-open cell range of bin p (for per-example sizes: a
    static window that holds bin p at every size, with the cells picked by
    masks at run time).
    """

    axis: int
    length: int
    ranges: Ranges

    @property
    def strided(self) -> bool:
        """True if all bins have one width and start at a fixed stride."""
        widths = {e - s for s, e in self.ranges}
        steps = {b[0] - a[0] for a, b in itertools.pairwise(self.ranges)}
        return len(widths) == 1 and len(steps) <= 1 and min(steps, default=1) >= 1

    def offsets(self):
        """For strided stages: ``(first, stop, step)`` of the slice of each offset."""
        (s0, e0), n = self.ranges[0], len(self.ranges)
        step = self.ranges[1][0] - s0 if n > 1 else 1
        return [(lo, lo + (n - 1) * step + 1, step) for lo in range(s0, e0)]


@functools.lru_cache(maxsize=4096)
def _stage(axis: int, length: int, ranges: Ranges) -> _Stage | None:
    """The stage reducing ``ranges`` of an axis; None if it is the identity."""
    if ranges == tuple((i, i + 1) for i in range(length)):
        return None
    return _Stage(axis, length, ranges)


Bounds = tuple[jax.Array, jax.Array] | None
"""Per-example bins ``(start, end)``, each ``(B, 1, .., n, .., 1)`` with the ``n``
bins on the stage's axis; None for static bins."""


class _InputKeys(NamedTuple):
    """The keys ``h * W + w`` of an NHWC input, computed where they are read.

    Materialising them as an int array would cost as much as a pass over the input.
    """

    shape: tuple[int, ...]

    def slice(self, lo: int, stop: int, step: int, axis: int) -> jax.Array:
        """The keys of ``x[..., lo:stop:step, ...]`` along ``axis`` (1 or 2)."""
        shape = list(self.shape)
        picked = np.arange(lo, stop, step, dtype=np.int32)
        shape[axis] = len(picked)
        picked = picked.reshape([-1 if d == axis else 1 for d in range(4)])
        other = lax.broadcasted_iota(jnp.int32, shape, 3 - axis)
        rows, cols = (picked, other) if axis == 1 else (other, picked)
        return jnp.asarray(rows * self.shape[2] + cols)


def _slice(a, lo: int, stop: int, step: int, axis: int) -> jax.Array:
    if isinstance(a, _InputKeys):
        return a.slice(lo, stop, step, axis)
    return lax.slice_in_dim(a, lo, stop, step, axis)


def _fold(
    st: _Stage, arrays: tuple, extras: tuple, item, combine, strided_extras: bool = False
) -> jax.Array:
    """Reduces ``item(candidates, cell, extras)`` over every bin of ``st``.

    ``candidates`` are ``arrays`` sliced at one candidate cell of each bin,
    ``cell`` that cell's index (an int, or an array along the axis) and
    ``extras`` arrays aligned with the bins (a bin's max, per-example limits).
    Strided stages take one strided slice per offset, others fold each bin's cells
    and concatenate (module docstring). ``strided_extras``: take the strided path
    with extras too (they are then passed whole: each holds every bin along the axis).
    """
    ax = st.axis
    if st.strided and (strided_extras or not extras):
        shape = [1] * 4
        shape[ax] = len(st.ranges)
        return functools.reduce(
            combine,
            (
                item(
                    tuple(_slice(a, lo, stop, step, ax) for a in arrays),
                    np.arange(lo, stop, step, dtype=np.int32).reshape(shape),
                    extras,
                )
                for lo, stop, step in st.offsets()
            ),
        )
    parts = []
    for p, (s, e) in enumerate(st.ranges):
        ex = tuple(lax.slice_in_dim(a, p, p + 1, 1, ax) for a in extras)
        cells = (
            item(tuple(_slice(a, c, c + 1, 1, ax) for a in arrays), c, ex) for c in range(s, e)
        )
        parts.append(functools.reduce(combine, cells))
    return jnp.concatenate(parts, ax)


def _inside(cell, start, end):
    return (start <= cell) & (cell < end)


def _stage_reduce(v: jax.Array, st: _Stage, bounds: Bounds, combine, identity) -> jax.Array:
    """Max (``jnp.maximum``, NaN-propagating) or sum (``jnp.add``) over every bin."""
    if bounds is None:
        return _fold(st, (v,), (), lambda c, cell, ex: c[0], combine)
    fill = jnp.array(identity, v.dtype)
    return _fold(
        st, (v,), bounds, lambda c, cell, ex: jnp.where(_inside(cell, *ex), c[0], fill), combine
    )


def _sum_impl(v: jax.Array, *bounds: jax.Array, st: _Stage) -> jax.Array:
    return _stage_reduce(v, st, bounds or None, jnp.add, 0)  # type: ignore[arg-type]


def _spread_impl(g: jax.Array, *bounds: jax.Array, st: _Stage) -> jax.Array:
    # The transpose of a stage sum: each bin's cotangent goes to all of its cells.
    # Autodiff of the slices would add one padded copy per cell: far slower.
    def term(p, c):
        gp = lax.slice_in_dim(g, p, p + 1, 1, st.axis)
        if not bounds:
            return gp
        start, end = (lax.slice_in_dim(b, p, p + 1, 1, st.axis) for b in bounds)
        return jnp.where(_inside(c, start, end), gp, jnp.zeros((), g.dtype))

    return _gather_cells(g, st, term)


def _with_axis(shape, axis: int, n: int) -> tuple[int, ...]:
    return (*shape[:axis], n, *shape[axis + 1 :])


_stage_sum_op = _prims.Op(
    "spp_jax_stage_sum",
    _sum_impl,
    lambda v, *b, st: (_with_axis(v.shape, st.axis, len(st.ranges)), v.dtype),
)
_stage_spread_op = _prims.Op(
    "spp_jax_stage_spread",
    _spread_impl,
    lambda g, *b, st: (_with_axis(g.shape, st.axis, st.length), g.dtype),
)
_prims.linear_pair(_stage_sum_op, _stage_spread_op)


def _stage_sum(v: jax.Array, bounds: Bounds, st: _Stage) -> jax.Array:
    """Sum over every bin of ``st`` (a linear primitive; its transpose spreads
    each bin's cotangent over its cells)."""
    return _stage_sum_op(v, *(bounds or ()), st=st)


def _gather_cells(g: jax.Array, st: _Stage, term) -> jax.Array:
    """For every cell c, the sum over the bins p holding c of ``term(p, cells)``.

    Consecutive cells held by the same bins form one block: ``term`` gets their
    indices as an int array along the axis, and the blocks are concatenated
    (one piece per block, not per cell, which is faster on CPU).
    """
    ax = st.axis
    holders = [
        tuple(p for p, (s, e) in enumerate(st.ranges) if s <= c < e) for c in range(st.length)
    ]
    parts, start = [], 0
    for c in range(1, st.length + 1):
        if c < st.length and holders[c] == holders[start]:
            continue
        shape = [1] * g.ndim
        shape[ax] = c - start
        cells = np.arange(start, c, dtype=np.int32).reshape(shape)
        full = list(g.shape)
        full[ax] = c - start
        block = jnp.zeros(full, g.dtype)
        for p in holders[start]:
            block = block + term(p, cells)
        parts.append(block)
        start = c
    return jnp.concatenate(parts, ax)


def _first_max(a: Carry, b: Carry) -> Carry:
    """Reduction step on (value, key): the winner by :func:`~spp_jax._windows.better`,
    a total order, so the first maximum whatever order XLA reduces in."""
    take = better(*a, *b)
    return jnp.where(take, b[0], a[0]), jnp.where(take, b[1], a[1])


def _stage_argmax(v, k, st: _Stage, bounds: Bounds, key_bound: int) -> Carry:
    """``(values, keys, positions)`` of each bin's first maximum.

    ``keys`` are row-major input cell indices (below ``key_bound``); they decide
    ties in later stages, and a NaN counts as the largest value. ``positions``
    are the winners' cells along the stage's axis, for the backward pass.

    Strided static stages: one variadic XLA reduction over stacked strided
    candidates. Others: a max fold, then a min fold of ``key`` (packed with the
    position when both fit in 31 bits) over the cells equal to the max. The
    order is total, so both give the same winner. (A reduction also keeps XLA from
    recomputing a stage inside every term of the backward pass.)
    """
    shift = max(st.length - 1, 1).bit_length()
    packable = key_bound << shift < _PACK_LIMIT
    if bounds is None and st.strided and packable:
        ax = st.axis
        shape = [1] * 4
        shape[ax] = len(st.ranges)
        cv, ckp = [], []
        for lo, stop, step in st.offsets():
            cv.append(_slice(v, lo, stop, step, ax))
            cell = np.arange(lo, stop, step, dtype=np.int32).reshape(shape)
            ckp.append((_slice(k, lo, stop, step, ax) << shift) | cell)
        if len(cv) == 1:
            packed = jnp.broadcast_to(ckp[0], cv[0].shape)
            return cv[0], packed >> shift, packed & ((1 << shift) - 1)
        init = (jnp.array(-jnp.inf, v.dtype), jnp.int32(_BIG_KEY))
        stacked = (jnp.stack(cv, ax + 1), jnp.stack(ckp, ax + 1))
        out, packed = lax.reduce(stacked, init, _first_max, (ax + 1,))
        return out, packed >> shift, packed & ((1 << shift) - 1)

    out = _stage_reduce(v, st, bounds, jnp.maximum, -jnp.inf)
    big = jnp.int32(_BIG_KEY)
    extras = (out,) if bounds is None else (out, *bounds)

    def hits(c, cell, ex):
        hit = (c[0] == ex[0]) | ((c[0] != c[0]) & (ex[0] != ex[0]))
        return hit if bounds is None else hit & _inside(cell, *ex[1:])

    if packable:
        packed = _fold(
            st,
            (v, k),
            extras,
            lambda c, cell, ex: jnp.where(hits(c, cell, ex), (c[1] << shift) | cell, big),
            jnp.minimum,
        )
        return out, packed >> shift, packed & ((1 << shift) - 1)
    keys = _fold(
        st, (v, k), extras, lambda c, cell, ex: jnp.where(hits(c, cell, ex), c[1], big), jnp.minimum
    )
    pos = _fold(
        st,
        (v, k),
        (*extras, keys),
        lambda c, cell, ex: jnp.where(hits(c, cell, ex[:-1]) & (c[1] == ex[-1]), cell, big),
        jnp.minimum,
    )
    return out, keys, pos


def _pick_impl(t: jax.Array, pos: jax.Array, *, st: _Stage) -> jax.Array:
    """Tangent of a max stage: each bin reads ``t`` at its winning cell ``pos``."""
    zero = jnp.zeros((), t.dtype)
    return _fold(
        st,
        (t,),
        (pos,),
        lambda c, cell, ex: jnp.where(ex[0] == cell, c[0], zero),
        jnp.add,
        strided_extras=True,
    )


def _route_impl(g: jax.Array, pos: jax.Array, *, st: _Stage) -> jax.Array:
    """Transpose of a max stage: each bin's cotangent goes to its winning cell.

    One elementwise term per input cell (no scatter); XLA fuses them into a loop.
    """
    zero = jnp.zeros((), g.dtype)

    def term(p, c):
        won = lax.slice_in_dim(pos, p, p + 1, 1, st.axis) == c
        return jnp.where(won, lax.slice_in_dim(g, p, p + 1, 1, st.axis), zero)

    return _gather_cells(g, st, term)


_pick = _prims.Op(
    "spp_jax_stage_pick",
    _pick_impl,
    lambda t, pos, *, st: (pos.shape, t.dtype),
)
_route = _prims.Op(
    "spp_jax_stage_route",
    _route_impl,
    lambda g, pos, *, st: (_with_axis(g.shape, st.axis, st.length), g.dtype),
)
_prims.linear_pair(_pick, _route)


# --------------------------------------------------------------------------------------
# Whole pyramids.
# --------------------------------------------------------------------------------------


def _level_stages(plan, h: int, w: int, levels: tuple[Level, ...]):
    """Per level: ``(source, cols_stage, rows_stage)``, source "input" or "base"."""
    base, steps = plan
    out = []
    for source, rows, cols in steps:
        if source == "base":
            bh, bw = levels[base]
            out.append((source, _stage(2, bw, cols), _stage(1, bh, rows)))
        else:
            out.append((source, _stage(2, w, cols), _stage(1, h, rows)))
    return tuple(out)


def _eval_levels(plan, stages, from_input, from_base):
    """Evaluates the levels, ``from_input(i)`` or ``from_base(base_output, i)``: the
    base level first, then the rest."""
    base = plan[0]
    outs: list[Any] = [None] * len(stages)
    if base is not None:
        outs[base] = from_input(base)
    for i, (source, _, _) in enumerate(stages):
        if outs[i] is None:
            outs[i] = from_base(outs[base], i) if source == "base" else from_input(i)
    return outs


def _level_bounds(sizes, level: Level) -> tuple[Bounds, Bounds]:
    """Per-example bounds of the column and row stages of a level (None if static)."""
    if sizes is None:
        return None, None
    return _bounds(sizes[:, 1], level[1], 2), _bounds(sizes[:, 0], level[0], 1)


def _bounds(size: jax.Array, n: int, axis: int) -> tuple[jax.Array, jax.Array]:
    shape = [1] * 4
    shape[0], shape[axis] = size.shape[0], n
    start, end = _dynamic_bins(size, n)
    return start.reshape(shape), end.reshape(shape)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _max_pyramid(x: jax.Array, sizes: jax.Array | None, plan, levels) -> tuple[jax.Array, ...]:
    """Max pyramid, values only; per-level ``(B, n_h, n_w, C)``.

    ``sizes`` (B, 2) switches to per-example adaptive bins (masked stages).
    """
    stages = _level_stages(plan, x.shape[1], x.shape[2], levels)

    def apply(v, st, bounds=None):
        return v if st is None else _stage_reduce(v, st, bounds, jnp.maximum, -jnp.inf)

    def from_input(i):
        _, cols, rows = stages[i]
        cb, rb = _level_bounds(sizes, levels[i])
        return apply(apply(x, cols, cb), rows, rb)

    def from_base(b, i):
        _, cols, rows = stages[i]
        return apply(apply(b, cols), rows)

    return tuple(_eval_levels(plan, stages, from_input, from_base))


def _max_winners(x, sizes, plan, levels):
    """Per level ``((B, n_h, n_w, C) values, (cols, rows) winner positions)``."""
    stages = _level_stages(plan, x.shape[1], x.shape[2], levels)
    key_bound = x.shape[1] * x.shape[2]

    def level(vk, cols, rows, bounds=(None, None)):
        saved = []
        for st, bd in ((cols, bounds[0]), (rows, bounds[1])):
            pos = None
            if st is not None:
                v, k, pos = _stage_argmax(*vk, st, bd, key_bound)
                vk = (v, k)
            saved.append(pos)
        return vk, tuple(saved)

    def from_input(i):
        _, cols, rows = stages[i]
        return level((x, _InputKeys(x.shape)), cols, rows, _level_bounds(sizes, levels[i]))

    def from_base(b, i):
        _, cols, rows = stages[i]
        return level(b[0], cols, rows)

    outs = _eval_levels(plan, stages, from_input, from_base)
    return tuple(vk[0] for vk, _ in outs), tuple(pos for _, pos in outs)


def _split_positions(plan, levels, shape, flat):
    """Rebuilds per-level ``(cols, rows)`` positions (None for identity stages)."""
    stages = _level_stages(plan, shape[1], shape[2], levels)
    it = iter(flat)
    return tuple(
        tuple(None if st is None else next(it) for st in (cols, rows)) for _, cols, rows in stages
    )


def _winners_impl(x, *sizes, plan, levels):
    outs, positions = _max_winners(x, sizes[0] if sizes else None, plan, levels)
    return [*outs, *(p for pos in positions for p in pos if p is not None)]


@functools.lru_cache(maxsize=256)
def _winners_shapes(shape, dtype, sizes_shape, plan, levels):
    args = [jax.ShapeDtypeStruct(shape, dtype)]
    if sizes_shape is not None:
        args.append(jax.ShapeDtypeStruct(sizes_shape, jnp.int32))
    outs = jax.eval_shape(functools.partial(_winners_impl, plan=plan, levels=levels), *args)
    return tuple((o.shape, o.dtype) for o in outs)


_winners = _prims.Op(
    "spp_jax_pyramid_winners",
    _winners_impl,
    lambda x, *sizes, plan, levels: _winners_shapes(
        x.shape, x.dtype, sizes[0].shape if sizes else None, plan, levels
    ),
    multiple_results=True,
)


def _pick_levels(t, positions, plan, levels):
    """The tangent of every level: ``t`` read at the winners, stage by stage
    (``_pick``; reverse mode transposes it into ``_route``)."""
    stages = _level_stages(plan, t.shape[1], t.shape[2], levels)

    def pick(v, i):
        (_, cols, rows), (pos_cols, pos_rows) = stages[i], positions[i]
        if cols is not None:
            v = _pick(v, pos_cols, st=cols)
        if rows is not None:
            v = _pick(v, pos_rows, st=rows)
        return v

    return tuple(_eval_levels(plan, stages, lambda i: pick(t, i), pick))


def _winners_jvp(primals, tangents, *, plan, levels):
    x, t = primals[0], tangents[0]
    outs = _winners(*primals, plan=plan, levels=levels)
    n = len(levels)
    positions = _split_positions(plan, levels, x.shape, outs[n:])
    if type(t) is ad.Zero:
        t_values = [_prims.zero_tangent(o) for o in outs[:n]]
    else:
        t_values = list(_pick_levels(t, positions, plan, levels))
    return outs, [*t_values, *(_prims.zero_tangent(p) for p in outs[n:])]


_winners.def_jvp(_winners_jvp)


@_max_pyramid.defjvp
def _max_pyramid_jvp(plan, levels, primals, tangents):
    """Values and winners (``_winners``: its own derivative is the same rule, so
    every order of differentiation follows the first maximum), then the tangent
    read at the winners."""
    x, sizes = primals
    outs = _winners(x, *(() if sizes is None else (sizes,)), plan=plan, levels=levels)
    n = len(levels)
    positions = _split_positions(plan, levels, x.shape, outs[n:])
    return tuple(outs[:n]), _pick_levels(tangents[0], positions, plan, levels)


def _dynamic_bins(size: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Adaptive bins for traced sizes ``(B,)``: ``start, end`` of shape ``(B, n)``."""
    i = jnp.arange(n, dtype=jnp.int32)[None, :]
    a = size[:, None]
    return (i * a) // n, -((-(i + 1) * a) // n)


def _avg_pyramid(x: jax.Array, sizes: jax.Array | None, plan, levels) -> tuple[jax.Array, ...]:
    """Average pyramid (each level from the input), float32 accumulation."""
    xf = x.astype(jnp.float32)
    _, h, w, _ = x.shape
    outs = []
    for (nh, nw), (_, rows, cols) in zip(levels, plan[1], strict=True):
        cst, rst = _stage(2, w, cols), _stage(1, h, rows)
        cb, rb = _level_bounds(sizes, (nh, nw))
        s = xf if cst is None else _stage_sum(xf, cb, cst)
        s = s if rst is None else _stage_sum(s, rb, rst)
        area: jax.Array
        if sizes is None:
            areas = [[(re - rs) * (ce - cs) for cs, ce in cols] for rs, re in rows]
            area = jnp.asarray(areas, jnp.float32)[None, :, :, None]
        else:
            hs, he = _dynamic_bins(sizes[:, 0], nh)
            ws, we = _dynamic_bins(sizes[:, 1], nw)
            area = ((he - hs)[:, :, None] * (we - ws)[:, None, :]).astype(jnp.float32)[..., None]
        outs.append((s / area).astype(x.dtype))
    return tuple(outs)


# --------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------


def check_options(mode: str, rule: str, data_format: str) -> None:
    """Raises a ValueError naming any unknown ``mode``, ``rule`` or ``data_format``."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; accepted modes are {MODES}")
    geometry.check_rule(rule)
    if data_format not in DATA_FORMATS:
        raise ValueError(
            f"unknown data_format {data_format!r}; accepted formats are {DATA_FORMATS}"
        )


def as_nhwc(x: Any, name: str, data_format: str) -> jax.Array:
    """``x`` as an NHWC array; raises naming ``name`` unless it is a rank-4 float array."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.ndim != 4:
        layout = "(B, H, W, C)" if data_format == "NHWC" else "(B, C, H, W)"
        raise ValueError(
            f"{name} must have rank 4, {layout} for data_format={data_format!r}; "
            f"got shape {tuple(x.shape)} (rank {x.ndim})"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} must have a floating dtype (float32, bfloat16, float16), got {x.dtype}"
        )
    x = jnp.asarray(x)
    return jnp.transpose(x, (0, 2, 3, 1)) if data_format == "NCHW" else x


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
    row-major order (PyTorch's rule), and forward-mode tangents are read from
    that same cell; average pooling spreads the gradient over the bin. Every
    JAX transformation applies (``jit``, ``vmap``, ``grad``, ``jvp``,
    ``jacfwd``, ``hessian``, gradients of gradients).

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(2 * 7 * 5 * 3, dtype=jnp.float32).reshape(2, 7, 5, 3)
      >>> spatial_pyramid_pool(x, (2, 1)).shape  # 3 * (4 + 1)
      (2, 15)
    """
    check_options(mode, rule, data_format)
    x = as_nhwc(x, "x", data_format)
    lv = geometry.normalize_levels(levels)
    b, h, w, c = x.shape
    if h < 1 or w < 1:
        raise ValueError(f"cannot pool an empty feature map: H={h}, W={w} (both must be >= 1)")
    if b == 0 or c == 0:  # nothing to pool
        return jnp.zeros((b, c * sum(nh * nw for nh, nw in lv)), x.dtype)

    if valid_sizes is None:
        sizes = None
        plan = _plan(h, w, lv, rule, mode, False)
    else:
        if rule != "adaptive":
            raise ValueError(
                f'valid_sizes needs rule="adaptive" (the only rule valid for every size), '
                f"got rule={rule!r}"
            )
        sizes = _check_sizes(valid_sizes, b, h, w)
        plan = _plan(h, w, lv, rule, mode, True)
    if mode == "avg":
        return _flatten_levels(_avg_pyramid(x, sizes, plan, lv), channel_major)

    def pure_jax(x):
        return _flatten_levels(_max_pyramid(x, sizes, plan, lv), channel_major)

    if not native.kernel_chosen("spp"):
        return pure_jax(x)

    def cpu_kernel(x):
        rows, cols = _bin_bounds(h, w, lv, rule, sizes, b)
        pyr = _kernel_pyramid(h, w, lv, rule, sizes is not None)
        pure = native.Pure(_static_slice_bins, (lv, rule, sizes is not None))
        flat = native.window_max(x.astype(jnp.float32), jnp.arange(b), rows, cols, pyr, pure)
        return _flat_bins(flat.astype(x.dtype), lv, channel_major)

    # Each platform's lowering takes its branch: the kernel on CPU, JAX elsewhere.
    return lax.platform_dependent(x, cpu=cpu_kernel, default=pure_jax)


def _bin_bounds(h: int, w: int, levels, rule: str, sizes, b: int):
    """Every level's row and column bins, ``(B, sum n_h, 2)`` and ``(B, sum n_w, 2)``."""
    if sizes is None:
        bins = geometry._pyramid_bins(h, w, levels, rule)
        rows = np.asarray([r for lb in bins for r in lb.rows], np.int32)
        cols = np.asarray([c for lb in bins for c in lb.cols], np.int32)
        return (
            jnp.broadcast_to(jnp.asarray(rows), (b, *rows.shape)),
            jnp.broadcast_to(jnp.asarray(cols), (b, *cols.shape)),
        )
    return (
        native.bounds([_dynamic_bins(sizes[:, 0], nh) for nh, _ in levels]),
        native.bounds([_dynamic_bins(sizes[:, 1], nw) for _, nw in levels]),
    )


def _windows_first(x: jax.Array, bidx: jax.Array) -> jax.Array:
    """``x[bidx]``: the map of each window of a kernel call.

    Each window of a call from this module is its own example (``bidx`` is
    ``arange(B)``), also when ``vmap`` folds a mapped axis into the images and the
    windows alike; when it folds it into the windows alone (only ``valid_sizes``
    mapped), each window names its example.
    """
    return x if bidx.shape[0] == x.shape[0] else jnp.take(x, bidx, axis=0)


def _static_slice_bins(x, bidx, rows, cols, levels, rule: str, dynamic: bool) -> jax.Array:
    """The window-max kernel's result for :func:`spatial_pyramid_pool`, by the
    static-slice code: what a CPU lowers where the kernel cannot be built."""
    x = _windows_first(x, bidx)
    _, h, w, _ = x.shape
    sizes = None
    if dynamic:  # adaptive bins: the last bin of a level ends at the example's size
        (nh, nw), *_ = levels
        sizes = jnp.stack([rows[:, nh - 1, 1], cols[:, nw - 1, 1]], axis=1)
    outs = _max_pyramid(x, sizes, _plan(h, w, levels, rule, "max", dynamic), levels)
    return jnp.concatenate([o.reshape(o.shape[0], -1, o.shape[3]) for o in outs], axis=1)


def _flat_bins(flat: jax.Array, levels, channel_major: bool) -> jax.Array:
    """``(B, NB, C)`` bins (levels, rows, columns) to the flattened output."""
    b, _, c = flat.shape
    if not channel_major:
        return flat.reshape(b, -1)  # already (level, n_h, n_w, C) order
    outs, start = [], 0
    for nh, nw in levels:
        outs.append(flat[:, start : start + nh * nw].reshape(b, nh, nw, c))
        start += nh * nw
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


# --------------------------------------------------------------------------------------
# Plain max pooling (the conv trunks' pools), on the same kernel.
# --------------------------------------------------------------------------------------


def pool_output_size(n: Any, window: int, stride: int, ceil: bool = False) -> Any:
    """Output length of a max pool over ``n`` cells (an int, or an integer array).

    Floor mode: ``(n - window) // stride + 1``. Ceil mode (Caffe, PyTorch
    ``ceil_mode=True``): ``ceil((n - window) / stride) + 1``, less one if the last
    window would start outside the input.

    >>> pool_output_size(55, 3, 2), pool_output_size(54, 3, 2), pool_output_size(54, 3, 2, True)
    (27, 26, 27)
    """
    if not ceil:
        return (n - window) // stride + 1
    out = -((window - n) // stride) + 1
    outside = (out - 1) * stride >= n
    return out - (outside.astype(out.dtype) if hasattr(outside, "astype") else int(outside))


def max_pool2d(x: jax.Array, window: int, stride: int, *, ceil: bool = False) -> jax.Array:
    """Max pooling with square ``window`` and ``stride`` over an NHWC map (no padding).

    ``ceil=True`` is Caffe's (and PyTorch's ``ceil_mode=True``) rounding: the last
    window may stick out of the map, and only its cells inside count (padding with
    ``-inf``). The gradient of each output goes to the first maximum of its window
    in row-major order, like ``lax.reduce_window``'s (tested equal, ties included).
    On CPU the window-max kernel runs it (each output cell is one bin), elsewhere
    ``lax.reduce_window`` (``docs/performance.md``). Every JAX transformation applies.

    Args:
      x: ``(B, H, W, C)`` float.
      window: window side.
      stride: step between windows.
      ceil: Caffe's ceil-mode output size (:func:`pool_output_size`).

    Returns:
      ``(B, oh, ow, C)`` in the dtype of ``x``.

    >>> import jax.numpy as jnp
    >>> max_pool2d(jnp.arange(25.0).reshape(1, 5, 5, 1), 3, 2)[0, :, :, 0].tolist()
    [[12.0, 14.0], [22.0, 24.0]]
    """
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C), got shape {tuple(x.shape)}")
    geometry._check_positive_int("window", window)
    geometry._check_positive_int("stride", stride)
    b, h, w, c = x.shape
    if h < window or w < window:
        raise ValueError(f"a {window}x{window} window does not fit in a {h}x{w} map")
    oh, ow = pool_output_size(h, window, stride, ceil), pool_output_size(w, window, stride, ceil)

    reduce_window = functools.partial(_reduce_window, window=window, stride=stride, out=(oh, ow))
    if not native.kernel_chosen("max_pool") or b == 0 or c == 0:
        return reduce_window(x)

    def cpu_kernel(x):
        rows = np.asarray([(i * stride, i * stride + window) for i in range(oh)], np.int32)
        cols = np.asarray([(j * stride, j * stride + window) for j in range(ow)], np.int32)
        flat = native.window_max(  # the kernel clips windows to the map (ceil mode)
            x.astype(jnp.float32),
            jnp.arange(b, dtype=jnp.int32),
            jnp.broadcast_to(jnp.asarray(rows), (b, oh, 2)),
            jnp.broadcast_to(jnp.asarray(cols), (b, ow, 2)),
            native.pyramid([(oh, ow)], [None]),
            native.Pure(_reduce_window_bins, (window, stride, (oh, ow))),
        )
        return flat.reshape(b, oh, ow, c).astype(x.dtype)

    return lax.platform_dependent(x, cpu=cpu_kernel, default=reduce_window)


def _reduce_window(x: jax.Array, *, window: int, stride: int, out: tuple[int, int]) -> jax.Array:
    """:func:`max_pool2d` by ``lax.reduce_window``, the windows past the map's end
    (ceil mode) padded with ``-inf``."""
    pads = tuple(
        (0, max(0, (o - 1) * stride + window - n)) for o, n in zip(out, x.shape[1:3], strict=True)
    )
    return lax.reduce_window(  # a concrete -inf: reduce_window_max, differentiable
        x,
        -jnp.inf,
        lax.max,
        (1, window, window, 1),
        (1, stride, stride, 1),
        ((0, 0), *pads, (0, 0)),
    )


def _reduce_window_bins(x, bidx, rows, cols, window: int, stride: int, out) -> jax.Array:
    """The window-max kernel's result for :func:`max_pool2d`, by ``lax.reduce_window``:
    what a CPU lowers where the kernel cannot be built."""
    y = _reduce_window(_windows_first(x, bidx), window=window, stride=stride, out=out)
    return y.reshape(y.shape[0], -1, y.shape[3])
