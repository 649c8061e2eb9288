"""What ``detect-train`` and ``detect-eval`` write to ``WORKDIR/eval/``: the AP table
(markdown), precision-recall curves and test images with their detections (PNG)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def class_names(num_classes: int) -> list[str]:
    """``spp_scenes``' class names when the count matches, else ``class 0`` ..."""
    try:
        from spp_jax.datasets.spp_scenes import CLASS_NAMES

        if len(CLASS_NAMES) == num_classes:
            return list(CLASS_NAMES)
    except ImportError:  # pragma: no cover
        pass
    if num_classes == 20:
        from spp_jax.detection.voc import VOC_CLASSES

        return list(VOC_CLASSES)
    return [f"class {k}" for k in range(num_classes)]


def _markdown(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def ap_table(table: Mapping[str, Mapping[str, Any]], num_classes: int) -> str:
    """A markdown table: one row per variant, mAP (VOC07, area) and per-class AP (%)."""
    rows = (
        [name, *(f"{100 * v:.1f}" for v in (r["map_voc07"], r["map_area"], *r["ap_voc07"]))]
        for name, r in table.items()
    )
    return _markdown(["method", "mAP VOC07", "mAP area", *class_names(num_classes)], rows)


def timing_table(table: Mapping[str, Mapping[str, Any]]) -> str:
    """Seconds per image per stage (markdown), one row per variant."""
    stages = ("conv", "pool_fc", "score", "nms", "bbox")
    rows = []
    for name, r in table.items():
        vals = [r["seconds_per_image"].get(s, 0.0) for s in stages]
        rows.append([name, *(f"{v:.4f}" for v in [*vals, sum(vals)])])
    return _markdown(["method", *stages, "total"], rows)


def write_eval(
    workdir: str,
    table: Mapping[str, Mapping[str, Any]],
    result: Mapping[str, Any],
    split: Any,
    dets: Sequence[Mapping[str, np.ndarray]],
    draw: int = 6,
) -> str:
    """Writes ``eval/ap_table.md``, ``eval/pr_curves.png`` and ``eval/detections_*.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    k = len(result["ap"])
    with open(os.path.join(out, "ap_table.md"), "w") as f:
        f.write("Average precision (%) on the test split\n\n")
        f.write(ap_table(table, k))
        f.write("\nSeconds per image\n\n")
        f.write(timing_table(table))
    names = class_names(k)
    fig, ax = plt.subplots(figsize=(7, 5))
    for c in range(k):
        rec, prec = result["recall"][c], result["precision"][c]
        if len(rec):
            ax.plot(rec, prec, label=f"{names[c]} (AP {100 * result['ap'][c]:.1f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"precision-recall on the test split, mAP {100 * result['map']:.1f} (VOC07)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "pr_curves.png"), dpi=100)
    plt.close(fig)
    for i in range(min(draw, len(dets))):
        draw_detections(
            split.images[i], dets[i], names, os.path.join(out, f"detections_{split.ids[i]}.png")
        )
    return out


def draw_detections(
    image: np.ndarray,
    det: Mapping[str, np.ndarray],
    names: Sequence[str],
    path: str,
    min_score: float | None = None,
    max_boxes: int = 10,
) -> None:
    """Saves ``image`` with its best ``max_boxes`` detections (labelled boxes) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = image.shape[:2]
    fig = plt.figure(figsize=(w / 60, h / 60), dpi=60)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image)
    ax.axis("off")
    scores = np.asarray(det["scores"])
    order = np.argsort(-scores, kind="stable")[:max_boxes]
    colours = plt.get_cmap("tab10")
    for j in order:
        if min_score is not None and scores[j] < min_score:
            continue
        x1, y1, x2, y2 = np.asarray(det["boxes"][j], np.float64)
        c = int(det["labels"][j])
        ax.add_patch(
            plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, color=colours(c % 10))
        )
        ax.text(
            x1, y1, f"{names[c]} {scores[j]:.2f}", fontsize=8, color="white", va="bottom",
            bbox={"facecolor": colours(c % 10), "alpha": 0.8, "pad": 1, "lw": 0},
        )  # fmt: skip
    fig.savefig(path, dpi=60)
    plt.close(fig)
