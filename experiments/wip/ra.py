import functools
import jax, jax.numpy as jnp
import numpy as np
from jax import lax

def _axis_weights(start, bin_size, grid, n_out, size, samples):
    """(R, n_out, size) weights of one axis: sum over a bin's samples of the
    bilinear tap weights, masked as torchvision's kernel masks them, / grid."""
    r = start.shape[0]
    grid_f = grid.astype(start.dtype)
    p = jnp.arange(n_out, dtype=start.dtype)
    base = start[:, None] + p[None, :] * bin_size[:, None]           # (R, n_out)
    if samples is None:  # fixed: enumerate every sample
        s_count = int(grid[0]) if False else None
    # first sample index that can be in range, minus one for rounding
    first = jnp.ceil((-1.0 - base) * grid_f[:, None] / jnp.maximum(bin_size[:, None], 1e-30) - 0.5) - 1
    first = jnp.clip(first, 0, None).astype(jnp.int32)
    iy = first[..., None] + jnp.arange(samples, dtype=jnp.int32)       # (R, n_out, S)
    live = iy < grid[:, None, None]
    y = base[..., None] + (iy.astype(start.dtype) + 0.5) * bin_size[:, None, None] / grid_f[:, None, None]
    inside = live & (y >= -1.0) & (y <= size)
    y = jnp.maximum(y, 0.0)
    low = y.astype(jnp.int32)
    top = low >= size - 1
    low = jnp.where(top, size - 1, low)
    high = jnp.where(top, size - 1, low + 1)
    y = jnp.where(top, low.astype(y.dtype), y)
    l = y - low
    h = 1.0 - l
    a = jnp.arange(size)
    w = (jnp.where(inside, h, 0.0)[..., None] * (low[..., None] == a)
         + jnp.where(inside, l, 0.0)[..., None] * (high[..., None] == a))  # (R, n_out, S, size)
    return jnp.sum(w, axis=2)

def roi_align(features, boxes, box_indices=None, *, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    n, hgt, wid, c = features.shape
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    dt = features.dtype
    boxes = boxes.astype(dt)
    if box_indices is None:
        box_indices = jnp.zeros(boxes.shape[0], jnp.int32)
    off = 0.5 if aligned else 0.0
    x1 = boxes[:, 0] * spatial_scale - off
    y1 = boxes[:, 1] * spatial_scale - off
    x2 = boxes[:, 2] * spatial_scale - off
    y2 = boxes[:, 3] * spatial_scale - off
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = jnp.maximum(rw, 1.0), jnp.maximum(rh, 1.0)
    bh, bw = rh / oh, rw / ow
    if sampling_ratio > 0:
        gh = jnp.full(boxes.shape[:1], sampling_ratio, jnp.int32)
        gw = gh
        sh = sw = sampling_ratio
    else:
        gh = jnp.ceil(rh / oh).astype(jnp.int32)
        gw = jnp.ceil(rw / ow).astype(jnp.int32)
        sh, sw = 2 * hgt + 5, 2 * wid + 5
    count = jnp.maximum(gh * gw, 1).astype(dt)
    ay = _axis_weights(y1, bh, gh, oh, hgt, sh)  # (R, oh, H)
    ax = _axis_weights(x1, bw, gw, ow, wid, sw)  # (R, ow, W)
    onehot = (box_indices[:, None] == jnp.arange(n)).astype(dt)
    ayn = ay[:, :, None, :] * onehot[:, None, :, None]  # (R, oh, N, H)
    g = jnp.einsum("rpna,nabc->rpbc", ayn, features, precision=lax.Precision.HIGHEST)
    out = jnp.einsum("rpbc,rqb->rpqc", g, ax, precision=lax.Precision.HIGHEST)
    return out / count[:, None, None, None]
