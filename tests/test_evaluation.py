"""spp_jax.detection.evaluation against line-by-line ports of VOCevaldet.m and voc_eval.py."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.detection.evaluation import _stable_descending, evaluate_detections, voc_ap

ONE_BASED = np.array([1.0, 1.0, 0.0, 0.0])  # continuous edges back to VOC's 1-based pixels


def devkit_class(dets, gts, c, thr=0.5, metric="voc07"):
    """VOCevaldet.m for one class, one detection at a time (NaN precision as MATLAB)."""
    gt = []
    npos = 0
    for g in gts:
        m = np.asarray(g["labels"]) == c
        diff = np.asarray(g.get("difficult", np.zeros(m.size, bool)), bool)[m]
        gt.append(
            {"bb": np.asarray(g["boxes"], float)[m], "diff": diff, "det": np.zeros(m.sum(), bool)}
        )
        npos += int((~diff).sum())
    items = [
        (float(s), i, np.asarray(b, float))
        for i, d in enumerate(dets)
        for b, s, lab in zip(d["boxes"], d["scores"], d["labels"], strict=True)
        if lab == c
    ]
    order = sorted(range(len(items)), key=lambda k: -items[k][0])  # Python's sort is stable
    tp, fp = np.zeros(len(items)), np.zeros(len(items))
    for d, k in enumerate(order):
        _, i, bb = items[k]
        ovmax, jmax = -math.inf, -1
        for j, bbgt in enumerate(gt[i]["bb"]):
            iw = min(bb[2], bbgt[2]) - max(bb[0], bbgt[0])
            ih = min(bb[3], bbgt[3]) - max(bb[1], bbgt[1])
            if iw > 0 and ih > 0:
                ua = (bb[2] - bb[0]) * (bb[3] - bb[1]) + (bbgt[2] - bbgt[0]) * (bbgt[3] - bbgt[1])
                ov = iw * ih / (ua - iw * ih)
                if ov > ovmax:
                    ovmax, jmax = ov, j
        if ovmax >= thr:
            if not gt[i]["diff"][jmax]:
                if not gt[i]["det"][jmax]:
                    tp[d] = 1
                    gt[i]["det"][jmax] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    if npos == 0:
        return math.nan
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / npos
    with np.errstate(invalid="ignore"):
        prec = tp / (fp + tp)  # NaN after only ignored detections, as in MATLAB
    if metric == "voc07":
        ap = 0.0
        for k in range(11):
            p = prec[rec >= k / 10]
            p = p[~np.isnan(p)]  # MATLAB's max skips NaN
            ap += (p.max() if p.size else 0.0) / 11
        return ap
    mrec = np.concatenate([[0], rec, [1]])
    mpre = np.concatenate([[0], prec, [0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = np.fmax(mpre[i], mpre[i + 1])
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def py_faster_rcnn_class(dets, gts, c, thr=0.5):
    """py-faster-rcnn's voc_eval (use_07_metric=True), its +1 on 1-based boxes."""
    recs, npos = {}, 0
    for i, g in enumerate(gts):
        m = np.asarray(g["labels"]) == c
        diff = np.asarray(g.get("difficult", np.zeros(m.size, bool)), bool)[m]
        bb = np.asarray(g["boxes"], float)[m] + ONE_BASED
        recs[i] = {"bbox": bb, "difficult": diff, "det": [False] * m.sum()}
        npos += int((~diff).sum())
    image_ids, conf, boxes = [], [], []
    for i, d in enumerate(dets):
        for b, s, lab in zip(d["boxes"], d["scores"], d["labels"], strict=True):
            if lab == c:
                image_ids.append(i)
                conf.append(float(s))
                boxes.append(np.asarray(b, float) + ONE_BASED)
    conf = np.array(conf)
    BB = np.array(boxes).reshape(-1, 4)
    sorted_ind = np.argsort(-conf)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp, fp = np.zeros(nd), np.zeros(nd)
    for d in range(nd):
        R = recs[image_ids[d]]
        bb = BB[d, :]
        ovmax = -np.inf
        BBGT = R["bbox"]
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = (
                (bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0)
                - inters
            )
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > thr:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    if npos == 0:
        return math.nan
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    ap = 0.0
    for t in np.arange(0.0, 1.1, 0.1):
        p = 0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
        ap = ap + p / 11.0
    return ap


def random_problem(rng, num_images=12, num_classes=4, grid=True):
    """Integer boxes (ties in IoU), quantised scores (ties), near-duplicates, difficult."""
    gts, dets = [], []
    for i in range(num_images):
        m = int(rng.integers(0, 5)) if i % 5 else 0  # some images without objects
        xy = rng.integers(0, 80, (m, 2))
        gb = np.concatenate([xy, xy + rng.integers(4, 40, (m, 2))], 1).astype(float)
        gl = rng.integers(0, num_classes - 1, m)  # the last class never has objects
        gts.append({"boxes": gb, "labels": gl, "difficult": rng.random(m) < 0.25})
        n = int(rng.integers(0, 9)) if i % 4 else 0  # some images without detections
        src = rng.integers(0, max(m, 1), n)
        db = gb[src] + rng.integers(-6, 7, (n, 4)) if m else rng.integers(0, 80, (n, 4)) * 1.0
        db[:, 2:] = np.maximum(db[:, 2:], db[:, :2] + 1)
        dl = np.where(rng.random(n) < 0.8, gl[src] if m else 0, rng.integers(0, num_classes, n))
        dets.append({"boxes": db, "scores": np.round(rng.random(n), 1), "labels": dl})
    return dets, gts


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("metric", ["voc07", "area"])
def test_matches_the_devkit_port(seed, metric):
    rng = np.random.default_rng(seed)
    dets, gts = random_problem(rng)
    out = evaluate_detections(dets, gts, num_classes=4, metric=metric)
    expected = [devkit_class(dets, gts, c, metric=metric) for c in range(4)]
    np.testing.assert_allclose(out["ap"], expected, rtol=1e-12, atol=1e-12)
    assert math.isnan(out["ap"][3])  # no ground truth of the last class
    assert out["map"] == pytest.approx(np.nanmean(expected), rel=1e-12)
    npos = [sum(int(((g["labels"] == c) & ~g["difficult"]).sum()) for g in gts) for c in range(4)]
    assert out["num_positives"].tolist() == npos


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_py_faster_rcnn_port(seed):
    rng = np.random.default_rng(100 + seed)
    dets, gts = random_problem(rng)
    out = evaluate_detections(dets, gts, num_classes=4, protocol="py-faster-rcnn")
    expected = [py_faster_rcnn_class(dets, gts, c) for c in range(4)]
    np.testing.assert_allclose(out["ap"], expected, rtol=1e-12, atol=1e-12)


def one_image(det_boxes, scores, gt_boxes, difficult=None, det_labels=None, gt_labels=None):
    det = {
        "boxes": np.asarray(det_boxes, float),
        "scores": np.asarray(scores, float),
        "labels": np.zeros(len(scores), int) if det_labels is None else np.asarray(det_labels),
    }
    gt = {"boxes": np.asarray(gt_boxes, float)}
    gt["labels"] = np.zeros(len(gt_boxes), int) if gt_labels is None else np.asarray(gt_labels)
    if difficult is not None:
        gt["difficult"] = np.asarray(difficult, bool)
    return det, gt


def test_difficult_duplicates_and_no_fall_back():
    a, b = [0, 0, 10, 10], [5, 0, 15, 10]  # b overlaps a by 1/3
    # The first detection takes a; the second (best match also a) is a false
    # positive even though c (IoU 0.5 with it) is free: no fall-back.
    c = [0, 0, 10, 20]
    det, gt = one_image([a, [0, 0, 10, 12]], [0.9, 0.8], [a, c])
    out = evaluate_detections([det], [gt], num_classes=1)
    assert out["precision"][0].tolist() == [1.0, 0.5]
    assert out["recall"][0].tolist() == [0.5, 0.5]
    # A detection on a difficult object is ignored: neither TP nor FP.
    det, gt = one_image([a, b, b], [0.9, 0.8, 0.7], [b, a], difficult=[False, True])
    out = evaluate_detections([det], [gt], num_classes=1)
    assert out["num_positives"].tolist() == [1]
    assert out["precision"][0].tolist() == [0.0, 1.0, 0.5]  # a: ignored; b: TP; b again: FP
    assert out["recall"][0].tolist() == [0.0, 1.0, 1.0]
    assert out["ap"][0] == pytest.approx(1.0)


def test_iou_exactly_at_the_threshold():
    gt_box, det_box = [0, 0, 10, 10], [0, 0, 10, 5]  # IoU 0.5 exactly
    det, gt = one_image([det_box], [1.0], [gt_box])
    assert evaluate_detections([det], [gt], num_classes=1)["ap"][0] == 1.0
    out = evaluate_detections([det], [gt], num_classes=1, protocol="py-faster-rcnn")
    assert out["ap"][0] == 0.0  # IoU > 0.5 needed there
    # Touching boxes do not overlap, even at threshold 0.
    det, gt = one_image([[10, 0, 20, 10]], [1.0], [gt_box])
    assert evaluate_detections([det], [gt], num_classes=1, iou_threshold=0.0)["ap"][0] == 0.0


def test_eleven_points_are_k_over_10_exactly():
    # 10 objects, 3 found first, then 7 false positives, then the rest: recall reaches
    # exactly 0.3 (= 3/10) at precision 1; np.arange's 0.30000000000000004 misses it.
    boxes = [[20 * i, 0, 20 * i + 10, 10] for i in range(10)]
    miss = [[500, 500, 510, 510]] * 7
    det_boxes = boxes[:3] + miss + boxes[3:]
    scores = np.linspace(1, 0, len(det_boxes))
    det, gt = one_image(det_boxes, scores, boxes)
    devkit = evaluate_detections([det], [gt], num_classes=1)["ap"][0]
    faster = evaluate_detections([det], [gt], num_classes=1, protocol="py-faster-rcnn")["ap"][0]
    assert devkit == pytest.approx(devkit_class([det], [gt], 0))
    assert faster == pytest.approx(py_faster_rcnn_class([det], [gt], 0))
    assert devkit - faster == pytest.approx((1.0 - 10 / 17) / 11)  # the t = 0.3 point


def test_stable_sort_keeps_input_order_of_ties():
    a, b = [0, 0, 10, 10], [30, 0, 40, 10]
    det1, gt1 = one_image([a], [0.5], [a])  # image 0: a hit
    det2, gt2 = one_image([a], [0.5], [b])  # image 1: a miss, same score
    first = evaluate_detections([det1, det2], [gt1, gt2], num_classes=1)
    second = evaluate_detections([det2, det1], [gt2, gt1], num_classes=1)
    assert first["precision"][0].tolist() == [1.0, 0.5]
    assert second["precision"][0].tolist() == [0.0, 0.5]


def test_empty_inputs_and_classes():
    empty_det = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)}
    empty_gt = {"boxes": [], "labels": []}
    out = evaluate_detections([empty_det], [empty_gt], num_classes=2)
    assert np.isnan(out["ap"]).all() and math.isnan(out["map"])
    assert out["precision"][0].shape == (0,)
    out = evaluate_detections([], [], num_classes=1)
    assert math.isnan(out["ap"][0])
    # Objects but no detections: AP 0 (both metrics).
    _, gt = one_image([], [], [[0, 0, 5, 5]])
    for metric in ("voc07", "area"):
        out = evaluate_detections([empty_det], [gt], num_classes=1, metric=metric)
        assert out["ap"].tolist() == [0.0] and out["map"] == 0.0
    # JAX arrays are accepted.
    det, gt = one_image([[0, 0, 5, 5]], [0.3], [[0, 0, 5, 5]])
    det = {k: jnp.asarray(v) for k, v in det.items()}
    assert evaluate_detections([det], [gt], num_classes=1)["ap"].tolist() == [1.0]


def test_bad_input_raises_clear_errors():
    det, gt = one_image([[0, 0, 5, 5]], [0.3], [[0, 0, 5, 5]])
    with pytest.raises(
        ValueError,
        match=r"detections\[0\] has label 3; labels must lie in \[0, num_classes\) = \[0, 2\)",
    ):
        evaluate_detections([{**det, "labels": np.array([3])}], [gt], num_classes=2)
    with pytest.raises(ValueError, match=r"ground_truths\[1\] has label -1"):
        evaluate_detections([det, det], [gt, {**gt, "labels": np.array([-1])}], num_classes=2)
    with pytest.raises(ValueError, match="the same images: got 2 and 1"):
        evaluate_detections([det, det], [gt], num_classes=1)
    with pytest.raises(ValueError, match=r"detections\[0\] has box \[5.0, 0.0, 0.0, 5.0\]"):
        evaluate_detections([{**det, "boxes": np.array([[5, 0, 0, 5.0]])}], [gt], num_classes=1)
    with pytest.raises(ValueError, match="NaN score"):
        evaluate_detections([{**det, "scores": np.array([np.nan])}], [gt], num_classes=1)
    with pytest.raises(ValueError, match=r"detections\[0\]\['scores'\] must have shape \(1,\)"):
        evaluate_detections([{**det, "scores": np.array([1.0, 2.0])}], [gt], num_classes=1)
    with pytest.raises(ValueError, match=r"has no 'scores'"):
        evaluate_detections([{"boxes": det["boxes"], "labels": det["labels"]}], [gt], num_classes=1)
    with pytest.raises(TypeError, match="integers"):
        evaluate_detections([{**det, "labels": np.array([0.0])}], [gt], num_classes=1)
    with pytest.raises(ValueError, match="unknown metric 'voc12'"):
        evaluate_detections([det], [gt], num_classes=1, metric="voc12")
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_detections([det], [gt], num_classes=1, protocol="coco")
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        evaluate_detections([det], [gt], num_classes=0)


def test_voc_ap():
    assert voc_ap([0.5, 1.0], [1.0, 0.5]) == pytest.approx(8.5 / 11)
    assert voc_ap([0.5, 1.0], [1.0, 0.5], metric="area") == pytest.approx(0.75)
    assert voc_ap([], []) == 0.0 and voc_ap([], [], metric="area") == 0.0
    # The envelope: a later, higher precision lifts earlier recalls.
    assert voc_ap([0.25, 0.5, 0.75], [0.5, 0.4, 0.6], metric="area") == pytest.approx(0.45)
    # A curve whose recall is not ordered uses the plain definition.
    assert voc_ap([1.0, 0.5], [0.5, 1.0]) == pytest.approx(8.5 / 11)
    with pytest.raises(ValueError, match=r"two \(D,\) arrays of one length"):
        voc_ap([0.1, 0.2], [0.5])
    with pytest.raises(ValueError, match="finite"):
        voc_ap([np.nan], [0.5])
    with pytest.raises(ValueError, match="unknown metric"):
        voc_ap([0.1], [0.5], metric="11point")


def test_fast_stable_order_equals_numpy_stable_argsort():
    rng = np.random.default_rng(5)
    for scores in (
        np.round(rng.random(5000), 2).astype(np.float32),  # many ties
        np.array([0.0, -0.0, 0.0, -np.inf, np.inf, -0.0, 1e-45, -1e-45], np.float32),
        rng.standard_normal(300).astype(np.float16),
        np.round(rng.random(300), 1),  # float64: NumPy's stable sort itself
    ):
        expected = np.argsort(-scores, kind="stable")
        np.testing.assert_array_equal(_stable_descending(scores), expected)
