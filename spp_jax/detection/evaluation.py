"""PASCAL VOC detection evaluation: average precision per class and mAP (NumPy).

The default protocol is the VOC2007 devkit's ``VOCevaldet.m``, as
``docs/detection-reference.md`` section 8 states it. Where that leaves a choice:
detections of equal score keep their input order (image, then detection); of ground
truths with equal IoU the first is taken; boxes without a positive width and height
in common never match; the precision is 0 where no detection counts yet (the
devkit's NaN there is skipped by its ``max``: the same AP, except for a class whose
every detection is ignored, AP 0 here and NaN in the devkit). A class without a
non-difficult ground truth has AP NaN; ``map`` is the mean over the other classes.
IoU is computed in float64 on continuous pixel edges, without "+1" (section 1).

``protocol="py-faster-rcnn"`` reproduces py-faster-rcnn's ``voc_eval.py``: IoU
``> iou_threshold`` (strict), the 11 points ``np.arange(0., 1.1, 0.1)``, and
NumPy's default (unstable) ``np.argsort(-scores)``, whose order of tied scores can
depend on the NumPy version and CPU, as for py-faster-rcnn. It writes scores with 3
decimals and boxes with 1 (plus 1 for its 1-based files): round yours the same way
to get its exact numbers.

Vectorised per class: a detection is compared only with the ground truths of its
class in its image (VOC 2007 test's 9.9M detections: seconds, ``docs/detection.md``).

>>> import numpy as np
>>> gts = [{"boxes": np.array([[0, 0, 10, 10.0]]), "labels": np.array([0])}]
>>> dets = [{"boxes": np.array([[0, 0, 10, 10.0], [0, 0, 10, 9.0]]),
...          "scores": np.array([0.9, 0.8]), "labels": np.array([0, 0])}]
>>> out = evaluate_detections(dets, gts, num_classes=1)
>>> out["ap"].tolist(), out["recall"][0].tolist(), out["precision"][0].tolist()
([1.0], [1.0, 1.0], [1.0, 0.5])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["METRICS", "PROTOCOLS", "evaluate_detections", "voc_ap"]

METRICS = ("voc07", "area")
PROTOCOLS = ("devkit", "py-faster-rcnn")

_ELEVEN_POINTS = np.arange(11) / 10.0  # k / 10 exactly
_ELEVEN_POINTS_PY_FASTER_RCNN = np.arange(0.0, 1.1, 0.1)


def _check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ValueError(f"unknown {name} {value!r}; accepted are {accepted}")


def voc_ap(
    recall: np.ndarray | Sequence[float],
    precision: np.ndarray | Sequence[float],
    metric: str = "voc07",
) -> float:
    """Average precision from a precision-recall curve, the VOC devkit's way.

    Args:
      recall: ``(D,)`` recall after each detection in score order
        (non-decreasing), in ``[0, 1]``.
      precision: ``(D,)`` precision after each detection, in ``[0, 1]``.
      metric: ``"voc07"`` (VOC2007's 11-point AP, at recalls exactly ``k / 10``)
        or ``"area"`` (VOC2010+), as ``docs/detection-reference.md`` section 8
        defines them.

    Returns:
      The AP, a float in ``[0, 1]`` (0 for an empty curve).

    Raises:
      ValueError: an unknown metric, shapes that are not two equal ``(D,)``, or
        values that are not finite.

    >>> round(voc_ap([0.5, 1.0], [1.0, 0.5]), 6)  # (6 * 1.0 + 5 * 0.5) / 11
    0.772727
    >>> voc_ap([0.5, 1.0], [1.0, 0.5], metric="area")
    0.75
    """
    _check_choice("metric", metric, METRICS)
    rec = np.asarray(recall, np.float64)
    prec = np.asarray(precision, np.float64)
    if rec.ndim != 1 or rec.shape != prec.shape:
        raise ValueError(
            f"recall and precision must be two (D,) arrays of one length, got shapes "
            f"{rec.shape} and {prec.shape}"
        )
    if not (np.isfinite(rec).all() and np.isfinite(prec).all()):
        raise ValueError(
            "recall and precision must be finite (a class without positives has no AP)"
        )
    return _ap(rec, prec, metric, _ELEVEN_POINTS)


def _ap(rec: np.ndarray, prec: np.ndarray, metric: str, points: np.ndarray) -> float:
    if metric == "voc07":
        if rec.size == 0:
            return 0.0
        if np.any(rec[1:] < rec[:-1]):  # not a curve in score order: the plain definition
            return float(sum(np.max(prec[rec >= t], initial=0.0) / 11.0 for t in points))
        # Highest precision at recall >= t: a suffix maximum, read where recall first reaches t.
        suffix_max = np.maximum.accumulate(prec[::-1])[::-1]
        first = np.searchsorted(rec, points, side="left")  # rec is non-decreasing
        p = np.where(first < rec.size, suffix_max[np.minimum(first, rec.size - 1)], 0.0)
        return float(np.sum(p / 11.0))
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def _field(item: Any, key: str, image: int, what: str) -> Any:
    if not isinstance(item, Mapping):
        raise TypeError(f"{what}[{image}] must be a mapping, got {type(item).__name__}")
    if key not in item:
        raise ValueError(f"{what}[{image}] has no {key!r} (it has {sorted(item)})")
    return item[key]


def _flatten(
    items: Sequence[Mapping[str, Any]], what: str, num_classes: int, keys: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Concatenates per-image arrays, checking shapes, labels and boxes."""
    boxes: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    image: list[np.ndarray] = []
    extra: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for i, item in enumerate(items):
        b = np.asarray(_field(item, "boxes", i, what), np.float64)
        if b.size == 0:
            b = b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"{what}[{i}]['boxes'] must have shape (n, 4), got {b.shape}")
        n = b.shape[0]
        lab = np.asarray(_field(item, "labels", i, what))
        if lab.shape != (n,) and not (n == 0 and lab.size == 0):
            raise ValueError(f"{what}[{i}]['labels'] must have shape ({n},), got {lab.shape}")
        if lab.size and not np.issubdtype(lab.dtype, np.integer):
            raise TypeError(f"{what}[{i}]['labels'] must be integers, got dtype {lab.dtype}")
        for k in keys:
            if k == "difficult" and k not in item:
                v = np.zeros(n, bool)
            else:
                v = np.asarray(_field(item, k, i, what))
            if v.shape != (n,) and not (n == 0 and v.size == 0):
                raise ValueError(f"{what}[{i}][{k!r}] must have shape ({n},), got {v.shape}")
            extra[k].append(v.reshape(n))
        boxes.append(b)
        labels.append(lab.reshape(n).astype(np.int64))
        image.append(np.full(n, i, np.int64))
    out: dict[str, np.ndarray] = {
        "boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4)),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "image": np.concatenate(image) if image else np.zeros(0, np.int64),
    }
    for k in keys:
        out[k] = np.concatenate(extra[k]) if extra[k] else np.zeros(0)
    bad = np.flatnonzero((out["labels"] < 0) | (out["labels"] >= num_classes))
    if bad.size:
        j = bad[0]
        raise ValueError(
            f"{what}[{out['image'][j]}] has label {out['labels'][j]}; labels must lie in "
            f"[0, num_classes) = [0, {num_classes})"
        )
    b = out["boxes"]
    bad = np.flatnonzero(~np.isfinite(b).all(axis=1) | (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1]))
    if bad.size:
        j = bad[0]
        raise ValueError(
            f"{what}[{out['image'][j]}] has box {b[j].tolist()}; boxes must be finite "
            f"(x1, y1, x2, y2) with x1 <= x2 and y1 <= y2"
        )
    return out


def evaluate_detections(
    detections: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    *,
    num_classes: int,
    iou_threshold: float = 0.5,
    metric: str = "voc07",
    protocol: str = "devkit",
) -> dict[str, Any]:
    """VOC average precision per class and mAP (see the module docstring for the rule).

    Args:
      detections: one mapping per image with ``boxes`` ``(n, 4)``
        ``(x1, y1, x2, y2)``, ``scores`` ``(n,)`` and ``labels`` ``(n,)`` ints in
        ``[0, num_classes)``. NumPy or JAX arrays (or lists).
      ground_truths: one mapping per image (the same images, in the same order)
        with ``boxes`` ``(m, 4)``, ``labels`` ``(m,)`` and optional
        ``difficult`` ``(m,)`` bools (default all False).
      num_classes: the number of classes.
      iou_threshold: the IoU a match needs (``>=``; ``>`` with
        ``protocol="py-faster-rcnn"``).
      metric: ``"voc07"`` (11-point, the default) or ``"area"`` (VOC2010+):
        see :func:`voc_ap`.
      protocol: ``"devkit"`` (VOCevaldet, the default) or ``"py-faster-rcnn"``.

    Returns:
      A dict with ``ap`` (float64 ``(num_classes,)``, NaN for a class without a
      non-difficult ground truth), ``map`` (float, the mean of the non-NaN APs;
      NaN if there is none), ``precision`` and ``recall`` (lists of
      ``num_classes`` float64 arrays, one entry per detection of the class in
      score order), ``num_positives`` (int64 ``(num_classes,)``),
      ``num_detections`` (int64 ``(num_classes,)``), and ``metric``,
      ``protocol``, ``iou_threshold``.

    Raises:
      ValueError: a different number of images, shapes that do not fit, labels
        outside ``[0, num_classes)`` (naming the image), non-finite or inverted
        boxes, NaN scores, an unknown metric or protocol.
      TypeError: an image that is not a mapping, non-integer labels.
    """
    _check_choice("metric", metric, METRICS)
    _check_choice("protocol", protocol, PROTOCOLS)
    if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    thr = float(iou_threshold)
    if not 0.0 <= thr <= 1.0:
        raise ValueError(f"iou_threshold must lie in [0, 1], got {iou_threshold}")
    det, gt = _read(detections, ground_truths, int(num_classes))
    strict = protocol == "py-faster-rcnn"
    points = _ELEVEN_POINTS_PY_FASTER_RCNN if strict else _ELEVEN_POINTS
    ap = np.full(num_classes, np.nan)
    npos = np.zeros(num_classes, np.int64)
    ndet = np.zeros(num_classes, np.int64)
    precisions: list[np.ndarray] = []
    recalls: list[np.ndarray] = []
    det_groups = _by_class(det["labels"], num_classes)
    gt_groups = _by_class(gt["labels"], num_classes)
    for c, (d, g) in enumerate(zip(det_groups, gt_groups, strict=True)):
        tp, fp = _match_class(
            det["boxes"][d],
            det["scores"][d],
            det["image"][d],
            gt["boxes"][g],
            gt["image"][g],
            gt["difficult"][g],
            len(ground_truths),
            thr,
            strict,
        )
        npos[c] = int(np.count_nonzero(~gt["difficult"][g]))
        ndet[c] = d.size
        ctp, cfp = np.cumsum(tp), np.cumsum(fp)
        prec = ctp / np.maximum(ctp + cfp, 1)
        rec = ctp / npos[c] if npos[c] else np.full(ctp.shape, np.nan)
        if npos[c]:
            ap[c] = _ap(rec, prec, metric, points)
        precisions.append(prec)
        recalls.append(rec)
    valid = ~np.isnan(ap)
    return {
        "ap": ap,
        "map": float(np.mean(ap[valid])) if valid.any() else math.nan,
        "precision": precisions,
        "recall": recalls,
        "num_positives": npos,
        "num_detections": ndet,
        "metric": metric,
        "protocol": protocol,
        "iou_threshold": thr,
    }


def _read(
    detections: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    num_classes: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The checked detections and ground truths of all images, each as one set of arrays."""
    if len(detections) != len(ground_truths):
        raise ValueError(
            f"detections and ground_truths must hold the same images: got {len(detections)} "
            f"and {len(ground_truths)}"
        )
    det = _flatten(detections, "detections", num_classes, ("scores",))
    gt = _flatten(ground_truths, "ground_truths", num_classes, ("difficult",))
    if not np.issubdtype(det["scores"].dtype, np.floating):
        det["scores"] = det["scores"].astype(np.float64)  # float32 stays: a faster sort
    if np.isnan(det["scores"]).any():
        j = int(np.flatnonzero(np.isnan(det["scores"]))[0])
        raise ValueError(f"detections[{det['image'][j]}] has a NaN score")
    gt["difficult"] = gt["difficult"].astype(bool)
    return det, gt


def _by_class(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """The rows of each class, in input order (image order: a stable sort by label).

    NumPy's stable sort of int16 is a radix sort.
    """
    small = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int64
    order = np.argsort(labels.astype(small), kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def _stable_descending(scores: np.ndarray) -> np.ndarray:
    """``np.argsort(-scores, kind="stable")``, faster for float32 scores.

    float32 scores and their positions make unique int64 keys, which NumPy's
    (SIMD) quicksort orders faster than its stable sort orders the floats.
    """
    if scores.dtype.itemsize > 4 or scores.size >= 2**31:
        return np.argsort(-scores, kind="stable")
    bits = (-scores.astype(np.float32) + np.float32(0.0)).view(np.int32)  # -0.0 -> 0.0
    ordered = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))  # int32 in float order
    key = (ordered.astype(np.int64) << 32) | np.arange(scores.size, dtype=np.int64)
    return np.argsort(key)


def _match_class(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_image: np.ndarray,
    gt_boxes: np.ndarray,
    gt_image: np.ndarray,
    gt_difficult: np.ndarray,
    num_images: int,
    thr: float,
    strict: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """True and false positive flags (int64) of one class's detections, in score order."""
    # py-faster-rcnn: its call on float64 scores (ties in NumPy's quicksort order).
    order = np.argsort(-det_scores.astype(np.float64)) if strict else _stable_descending(det_scores)
    boxes, image = det_boxes[order], det_image[order]
    n = order.size
    # Each detection against the ground truths of its image (gt sorted by image).
    gt_start = np.searchsorted(gt_image, np.arange(num_images + 1))
    first, count = gt_start[image], gt_start[image + 1] - gt_start[image]
    total = int(count.sum())
    best = np.full(n, -np.inf)
    best_gt = np.zeros(n, np.int64)
    if total:
        pair_det = np.repeat(np.arange(n), count)
        seg_start = np.cumsum(count) - count
        pair_gt = first[pair_det] + (np.arange(total) - seg_start[pair_det])
        a, b = boxes[pair_det], gt_boxes[pair_gt]
        iw = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
        ih = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
        inter = iw * ih
        union = (
            (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
            + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
            - inter
        )
        if strict:  # py-faster-rcnn: sides clamped at 0, overlaps of 0 kept
            iw0, ih0 = np.maximum(iw, 0.0), np.maximum(ih, 0.0)
            inter0 = iw0 * ih0
            union0 = union + inter - inter0
            with np.errstate(divide="ignore", invalid="ignore"):
                ov = inter0 / union0
        else:  # devkit: only boxes that overlap (iw > 0 and ih > 0) count
            with np.errstate(divide="ignore", invalid="ignore"):
                ov = np.where((iw > 0) & (ih > 0), inter / union, -np.inf)
        has = count > 0
        starts = seg_start[has]
        seg_max = np.maximum.reduceat(ov, starts)
        # First ground truth reaching the maximum (MATLAB's strict '>' scan, np.argmax).
        is_max = ov == np.repeat(seg_max, count[has])
        pos = np.where(is_max, np.arange(total), total)
        best[has] = seg_max
        best_gt[has] = pair_gt[np.minimum.reduceat(pos, starts)]
    matched = best > thr if strict else best >= thr
    ignored = matched & gt_difficult[best_gt] if gt_difficult.size else np.zeros(n, bool)
    candidate = np.flatnonzero(matched & ~ignored)
    tp = np.zeros(n, np.int64)
    # The first detection (in score order) to pick a ground truth matches it.
    _, first_pick = np.unique(best_gt[candidate], return_index=True)
    tp[candidate[first_pick]] = 1
    fp = (~ignored).astype(np.int64) - tp
    return tp, fp
