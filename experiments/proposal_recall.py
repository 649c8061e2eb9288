"""Proposal quality of selective search on the built-in ``spp_scenes``: recall vs boxes.

Run (about 2 minutes on 2 CPU cores, dataset build included; the proposals are
cached under ``--cache``, so a second run takes seconds):

    python experiments/proposal_recall.py --out results/proposal_recall

For each number of proposals ``N`` (the first ``N`` in selective search's
order), recall is the fraction of the split's non-difficult ground-truth boxes
that some proposal covers with IoU >= 0.5 (and >= 0.7): the standard proposal
quality measure (Hosang et al., "What makes for effective detection
proposals?", 2015). Also: the same with difficult boxes included, mean best
overlap (MABO: each ground truth's best IoU, averaged), a random-order baseline
(each image's proposals shuffled with a fixed seed: what OpenCV's rank order is
worth), the number of proposals per image, and seconds per image of selective
search (one process on one core, the first ``--time-images`` images; plus the
cache's wall time with every core). Writes ``recall.json`` and ``recall.png``.

IoU is torchvision's (continuous pixel edges, no "+1"; the same as
``spp_jax.detection.box_iou``), computed here with NumPy.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from spp_jax.detection import proposals, voc

NUM_BOXES = (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 2000)
THRESHOLDS = (0.5, 0.7)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(N, M)`` IoU of ``(x1, y1, x2, y2)`` boxes (torchvision's formula)."""
    a = a.astype(np.float64)[:, None]
    b = b.astype(np.float64)[None]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def best_overlaps(props: np.ndarray, gt: np.ndarray, num_boxes) -> np.ndarray:
    """``(len(num_boxes), G)``: each ground truth's best IoU among the first N proposals."""
    out = np.zeros((len(num_boxes), len(gt)))
    if len(gt) == 0 or len(props) == 0:
        return out
    # Running maximum over proposals in order: best[k] = max IoU among the first k + 1.
    best = np.maximum.accumulate(iou(props, gt), axis=0)
    for i, n in enumerate(num_boxes):
        out[i] = best[min(n, len(props)) - 1]
    return out


def evaluate(cache, examples, num_boxes, *, shuffle_seed: int | None = None) -> dict:
    overlaps, easy = [], []
    rng = np.random.default_rng(shuffle_seed)
    for ex in examples:
        target = voc.example_boxes(ex)
        props = cache.get(voc.image_id(ex))
        if shuffle_seed is not None:
            props = props[rng.permutation(len(props))]
        overlaps.append(best_overlaps(props, target["boxes"], num_boxes))
        easy.append(~target["difficult"])
    ov = np.concatenate(overlaps, axis=1)
    easy_mask = np.concatenate(easy)
    result: dict = {"num_boxes": list(num_boxes)}
    for t in THRESHOLDS:
        result[f"recall@{t}"] = (ov[:, easy_mask] >= t).mean(axis=1).round(4).tolist()
        result[f"recall@{t}_with_difficult"] = (ov >= t).mean(axis=1).round(4).tolist()
    result["mabo"] = ov[:, easy_mask].mean(axis=1).round(4).tolist()
    result["num_ground_truths"] = int(easy_mask.sum())
    result["num_difficult"] = int((~easy_mask).sum())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="spp_scenes", help="TFDS name, e.g. voc/2007")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default="results/proposal_recall")
    parser.add_argument("--cache", default=None, help="default: <out>/cache_<dataset>_<split>")
    parser.add_argument("--mode", default="fast", choices=proposals.MODES)
    parser.add_argument("--max-boxes", type=int, default=2000)
    parser.add_argument("--min-size", type=float, default=proposals.DEFAULT_MIN_SIZE)
    parser.add_argument("--workers", type=int, default=None, help="default: every core")
    parser.add_argument("--time-images", type=int, default=20)
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    tag = f"{args.dataset.replace('/', '_')}_{args.split}"
    cache_dir = args.cache or os.path.join(args.out, f"cache_{tag}")
    settings = {"mode": args.mode, "max_boxes": args.max_boxes, "min_size": args.min_size}

    examples = list(voc.tfds_examples(args.dataset, args.split, data_dir=args.data_dir))
    print(f"{len(examples)} images of {args.dataset} {args.split}")

    # Seconds per image: one process, one core, in-process (decoded images).
    import cv2

    cv2.setNumThreads(1)
    timed = examples[: args.time_images]
    start = time.perf_counter()
    for ex in timed:
        proposals.selective_search(ex["image"], **settings)
    seconds_per_image = (time.perf_counter() - start) / max(1, len(timed))
    print(f"selective search ({args.mode}): {seconds_per_image:.3f} s per image on one core")

    cache = proposals.ProposalCache(cache_dir, **settings)
    stats = cache.compute(
        voc.encoded_images(args.dataset, args.split, data_dir=args.data_dir),
        total=len(examples),
        num_workers=args.workers,
    )
    counts = np.array([len(cache.get(voc.image_id(ex))) for ex in examples])
    ranked = evaluate(cache, examples, NUM_BOXES)
    shuffled = evaluate(cache, examples, NUM_BOXES, shuffle_seed=0)
    sizes = np.concatenate([ex["image"].shape[:2] for ex in examples]).reshape(-1, 2)
    report = {
        "dataset": args.dataset,
        "split": args.split,
        "num_images": len(examples),
        "image_size_mean_hw": sizes.mean(axis=0).round(1).tolist(),
        "settings": settings,
        "opencv": cv2.__version__,
        "cpu_count": os.cpu_count(),
        "seconds_per_image_one_core": round(seconds_per_image, 4),
        "cache_wall_seconds": round(stats.wall_seconds, 2),
        "cache_images_computed": stats.computed,
        "proposals_per_image": {
            "mean": float(counts.mean().round(1)),
            "median": float(np.median(counts)),
            "min": int(counts.min()),
            "max": int(counts.max()),
        },
        "rank_order": ranked,
        "random_order": shuffled,
    }
    with open(os.path.join(args.out, "recall.json"), "w") as f:
        json.dump(report, f, indent=1)
    for t in THRESHOLDS:
        row = ", ".join(
            f"{n}: {r:.3f}" for n, r in zip(NUM_BOXES, ranked[f"recall@{t}"], strict=True)
        )
        print(f"recall@{t} (non-difficult) by boxes: {row}")
    print(f"proposals per image: {report['proposals_per_image']}")
    _plot(report, os.path.join(args.out, "recall.png"))
    print(f"wrote {args.out}/recall.json and recall.png")


def _plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    n = report["rank_order"]["num_boxes"]
    for t, colour in zip(THRESHOLDS, ("tab:blue", "tab:orange"), strict=True):
        ax.plot(n, report["rank_order"][f"recall@{t}"], "o-", color=colour, label=f"IoU {t}")
        ax.plot(
            n,
            report["random_order"][f"recall@{t}"],
            "--",
            color=colour,
            alpha=0.6,
            label=f"IoU {t}, random order",
        )
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image (first N)")
    ax.set_ylabel("recall (non-difficult ground truths)")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    s = report["settings"]
    ax.set_title(
        f"selective search ({s['mode']}) on {report['dataset']} {report['split']}: "
        f"{report['seconds_per_image_one_core']:.2f} s/image",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
