"""Speed of spp_jax's pyramid pooling layer against PyTorch and the memory floor.

Run (a few minutes on 2 CPU cores):

    python experiments/benchmarks/spp_layer.py --out results/spp_layer.json

float32 on CPU, levels (6, 3, 2, 1). For each (B, H, W, C) it times, in one run:
spp_jax forward and forward+backward (jit) as users get it (the compiled CPU
kernel, see spp_jax/_cpu/native.py) and with the pure-JAX code that GPU and TPU run;
PyTorch's pyramid of ``adaptive_max_pool2d`` on channels_last tensors (if torch
is installed: the ``bench`` extra); and the floor, one global max over the same
array (the cost of reading x once). The backward pass gets its cotangent as an
argument, as in training (a constant one would be folded into the program).
Each time is the 25th percentile of repeated calls; the whole set is measured
``--rounds`` times, interleaved, and the best round kept for every contender
alike (this machine's timings drift between runs). Also times ``mode="avg"``
and a padded batch with ``valid_sizes``. Prints a table of ratios and writes
JSON.

``--fallbacks`` instead compares the two pure-JAX ways to pool the same static bins
on CPU, with the kernel off: the static slices that GPU and TPU run (what
``spatial_pyramid_pool`` traces without the kernel) and 2-D sparse tables (every
bin the max of 4 table entries, the code :func:`spp_jax.roi_pyramid_pool` runs
without the kernel; ``spp_jax/_windows.py``), forward and forward+backward. The two
alternate call by call (A/B/A/B) so that background load hits both alike; each
time is the median over ``--rounds`` of per-round medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import spp_jax
from spp_jax import _windows, geometry
from spp_jax._cpu import native, tune

SHAPES = [(32, 13, 13, 256), (32, 10, 10, 256), (8, 38, 50, 256), (64, 7, 7, 512)]
LEVELS = (6, 3, 2, 1)


def _time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 25))


def bench_jax(shape, reps, kernels=True):
    """spp_jax forward, forward+backward, floor and compile times.

    ``kernels=False`` times the pure-JAX code (what GPU and TPU run) on CPU.
    """
    with native.forced(kernels and native.usable()):
        return _bench_jax(shape, reps)


def _bench_jax(shape, reps):
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
    cot = jnp.asarray(
        np.random.default_rng(1).standard_normal(
            (shape[0], spp_jax.output_dim(shape[3], LEVELS)), np.float32
        )
    )
    fwd = jax.jit(lambda x: spp_jax.spatial_pyramid_pool(x, LEVELS))
    fb = jax.jit(jax.grad(lambda x, c: jnp.sum(spp_jax.spatial_pyramid_pool(x, LEVELS) * c)))
    floor = jax.jit(jnp.max)
    t0 = time.perf_counter()
    fwd.lower(x).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fb.lower(x, cot).compile()
    compile_fb_s = time.perf_counter() - t0
    sizes = jnp.asarray(np.stack([np.full(shape[0], shape[1]), np.full(shape[0], shape[2])], 1))
    sizes = sizes - jnp.arange(shape[0])[:, None] % 3  # mixed true sizes
    fwd_pad = jax.jit(lambda x, s: spp_jax.spatial_pyramid_pool(x, LEVELS, valid_sizes=s))
    fb_pad = jax.jit(
        jax.grad(
            lambda x, s, c: jnp.sum(spp_jax.spatial_pyramid_pool(x, LEVELS, valid_sizes=s) * c)
        )
    )
    fwd_avg = jax.jit(lambda x: spp_jax.spatial_pyramid_pool(x, LEVELS, mode="avg"))
    # Squared, so that the backward pass needs the forward values (a linear loss
    # would let XLA skip the forward pass entirely).
    fb_avg = jax.jit(
        jax.grad(lambda x, c: jnp.sum(spp_jax.spatial_pyramid_pool(x, LEVELS, mode="avg") ** 2 * c))
    )
    few = max(reps // 4, 5)
    return {
        "floor": _time(lambda: floor(x).block_until_ready(), reps),
        "fwd": _time(lambda: fwd(x).block_until_ready(), reps),
        "fwd_bwd": _time(lambda: fb(x, cot).block_until_ready(), few),
        "fwd_valid_sizes": _time(lambda: fwd_pad(x, sizes).block_until_ready(), few),
        "fwd_bwd_valid_sizes": _time(lambda: fb_pad(x, sizes, cot).block_until_ready(), few),
        "fwd_avg": _time(lambda: fwd_avg(x).block_until_ready(), few),
        "fwd_bwd_avg": _time(lambda: fb_avg(x, cot).block_until_ready(), few),
        "compile_fwd_s": compile_s,
        "compile_fwd_bwd_s": compile_fb_s,
    }


def bench_pure_jax(shape, reps):
    return bench_jax(shape, reps, kernels=False)


def bench_torch(shape, reps):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    b, h, w, c = shape
    x = torch.randn(b, c, h, w).contiguous(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_(True)

    def fwd(t):
        return torch.cat(
            [torch.nn.functional.adaptive_max_pool2d(t, n).flatten(1) for n in LEVELS], 1
        )

    cot = torch.randn(b, spp_jax.output_dim(c, LEVELS))

    def fb():
        (g,) = torch.autograd.grad(fwd(xg), xg, cot)
        return g

    with torch.no_grad():
        t_fwd = _time(lambda: fwd(x), reps)
    return {"fwd": t_fwd, "fwd_bwd": _time(fb, max(reps // 4, 5))}


def sparse_table_spp(x: jax.Array, levels=LEVELS) -> jax.Array:
    """Max pyramid pooling of ``x`` (NHWC) by sparse tables: the static adaptive bins
    of every level as data, pooled by :func:`spp_jax._windows.pool_max` (first-maximum
    derivatives), flattened like :func:`spp_jax.spatial_pyramid_pool`."""
    b, h, w, _ = x.shape
    lv = geometry.normalize_levels(levels)
    bidx = jnp.arange(b, dtype=jnp.int32)
    outs = []
    for lb in geometry._pyramid_bins(h, w, lv, "adaptive"):
        rows, cols = np.asarray(lb.rows, np.int32), np.asarray(lb.cols, np.int32)
        shape = (b, lb.n_h, lb.n_w)
        bins = tuple(
            jnp.broadcast_to(jnp.asarray(a), shape)
            for a in (rows[:, None, 0], rows[:, None, 1], cols[None, :, 0], cols[None, :, 1])
        )
        outs.append(_windows.pool_max(x, bidx, bins).reshape(b, -1))
    return jnp.concatenate(outs, axis=1)


def bench_fallbacks(rounds: int, reps: int) -> list[dict]:
    """Static slices vs sparse tables, kernel off, per shape: forward and
    forward+backward, alternating call by call; medians of per-round medians."""
    rows = []
    for shape in SHAPES:
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
        cot = jnp.asarray(
            np.random.default_rng(1).standard_normal(
                (shape[0], spp_jax.output_dim(shape[3], LEVELS)), np.float32
            )
        )
        static = lambda x: spp_jax.spatial_pyramid_pool(x, LEVELS)
        progs = {}
        with native.forced(False):  # traced and compiled without the kernel
            for name, f in (("static_slices", static), ("sparse_tables", sparse_table_spp)):
                fwd = jax.jit(f).lower(x).compile()
                fb = jax.jit(jax.grad(lambda x, c, f=f: jnp.sum(f(x) * c))).lower(x, cot).compile()
                progs[(name, "fwd")] = (fwd, (x,))
                progs[(name, "fwd_bwd")] = (fb, (x, cot))
        a, b = (np.asarray(progs[(n, "fwd")][0](x)) for n in ("static_slices", "sparse_tables"))
        np.testing.assert_array_equal(a, b)  # the same bins, the same values
        per_round: dict = {k: [] for k in progs}
        for _ in range(rounds):
            for what in ("fwd", "fwd_bwd"):
                ts: dict = {n: [] for n in ("static_slices", "sparse_tables")}
                for name, _ in progs:  # warm-up
                    fn, args = progs[(name, what)]
                    jax.block_until_ready(fn(*args))
                for _ in range(reps):
                    for name in ts:  # A/B/A/B
                        fn, args = progs[(name, what)]
                        t0 = time.perf_counter()
                        jax.block_until_ready(fn(*args))
                        ts[name].append(time.perf_counter() - t0)
                for name, t in ts.items():
                    per_round[(name, what)].append(float(np.median(t)))
        row: dict = {"shape": shape}
        for (name, what), t in per_round.items():
            row.setdefault(name, {})[what] = float(np.median(t))
        row["sparse_over_static"] = {
            w: row["sparse_tables"][w] / row["static_slices"][w] for w in ("fwd", "fwd_bwd")
        }
        rows.append(row)
        s, p = row["static_slices"], row["sparse_tables"]
        print(
            f"{tuple(shape)!s:>18} | fwd ms static {s['fwd'] * 1e3:8.3f} sparse "
            f"{p['fwd'] * 1e3:8.3f} (sparse/static {row['sparse_over_static']['fwd']:5.2f}) | "
            f"fwd+bwd ms static {s['fwd_bwd'] * 1e3:8.3f} sparse {p['fwd_bwd'] * 1e3:8.3f} "
            f"(sparse/static {row['sparse_over_static']['fwd_bwd']:5.2f})",
            flush=True,
        )
    return rows


def benchmark_meta() -> dict:
    """What the timings depend on: the CPU (model, ISA, load), the target the kernel
    was built for, and which side spp_jax chooses by default on this machine."""
    usable = native.usable()
    return {
        "cpu_kernels": usable,
        "kernel_march": os.environ.get(native.MARCH_ENV) or "native",
        # Limits that emulate an older CPU for XLA, oneDNN and PyTorch, if set.
        "isa_limits": {
            k: os.environ[k]
            for k in ("XLA_FLAGS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
            if k in os.environ
        },
        "auto_choice": native.tuned("window_max") if usable else None,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu": tune.cpu_description(),
        "machine": platform.machine(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/spp_layer.json")
    parser.add_argument(
        "--fallbacks",
        action="store_true",
        help="only compare static slices with sparse tables (pure JAX, kernel off)",
    )
    args = parser.parse_args()
    if args.fallbacks:
        rows = bench_fallbacks(args.rounds, max(args.reps // 10, 5))
        meta = {"jax": jax.__version__, "cpu": tune.cpu_description()}
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "levels": LEVELS, "fallbacks": rows}, f, indent=1)
        print(f"wrote {args.out}")
        return
    best: dict = {}
    for r in range(args.rounds):
        for shape in SHAPES:
            for who, fn in (
                ("jax", bench_jax),
                ("pure_jax", bench_pure_jax),
                ("torch", bench_torch),
            ):
                got = fn(shape, args.reps)
                if got is None:
                    best[(shape, who)] = None
                    continue
                old = best.get((shape, who)) or {}
                best[(shape, who)] = {k: min(v, old.get(k, v)) for k, v in got.items()}
            print(f"round {r + 1}/{args.rounds}: measured {shape}", flush=True)
    rows = [
        {
            "shape": s,
            "jax": best[(s, "jax")],
            "pure_jax": best[(s, "pure_jax")],
            "torch": best[(s, "torch")],
        }
        for s in SHAPES
    ]
    head = (
        f"{'(B,H,W,C)':>18} | {'fwd/floor':>9} | {'torch/fwd':>9} | {'fb/floor':>8} | "
        f"{'torch_fb/fb':>11} | {'fwd ms':>7} | {'fb ms':>7} | {'compile s':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        j, t = r["jax"], r["torch"]
        tf = f"{t['fwd'] / j['fwd']:9.2f}" if t else f"{'n/a':>9}"
        tfb = f"{t['fwd_bwd'] / j['fwd_bwd']:11.2f}" if t else f"{'n/a':>11}"
        print(
            f"{tuple(r['shape'])!s:>18} | {j['fwd'] / j['floor']:9.2f} | {tf} | "
            f"{j['fwd_bwd'] / j['floor']:8.1f} | {tfb} | {j['fwd'] * 1e3:7.3f} | "
            f"{j['fwd_bwd'] * 1e3:7.3f} | {j['compile_fwd_s']:9.2f}"
        )
    print("\npure-JAX code (what GPU/TPU run), on this CPU:")
    for r in rows:
        p, t = r["pure_jax"], r["torch"]
        tf = f"{t['fwd'] / p['fwd']:.2f}" if t else "n/a"
        tfb = f"{t['fwd_bwd'] / p['fwd_bwd']:.2f}" if t else "n/a"
        print(
            f"{tuple(r['shape'])!s:>18} | fwd/floor {p['fwd'] / p['floor']:5.2f} | "
            f"torch/fwd {tf} | torch_fb/fb {tfb} | fwd {p['fwd'] * 1e3:7.3f} ms | "
            f"fb {p['fwd_bwd'] * 1e3:7.3f} ms"
        )
    print("\nother modes, ms (forward / forward+backward):")
    for r in rows:
        j = r["jax"]
        print(
            f"{tuple(r['shape'])!s:>18} | valid_sizes {j['fwd_valid_sizes'] * 1e3:7.3f} / "
            f"{j['fwd_bwd_valid_sizes'] * 1e3:7.3f} | avg {j['fwd_avg'] * 1e3:7.3f} / "
            f"{j['fwd_bwd_avg'] * 1e3:7.3f} | fwd+bwd compile {j['compile_fwd_bwd_s']:.2f} s"
        )
    print("\nkernel / pure-JAX time (below 1: the kernel is faster):")
    for r in rows:
        j, p = r["jax"], r["pure_jax"]
        r["kernel_over_pure"] = {k: j[k] / p[k] for k in ("fwd", "fwd_bwd")}
        print(
            f"{tuple(r['shape'])!s:>18} | fwd {r['kernel_over_pure']['fwd']:5.2f} | "
            f"fwd+bwd {r['kernel_over_pure']['fwd_bwd']:5.2f}"
        )
    meta = benchmark_meta()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "levels": LEVELS, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
