"""Speed and memory of spp_jax's window (RoI) pyramid pooling.

Run (about a minute on 2 CPU cores; add ``--torch`` to compare with torchvision):

    python experiments/benchmarks/roi_pool.py --out results/roi_pool.json

float32 on CPU, as users get it (the compiled CPU kernel, spp_jax/_cpu/native.py;
the pure-JAX code is also timed at R = 2,000): random boxes (sides 16 to 400
px) on a (1, 38, 50, 256) map, a ~600x800 image at stride 16, levels
(6, 3, 2, 1), projection "sppnet". Times
forward and forward+backward at R = 300, 2,000 and 10,000 boxes, the compile
time, and XLA's memory estimate for the compiled op (arguments, outputs and
temporaries). With torchvision installed, also times four calls of
``torchvision.ops.roi_pool`` (one per level) forward and forward+backward at
R = 2,000. Each time is the best of ``--rounds`` medians. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import spp_jax
from spp_jax._cpu import native

sys.path.insert(0, os.path.dirname(__file__))
from spp_layer import benchmark_meta

LEVELS = (6, 3, 2, 1)
SHAPE = (1, 38, 50, 256)


def boxes(r: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    wh = rng.uniform(16, 400, (r, 2))
    xy = rng.uniform(0, 1, (r, 2)) * (np.array([800, 600]) - wh)
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def bench_jax(r: int, reps: int, kernels: bool = True) -> dict:
    """spp_jax times; ``kernels=False`` times the pure-JAX code (what GPU/TPU run)."""
    with native.forced(kernels and native.usable()):
        return _bench_jax(r, reps)


def _bench_jax(r: int, reps: int) -> dict:
    x = jnp.asarray(np.random.default_rng(1).standard_normal(SHAPE, np.float32))
    b = jnp.asarray(boxes(r))
    fwd = jax.jit(lambda x, b: spp_jax.roi_pyramid_pool(x, b, levels=LEVELS))
    fb = jax.jit(jax.grad(lambda x, b: jnp.sum(spp_jax.roi_pyramid_pool(x, b, levels=LEVELS))))
    t0 = time.perf_counter()
    compiled = fwd.lower(x, b).compile()
    compile_s = time.perf_counter() - t0
    compiled_fb = fb.lower(x, b).compile()

    def mem(c):
        m = c.memory_analysis()
        if m is None:
            return None
        return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes

    return {
        "fwd_s": _time(lambda: fwd(x, b).block_until_ready(), reps),
        "fwd_bwd_s": _time(lambda: fb(x, b).block_until_ready(), max(reps // 2, 2)),
        "compile_fwd_s": compile_s,
        "memory_fwd_bytes": mem(compiled),
        "memory_fwd_bwd_bytes": mem(compiled_fb),
    }


def bench_torchvision(r: int, reps: int) -> dict | None:
    try:
        import torch
        from torchvision.ops import roi_pool
    except ImportError:
        return None
    x = torch.randn(SHAPE[0], SHAPE[3], SHAPE[1], SHAPE[2])
    xg = x.clone().requires_grad_(True)
    rois = torch.cat([torch.zeros(r, 1), torch.from_numpy(boxes(r))], 1)

    def fwd(t):
        return torch.cat([roi_pool(t, rois, (n, n), 1 / 16).flatten(1) for n in LEVELS], 1)

    def fb():
        (g,) = torch.autograd.grad(fwd(xg).sum(), xg)
        return g

    with torch.no_grad():
        t_fwd = _time(lambda: fwd(x), reps)
    return {"fwd_s": t_fwd, "fwd_bwd_s": _time(fb, max(reps // 2, 2))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--torch", action="store_true", help="compare with torchvision")
    parser.add_argument("--out", default="results/roi_pool.json")
    args = parser.parse_args()
    res: dict = {}
    pure: dict = {}
    for _ in range(args.rounds):
        for r in (300, 2000, 10000):
            for kernels, into in ((True, res), (False, pure)):
                got = bench_jax(r, args.reps, kernels=kernels)
                old = into.get(r, got)
                into[r] = {k: min(v, old[k]) if v is not None else None for k, v in got.items()}
            print(f"measured R={r}", flush=True)
    tv = bench_torchvision(2000, args.reps) if args.torch else None
    print(
        f"{'R':>6} | {'fwd ms':>8} | {'boxes/s':>9} | {'fwd+bwd ms':>10} | {'compile s':>9} | "
        f"{'memory fwd MiB':>14} | {'memory fwd+bwd MiB':>18}"
    )
    for r, j in res.items():
        mf = j["memory_fwd_bytes"] / 2**20 if j["memory_fwd_bytes"] else float("nan")
        mb = j["memory_fwd_bwd_bytes"] / 2**20 if j["memory_fwd_bwd_bytes"] else float("nan")
        print(
            f"{r:>6} | {j['fwd_s'] * 1e3:8.1f} | {r / j['fwd_s']:9.0f} | "
            f"{j['fwd_bwd_s'] * 1e3:10.1f} | {j['compile_fwd_s']:9.2f} | {mf:14.1f} | {mb:18.1f}"
        )
    print("pure-JAX code (what GPU/TPU run), and the kernel's time over it:")
    ratios = {}
    for r, p in pure.items():
        j = res[r]
        ratios[r] = {k: j[f"{k}_s"] / p[f"{k}_s"] for k in ("fwd", "fwd_bwd")}
        print(
            f"{r:>6} | fwd {p['fwd_s'] * 1e3:8.1f} ms (kernel / pure {ratios[r]['fwd']:.2f}) | "
            f"fwd+bwd {p['fwd_bwd_s'] * 1e3:8.1f} ms (kernel / pure {ratios[r]['fwd_bwd']:.2f})"
        )
    if tv:
        j = res[2000]
        print(
            f"torchvision roi_pool x4 at R=2000: fwd {tv['fwd_s'] * 1e3:.1f} ms "
            f"({tv['fwd_s'] / j['fwd_s']:.2f}x spp_jax), fwd+bwd {tv['fwd_bwd_s'] * 1e3:.1f} ms "
            f"({tv['fwd_bwd_s'] / j['fwd_bwd_s']:.2f}x spp_jax)"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "shape": SHAPE,
                "levels": LEVELS,
                "meta": benchmark_meta(),
                "jax": res,
                "pure_jax": pure,
                "kernel_over_pure": ratios,
                "torchvision": tv,
            },
            f,
            indent=1,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
