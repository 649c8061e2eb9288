"""Multi-view testing on the feature map against crops through the whole network.

Run on a finished training workdir (``--limit 200``: about 70 s on 2 busy CPU cores
for the default config, 1, 10 and 18 views)::

    python experiments/benchmarks/multiview.py --workdir /tmp/spp_default --limit 200 \\
        --out experiments/results/multiview.json

For each test size (default ``round(crop_size * resize_ratio)``, where the views are
the training crop's size, as the paper's 224 views of 256 images) and each number
of views (1, 10, 18), the latest checkpoint scores the first ``--limit`` test images
the full-image pipeline yields (short side ``size``, aspect kept, padded to aspect
buckets; :func:`spp_jax.data.eval_batches`) two ways
(:func:`spp_jax.multiview.evaluate_batches`):

* ``feature_map``: conv5 once per image (and once for its mirror), every view
  pooled from it with SPP, fc6-fc8 per view, softmax averaged (SPP-net 3.1.2);
* ``whole_net``: every view cropped (and mirrored) and run through the whole
  network, softmax averaged.

Reported per (size, views): top-1 and top-5 accuracy, seconds per image of the
jitted computation (after an untimed first call per batch shape; data loading and
compiles excluded), compile seconds, the fraction of images whose top-1 class is
the same both ways and the largest difference of an averaged probability. Prints
a table and writes the JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time

import jax


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a finished training workdir")
    parser.add_argument("--limit", type=int, help="at most this many test images per run")
    parser.add_argument(
        "--sizes",
        help="comma-separated test sizes (short sides); default round(crop_size * resize_ratio)",
    )
    parser.add_argument("--views", default="1,10,18", help="comma-separated: 1, 10, 18")
    parser.add_argument("--mapping", default="aligned", choices=("aligned", "paper"))
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from spp_jax import multiview, workdirs

    views_list = [int(v) for v in args.views.split(",")]
    for v in views_list:
        multiview.check_views(v)
    trained = workdirs.load_trained(args.workdir)
    config = trained.config
    sizes = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else [round(config.crop_size * config.resize_ratio)]
    )
    rows = []
    t_start = time.perf_counter()
    for views in views_list:
        by_size = multiview.evaluate_multiview(
            args.workdir,
            sizes,
            views=views,
            compare_whole_net=True,
            mapping=args.mapping,
            limit=args.limit,
            batch_size=args.batch_size,
        )
        for size in sizes:
            view_size = multiview.view_size_for(size, config.resize_ratio)
            r = by_size[str(size)]
            r["size"] = size
            rows.append(r)
            fm, wn = r["feature_map"], r["whole_net"]
            print(
                f"size {size} views {views:2d} (side {view_size}, {r['count']} images): "
                f"feature map top-1 {fm['top1']:.4f} {fm['seconds_per_image'] * 1e3:.2f} ms/image"
                f" | whole net top-1 {wn['top1']:.4f} {wn['seconds_per_image'] * 1e3:.2f} "
                f"ms/image | speed-up {wn['seconds_per_image'] / fm['seconds_per_image']:.1f}x, "
                f"same top-1 {r['agreement']:.3f}, max |dp| {r['max_abs_diff']:.4f}",
                flush=True,
            )
    rows.sort(key=lambda r: (r["size"], r["views"]))
    result = {
        "meta": {
            "workdir": os.path.abspath(args.workdir),
            "step": trained.step,
            "dataset": config.dataset,
            "split": config.eval_split,
            "limit": args.limit,
            "mapping": args.mapping,
            "batch_size": args.batch_size,
            "model": config.model.to_dict(),
            "crop_size": config.crop_size,
            "resize_ratio": config.resize_ratio,
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "wall_seconds": time.perf_counter() - t_start,
        },
        "rows": rows,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
