"""SPP features of torchvision's AlexNet (or VGG-16) for images of mixed sizes: spp_jax
against eager PyTorch, on the CPU.

Run (a few minutes on 2 CPU cores; ``--quick``, a check that it works: 6 small images,
one timed pass)::

    pip install -e ".[bench,cpu]" torchvision
    python experiments/benchmarks/pretrained_features.py \\
        --json experiments/results/pretrained_features.json

The network is torchvision's ``alexnet`` (``--arch vgg16``: VGG-16, about 20x slower)
with random weights (``torch.manual_seed(--seed)``; ``--weights FILE`` reads a
``.pth``/``.safetensors`` state_dict instead), imported into spp_jax with
:func:`spp_jax.pretrained.from_torchvision`, so both sides hold the same weights. The
features are SPP-net's: the conv5 map (torchvision's ``features[:-1]``) pooled by the
max pyramid (6, 3, 2, 1), flattened channel-major (AlexNet: 12,800 values per image).

The images: ``--images`` seeded random RGB images, each side between ``--min-side``
and ``--max-side`` (defaults 180 and 320, photo-like: short side up to 3/4 of the
largest, aspect ratios 1, 5:4, 4:3, 3:2 and 16:9, landscape or portrait), normalised
with torchvision's ImageNet mean and std. Three ways to get their features:

1. ``spp_jax``: the images grouped into buckets (each side rounded up to a multiple of
   ``--bucket``), each bucket zero-padded into one batch (at most ``--max-batch``
   images) and passed to :func:`spp_jax.pretrained.spp_features` with
   ``valid_sizes``: each row equals the features of its image alone. One compile per
   batch shape: the first pass, which compiles every bucket, is timed apart
   (``first_pass_s``) after a small call that loads the CPU kernels.
2. ``torch_per_image``: eager PyTorch, one image at a time (what is exact in PyTorch
   without masking): ``features[:-1]`` then ``torch.cat([adaptive_max_pool2d(f,
   n).flatten(1) for n in levels], 1)``, under ``torch.inference_mode``.
3. ``torch_padded``: eager PyTorch on the same zero-padded bucket batches, without
   masking: one call per batch as (1), but not exact (the padding enters the convs' borders and
   the pyramid's bins). Its largest difference from (2) is reported.

Before timing, (1) is checked equal to (2) (largest difference over the largest
feature at most ``FEATURES_RTOL``; the script stops otherwise). Timing: one untimed
pass per contender, then ``--rounds`` rounds, each timing ``--reps`` passes over all
the images per contender, the contenders in turn; a pass is the wall time from the
prepared inputs (arrays in each framework's layout, padded batches built beforehand)
to every feature computed. Per contender: the min and median pass, images/s and ms
per image from the median (``best_img_per_s`` from the min), and the ratio of each
PyTorch contender's time to spp_jax's (above 1: spp_jax is faster).

PyTorch runs on ``--threads`` threads (2; channels_last layout, PyTorch's fast one on
CPU, or ``--torch-layout contiguous``); XLA and spp_jax's oneDNN convolutions use
every core the process may run on: on a machine with more than 2 cores, run under
``taskset -c 0,1`` to compare on 2. ``SPP_JAX_CPU_KERNELS`` and ``SPP_JAX_ONEDNN``
choose spp_jax's CPU kernels as everywhere (``docs/install.md``); the values are
saved. The line of ``../shared/tools/machine_speed.py`` (relative to the repository,
if present), the load averages at start and end, versions and settings are printed
and saved: compare runs on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np

jax.config.update("jax_platforms", "cpu")  # a CPU benchmark, whatever else is installed

from spp_jax import pretrained  # noqa: E402
from spp_jax._cpu import conv  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from spp_layer import benchmark_meta  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MACHINE_SPEED = os.path.join(os.path.dirname(REPO), "shared", "tools", "machine_speed.py")
LEVELS = (6, 3, 2, 1)
ASPECTS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 9)
# Largest accepted max|spp_jax - torch| / max|torch| of the exact features: both sum each
# conv's products in float32 in their own order (torch_twin.py's LOGITS_RTOL, measured
# 0.7-3.4e-6 on logits); a wrong bin, layer or flatten order gives 1e-2 or more.
FEATURES_RTOL = 1e-5
CONTENDERS = ("spp_jax", "torch_per_image", "torch_padded")


def image_sizes(n: int, min_side: int, max_side: int, seed: int) -> list[tuple[int, int]]:
    """``n`` seeded photo-like ``(h, w)``: short side in ``[min_side, 3/4 max_side]``,
    long side ``short * aspect`` (at most ``max_side``), 70 % landscape.

    >>> image_sizes(3, 180, 320, 0)
    [(231, 320), (198, 198), (320, 190)]
    """
    if not 0 < min_side <= max_side:
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side} and {max_side}")
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(n):
        short = int(rng.integers(min_side, max(min_side, max_side * 3 // 4) + 1))
        long = max(short, min(max_side, round(short * float(rng.choice(ASPECTS)))))
        sizes.append((short, long) if rng.random() < 0.7 else (long, short))
    return sizes


def buckets(
    sizes: list[tuple[int, int]], multiple: int, max_batch: int
) -> list[tuple[tuple[int, int], list[int]]]:
    """Images grouped by their sides rounded up to ``multiple``: ``[((H, W), [image
    indices])]``, each group split into batches of at most ``max_batch``.

    >>> buckets([(180, 240), (190, 250), (300, 200)], 64, 8)
    [((192, 256), [0, 1]), ((320, 256), [2])]
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        key = (-(-h // multiple) * multiple, -(-w // multiple) * multiple)
        groups.setdefault(key, []).append(i)
    return [
        (shape, idx[k : k + max_batch])
        for shape, idx in sorted(groups.items())
        for k in range(0, len(idx), max_batch)
    ]


def torch_model(arch: str, weights: str | None, seed: int):
    """torchvision's ``arch`` (eval mode) and its state_dict: random (seeded) or from
    ``weights``."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(weights=None)
    if weights:
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(weights)
        else:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict)
    return model.eval(), model.state_dict()


def torch_spp(trunk, x, levels=LEVELS):
    """``features[:-1]`` then the max pyramid, flattened channel-major (PyTorch's way)."""
    import torch
    from torch.nn.functional import adaptive_max_pool2d

    f = trunk(x)
    return torch.cat([adaptive_max_pool2d(f, n).flatten(1) for n in levels], 1)


def _time_passes(fn: Callable[[], object], reps: int) -> list[float]:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_speed() -> str | None:
    """The line of ``../shared/tools/machine_speed.py`` (None if it is not there)."""
    if not os.path.isfile(MACHINE_SPEED):
        return None
    out = subprocess.run(
        [sys.executable, MACHINE_SPEED], capture_output=True, text=True, timeout=300
    )
    return out.stdout.strip() or f"machine_speed.py failed: {out.stderr.strip()[-300:]}"


def _diff(a: np.ndarray, ref: np.ndarray) -> dict:
    d = float(np.max(np.abs(a - ref)))
    scale = float(np.max(np.abs(ref)))
    return {"max_abs_diff": d, "max_abs_feature": scale, "rel_diff": d / scale if scale else d}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="alexnet", choices=list(pretrained.TORCHVISION_ARCHS))
    parser.add_argument("--weights", help="a .pth or .safetensors state_dict (default: random)")
    parser.add_argument("--images", type=int, default=24, help="number of images")
    parser.add_argument("--min-side", type=int, default=180)
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--bucket", type=int, default=64, help="sides rounded up to this")
    parser.add_argument("--max-batch", type=int, default=8, help="images per padded batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=3, help="timed passes per round")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--torch-layout", default="channels_last", choices=["channels_last", "contiguous"]
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-machine-speed", dest="machine_speed", action="store_false")
    parser.add_argument(
        "--quick", action="store_true", help="6 images of 72-128 px, 1 round of 1 pass"
    )
    parser.add_argument("--json", "--out", dest="json", default=None, help="write JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.min_side, args.max_side, args.bucket = 6, 72, 128, 32
        args.rounds, args.reps = 1, 1
    try:
        import torch
        import torchvision
    except ImportError:
        print(
            "pretrained_features.py: needs torch and torchvision "
            "(pip install -e '.[bench]' torchvision)"
        )
        return 1
    torch.set_num_threads(args.threads)
    speed = machine_speed() if args.machine_speed else None
    if speed:
        print(speed, flush=True)
    load_start = _load()
    start = time.perf_counter()

    model, state_dict = torch_model(args.arch, args.weights, args.seed)
    trunk = model.features[:-1]
    channels_last = args.torch_layout == "channels_last"
    if channels_last:
        trunk = trunk.to(memory_format=torch.channels_last)
    _, variables = pretrained.from_torchvision(state_dict, args.arch)
    variables = {"params": {k: v for k, v in variables["params"].items() if k.startswith("conv")}}

    sizes = image_sizes(args.images, args.min_side, args.max_side, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    images = [np.array(pretrained.normalize(rng.random((h, w, 3), np.float32))) for h, w in sizes]
    groups = buckets(sizes, args.bucket, args.max_batch)
    padded = []  # per batch: the zero-padded (B, H, W, 3) images and (B, 2) true sizes
    for (hb, wb), idx in groups:
        x = np.zeros((len(idx), hb, wb, 3), np.float32)
        for j, i in enumerate(idx):
            x[j, : sizes[i][0], : sizes[i][1]] = images[i]
        padded.append((x, np.asarray([sizes[i] for i in idx], np.int32)))
    order = [i for _, idx in groups for i in idx]  # image index of each batch row
    pixels = sum(h * w for h, w in sizes)
    padded_pixels = sum(x.size // 3 for x, _ in padded)

    def to_torch(x: np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # channels_last
        return t if channels_last else t.contiguous()

    jax_inputs = [(jax.device_put(x), jax.device_put(s)) for x, s in padded]
    torch_images = [to_torch(im[None]) for im in images]
    torch_batches = [to_torch(x) for x, _ in padded]

    def run_jax():
        outs = [
            pretrained.spp_features(variables, x, args.arch, LEVELS, valid_sizes=s)
            for x, s in jax_inputs
        ]
        return jax.block_until_ready(outs)

    def run_torch_per_image():
        with torch.inference_mode():
            return [torch_spp(trunk, t) for t in torch_images]

    def run_torch_padded():
        with torch.inference_mode():
            return [torch_spp(trunk, t) for t in torch_batches]

    # Loads (and, the first time on a machine, builds and times) the CPU kernels.
    t0 = time.perf_counter()
    small = np.zeros((1, 64, 64, 3), np.float32)  # both trunks accept 64 x 64
    jax.block_until_ready(pretrained.spp_features(variables, small, args.arch, LEVELS))
    kernels_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    first_jax = run_jax()
    first_pass_s = time.perf_counter() - t0
    onednn = conv.usable() and conv._chosen()  # else XLA's CPU convolutions
    print(
        f"{args.arch}, {len(sizes)} images {args.min_side}-{args.max_side} px in "
        f"{len(groups)} padded batches (sides rounded up to {args.bucket}; "
        f"{padded_pixels / pixels:.2f}x the pixels); spp_jax's first pass (compiles every "
        f"batch shape) {first_pass_s:.1f} s; its convolutions on "
        f"{'oneDNN' if onednn else 'XLA (oneDNN off, missing or measured slower)'}",
        flush=True,
    )

    def rows_by_image(batches) -> np.ndarray:
        rows = np.concatenate([np.asarray(b) for b in batches])
        out = np.empty_like(rows)
        out[order] = rows
        return out

    exact_torch = np.concatenate([t.numpy() for t in run_torch_per_image()])
    check = _diff(rows_by_image(first_jax), exact_torch)
    padded_torch = rows_by_image([t.numpy() for t in run_torch_padded()])
    unmasked = _diff(padded_torch, exact_torch)
    per_image = np.max(np.abs(padded_torch - exact_torch), axis=1) / check["max_abs_feature"]
    unmasked["images_differing"] = int(np.sum(per_image > FEATURES_RTOL))
    print(
        f"spp_jax vs PyTorch per image: max |diff| {check['max_abs_diff']:.3g}, relative "
        f"{check['rel_diff']:.2g} (largest feature {check['max_abs_feature']:.3g})\n"
        f"PyTorch padded without masking vs per image: max |diff| "
        f"{unmasked['max_abs_diff']:.3g}, relative {unmasked['rel_diff']:.2g}; "
        f"{unmasked['images_differing']} of {len(sizes)} images differ",
        flush=True,
    )
    if not np.isfinite(check["rel_diff"]) or check["rel_diff"] > FEATURES_RTOL:
        print(f"spp_jax's features differ from PyTorch's by more than {FEATURES_RTOL:g}")
        return 1

    fns = {
        "spp_jax": run_jax,
        "torch_per_image": run_torch_per_image,
        "torch_padded": run_torch_padded,
    }
    times: dict[str, list[float]] = {k: [] for k in CONTENDERS}
    for fn in fns.values():  # warm-up (the JAX one compiled above)
        fn()
    for r in range(args.rounds):
        for name in CONTENDERS:
            times[name] += _time_passes(fns[name], args.reps)
        print(f"round {r + 1}/{args.rounds} done; load {_load()}", flush=True)
    n = len(sizes)
    results = {}
    for name in CONTENDERS:
        med, best = statistics.median(times[name]), min(times[name])
        results[name] = {
            "pass_s": times[name],
            "median_s": med,
            "min_s": best,
            "img_per_s": n / med,
            "best_img_per_s": n / best,
            "ms_per_image": 1e3 * med / n,
        }
    for name in CONTENDERS:
        results[name]["time_over_spp_jax"] = (
            results[name]["median_s"] / results["spp_jax"]["median_s"]
        )
        results[name]["best_time_over_spp_jax"] = (
            results[name]["min_s"] / results["spp_jax"]["min_s"]
        )
    results["spp_jax"].update(first_pass_s=first_pass_s, kernels_load_s=kernels_s)
    head = f"{'contender':<16} | {'img/s':>7} | {'ms/img':>7} | {'best img/s':>10} | time / spp_jax"
    print(head)
    print("-" * len(head))
    for name in CONTENDERS:
        r = results[name]
        print(
            f"{name:<16} | {r['img_per_s']:7.1f} | {r['ms_per_image']:7.1f} | "
            f"{r['best_img_per_s']:10.1f} | {r['time_over_spp_jax']:.2f} "
            f"(best {r['best_time_over_spp_jax']:.2f})"
        )
    load_end = _load()
    wall = time.perf_counter() - start
    print(f"{wall:.0f} s; load {load_start} -> {load_end}")
    if args.json:
        meta = benchmark_meta() | {
            "onednn_conv": onednn,
            "machine_speed": speed,
            "cores": os.cpu_count(),
            "affinity": sorted(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "torch_threads": torch.get_num_threads(),
            "env": {
                k: os.environ.get(k)
                for k in ("SPP_JAX_CPU_KERNELS", "SPP_JAX_ONEDNN", "OMP_NUM_THREADS", "XLA_FLAGS")
            },
            "load_start": load_start,
            "load_end": load_end,
            "wall_s": wall,
        }
        settings = {
            **{k: v for k, v in vars(args).items() if k not in ("json", "machine_speed")},
            "weights": args.weights or f"random (torch.manual_seed({args.seed}))",
            "levels": LEVELS,
            "feature_dim": int(exact_torch.shape[1]),
            "image_sizes": sizes,
            "batches": [{"shape": list(shape), "images": idx} for shape, idx in groups],
            "padded_pixels_over_true": padded_pixels / pixels,
            "features_rtol": FEATURES_RTOL,
        }
        out = {
            "meta": meta,
            "settings": settings,
            "spp_jax_vs_torch_per_image": check,
            "torch_padded_vs_torch_per_image": unmasked,
            "results": results,
        }
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
