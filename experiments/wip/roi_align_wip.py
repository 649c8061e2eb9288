"""WIP (issue 23): RoIAlign as two separable contractions, bounded memory.

torchvision's RoIAlign averages, per output bin, bilinear samples on a grid of
``gh x gw`` points. Bilinear weights factor into a row weight and a column weight,
and torchvision's out-of-map rule (a sample with ``y < -1``, ``y > H``, ``x < -1``
or ``x > W`` counts 0) factors the same way, so a box's output is
``A_y (oh, H) @ F (H, W, C) @ A_x (ow, W)^T / (gh gw)`` per channel. ``A_y`` sums
the row weights of a bin's samples; with an adaptive grid (``sampling_ratio <= 0``:
``ceil(roi_h / oh)`` samples, data-dependent) only the samples that can land in
``[-1, H]`` are enumerated: at most ``2 H + 3`` per bin, a static bound, so new
boxes never recompile. Everything is ``jnp``: any-order derivatives, ``vmap``, and
deterministic gradients (dot products, no scatter). Boxes go in chunks through
``lax.map`` so the temporaries stay bounded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def axis_weights(start, bin_size, grid, n_out: int, size: int, samples: int):
    """``(R, n_out, size)``: per bin, the sum over its samples of the two bilinear tap
    weights on each of ``size`` cells, zero for samples outside ``[-1, size]``."""
    dt = start.dtype
    grid_f = grid.astype(dt)
    base = start[:, None] + jnp.arange(n_out, dtype=dt)[None, :] * bin_size[:, None]
    if samples >= 0:  # fixed sampling ratio: every sample
        first = jnp.zeros(base.shape, jnp.int32)
        count = samples
    else:  # adaptive: from (one before) the first sample that can be >= -1
        step = bin_size[:, None] / jnp.maximum(grid_f[:, None], 1.0)
        first = jnp.ceil((-1.0 - base) / jnp.where(step > 0, step, 1.0) - 0.5) - 1
        first = jnp.clip(first, 0, None).astype(jnp.int32)
        count = 2 * size + 5
    i = first[..., None] + jnp.arange(count, dtype=jnp.int32)  # (R, n_out, S)
    # torchvision: y = start + p * bin + (i + .5) * bin / grid, left to right.
    y = base[..., None] + (i.astype(dt) + 0.5) * bin_size[:, None, None] / grid_f[:, None, None]
    inside = (i < grid[:, None, None]) & (y >= -1.0) & (y <= size)
    y = jnp.maximum(y, 0.0)
    low = y.astype(jnp.int32)
    top = low >= size - 1
    low = jnp.where(top, size - 1, low)
    high = jnp.where(top, size - 1, low + 1)
    frac = jnp.where(top, 0.0, y - low.astype(dt))
    cells = jnp.arange(size, dtype=jnp.int32)
    w_low = jnp.where(inside, 1.0 - frac, 0.0)[..., None] * (low[..., None] == cells)
    w_high = jnp.where(inside, frac, 0.0)[..., None] * (high[..., None] == cells)
    return jnp.sum(w_low + w_high, axis=2)
