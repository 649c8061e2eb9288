r"""Speed of spp_jax's NMS against torchvision, and of the VOC evaluation.

Run:

    python experiments/benchmarks/nms.py --out results/nms.json
    python experiments/benchmarks/nms.py --n 64 --eval-images 4 --reps 2 --rounds 1 \
        --out /tmp/nms.json  # a quick check that it runs

2,000 boxes like selective-search windows on a 600 x 800 image (corners
uniform, sides log-uniform in 16-400 px), distinct uniform scores, 20 labels
(uniform) for the batched rows. For each threshold (0.3 and 0.7) it times, in
one run: ``spp_jax.detection.suppression``'s ``nms`` and ``batched_nms`` jitted
(``max_output`` None: every kept box), as a user calls them with fresh arrays, and
``torchvision.ops.nms`` / ``batched_nms`` (if torchvision is installed: the
``bench`` extra plus torchvision); and the detector's per-class NMS,
``multiclass_nms`` of the 2,000 boxes with a distinct score for each of 20
classes, keeping the best 100, against ``torchvision.ops.batched_nms`` of the
40,000 box-class pairs (first 100 kept; timed over a tenth of the calls).
``--n`` and ``--eval-images`` shrink the problems for a quick check. Each time is
the 25th percentile of
``--reps`` calls; the whole set is measured ``--rounds`` times, interleaved, and
the best round kept for every contender alike (this machine's timings drift
between runs). Both libraries' results are checked to be equal first.

Then it times ``evaluate_detections`` once on a VOC 2007 test-sized synthetic
problem: 4,952 images, 20 classes, 100 detections per class and image (9.9M
detections), 1-5 objects per image (10 % difficult). Prints a table and writes
JSON.
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

from spp_jax.detection.evaluation import evaluate_detections
from spp_jax.detection.suppression import batched_nms, multiclass_nms, nms

N = 2000
NUM_LABELS = 20
MAX_PER_IMAGE = 100  # multiclass_nms: the detector's test.max_per_image
THRESHOLDS = (0.3, 0.7)
OPS = ("nms", "batched_nms", "multiclass_nms")


def problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Boxes, distinct scores, labels, and distinct ``(N, NUM_LABELS)`` class scores."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1, (N, 2)) * [800, 600]
    wh = np.exp(rng.uniform(np.log(16), np.log(400), (N, 2)))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.permutation(N).astype(np.float32) / N + 0.5 / N  # distinct
    labels = rng.integers(0, NUM_LABELS, N).astype(np.int32)
    pairs = N * NUM_LABELS
    class_scores = (rng.permutation(pairs).reshape(N, NUM_LABELS) + 0.5) / pairs
    return boxes, scores, labels, class_scores.astype(np.float32)


def pairs(boxes, class_scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The box-class pairs of ``multiclass_nms`` as ``batched_nms`` input (pair k N + i)."""
    n, k = class_scores.shape
    return np.tile(boxes, (k, 1)), class_scores.T.reshape(-1), np.repeat(np.arange(k), n)


def _time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.percentile(times, 25))


def bench_jax(thr: float, reps: int) -> dict:
    boxes, scores, labels, class_scores = (jnp.asarray(a) for a in problem())
    calls = {
        "nms": (jax.jit(lambda b, s: nms(b, s, thr)), (boxes, scores)),
        "batched_nms": (
            jax.jit(lambda b, s, lab: batched_nms(b, s, lab, thr)),
            (boxes, scores, labels),
        ),
        "multiclass_nms": (
            jax.jit(lambda b, s: multiclass_nms(b, s, thr, max_output=MAX_PER_IMAGE)),
            (boxes, class_scores),
        ),
    }
    out = {}
    for op, (fn, args) in calls.items():
        t0 = time.perf_counter()
        fn.lower(*args).compile()
        out[f"compile_{op}_s"] = time.perf_counter() - t0
        n = max(1, reps // 10) if op == "multiclass_nms" else reps
        out[op] = _time(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)), n)
    return out


def bench_torch(thr: float, reps: int) -> dict | None:
    try:
        import torch
        import torchvision
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    boxes, scores, labels, class_scores = problem()
    pb, ps, pl = (torch.from_numpy(a) for a in pairs(boxes, class_scores))
    boxes, scores, labels = (torch.from_numpy(a) for a in (boxes, scores, labels))
    labels, pl = labels.long(), pl.long()
    ops = torchvision.ops
    return {
        "nms": _time(lambda: ops.nms(boxes, scores, thr), reps),
        "batched_nms": _time(lambda: ops.batched_nms(boxes, scores, labels, thr), reps),
        "multiclass_nms": _time(
            lambda: ops.batched_nms(pb, ps, pl, thr)[:MAX_PER_IMAGE], max(1, reps // 10)
        ),
    }


def check_equal() -> dict:
    """Kept counts per row; asserts spp_jax and torchvision keep the same boxes."""
    boxes, scores, labels, class_scores = problem()
    counts = {}
    for thr in THRESHOLDS:
        keep, count = nms(boxes, scores, thr)
        keep_b, count_b = batched_nms(boxes, scores, labels, thr)
        keep_m, classes_m, count_m = multiclass_nms(
            boxes, class_scores, thr, max_output=MAX_PER_IMAGE
        )
        counts[thr] = {
            "nms": int(count),
            "batched_nms": int(count_b),
            "multiclass_nms": int(count_m),
        }
        try:
            import torch
            import torchvision
        except ImportError:
            continue
        tb, ts, tl = torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels)
        expected = torchvision.ops.nms(tb, ts, thr).numpy()
        assert np.array_equal(np.asarray(keep)[: int(count)], expected), thr
        expected = torchvision.ops.batched_nms(tb, ts, tl.long(), thr).numpy()
        assert np.array_equal(np.asarray(keep_b)[: int(count_b)], expected), thr
        pb, ps, pl = (torch.from_numpy(a) for a in pairs(boxes, class_scores))
        expected = torchvision.ops.batched_nms(pb, ps, pl.long(), thr).numpy()[:MAX_PER_IMAGE]
        got = np.asarray(classes_m) * N + np.asarray(keep_m)
        assert np.array_equal(got[: int(count_m)], expected), thr
    return counts


def voc_sized(seed: int = 0, num_images: int = 4952, num_classes: int = 20, per_class: int = 100):
    rng = np.random.default_rng(seed)
    dets, gts = [], []
    labels = np.repeat(np.arange(num_classes), per_class)
    for _ in range(num_images):
        m = int(rng.integers(1, 6))
        xy = rng.uniform(0, 400, (m, 2))
        gts.append(
            {
                "boxes": np.concatenate([xy, xy + rng.uniform(16, 200, (m, 2))], 1),
                "labels": rng.integers(0, num_classes, m),
                "difficult": rng.random(m) < 0.1,
            }
        )
        n = num_classes * per_class
        xy = rng.uniform(0, 500, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(16, 300, (n, 2))], 1).astype(np.float32)
        dets.append({"boxes": boxes, "scores": rng.random(n).astype(np.float32), "labels": labels})
    return dets, gts


def bench_evaluation(num_images: int = 4952) -> dict:
    dets, gts = voc_sized(num_images=num_images)
    out = {}
    for protocol in ("devkit", "py-faster-rcnn"):
        t0 = time.perf_counter()
        evaluate_detections(dets, gts, num_classes=20, protocol=protocol)
        out[protocol] = time.perf_counter() - t0
    out["detections"] = sum(len(d["scores"]) for d in dets)
    return out


def main():
    global N
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="results/nms.json")
    parser.add_argument("--n", type=int, default=N, help="boxes per NMS problem")
    parser.add_argument("--eval-images", type=int, default=4952, help="images to evaluate")
    args = parser.parse_args()
    N = args.n
    counts = check_equal()
    best: dict = {}
    for r in range(args.rounds):
        for thr in THRESHOLDS:
            for who, fn in (("jax", bench_jax), ("torch", bench_torch)):
                got = fn(thr, args.reps)
                if got is None:
                    best[(thr, who)] = None
                    continue
                old = best.get((thr, who)) or {}
                best[(thr, who)] = {k: min(v, old.get(k, v)) for k, v in got.items()}
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    rows = []
    for thr in THRESHOLDS:
        for op in OPS:
            j, t = best[(thr, "jax")], best[(thr, "torch")]
            rows.append(
                {
                    "op": op,
                    "iou_threshold": thr,
                    "kept": counts[thr][op],
                    "spp_jax_ms": j[op] * 1e3,
                    "torchvision_ms": t[op] * 1e3 if t else None,
                    "compile_s": j[f"compile_{op}_s"],
                }
            )
    head = (
        f"{'op':>14} | {'iou thr':>7} | {'kept':>5} | {'spp_jax ms':>10} | "
        f"{'torchvision ms':>14} | {'torchvision / spp_jax':>21} | {'compile s':>9}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        tv = f"{r['torchvision_ms']:14.3f}" if r["torchvision_ms"] else f"{'n/a':>14}"
        ratio = (
            f"{r['torchvision_ms'] / r['spp_jax_ms']:21.2f}"
            if r["torchvision_ms"]
            else f"{'n/a':>21}"
        )
        print(
            f"{r['op']:>14} | {r['iou_threshold']:7.1f} | {r['kept']:5d} | "
            f"{r['spp_jax_ms']:10.3f} | {tv} | {ratio} | {r['compile_s']:9.2f}"
        )
    ev = bench_evaluation(args.eval_images)
    print(
        f"\nevaluate_detections, {ev['detections']:,} detections "
        f"({args.eval_images:,} images x 20 classes x 100): devkit {ev['devkit']:.2f} s, "
        f"py-faster-rcnn {ev['py-faster-rcnn']:.2f} s"
    )
    meta = {
        "n": N,
        "num_labels": NUM_LABELS,
        "multiclass_max_output": MAX_PER_IMAGE,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "reps": args.reps,
        "rounds": args.rounds,
    }
    try:
        import torch
        import torchvision

        meta.update(torch=torch.__version__, torchvision=torchvision.__version__)
    except ImportError:
        pass
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows, "evaluation_s": ev}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
