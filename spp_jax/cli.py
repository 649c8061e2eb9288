"""The ``spp-jax`` command line.

``spp-jax demo`` (the default) pools feature maps of several sizes, and a padded
mixed-size batch, into fixed-length vectors, checks them against the per-size
results and prints what happened. It needs no data and no network.
"""

from __future__ import annotations

import argparse
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.geometry import output_dim, pyramid_bins
from spp_jax.pooling import spatial_pyramid_pool

log = logging.getLogger("spp_jax")


def demo(levels=(6, 3, 2, 1), channels: int = 256, batch: int = 4) -> dict:
    """Pools random feature maps of several sizes; returns a summary dict."""
    sizes = [(13, 13), (10, 10), (17, 23), (5, 7)]
    dim = output_dim(channels, levels)
    log.info("levels=%s, C=%d -> every input becomes a %d-d vector", levels, channels, dim)
    pool = jax.jit(spatial_pyramid_pool, static_argnames=("levels",))
    rng = np.random.default_rng(0)
    per_size = {}
    for h, w in sizes:
        x = jnp.asarray(rng.standard_normal((batch, h, w, channels), np.float32))
        t0 = time.perf_counter()
        y = jax.block_until_ready(pool(x, levels=levels))
        ms = (time.perf_counter() - t0) * 1e3
        rows = [lb.rows for lb in pyramid_bins(h, w, levels)]
        log.info(
            "  input %2dx%-2d -> %s (first call, compile included: %.0f ms); row bins of "
            "the finest level: %s",
            h,
            w,
            tuple(y.shape),
            ms,
            rows[0],
        )
        assert y.shape == (batch, dim)
        per_size[(h, w)] = (x, y)

    # One padded batch of mixed sizes, one compiled program, valid_sizes per example.
    hmax, wmax = max(s[0] for s in sizes), max(s[1] for s in sizes)
    padded = np.full((len(sizes), hmax, wmax, channels), np.nan, np.float32)
    for i, (h, w) in enumerate(sizes):
        padded[i, :h, :w] = np.asarray(per_size[(h, w)][0][0])
    y = pool(jnp.asarray(padded), levels=levels, valid_sizes=np.array(sizes))
    worst = max(float(jnp.max(jnp.abs(y[i] - per_size[s][1][0]))) for i, s in enumerate(sizes))
    log.info(
        "padded mixed-size batch %s with valid_sizes -> %s, max |diff| vs per-size "
        "pooling: %g (padding held NaN)",
        padded.shape,
        tuple(y.shape),
        worst,
    )
    return {"dim": dim, "sizes": sizes, "padded_max_abs_diff": worst}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spp-jax", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="pool inputs of several sizes into fixed-length vectors")
    d.add_argument("--levels", default="6,3,2,1", help="comma-separated bin counts")
    d.add_argument("--channels", type=int, default=256)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command in (None, "demo"):
        levels = tuple(int(v) for v in getattr(args, "levels", "6,3,2,1").split(","))
        out = demo(levels, getattr(args, "channels", 256))
        if out["padded_max_abs_diff"] != 0.0:
            log.error("padded batch differs from per-size pooling")
            return 1
        log.info("ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
