"""SPP-net against R-CNN: detection time per image on the same ZF-5 (paper Table 10).

Run (about 2 minutes on 2 CPU cores: 117 s wall, 13 s of it compiling; ``--quick``: 7 s)::

    python experiments/benchmarks/detection_speed.py --json experiments/results/detection_speed.json

The paper's headline measurement: SPP-net computes conv5 once per image (per scale),
R-CNN once per window. Both methods here run the same network, spp_jax's
full-width ZF-5 (:class:`spp_jax.models.SPPNet`, ``arch="zf5"``, random init: only
the time matters), with fc6 and fc7 of 4,096 and K = 20 linear SVMs on fc7 (a
(4096, 20) matmul + bias: the 20-way fc8 of :class:`spp_jax.models.MLPHead`, the
same op). The conv layers, fc7 and the SVMs are the same weights for both; fc6
differs only in its input (12,800-d SPP vector against 9,216-d pool5).

Input: one synthetic 500 x 375 RGB image (deterministic RNG: smooth noise,
rectangles, a mosaic of 12-px tiles) and the same ``--windows`` (2,000) windows
for both methods: by default synthetic (integer-pixel boxes, the whole image
first, then sides log-uniform from 20 px to sqrt(500 * 375) px, aspect ratio w/h
log-uniform in [1/3, 3], clipped to the image, placed uniformly inside it); with
``--proposals selective_search`` OpenCV's selective search (fast mode, boxes
under 20 px dropped, the first ``--windows`` kept) of the synthetic image,
:func:`spp_jax.detection.selective_search` (not timed: the paper excludes proposal
time too; needs ``pip install -e ".[detect]"``).

Methods and stages (each stage one ``jax.jit``, compiled once with its compile
time recorded, one warm-up call excluded, then the median of ``--repeats`` calls
ended by ``block_until_ready``):

* SPP-net, 1 scale: ``conv`` = bilinear resize of the image to a shorter side of
  688 (688 x 917) and ZF-5's conv1-conv5 once (:class:`spp_jax.models.ConvTrunk`);
  ``pool`` = :func:`spp_jax.roi_pyramid_pool` of every window (boxes times
  688 / 375), levels (6, 3, 2, 1), ``projection="sppnet"``, stride 16:
  (R, 12,800); ``fc`` = fc6, fc7 and the SVM scores of the R pooled vectors.
* SPP-net, 5 scales {480, 576, 688, 864, 1200}: ``conv`` = resize + conv5 at every
  scale (one jit per scale, the times summed); ``pool`` = :func:`spp_jax.select_scales`
  (the paper's rule: the scale whose resized window area is closest to 224^2) and
  :func:`spp_jax.multiscale_roi_pyramid_pool`; ``fc`` = the same compiled function on
  the same shapes as the 1-scale ``fc``, so its measurement is reused.
* R-CNN: ``crop_warp`` = every window padded with context and warped (bilinear) to
  224 x 224, R-CNN's ``rcnn_im_crop.m`` ("warp" mode, padding 16) in continuous
  coordinates: the box is enlarged about its centre by 224 / (224 - 2 * 16) = 7/6
  (so after warping the box spans 192 px with 16 px of context on each side), its
  edges rounded to whole pixels, then clipped to the image; the clipped part is
  warped to its share of the 224 x 224 crop (half-pixel-centre bilinear, no
  antialiasing, as R-CNN's imresize) and the rest (context beyond the image) is 0,
  i.e. the mean colour (the image is mean-subtracted). ``conv`` = the same trunk on
  batches of ``--batch`` crops (conv5 13 x 13); ``pool5`` = the paper's fixed pool
  to 6 x 6 (:class:`spp_jax.models.Pool6Head`, window 3 stride 2: 9,216-d);
  ``fc`` = fc6, fc7, SVMs. crop_warp, conv and pool5 are timed per window on the
  first ``--rcnn-windows`` windows (64, in batches of 16) and SCALED LINEARLY to
  all windows (the work per window does not depend on the window: every crop is
  224 x 224); ``fc`` runs on all windows at once (pool5 vectors of the subset
  tiled to R rows), not scaled.

Reported per image, as the paper's Table 10: conv time (SPP: resize + conv;
R-CNN: crop/warp + conv) and total time (conv + pooling + fc6/fc7/SVM), and the
speed-ups ``conv_ratio_*`` and ``total_ratio_*`` (R-CNN time / SPP time). fc6/fc7 on
2,000 windows is the same work for both methods (SPP's fc6 is even 39 % larger),
so it bounds the total ratio far below the conv ratio. Also recorded: compile
times, windows per scale, the pooled feature shapes, versions (jax, jaxlib, flax,
python), CPU, cores and XLA threads, load averages at start and end, wall time and
the peak resident memory of the process (``ru_maxrss``). The conv layers run on
oneDNN where spp_jax's ``cpu`` extra is installed (``SPP_JAX_ONEDNN=0``: XLA's
convolutions); which one ran is saved (``env.onednn_convs``). Another process on the
cores slows every stage: compare runs on an idle machine (the load is saved).

Measured (``experiments/results/detection_speed.json``; 2 cores of an Intel Xeon, jax
0.10.2, oneDNN convs, 2,000 synthetic windows, R-CNN's conv timed on 64; the machine
was shared: load average 4.1 at the start, 8.5 at the end, so every time is inflated
and the ratios are noisy; rerun on an idle machine)::

    per image                  SPP 1-scale   SPP 5-scale   R-CNN
    conv time / image            0.618 s       4.371 s     141 s (crop+warp 8.2 s)
    pooling                      0.108 s       0.981 s     0.465 s (pool5)
    fc6, fc7, 20 SVMs            3.572 s       3.572 s     3.636 s
    total time / image           4.298 s       8.925 s     146 s
    speed-up conv / total      229x / 34x    32x / 16x     (paper: 270x / 102x, 49x / 38x)

fc6/fc7 of 2,000 windows (3.6 s on CPU; the paper's GPU spent ~0.09 s on everything
after conv5) dominates SPP-net's total here, hence the total ratios far below the
paper's. The multi-scale pooling
(0.98 s) pools every window at every scale and masks (multiscale_roi_pyramid_pool),
5x the 1-scale work. Peak resident memory 1.5 GiB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import multiscale_roi_pyramid_pool, roi_pyramid_pool, select_scales
from spp_jax.models import ConvTrunk, MLPHead, Pool6Head, SPPNet, pool6_window

ARCH = "zf5"
LEVELS = (6, 3, 2, 1)
STRIDE = 16
SCALES = (480, 576, 688, 864, 1200)
SINGLE_SCALE = 688
IMAGE_WH = (500, 375)
NUM_CLASSES = 20  # VOC: one linear SVM per class
CROP = 224  # R-CNN's warped window (227 in R-CNN; the paper's ZF-5 input is 224)
CONTEXT = 16  # R-CNN: pixels of context on each side after warping
MEAN_RGB = (123.68, 116.78, 103.94)
MIN_SIDE = 20.0
# Paper, Table 10 (VOC 2007, ZF-5, one GPU): seconds per image.
PAPER = {
    "spp_1scale": {"conv": 0.053, "total": 0.142},
    "spp_5scale": {"conv": 0.293, "total": 0.382},
    "rcnn": {"conv": 14.37, "total": 14.46},
}


# ------------------------------------------------------------------------ inputs


def synthetic_image(width: int, height: int, seed: int) -> np.ndarray:
    """A deterministic RGB uint8 ``(height, width, 3)`` image: smooth noise, a few
    flat rectangles and a mosaic of 12-px tiles (texture: selective search finds
    ~5,000 boxes in it at 500 x 375)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (height // 32 + 2, width // 32 + 2, 3))
    ys = np.linspace(0, coarse.shape[0] - 1, height)
    xs = np.linspace(0, coarse.shape[1] - 1, width)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, coarse.shape[0] - 1), np.minimum(x0 + 1, coarse.shape[1] - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = (
        coarse[y0][:, x0] * (1 - fy) * (1 - fx)
        + coarse[y1][:, x0] * fy * (1 - fx)
        + coarse[y0][:, x1] * (1 - fy) * fx
        + coarse[y1][:, x1] * fy * fx
    )
    for _ in range(12):
        w, h = rng.integers(width // 10, width // 2), rng.integers(height // 10, height // 2)
        x, y = rng.integers(0, width - w), rng.integers(0, height - h)
        img[y : y + h, x : x + w] = rng.uniform(0, 255, 3)
    tiles = rng.uniform(-30, 30, (height // 12 + 1, width // 12 + 1, 3))
    img += np.kron(tiles, np.ones((12, 12, 1)))[:height, :width]
    img += rng.normal(0, 8, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def synthetic_windows(n: int, width: int, height: int, seed: int) -> np.ndarray:
    """``(n, 4)`` float32 integer-pixel boxes ``(x1, y1, x2, y2)`` inside the image:
    the whole image, then sides log-uniform in [20, sqrt(W H)] px and aspect
    ratios log-uniform in [1/3, 3], clipped to the image, uniformly placed."""
    rng = np.random.default_rng(seed + 1)
    lo = min(MIN_SIDE, width, height)
    side = np.exp(rng.uniform(math.log(lo), math.log(math.sqrt(width * height)), n))
    aspect = np.exp(rng.uniform(math.log(1 / 3), math.log(3), n))
    bw = np.clip(np.round(side * np.sqrt(aspect)), lo, width)
    bh = np.clip(np.round(side / np.sqrt(aspect)), lo, height)
    x1 = np.floor(rng.uniform(0, 1, n) * (width - bw + 1))
    y1 = np.floor(rng.uniform(0, 1, n) * (height - bh + 1))
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], axis=1)
    boxes[0] = (0, 0, width, height)
    return boxes.astype(np.float32)


def selective_search_windows(image: np.ndarray, n: int, seed: int) -> np.ndarray:
    from spp_jax.detection import selective_search

    return selective_search(image, mode="fast", max_boxes=n, min_size=MIN_SIDE, seed=seed)


def resized_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """The image resized so its shorter side is ``scale`` (no cap on the longer)."""
    f = scale / min(height, width)
    return math.floor(height * f + 0.5), math.floor(width * f + 0.5)


# ------------------------------------------------------------------------ R-CNN warp


def rcnn_warp(image: jax.Array, boxes: jax.Array, crop: int = CROP, context: int = CONTEXT):
    """R-CNN's "warp" crops with context (rcnn_im_crop.m, continuous coordinates).

    ``image`` ``(H, W, C)`` mean-subtracted, ``boxes`` ``(B, 4)``; returns
    ``(B, crop, crop, C)``. See the module docstring for the rule.
    """
    h, w, _ = image.shape
    grow = crop / (crop - 2 * context)

    def axis(lo, hi, size):
        centre, half = (lo + hi) * 0.5, (hi - lo) * 0.5 * grow
        elo, ehi = jnp.floor(centre - half + 0.5), jnp.floor(centre + half + 0.5)
        ehi = jnp.maximum(ehi, elo + 1)
        clo, chi = jnp.maximum(elo, 0.0), jnp.minimum(ehi, float(size))
        per_px = crop / (ehi - elo)  # output pixels per input pixel
        pad = jnp.floor((clo - elo) * per_px + 0.5)
        n_out = jnp.minimum(jnp.maximum(jnp.floor((chi - clo) * per_px + 0.5), 1.0), crop - pad)
        j = jnp.arange(crop, dtype=jnp.float32)
        inside = (j >= pad) & (j < pad + n_out)
        src = clo + (j - pad + 0.5) * ((chi - clo) / n_out) - 0.5
        src = jnp.clip(src, 0.0, size - 1.0)
        i0 = jnp.floor(src)
        frac = src - i0
        i0 = i0.astype(jnp.int32)
        i1 = jnp.minimum(i0 + 1, size - 1)
        return i0, i1, frac, inside

    def one(box):
        x0, x1, fx, inx = axis(box[0], box[2], w)
        y0, y1, fy, iny = axis(box[1], box[3], h)
        rows0, rows1 = image[y0], image[y1]  # (crop, W, C)
        top = rows0[:, x0] * (1 - fx)[None, :, None] + rows0[:, x1] * fx[None, :, None]
        bot = rows1[:, x0] * (1 - fx)[None, :, None] + rows1[:, x1] * fx[None, :, None]
        out = top * (1 - fy)[:, None, None] + bot * fy[:, None, None]
        keep = iny[:, None, None] & inx[None, :, None]
        return jnp.where(keep, out, jnp.zeros((), out.dtype))

    return jax.vmap(one)(boxes)


# ------------------------------------------------------------------------ timing


def _compile(fn: Callable, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def _timed(fn: Callable, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def _median(fn: Callable, args: Sequence, repeats: int) -> tuple[Any, float]:
    """Warm-up call (excluded), then the median of ``repeats`` timed calls."""
    out = jax.block_until_ready(fn(*args))
    times = [_timed(fn, *args)[1] for _ in range(repeats)]
    return out, float(np.median(times))


# ------------------------------------------------------------------------ the benchmark


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def _init_params(args) -> tuple[dict, dict]:
    """Random parameters of ZF-5 with the SPP head and with the pool6 head; the
    conv layers, fc7 and fc8 (the SVMs) shared, fc6 each its own (input size).

    The shapes come from the modules' own ``init`` (``jax.eval_shape``: nothing is
    computed); the values are drawn with NumPy (He-normal kernels, zero biases),
    which skips the dozens of small XLA compiles of an eager Flax init."""
    kw = dict(arch=ARCH, num_classes=NUM_CLASSES, width=args.width, fc_dim=args.fc_dim)
    x = jax.ShapeDtypeStruct((1, CROP, CROP, 3), jnp.float32)
    key = jax.random.key(args.seed)
    spp = jax.eval_shape(SPPNet(head="spp", levels=LEVELS, **kw).init, key, x)["params"]
    pool6 = jax.eval_shape(SPPNet(head="pool6", base_size=CROP, **kw).init, key, x)["params"]
    rng = np.random.default_rng(args.seed + 2)

    def draw(path, leaf):
        if path[-1].key == "bias":
            return jnp.asarray(np.zeros(leaf.shape, np.float32))
        fan_in = math.prod(leaf.shape[:-1])
        std = np.float32(math.sqrt(2.0 / fan_in))
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * std)

    params = jax.tree_util.tree_map_with_path(draw, dict(spp))
    fc6 = jax.tree_util.tree_map_with_path(draw, {"fc6": pool6["fc6"]})
    return params, {**params, **fc6}


def _split(params: dict) -> tuple[dict, dict]:
    conv = {k: v for k, v in params.items() if k.startswith("conv")}
    fc = {k: params[k] for k in ("fc6", "fc7", "fc8")}
    return conv, fc


def run(args) -> dict:
    wall0 = time.perf_counter()
    load_start = _load()
    width_px, height_px = args.image_size
    image_u8 = synthetic_image(width_px, height_px, args.seed)
    t0 = time.perf_counter()
    if args.proposals == "selective_search":
        boxes_np = selective_search_windows(image_u8, args.windows, args.seed)
    else:
        boxes_np = synthetic_windows(args.windows, width_px, height_px, args.seed)
    proposals_s = time.perf_counter() - t0
    n_win = int(boxes_np.shape[0])
    if n_win < args.windows:
        print(f"  only {n_win} windows from {args.proposals} (asked for {args.windows})")
    image = jnp.asarray(image_u8.astype(np.float32) - np.asarray(MEAN_RGB, np.float32))
    boxes = jnp.asarray(boxes_np)
    hw = (height_px, width_px)
    short = float(min(hw))

    trunk = ConvTrunk(ARCH, args.width)
    mlp = MLPHead(NUM_CLASSES, args.fc_dim)
    pool6 = Pool6Head(*pool6_window(ARCH, CROP))
    t0 = time.perf_counter()
    spp_params, rcnn_params = _init_params(args)
    init_s = time.perf_counter() - t0
    conv_p, fc_spp = _split(spp_params)
    _, fc_rcnn = _split(rcnn_params)
    del spp_params, rcnn_params

    def resize_conv(scale):
        size = (*resized_size(height_px, width_px, scale), 3)

        def f(p, img):
            x = jax.image.resize(img, size, "bilinear")[None]
            return trunk.apply({"params": p}, x)[0]

        return f

    def fc_fn(p, feats):
        return mlp.apply({"params": p}, feats)

    compile_s: dict[str, float] = {}
    seconds: dict[str, dict] = {}
    shapes: dict[str, list[int]] = {}
    reps = args.repeats

    # ---- SPP-net, 1 scale
    s1 = args.single_scale
    convs: dict[int, tuple[Any, Any, float]] = {}  # scale -> (map, compiled, seconds)
    multi = list(args.scales) if len(args.scales) > 1 else []
    for s in dict.fromkeys([s1, *multi]):
        c, compile_s[f"conv_{s}"] = _compile(resize_conv(s), conv_p, image)
        fmap, t = _median(c, (conv_p, image), reps)
        convs[s] = (fmap, c, t)
        shapes[f"conv5_{s}"] = list(fmap.shape)
        print(f"  conv5 at scale {s}: {list(fmap.shape)} in {t:.3f} s", flush=True)

    def pool_one(fmap, b):
        return roi_pyramid_pool(
            fmap,
            b * jnp.float32(s1 / short),
            levels=LEVELS,
            spatial_scale=1 / STRIDE,
            projection="sppnet",
        )

    fmap1 = convs[s1][0]
    c, compile_s["spp_pool_1scale"] = _compile(pool_one, fmap1, boxes)
    feats1, t_pool1 = _median(c, (fmap1, boxes), reps)
    shapes["spp_pooled_1scale"] = list(feats1.shape)
    c, compile_s["fc_spp"] = _compile(fc_fn, fc_spp, feats1)
    scores, t_fc_spp = _median(c, (fc_spp, feats1), reps)
    shapes["scores"] = list(scores.shape)
    seconds["spp_1scale"] = {
        "conv": convs[s1][2],
        "pool": t_pool1,
        "fc": t_fc_spp,
        "scales": [s1],
    }
    print(f"  SPP 1 scale: pool {t_pool1:.3f} s, fc6/fc7/SVM {t_fc_spp:.3f} s", flush=True)
    del feats1, scores

    # ---- SPP-net, several scales
    per_scale = None
    if multi:
        maps = tuple(convs[s][0] for s in multi)

        def pool_multi(maps, b):
            idx = select_scales(b, hw, multi)
            feats = multiscale_roi_pyramid_pool(
                maps,
                b,
                idx,
                hw,
                multi,
                levels=LEVELS,
                spatial_scale=1 / STRIDE,
                projection="sppnet",
            )
            return feats, idx

        c, compile_s["spp_pool_multiscale"] = _compile(pool_multi, maps, boxes)
        (feats5, idx), t_pool5 = _median(c, (maps, boxes), reps)
        shapes["spp_pooled_multiscale"] = list(feats5.shape)
        idx = np.asarray(idx)
        per_scale = {str(s): int((idx == k).sum()) for k, s in enumerate(multi)}
        seconds["spp_5scale"] = {
            "conv": float(sum(convs[s][2] for s in multi)),
            "conv_per_scale": {str(s): convs[s][2] for s in multi},
            "pool": t_pool5,
            "fc": t_fc_spp,  # the same compiled function on the same shapes
            "fc_reused_from_1scale": True,
            "scales": multi,
        }
        print(f"  SPP {len(multi)} scales: pool {t_pool5:.3f} s; windows per scale {per_scale}")
        del feats5, maps
    del convs, fmap1

    # ---- R-CNN
    batch = max(1, min(args.batch, n_win))
    n_batches = max(1, math.ceil(min(args.rcnn_windows, n_win) / batch))
    n_batches = min(n_batches, n_win // batch)
    timed = n_batches * batch
    sub = [jnp.asarray(boxes_np[i * batch : (i + 1) * batch]) for i in range(n_batches)]

    def conv_fn(p, crops):
        return trunk.apply({"params": p}, crops)[0]

    def pool5_fn(fmap):
        return pool6.apply({}, fmap)

    c_crop, compile_s["rcnn_crop_warp"] = _compile(rcnn_warp, image, sub[0])
    crops = c_crop(image, sub[0])
    c_conv, compile_s["rcnn_conv"] = _compile(conv_fn, conv_p, crops)
    fm = c_conv(conv_p, crops)
    shapes["rcnn_crops"] = list(crops.shape)
    shapes["rcnn_conv5"] = list(fm.shape)
    c_pool, compile_s["rcnn_pool5"] = _compile(pool5_fn, fm)
    jax.block_until_ready(c_pool(fm))  # warm-up of the three (one batch)
    stage = {"crop_warp": [], "conv": [], "pool5": []}
    pooled: list[jax.Array] = []
    for _ in range(reps):
        tot = dict.fromkeys(stage, 0.0)
        pooled = []
        for b in sub:
            crops, t = _timed(c_crop, image, b)
            tot["crop_warp"] += t
            fm, t = _timed(c_conv, conv_p, crops)
            tot["conv"] += t
            p5, t = _timed(c_pool, fm)
            tot["pool5"] += t
            pooled.append(p5)
        for k in stage:
            stage[k].append(tot[k])
        print(f"  R-CNN {timed} windows: conv {tot['conv']:.3f} s", flush=True)
    del crops, fm
    scale = n_win / timed
    measured = {k: float(np.median(v)) for k, v in stage.items()}
    p5_all = np.concatenate([np.asarray(p) for p in pooled], axis=0)
    shapes["rcnn_pool5"] = list(p5_all.shape)
    feats_r = jnp.asarray(np.resize(p5_all, (n_win, p5_all.shape[1])))
    c, compile_s["fc_rcnn"] = _compile(fc_fn, fc_rcnn, feats_r)
    _, t_fc_rcnn = _median(c, (fc_rcnn, feats_r), reps)
    del feats_r, pooled, p5_all
    seconds["rcnn"] = {
        **{k: v * scale for k, v in measured.items()},
        "fc": t_fc_rcnn,
        "measured_on_windows": {k: v for k, v in measured.items()},
        "scale_factor": scale,
    }
    seconds["rcnn"]["pool5_fc"] = seconds["rcnn"]["pool5"] + t_fc_rcnn

    # ---- per-image conv and total, ratios
    r = seconds["rcnn"]
    r["conv_image"] = r["crop_warp"] + r["conv"]
    r["total"] = r["conv_image"] + r["pool5"] + r["fc"]
    for key in ("spp_1scale", "spp_5scale"):
        if key in seconds:
            s = seconds[key]
            s["conv_image"] = s["conv"]
            s["total"] = s["conv"] + s["pool"] + s["fc"]

    def ratio(key, what):
        return r[what] / seconds[key][what] if key in seconds else None

    wall = time.perf_counter() - wall0
    res = {
        "conv_ratio_1scale": ratio("spp_1scale", "conv_image"),
        "total_ratio_1scale": ratio("spp_1scale", "total"),
        "conv_ratio_5scale": ratio("spp_5scale", "conv_image"),
        "total_ratio_5scale": ratio("spp_5scale", "total"),
        "conv_only_ratio_1scale": r["conv"] / seconds["spp_1scale"]["conv"],
        "seconds": seconds,
        "compile_seconds": {**compile_s, "init_params": init_s},
        "windows": n_win,
        "proposals_s_not_timed_above": proposals_s,
        "rcnn_windows_timed": timed,
        "rcnn_batch": batch,
        "rcnn_scaled_linearly": timed < n_win,
        "windows_per_scale": per_scale,
        "shapes": shapes,
        "paper_table10_seconds": PAPER,
        "setup": {
            "arch": ARCH,
            "width": args.width,
            "fc_dim": args.fc_dim,
            "svm_classes": NUM_CLASSES,
            "levels": LEVELS,
            "projection": "sppnet",
            "image_wh": [width_px, height_px],
            "single_scale": s1,
            "scales": multi,
            "proposals": args.proposals,
            "crop": CROP,
            "context_px": CONTEXT,
            "repeats": reps,
            "seed": args.seed,
            "quick": args.quick,
        },
        "env": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "jax": jax.__version__,
            "jaxlib": _jaxlib_version(),
            "flax": _flax_version(),
            "python": platform.python_version(),
            "backend": jax.default_backend(),
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "threads": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "cpu_kernels": _native_usable(),
            "onednn_convs": _onednn_usable(),
            "SPP_JAX_ONEDNN": os.environ.get("SPP_JAX_ONEDNN"),
            "load_start": load_start,
            "load_end": _load(),
            "wall_s": wall,
            "peak_rss_mib": _peak_rss_mib(),
        },
    }
    return res


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return jaxlib.__version__
    except (ImportError, AttributeError):
        return jax.__version__


def _flax_version() -> str | None:
    try:
        import flax

        return flax.__version__
    except ImportError:
        return None


def _native_usable() -> bool:
    from spp_jax._cpu import native

    return bool(native.usable())


def _onednn_usable() -> bool | None:
    """Whether the conv layers ran on oneDNN (None: a spp_jax without that option)."""
    try:
        from spp_jax._cpu import conv
    except ImportError:
        return None
    return bool(conv.usable()) if jax.default_backend() == "cpu" else False


# ------------------------------------------------------------------------ report


def _fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} s" if v < 100 else f"{v:.0f} s"


def table(res: dict) -> str:
    sec = res["seconds"]
    cols = [("spp_1scale", "SPP 1-scale"), ("spp_5scale", "SPP 5-scale"), ("rcnn", "R-CNN")]
    cols = [(k, n) for k, n in cols if k in sec]
    if "spp_5scale" in sec:
        n = len(sec["spp_5scale"]["scales"])
        cols = [(k, f"SPP {n}-scale" if k == "spp_5scale" else v) for k, v in cols]
    w = 14
    lines = [
        f"{'per image (' + str(res['windows']) + ' windows)':<30}"
        + "".join(f"{name:>{w}}" for _, name in cols)
    ]

    def get(k, spp_key, rcnn_key):
        key = rcnn_key if k == "rcnn" else spp_key
        return sec[k][key] if key else None

    rows = [
        ("conv5 (SPP: with the resize)", "conv", "conv"),
        ("crop + warp (R-CNN)", None, "crop_warp"),
        ("conv time / image", "conv_image", "conv_image"),
        ("pooling (SPP / pool5)", "pool", "pool5"),
        ("fc6, fc7, 20 SVMs", "fc", "fc"),
        ("total time / image", "total", "total"),
    ]
    for label, spp_key, rcnn_key in rows:
        cells = [_fmt_s(get(k, spp_key, rcnn_key)) for k, _ in cols]
        lines.append(f"{label:<30}" + "".join(f"{c:>{w}}" for c in cells))

    def sp(key):
        return {
            "spp_1scale": (res["conv_ratio_1scale"], res["total_ratio_1scale"]),
            "spp_5scale": (res["conv_ratio_5scale"], res["total_ratio_5scale"]),
        }.get(key)

    for i, label in enumerate(("speed-up (conv)", "speed-up (total)")):
        cells = [f"{sp(k)[i]:.1f}x" if sp(k) else "-" for k, _ in cols]
        lines.append(f"{label:<30}" + "".join(f"{c:>{w}}" for c in cells))
    paper = res["paper_table10_seconds"]
    cells = [f"{paper[k]['conv']:g}/{paper[k]['total']:g}" for k, _ in cols]
    lines.append(f"{'paper conv/total (GPU), s':<30}" + "".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)


def explanation(res: dict) -> str:
    sec = res["seconds"]
    fc = sec["spp_1scale"]["fc"]
    d_spp = res["shapes"]["spp_pooled_1scale"][1]
    d_rcnn = res["shapes"]["rcnn_pool5"][1]
    return (
        f"The conv speed-up ({res['conv_ratio_1scale']:.0f}x at 1 scale) comes from "
        f"computing conv5 once per image instead of once per window. fc6/fc7 and the SVMs "
        f"on {res['windows']} windows are the same work for both methods ({fc:.2f} s on "
        f"SPP-net's {d_spp:,}-d vectors, {sec['rcnn']['fc']:.2f} s on R-CNN's {d_rcnn:,}-d "
        f"pool5) and SPP-net cannot avoid them, so they cap the total speed-up: R-CNN's total "
        f"over SPP-net's fc time alone is {sec['rcnn']['total'] / fc:.0f}x, and the measured "
        f"total ratio is {res['total_ratio_1scale']:.0f}x, far below the conv ratio."
    )


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", "--out", dest="json", default=None, help="write JSON here")
    parser.add_argument("--quick", action="store_true", help="200 windows, 1 scale, 16 R-CNN")
    parser.add_argument(
        "--scales", nargs="+", type=int, default=list(SCALES), help="the multi-scale setting"
    )
    parser.add_argument("--windows", type=int, default=2000)
    parser.add_argument(
        "--rcnn-windows", type=int, default=64, help="windows R-CNN's conv is timed on"
    )
    parser.add_argument("--batch", type=int, default=16, help="R-CNN windows per conv batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--proposals",
        default="synthetic",
        choices=["synthetic", "selective_search"],
        help="synthetic windows (default) or OpenCV selective search of the image",
    )
    # For tests: shrink the network and the image.
    parser.add_argument("--width", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--fc-dim", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument(
        "--image-size", type=int, nargs=2, default=list(IMAGE_WH), help=argparse.SUPPRESS
    )
    parser.add_argument("--single-scale", type=int, default=SINGLE_SCALE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.windows, args.scales, args.rcnn_windows = 200, [args.single_scale], 16
        args.repeats = min(args.repeats, 2)
    return args


def main(argv=None) -> int:
    args = _parse_args(argv)
    print(
        f"detection speed: {args.windows} windows, scales 1: {args.single_scale}, "
        f"multi: {args.scales}; R-CNN on {args.rcnn_windows} windows; load {_load()}",
        flush=True,
    )
    res = run(args)
    print()
    print(table(res))
    if res["rcnn_scaled_linearly"]:
        print(
            f"R-CNN crop/warp, conv5 and pool5 timed on {res['rcnn_windows_timed']} windows "
            f"(batches of {res['rcnn_batch']}) and scaled linearly to {res['windows']}; "
            f"its fc6/fc7/SVMs run on all {res['windows']}."
        )
    print(explanation(res))
    env = res["env"]
    comp = res["compile_seconds"]
    print(
        f"compile {sum(comp.values()):.1f} s in all (not in the times above); wall "
        f"{env['wall_s']:.0f} s; peak RSS {env['peak_rss_mib']:.0f} MiB; load "
        f"{env['load_start']} -> {env['load_end']}"
    )
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
