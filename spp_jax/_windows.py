"""Max pooling of arbitrary bins by 2-D sparse tables, in pure JAX (internal).

Used by :func:`spp_jax.roi_pyramid_pool` on GPU and TPU, and wherever the CPU
kernel is unavailable (:func:`pool_bounds` takes the kernel's operands). The bins
move with the boxes, so they cannot be static slices. A 2-D sparse table is built
once per map: ``T[kh, kw][b, h, w] = max(x[b, h : h + 2**kh, w : w + 2**kw])``; any
bin is then the max of 4 overlapping table entries (its corners), one row gather of
``C`` values each. Memory is ``(log2 H + 1) * (log2 W + 1)`` copies of the map (not
a dense ``(R, bins, H, W, C)`` mask), and the time does not depend on bin sizes.

Winners: under differentiation the table also keeps, per entry, the winner's key
(its row-major cell index ``h * W + w``) by "largest value, then smallest key"
(NaN counts as largest), so a bin's winner is its first maximum in row-major
order, PyTorch's and torchvision's rule. The derivative is then a pair of linear
primitives (``_prims.py``): :data:`gather_winners` reads a tangent at the winners,
:data:`scatter_winners` adds cotangents there. Empty bins have meaningless
values and winners: callers mask them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax import _prims

Bins = tuple[jax.Array, jax.Array, jax.Array, jax.Array]
"""``(hs, he, ws, we)``, each ``(R, n_h, n_w)`` int32: the half-open cell ranges of
every bin of every window, inside the map."""


def _levels_of(n: int) -> int:
    return max(n, 1).bit_length()  # floor(log2 n) + 1


def better(va, ka, vb, kb):
    """True where (vb, kb) beats (va, ka): larger value, then smaller key; NaN largest."""
    a_nan, b_nan = va != va, vb != vb
    smaller = kb < ka
    return (b_nan & (~a_nan | smaller)) | (~a_nan & ((vb > va) | ((vb == va) & smaller)))


def _shift(a: jax.Array, step: int, axis: int, fill) -> jax.Array:
    """``a`` moved ``step`` cells towards index 0 along ``axis``, padded with ``fill``."""
    n = a.shape[axis]
    if step >= n:
        return jnp.full_like(a, fill)
    part = lax.slice_in_dim(a, step, n, 1, axis)
    pad = jnp.full_like(lax.slice_in_dim(a, 0, step, 1, axis), fill)
    return jnp.concatenate([part, pad], axis)


def _doubling(first, n: int, step_fn):
    """``[first, f(first, 1), f(f(first, 1), 2), ...]`` for block sizes up to ``n``,
    stacked on a new leading axis (one table dimension)."""
    out = [first]
    for k in range(1, _levels_of(n)):
        out.append(step_fn(out[-1], 1 << (k - 1)))
    return jax.tree.map(lambda *a: jnp.stack(a), *out)


def _table_values(x: jax.Array) -> jax.Array:
    """``(KH, KW, B, H, W, C)`` block maxima (NaN-propagating)."""
    _, h, w, _ = x.shape

    def step(v, s):
        # Axis 2 is W for the first pass (on x) and H for the second (on the
        # stacked (KW, B, H, W, C) table).
        return jnp.maximum(v, _shift(v, s, 2, -jnp.inf))

    return _doubling(_doubling(x, w, step), h, step)


def _table_winners(x: jax.Array):
    """Block winners ``(values, keys)``, both ``(KH, KW, B, H, W, C)``: the largest
    value of each block, then the smallest key (row-major cell index)."""
    _, h, w, _ = x.shape
    keys = lax.broadcasted_iota(jnp.int32, x.shape, 1) * w + lax.broadcasted_iota(
        jnp.int32, x.shape, 2
    )
    big = jnp.int32(np.iinfo(np.int32).max)

    def step(vk, s):
        v, k = vk
        sv, sk = _shift(v, s, 2, -jnp.inf), _shift(k, s, 2, big)
        take = better(v, k, sv, sk)
        return jnp.where(take, sv, v), jnp.where(take, sk, k)

    return _doubling(_doubling((x, keys), w, step), h, step)


def _corner_rows(bins: Bins, bidx: jax.Array, shape) -> jax.Array:
    """Flat row indices into a ``(KH*KW*B*H*W, C)`` table of the 4 corners of every
    bin: ``(4, R, n_h, n_w)``, corner order (top-left, top-right, bottom-left,
    bottom-right)."""
    _kh_n, kw_n, b_n, h, w = shape
    hs, he, ws, we = bins
    log2 = np.array([0] + [i.bit_length() - 1 for i in range(1, max(h, w) + 1)], np.int32)
    lh, lw = jnp.clip(he - hs, 1, h), jnp.clip(we - ws, 1, w)
    kh, kw = jnp.asarray(log2)[lh], jnp.asarray(log2)[lw]
    h0, w0 = hs, ws
    h1, w1 = jnp.maximum(he - (1 << kh), hs), jnp.maximum(we - (1 << kw), ws)
    b = bidx[:, None, None]
    base = ((kh * kw_n + kw) * b_n + b) * h
    rows = []
    for hh, ww in ((h0, w0), (h0, w1), (h1, w0), (h1, w1)):
        rows.append((base + jnp.clip(hh, 0, h - 1)) * w + jnp.clip(ww, 0, w - 1))
    return jnp.stack(rows)


def _corners(table: jax.Array, bins: Bins, bidx: jax.Array) -> jax.Array:
    """The ``(KH, KW, B, H, W, C)`` table's entries at the 4 corners of every bin:
    ``(4, R, n_h, n_w, C)`` (the corner order of :func:`_corner_rows`)."""
    rows = _corner_rows(bins, bidx, table.shape[:5])
    out = jnp.take(table.reshape(-1, table.shape[5]), rows.reshape(-1), axis=0, mode="clip")
    return out.reshape(*rows.shape, table.shape[5])


def empty_bins(bins: Bins) -> jax.Array:
    """``(R, n_h, n_w)`` bool: bins with no cell."""
    hs, he, ws, we = bins
    return (he <= hs) | (we <= ws)


def window_max(x: jax.Array, bidx: jax.Array, bins: Bins) -> jax.Array:
    """Max over every bin of every window: ``(R, n_h, n_w, C)``.

    Empty bins (:func:`empty_bins`) give meaningless values: callers mask them
    (masking here too would cost a pass over the output).

    Args:
      x: ``(B, H, W, C)``.
      bidx: ``(R,)`` int32, each window's batch element (in range).
      bins: see :data:`Bins`.
    """
    out = _corners(_table_values(x), bins, bidx)
    # Elementwise, not jnp.max(axis=0): XLA's CPU reduction over a short leading
    # axis is much slower.
    return jnp.maximum(jnp.maximum(out[0], out[1]), jnp.maximum(out[2], out[3]))


def window_winners(x: jax.Array, bidx: jax.Array, bins: Bins):
    """``(values, keys)`` of every bin's first maximum, both ``(R, n_h, n_w, C)``.

    Keys always name a cell of the map; for empty bins they are meaningless, like
    the values: callers mask both (values, and the tangents or cotangents)."""
    values, keys = _table_winners(x)
    cv, ck = _corners(values, bins, bidx), _corners(keys, bins, bidx)
    best_v, best_k = cv[0], ck[0]
    for q in range(1, 4):
        take = better(best_v, best_k, cv[q], ck[q])
        best_v = jnp.where(take, cv[q], best_v)
        best_k = jnp.where(take, ck[q], best_k)
    return best_v, best_k


def _flat_cells(keys: jax.Array, bidx: jax.Array, image_shape) -> jax.Array:
    """Flat indices into the ``image_shape`` array of each (window, bin, channel) winner."""
    _, h, w, c = image_shape
    b = bidx.reshape(-1, *[1] * (keys.ndim - 1))
    ch = lax.broadcasted_iota(jnp.int32, keys.shape, keys.ndim - 1)
    return (b * (h * w) + keys) * c + ch


def _gather_impl(t, keys, bidx, *, image_shape):
    cells = _flat_cells(keys, bidx, image_shape)
    return jnp.take(t.reshape(-1), cells, mode="clip")


def _scatter_impl(g, keys, bidx, *, image_shape):
    # A scatter-add of scalars into the flat map (measured several times faster
    # than pushing cotangents down the table levels, which XLA fuses into one
    # loop that recomputes every level).
    cells = _flat_cells(keys, bidx, image_shape)
    size = int(np.prod(image_shape))
    flat = jnp.zeros((size,), g.dtype).at[cells.reshape(-1)].add(g.reshape(-1), mode="drop")
    return flat.reshape(image_shape)


gather_winners = _prims.Op(
    "spp_jax_gather_winners",
    _gather_impl,
    lambda t, keys, bidx, *, image_shape: (keys.shape, t.dtype),
    (_prims.IMAGE, _prims.WINDOW, _prims.INDEX),
    _prims.WINDOW,
)
"""``gather_winners(t, keys, bidx, image_shape=...)``: ``t`` read at each winner."""

scatter_winners = _prims.Op(
    "spp_jax_scatter_winners",
    _scatter_impl,
    lambda g, keys, bidx, *, image_shape: (image_shape, g.dtype),
    (_prims.WINDOW, _prims.WINDOW, _prims.INDEX),
    _prims.IMAGE,
)
"""``scatter_winners(g, keys, bidx, image_shape=...)``: each ``g`` added at its winner."""

_prims.linear_pair(gather_winners, scatter_winners)


@jax.custom_jvp
def pool_max(x: jax.Array, bidx: jax.Array, bins: Bins) -> jax.Array:
    """:func:`window_max` with the first-maximum derivative (every transformation).

    Empty bins give meaningless values and derivatives: mask them after (a
    ``jnp.where`` masks the derivatives too)."""
    return window_max(x, bidx, bins)


@pool_max.defjvp
def _pool_max_jvp(primals, tangents):
    x, bidx, bins = primals
    values, keys = window_winners(x, bidx, bins)
    t = tangents[0]
    return values, gather_winners(t, keys, bidx, image_shape=tuple(x.shape))


def pool_bounds(
    x: jax.Array, bidx: jax.Array, rows: jax.Array, cols: jax.Array, levels, pool=pool_max
) -> jax.Array:
    """``pool`` (:func:`pool_max`, or a function of the same arguments) of every
    level's bins given as the CPU kernel takes them.

    The pure-JAX code of :func:`spp_jax._cpu.native.window_max` for windows whose
    bins are data (RoI pooling): ``rows`` ``(R, sum n_h, 2)`` and ``cols``
    ``(R, sum n_w, 2)`` hold every level's ``[start, end)`` bins, clipped here into
    the map; a bin empty after clipping gives 0 and no derivative.

    Returns:
      ``(R, sum n_h * n_w, C)``: the levels' bins in row-major order.
    """
    _, h, w, c = x.shape
    bidx = jnp.clip(bidx, 0, x.shape[0] - 1)
    r, outs, r0, c0 = rows.shape[0], [], 0, 0
    for nh, nw in levels:
        rb, cb = jnp.clip(rows[:, r0 : r0 + nh], 0, h), jnp.clip(cols[:, c0 : c0 + nw], 0, w)
        parts = (rb[:, :, None, 0], rb[:, :, None, 1], cb[:, None, :, 0], cb[:, None, :, 1])
        hs, he, ws, we = (jnp.broadcast_to(a, (r, nh, nw)) for a in parts)
        bins = (hs, he, ws, we)
        v = jnp.where(empty_bins(bins)[..., None], 0.0, pool(x, bidx, bins))
        outs.append(v.reshape(r, -1, c))
        r0, c0 = r0 + nh, c0 + nw
    return jnp.concatenate(outs, axis=1)
