"""Slow, obviously-correct NumPy references. Bins written out from the formulas in
docs/spp-reference.md section 2, independently of spp_jax.geometry."""

from __future__ import annotations

import math

import numpy as np


def ref_bins(a: int, n: int, rule: str) -> list[tuple[int, int]]:
    if rule == "adaptive":
        return [(math.floor(i * a / n), math.ceil((i + 1) * a / n)) for i in range(n)]
    if rule == "sliding":
        win, stride = math.ceil(a / n), math.floor(a / n)
        return [(i * stride, i * stride + win) for i in range(n)]
    sizes = [math.ceil(a / n) if i < a % n else a // n for i in range(n)]
    starts = np.cumsum([0, *sizes[:-1]])
    return [(int(s), int(s) + z) for s, z in zip(starts, sizes, strict=False)]


def ref_pool(x_nhwc, levels, mode="max", rule="adaptive", channel_major=False):
    """Loops over examples, levels and bins; float64 accumulation for avg."""
    x = np.asarray(x_nhwc)
    b, h, w, c = x.shape
    out = []
    for i in range(b):
        vec = []
        for lv in levels:
            nh, nw = (lv, lv) if isinstance(lv, int) else lv
            level = np.empty((nh, nw, c), x.dtype)
            for p, (rs, re) in enumerate(ref_bins(h, nh, rule)):
                for q, (cs, ce) in enumerate(ref_bins(w, nw, rule)):
                    blk = x[i, rs:re, cs:ce, :].reshape(-1, c)
                    if mode == "max":
                        level[p, q] = np.max(blk, axis=0)  # NaN propagates
                    else:
                        level[p, q] = blk.astype(np.float64).mean(axis=0)
            if channel_major:
                level = level.transpose(2, 0, 1)
            vec.append(level.reshape(-1))
        out.append(np.concatenate(vec))
    return np.stack(out)


def ref_max_grad(x_nhwc, levels, cot, rule="adaptive"):
    """Gradient of sum(cot * max-pyramid): each bin's cotangent to the first
    maximum of the bin in row-major order (first NaN if the bin holds one)."""
    x = np.asarray(x_nhwc)
    b, h, w, c = x.shape
    g = np.zeros(x.shape, np.float64)
    cot = np.asarray(cot, np.float64)
    for i in range(b):
        off = 0
        for lv in levels:
            nh, nw = (lv, lv) if isinstance(lv, int) else lv
            for p, (rs, re) in enumerate(ref_bins(h, nh, rule)):
                for q, (cs, ce) in enumerate(ref_bins(w, nw, rule)):
                    for ch in range(c):
                        best = None
                        for r in range(rs, re):
                            for s in range(cs, ce):
                                v = x[i, r, s, ch]
                                if best is None:
                                    best = (r, s)
                                    continue
                                bv = x[i, best[0], best[1], ch]
                                if np.isnan(bv):
                                    continue
                                if np.isnan(v) or v > bv:
                                    best = (r, s)
                        g[i, best[0], best[1], ch] += cot[i, off + (p * nw + q) * c + ch]
            off += nh * nw * c
    return g
