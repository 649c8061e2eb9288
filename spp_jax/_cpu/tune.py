"""Which CPU code is faster on this machine: the compiled kernels or their fallbacks.

Speed depends on the CPU, so spp_jax measures each kernel against the code it
replaces once per machine and kernel build and uses the faster (``docs/install.md``,
"Kernel or pure JAX"). This module is the measurement. It runs in a child process
(``python -m spp_jax._cpu.tune LIBRARY OUT``), started by
:func:`spp_jax._cpu.native.tuned` with the kernels forced on (so it never starts
another) and one CPU device, and writes ``OUT`` (JSON, atomically): per family the
kernel's and the fallback's times and ``"kernel": true`` if the kernel was not slower.

Families and what they time (forward, and forward + backward with a cotangent
argument, on shapes of the built-in networks):

* ``spp``: :func:`spp_jax.spatial_pyramid_pool` (max), kernel vs the pure-JAX
  static-slice code that GPU and TPU run;
* ``roi``: :func:`spp_jax.roi_pyramid_pool` (max), kernel vs the pure-JAX sparse
  tables;
* ``max_pool``: :func:`spp_jax.pooling.max_pool2d`, kernel vs ``lax.reduce_window``;
* ``conv``: :func:`spp_jax._cpu.conv.conv2d`, oneDNN vs XLA's convolutions.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Callable

from spp_jax._io import atomic_write_json

# _cases(family) gives (name, {"fwd": (jitted fn, args), "fwd_bwd": (jitted fn, args)}) pairs.
ROUNDS = 2
TARGET_S = 0.03  # each timing repeats a call for about this long


def _cases(family: str):
    import jax
    import jax.numpy as jnp
    import numpy as np

    import spp_jax
    from spp_jax import pooling
    from spp_jax._cpu import conv

    rng = np.random.default_rng(0)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def fwd_bwd(f, *args):
        ct = normal(*jax.eval_shape(f, *args).shape)
        return {
            "fwd": (jax.jit(f), args),
            "fwd_bwd": (jax.jit(lambda *a: jax.vjp(f, *a[:-1])[1](a[-1])), (*args, ct)),
        }

    if family == "spp":
        return [
            (s, fwd_bwd(lambda x: spp_jax.spatial_pyramid_pool(x, (6, 3, 2, 1)), normal(*s)))
            for s in ((32, 13, 13, 256), (8, 38, 50, 256))
        ]
    if family == "roi":
        wh = rng.uniform(16, 400, (300, 2))
        xy = rng.uniform(0, 1, (300, 2)) * (np.array([800, 600]) - wh)
        boxes = jnp.asarray(np.concatenate([xy, xy + wh], 1), jnp.float32)
        f = lambda x: spp_jax.roi_pyramid_pool(x, boxes, levels=(6, 3, 2, 1))
        return [("300 boxes on (1, 38, 50, 256)", fwd_bwd(f, normal(1, 38, 50, 256)))]
    if family == "max_pool":
        return [
            (s, fwd_bwd(lambda x: pooling.max_pool2d(x, 3, 2), normal(*s)))
            for s in ((32, 55, 55, 24), (32, 13, 13, 64))
        ]
    if family == "conv":

        def conv_case(xs, ws, stride, pad):
            f = lambda x, w: conv.conv2d(x, w, stride, pad)
            name = f"x {xs}, w {ws}, stride {stride}, pad {pad}"
            return name, fwd_bwd(f, normal(*xs), normal(*ws))

        return [
            conv_case((16, 112, 112, 3), (7, 7, 3, 24), 2, 1),
            conv_case((16, 13, 13, 64), (3, 3, 64, 96), 1, 1),
        ]
    raise ValueError(f"unknown family {family!r}")


FAMILIES = {"window_max": ("spp", "roi", "max_pool"), "onednn_conv": ("conv",)}


def _forced(family: str):
    from spp_jax._cpu import conv, native

    return conv.forced if family == "conv" else native.forced


def _time(fn: Callable, args) -> float:
    """Median seconds per call over about TARGET_S of calls (after a warm-up call)."""
    import jax

    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max(TARGET_S / once, 3), 200))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def measure(family: str) -> dict:
    """Times the kernel and the fallback on ``family``'s cases, interleaved, best of
    ROUNDS; the kernel is chosen unless the geometric mean of its time ratios to the
    fallback's is above 1."""
    best: dict[tuple[str, str, bool], float] = {}
    programs = {}
    for kernel in (True, False):
        with _forced(family)(kernel):  # traced and compiled under the setting
            for name, progs in _cases(family):
                for what, (fn, args) in progs.items():
                    compiled = fn.lower(*args).compile()
                    programs[(str(name), what, kernel)] = (compiled, args)
    for _ in range(ROUNDS):
        for key, (compiled, args) in programs.items():
            t = _time(compiled, args)
            best[key] = min(t, best.get(key, t))
    rows, log_ratio = [], 0.0
    for name, what, kernel in programs:
        if not kernel:
            continue
        k, p = best[(name, what, True)], best[(name, what, False)]
        rows.append({"case": name, "what": what, "kernel_s": k, "fallback_s": p})
        log_ratio += math.log(k / p)
    ratio = math.exp(log_ratio / len(rows))
    return {"kernel": ratio <= 1.0, "kernel_over_fallback": ratio, "times": rows}


def cpu_description() -> dict:
    """The CPU model, its vector ISA and the load: what a timing depends on."""
    from spp_jax._cpu.native import cpuinfo_line

    model, flags = cpuinfo_line("model name").partition(":")[2].strip(), cpuinfo_line("flags")
    isa = next(
        (name for name, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"))
         if f" {flag} " in f" {flags.split(':', 1)[-1].strip()} "),
        "baseline",
    )  # fmt: skip
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    model = model or platform.processor() or platform.machine()
    return {"model": model, "isa": isa, "cores": os.cpu_count(), "load_1min": load}


def main(argv: list[str]) -> None:
    library, out = argv
    import jax

    result = {
        "library": library,
        "jax": jax.__version__,
        "cpu": cpu_description(),
        "families": {f: measure(f) for f in FAMILIES[library]},
    }
    atomic_write_json(out, result, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
