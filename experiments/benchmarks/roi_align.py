"""Speed of spp_jax's RoIAlign against torchvision's, forward and forward+backward.

Run (add ``--quick`` for a check that it works: 100 boxes, 7x7, one timed call):

    python experiments/benchmarks/roi_align.py --json experiments/results/roi_align.json

float32 on CPU: random boxes (sides 16 to 400 px, alternating between the two images) on a
``(2, 38, 50, 256)`` map, two ~600x800 images at stride 16 (``spatial_scale=1/16``),
``aligned=False``; 300 and 2,000 boxes, ``sampling_ratio`` 2 and -1 (adaptive), output
7x7 and 14x14. Forward+backward is the gradient with respect to the features of the
output's sum. spp_jax's :func:`spp_jax.roi_align` is pure JAX on every backend (no CPU
kernel): what is timed here is also what GPUs and TPUs run. Each side takes its own
layout (NHWC for spp_jax, NCHW for torchvision) and its own threads. Each time is the
best over ``--rounds`` of the median of ``--reps`` calls after a warm-up; the JAX
compile time and XLA's temporaries are reported beside it, and the two outputs are
compared once (largest difference over the largest value). The ratio is torchvision's
time over spp_jax's: above 1, spp_jax is faster. Timings depend on the machine's load,
which is printed and saved: compare runs on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import spp_jax

sys.path.insert(0, os.path.dirname(__file__))
from spp_layer import benchmark_meta

SHAPE = (2, 38, 50, 256)  # NHWC
SPATIAL_SCALE = 1 / 16
BOXES = (300, 2000)
SAMPLING_RATIOS = (2, -1)
OUTPUTS = (7, 14)


def boxes(r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(R, 4)`` boxes in an 800x600 image and ``(R,)`` image indices (alternating)."""
    rng = np.random.default_rng(seed)
    wh = rng.uniform(16, 400, (r, 2))
    xy = rng.uniform(0, 1, (r, 2)) * (np.array([800, 600]) - wh)
    b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    return b, (np.arange(r) % SHAPE[0]).astype(np.int32)


def _time(fn: Callable[[], object], reps: int) -> float:
    """Median of ``reps`` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def bench_jax(x: np.ndarray, r: int, sampling_ratio: int, out: int, reps: int) -> dict:
    b, idx = boxes(r)
    xj, bj, ij = jnp.asarray(x), jnp.asarray(b), jnp.asarray(idx)

    def pool(x, b, i):
        return spp_jax.roi_align(x, b, i, output_size=out, spatial_scale=SPATIAL_SCALE,
                                 sampling_ratio=sampling_ratio)  # fmt: skip

    t0 = time.perf_counter()
    fwd = jax.jit(pool).lower(xj, bj, ij).compile()
    compile_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    fb = jax.jit(jax.grad(lambda x, b, i: jnp.sum(pool(x, b, i)))).lower(xj, bj, ij).compile()
    compile_fb = time.perf_counter() - t0
    mem = fb.memory_analysis()
    return {
        "fwd_s": _time(lambda: fwd(xj, bj, ij).block_until_ready(), reps),
        "fwd_bwd_s": _time(lambda: fb(xj, bj, ij).block_until_ready(), reps),
        "compile_fwd_s": compile_fwd,
        "compile_fwd_bwd_s": compile_fb,
        "temp_fwd_bwd_mib": None if mem is None else mem.temp_size_in_bytes / 2**20,
        "output": np.asarray(fwd(xj, bj, ij)),
    }


def bench_torchvision(
    x: np.ndarray, r: int, sampling_ratio: int, out: int, reps: int
) -> dict | None:
    try:
        import torch
        from torchvision.ops import roi_align
    except ImportError:
        return None
    b, idx = boxes(r)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    xg = xt.clone().requires_grad_(True)
    rois = torch.from_numpy(np.concatenate([idx[:, None].astype(np.float32), b], 1))

    def pool(t):
        return roi_align(t, rois, out, SPATIAL_SCALE, sampling_ratio, False)

    def fb():
        (g,) = torch.autograd.grad(pool(xg).sum(), xg)
        return g

    with torch.no_grad():
        t_fwd = _time(lambda: pool(xt), reps)
        output = pool(xt).numpy().transpose(0, 2, 3, 1)
    return {"fwd_s": t_fwd, "fwd_bwd_s": _time(fb, reps), "output": output}


def _best(old: dict | None, new: dict) -> dict:
    if old is None:
        return new
    return {k: min(v, old[k]) if k.endswith("_s") else v for k, v in new.items()}


def machine_line() -> str:
    meta = benchmark_meta()
    cpu = meta["cpu"]
    if isinstance(cpu, dict):
        cpu = f"{cpu.get('model')} ({cpu.get('isa')})"
    line = (
        f"machine: {cpu}, {meta['machine']}, {os.cpu_count()} cores, "
        f"jax {meta['jax']} ({meta['backend']}), load {_load()}"
    )
    try:
        import torch
        import torchvision

        line += (
            f", torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"torchvision {torchvision.__version__}"
        )
    except ImportError:
        line += ", torchvision not installed"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", "--out", dest="json", default=None, help="write JSON here")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per median")
    parser.add_argument("--rounds", type=int, default=2, help="medians; the best is kept")
    parser.add_argument("--boxes", type=int, nargs="+", default=list(BOXES))
    parser.add_argument("--outputs", type=int, nargs="+", default=list(OUTPUTS))
    parser.add_argument("--quick", action="store_true", help="100 boxes, 7x7, one timed call")
    args = parser.parse_args(argv)
    if args.quick:
        args.boxes, args.outputs, args.reps, args.rounds = [100], [7], 1, 1
    print(machine_line(), flush=True)
    load_start = _load()
    x = np.random.default_rng(1).standard_normal(SHAPE, np.float32)
    configs = [
        (r, s, o) for r in args.boxes for s in SAMPLING_RATIOS for o in args.outputs
    ]  # fmt: skip
    best: dict = {}
    for k in range(args.rounds):
        for cfg in configs:
            best[cfg, "jax"] = _best(best.get((cfg, "jax")), bench_jax(x, *cfg, args.reps))
            tv = bench_torchvision(x, *cfg, args.reps)
            best[cfg, "tv"] = None if tv is None else _best(best.get((cfg, "tv")), tv)
        print(f"round {k + 1}/{args.rounds} done", flush=True)
    rows = []
    for r, s, o in configs:
        j, t = best[(r, s, o), "jax"], best[(r, s, o), "tv"]
        row = {
            "boxes": r,
            "sampling_ratio": s,
            "output": o,
            "spp_jax_fwd_ms": j["fwd_s"] * 1e3,
            "spp_jax_fwd_bwd_ms": j["fwd_bwd_s"] * 1e3,
            "compile_fwd_s": j["compile_fwd_s"],
            "compile_fwd_bwd_s": j["compile_fwd_bwd_s"],
            "temp_fwd_bwd_mib": j["temp_fwd_bwd_mib"],
            "torchvision_fwd_ms": None,
            "torchvision_fwd_bwd_ms": None,
            "ratio_fwd": None,
            "ratio_fwd_bwd": None,
            "max_rel_diff": None,
        }
        if t is not None:
            row.update(
                torchvision_fwd_ms=t["fwd_s"] * 1e3,
                torchvision_fwd_bwd_ms=t["fwd_bwd_s"] * 1e3,
                ratio_fwd=t["fwd_s"] / j["fwd_s"],
                ratio_fwd_bwd=t["fwd_bwd_s"] / j["fwd_bwd_s"],
                max_rel_diff=float(
                    np.abs(j["output"] - t["output"]).max() / np.abs(t["output"]).max()
                ),
            )
        rows.append(row)
    head = (
        f"{'boxes':>5} | {'sr':>3} | {'out':>5} | {'spp_jax fwd ms':>14} | {'tv fwd ms':>9} | "
        f"{'tv/spp':>6} | {'spp_jax f+b ms':>14} | {'tv f+b ms':>9} | {'tv/spp':>6} | "
        f"{'compile s':>9} | {'temp MiB':>8}"
    )
    print(head)
    print("-" * len(head))

    def cell(v, width, fmt):
        return f"{'n/a':>{width}}" if v is None else f"{v:{width}{fmt}}"

    for w in rows:
        print(
            f"{w['boxes']:5d} | {w['sampling_ratio']:3d} | {w['output']:>2}x{w['output']:<2} | "
            f"{w['spp_jax_fwd_ms']:14.1f} | {cell(w['torchvision_fwd_ms'], 9, '.1f')} | "
            f"{cell(w['ratio_fwd'], 6, '.2f')} | {w['spp_jax_fwd_bwd_ms']:14.1f} | "
            f"{cell(w['torchvision_fwd_bwd_ms'], 9, '.1f')} | "
            f"{cell(w['ratio_fwd_bwd'], 6, '.2f')} | "
            f"{w['compile_fwd_s'] + w['compile_fwd_bwd_s']:9.2f} | "
            f"{cell(w['temp_fwd_bwd_mib'], 8, '.0f')}"
        )
    diffs = [w["max_rel_diff"] for w in rows if w["max_rel_diff"] is not None]
    if diffs:
        print(f"largest difference from torchvision (over its largest value): {max(diffs):.1e}")
    load_end = _load()
    print(f"load {load_start} -> {load_end}; spp_jax's roi_align is pure JAX (no CPU kernel)")
    if args.json:
        meta = benchmark_meta() | {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_start": load_start,
            "load_end": load_end,
            "reps": args.reps,
            "rounds": args.rounds,
            "roi_align_path": "pure JAX",
        }
        try:
            import torch
            import torchvision

            meta.update(
                torch=torch.__version__,
                torchvision=torchvision.__version__,
                torch_threads=torch.get_num_threads(),
            )
        except ImportError:
            pass
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {"meta": meta, "shape": SHAPE, "spatial_scale": SPATIAL_SCALE, "rows": rows},
                f,
                indent=1,
            )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
