"""Slow NumPy references for window pooling, written from the rules in
docs/spp-reference.md sections 7-8 (loops over boxes and bins)."""

from __future__ import annotations

import math

import numpy as np


def c_round(v: float) -> int:
    """C's round(): halves away from zero (v is a float32 value held in a double)."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def ref_project(box, scale, projection, h, w):
    x1, y1, x2, y2 = (float(v) for v in box)
    if projection == "roi_pool":
        return [c_round(float(np.float32(v) * np.float32(scale))) for v in (x1, y1, x2, y2)]
    s = 1 / scale
    s = round(s) if abs(s - round(s)) < 1e-6 else s
    left, top = math.floor(x1 / s) + 1, math.floor(y1 / s) + 1
    right, bottom = math.ceil(x2 / s) - 1, math.ceil(y2 / s) - 1
    left, right = min(max(left, 0), w - 1), min(max(right, 0), w - 1)
    top, bottom = min(max(top, 0), h - 1), min(max(bottom, 0), h - 1)
    if left > right:
        left = right = (left + right) // 2
    if top > bottom:
        top = bottom = (top + bottom) // 2
    return [left, top, right, bottom]


def ref_bins(lo, hi, n, projection, size):
    if projection == "sppnet":
        a = hi - lo + 1
        return [(lo + (i * a) // n, lo + -((-(i + 1) * a) // n)) for i in range(n)]
    length = np.float32(max(hi - lo + 1, 1))
    bin_size = length / np.float32(n)
    out = []
    for i in range(n):
        s = math.floor(np.float32(i) * bin_size) + lo
        e = math.ceil(np.float32(i + 1) * bin_size) + lo
        out.append((min(max(s, 0), size), min(max(e, 0), size)))
    return out


def ref_roi_pool(x, boxes, box_idx, levels, scale, projection, mode="max"):
    """Returns (out (R, D), argmax cells per output entry (R, D) as (b, h, w) or None)."""
    _b, h, w, c = x.shape
    rows, wins = [], []
    for r, box in enumerate(boxes):
        x1, y1, x2, y2 = ref_project(box, scale, projection, h, w)
        bi = int(box_idx[r])
        vec, win = [], []
        for lv in levels:
            nh, nw = (lv, lv) if isinstance(lv, int) else lv
            for hs, he in ref_bins(y1, y2, nh, projection, h):
                for ws, we in ref_bins(x1, x2, nw, projection, w):
                    for ch in range(c):
                        if he <= hs or we <= ws:
                            vec.append(0.0)
                            win.append(None)
                            continue
                        blk = x[bi, hs:he, ws:we, ch]
                        if mode == "avg":
                            vec.append(float(blk.astype(np.float64).mean()))
                            win.append(None)
                            continue
                        best, cell = -np.inf, None
                        for hh in range(hs, he):
                            for ww in range(ws, we):
                                if cell is None or x[bi, hh, ww, ch] > best:
                                    best, cell = x[bi, hh, ww, ch], (bi, hh, ww, ch)
                        vec.append(best)
                        win.append(cell)
        rows.append(vec)
        wins.append(win)
    return np.array(rows, np.float64), wins


def ref_roi_grad(x, wins, cot):
    g = np.zeros(x.shape, np.float64)
    for r, row in enumerate(wins):
        for d, cell in enumerate(row):
            if cell is not None:
                g[cell] += cot[r, d]
    return g
