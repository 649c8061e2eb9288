"""Selective-search recall when the search runs on a downscaled copy (``max_side``).

Run (from the repository root; ``spp_scenes`` is built locally on first use)::

    python experiments/proposal_downscale.py --out experiments/results/proposal_downscale.json

For each image of the split, proposals (the ``detection`` config's settings: fast mode,
2,000 boxes, ``min_size`` 10) are computed on the image itself and on copies whose
longer side is ``max_side`` (a fraction of the image's own longer side, so images of
any size compare alike), and each ground-truth box counts as recalled at IoU t when
some proposal overlaps it by at least t. Reported per setting: recall at IoU 0.5 and
0.7 over all non-difficult ground-truth boxes (IoU as in ``proposal_recall.py``), mean
proposals per image, seconds per image. This is what the default
``proposals.max_side`` was chosen from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments.proposal_recall import iou  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="spp_scenes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100, help="images (default 100)")
    parser.add_argument(
        "--fractions",
        default="1,0.75,0.5,0.375,0.25",
        help="max_side as fractions of each image's longer side (1: the image itself)",
    )
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    from spp_jax._cpu import tune
    from spp_jax.configs import detection
    from spp_jax.detection import proposals, stages

    p = detection.get_config().proposals
    split = stages.load_split(args.dataset, args.split)
    n = min(args.limit, len(split))
    fractions = [float(f) for f in args.fractions.split(",")]
    rows = []
    for frac in fractions:
        hits = {0.5: 0, 0.7: 0}
        total, counts, seconds = 0, [], 0.0
        for i in tqdm(range(n), desc=f"max_side {frac:g} x longer side"):
            image = split.images[i]
            h, w = image.shape[:2]
            max_side = None if frac >= 1 else max(16, round(frac * max(h, w)))
            t0 = time.perf_counter()
            boxes = proposals.selective_search(
                image, mode=p.mode, max_boxes=p.max_boxes, min_size=p.min_size, max_side=max_side
            )
            seconds += time.perf_counter() - t0
            gt = split.boxes[i][~split.difficult[i]]
            counts.append(len(boxes))
            total += len(gt)
            if len(gt) and len(boxes):
                best = iou(gt, boxes).max(axis=1)
                for t in hits:
                    hits[t] += int((best >= t).sum())
        row = {
            "max_side_fraction": frac,
            "recall_iou50": hits[0.5] / total,
            "recall_iou70": hits[0.7] / total,
            "proposals_per_image": float(np.mean(counts)),
            "seconds_per_image": seconds / n,
            "ground_truth_boxes": total,
        }
        rows.append(row)
        print(
            f"max_side = {frac:g} x longer side: recall {row['recall_iou50']:.3f} (IoU 0.5), "
            f"{row['recall_iou70']:.3f} (IoU 0.7), {row['proposals_per_image']:.0f} boxes, "
            f"{row['seconds_per_image']:.3f} s/image",
            flush=True,
        )
    sizes = [im.shape[:2] for im in split.images[:n]]
    result = {
        "meta": {
            "dataset": args.dataset,
            "split": args.split,
            "images": n,
            "image_longer_side": [int(min(max(s) for s in sizes)), int(max(max(s) for s in sizes))],
            "settings": {k: p[k] for k in ("mode", "max_boxes", "min_size")},
            "cpu": tune.cpu_description(),
        },
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
