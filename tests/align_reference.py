"""Slow NumPy references for RoIAlign and position-sensitive pooling, written from
torchvision's CPU kernels' documented rules (loops over boxes, bins and samples, in
float32 as the kernels compute). Inputs and outputs are NCHW, as torchvision's."""

from __future__ import annotations

import math

import numpy as np

f32 = np.float32


def _bilinear(plane: np.ndarray, y: np.float32, x: np.float32) -> np.float32:
    h, w = plane.shape
    if not (-1.0 <= y <= h and -1.0 <= x <= w):
        return f32(0)
    y, x = max(y, f32(0)), max(x, f32(0))
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_low = y_high = h - 1
        y = f32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_low = x_high = w - 1
        x = f32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = f32(y - y_low), f32(x - x_low)
    hy, hx = f32(1) - ly, f32(1) - lx
    return (
        hy * hx * plane[y_low, x_low]
        + hy * lx * plane[y_low, x_high]
        + ly * hx * plane[y_high, x_low]
        + ly * lx * plane[y_high, x_high]
    )


def _align_bin(plane, y0, x0, bin_h, bin_w, ph, pw, grid_h, grid_w, min_count):
    total = f32(0)
    for iy in range(grid_h):
        y = f32(y0 + f32(ph) * bin_h) + f32(iy + 0.5) * bin_h / f32(grid_h)
        for ix in range(grid_w):
            x = f32(x0 + f32(pw) * bin_w) + f32(ix + 0.5) * bin_w / f32(grid_w)
            total += _bilinear(plane, f32(y), f32(x))
    count = max(grid_h * grid_w, min_count)
    return total / f32(count) if count > 0 else f32(0)


def _align_geometry(roi, scale, oh, ow, sampling_ratio, aligned):
    off = f32(0.5) if aligned else f32(0)
    x1, y1, x2, y2 = (f32(f32(v) * f32(scale)) - off for v in roi)
    roi_w, roi_h = f32(x2 - x1), f32(y2 - y1)
    if not aligned:
        roi_w, roi_h = max(roi_w, f32(1)), max(roi_h, f32(1))
    bin_h, bin_w = f32(roi_h / f32(oh)), f32(roi_w / f32(ow))
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / f32(oh))
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / f32(ow))
    return y1, x1, bin_h, bin_w, max(grid_h, 0), max(grid_w, 0)


def roi_align(x, boxes, idx, oh, ow, scale, sampling_ratio, aligned):
    r, c = len(boxes), x.shape[1]
    out = np.zeros((r, c, oh, ow), np.float32)
    for n in range(r):
        y1, x1, bin_h, bin_w, gh, gw = _align_geometry(
            boxes[n], scale, oh, ow, sampling_ratio, aligned
        )
        for ch in range(c):
            for ph in range(oh):
                for pw in range(ow):
                    out[n, ch, ph, pw] = _align_bin(
                        x[idx[n], ch], y1, x1, bin_h, bin_w, ph, pw, gh, gw, 1
                    )
    return out


def ps_roi_align(x, boxes, idx, oh, ow, scale, sampling_ratio):
    """torchvision's ps_roi_align, except that a bin without samples gives 0 (0 / 0 there)."""
    r, c_out = len(boxes), x.shape[1] // (oh * ow)
    out = np.zeros((r, c_out, oh, ow), np.float32)
    for n in range(r):
        y1, x1, bin_h, bin_w, gh, gw = _align_geometry(
            boxes[n], scale, oh, ow, sampling_ratio, True
        )
        for co in range(c_out):
            for ph in range(oh):
                for pw in range(ow):
                    plane = x[idx[n], (co * oh + ph) * ow + pw]
                    out[n, co, ph, pw] = _align_bin(plane, y1, x1, bin_h, bin_w, ph, pw, gh, gw, 0)
    return out


def c_round(v: np.float32) -> int:
    return int(math.copysign(math.floor(abs(float(v)) + 0.5), float(v)))


def ps_roi_pool(x, boxes, idx, oh, ow, scale):
    _, c, h, w = x.shape
    r, c_out = len(boxes), c // (oh * ow)
    out = np.zeros((r, c_out, oh, ow), np.float32)
    for n in range(r):
        x1, y1, x2, y2 = (c_round(f32(f32(v) * f32(scale))) for v in boxes[n])
        bin_h = f32(f32(max(y2 - y1, 1)) / f32(oh))
        bin_w = f32(f32(max(x2 - x1, 1)) / f32(ow))
        for ph in range(oh):
            for pw in range(ow):
                hs = min(max(math.floor(f32(ph) * bin_h) + y1, 0), h - 1)
                he = min(max(math.ceil(f32(ph + 1) * bin_h) + y1, 0), h - 1)
                ws = min(max(math.floor(f32(pw) * bin_w) + x1, 0), w - 1)
                we = min(max(math.ceil(f32(pw + 1) * bin_w) + x1, 0), w - 1)
                if he <= hs or we <= ws:
                    continue
                for co in range(c_out):
                    plane = x[idx[n], (co * oh + ph) * ow + pw]
                    out[n, co, ph, pw] = plane[hs:he, ws:we].sum() / f32((he - hs) * (we - ws))
    return out


def fpn_scales(map_sizes, image_sizes):
    """torchvision's ``_infer_scale``: the map height over the largest image height, as a
    power of two (log2 of the float32 ratio, rounded half to even)."""
    max_h = max(h for h, _ in image_sizes)
    return [2.0 ** float(np.round(np.log2(f32(h / max_h)))) for h, _ in map_sizes]


def fpn_levels(boxes, k_min, k_max, canonical_scale=224, canonical_level=4, eps=1e-6):
    """torchvision's ``LevelMapper`` in float32, box by box; -1 for a negative area."""
    out = []
    for x1, y1, x2, y2 in np.asarray(boxes, f32):
        area = f32(f32(x2 - x1) * f32(y2 - y1))
        if area < 0:
            out.append(-1)
            continue
        with np.errstate(divide="ignore"):  # a zero area: log2(0) = -inf, clamped to k_min
            log = np.log2(f32(np.sqrt(area) / f32(canonical_scale)))
        k = np.floor(f32(f32(canonical_level + log) + f32(eps)))
        out.append(int(min(max(k, k_min), k_max)) - k_min)
    return np.array(out)


def multiscale_roi_align(maps, boxes, idx, image_sizes, oh, ow, sampling_ratio, s0, k0):
    """``MultiScaleRoIAlign``: each box's RoIAlign (``aligned=False``) from its level's
    map (NCHW maps, finest first); a box without a level gives zeros."""
    scales = fpn_scales([m.shape[2:] for m in maps], image_sizes)
    if len(maps) == 1:
        return roi_align(maps[0], boxes, idx, oh, ow, scales[0], sampling_ratio, False)
    k_min, k_max = (round(-math.log2(scales[i])) for i in (0, -1))
    levels = fpn_levels(boxes, k_min, k_max, s0, k0)
    out = np.zeros((len(boxes), maps[0].shape[1], oh, ow), np.float32)
    for n, level in enumerate(levels):
        if level >= 0:
            out[n] = roi_align(
                maps[level], boxes[n : n + 1], idx[n : n + 1], oh, ow, scales[level],
                sampling_ratio, False,
            )[0]  # fmt: skip
    return out
