"""spp_jax.detection.suppression: against a slow greedy NumPy reference, hand cases, torchvision."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from spp_jax.detection.suppression import _group, _nms, batched_nms, multiclass_nms, nms


def ref_iou32(a: np.ndarray, b: np.ndarray) -> np.float32:
    """torchvision's float32 IoU of two boxes (a: the kept, higher-scored one)."""
    f = np.float32
    w = max(f(0), min(a[2], b[2]) - max(a[0], b[0]))
    h = max(f(0), min(a[3], b[3]) - max(a[1], b[1]))
    inter = f(w * h)
    area_a = f((a[2] - a[0]) * (a[3] - a[1]))
    area_b = f((b[2] - b[0]) * (b[3] - b[1]))
    with np.errstate(invalid="ignore"):
        return f(inter / f(f(area_a + area_b) - inter))


def ref_nms(boxes, scores, thr, labels=None, max_output=None, score_threshold=None):
    """Greedy NMS, one box at a time; the IoU compared with ``thr`` as a real number."""
    boxes = np.asarray(boxes, np.float32)
    scores = np.asarray(scores, np.float32)
    n = len(scores)
    take = [
        i
        for i in range(n)
        if not math.isnan(scores[i]) and (score_threshold is None or scores[i] > score_threshold)
    ]
    take.sort(key=lambda i: (-float(scores[i]), i))
    keep: list[int] = []
    for i in take:
        if all(
            (labels is not None and labels[k] != labels[i])
            or not float(ref_iou32(boxes[k], boxes[i])) > thr
            for k in keep
        ):
            keep.append(i)
    return keep[: n if max_output is None else max_output]


def ref_multiclass(boxes, scores, thr, max_output=None, score_threshold=None):
    """Per-class NMS of ``(N, K)`` scores as :func:`ref_nms` of the ``N K`` box-class
    pairs (pair ``k N + i``): the kept ``(box indices, classes)``."""
    n, k = scores.shape
    pairs = ref_nms(
        np.tile(boxes, (k, 1)),
        np.asarray(scores).T.reshape(-1),
        thr,
        np.repeat(np.arange(k), n),
        max_output,
        score_threshold,
    )
    return [p % n for p in pairs], [p // n for p in pairs]


def random_problem(rng, n, grid=False, tie_scores=False):
    """Boxes in a 100 x 100 image; ``grid``: integer coordinates (exact IoU ties)."""
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    if grid:
        boxes = np.round(boxes / 4) * 4
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 4)
    scores = rng.random(n)
    if tie_scores:
        scores = np.round(scores * 4) / 4
    return boxes.astype(np.float32), scores.astype(np.float32)


def check(keep, count, expected, max_output):
    keep, count = np.asarray(keep), int(count)
    assert keep.dtype == np.int32 and keep.shape == (max_output,)
    assert count == len(expected)
    assert keep[:count].tolist() == list(expected)
    assert (keep[count:] == -1).all()


@pytest.mark.parametrize("n", [1, 7, 40])
def test_nms_matches_reference(n):
    rng = np.random.default_rng(n)
    for trial in range(6):
        boxes, scores = random_problem(rng, n, grid=trial % 2 == 1, tie_scores=trial % 3 == 2)
        for thr in (0.0, 0.3, 0.5, 0.7, 1.0):
            check(*nms(boxes, scores, thr), ref_nms(boxes, scores, thr), n)


# 40 boxes: the triangle in visiting order; 300 (more than a band): label runs,
# in a band (runs of at most 225 boxes) or the triangle (one label).
@pytest.mark.parametrize("n", [40, 300])
@pytest.mark.parametrize("num_labels", [1, 3, 20])
def test_batched_nms_matches_reference(n, num_labels):
    rng = np.random.default_rng(num_labels)
    for trial in range(4):
        boxes, scores = random_problem(rng, n, grid=trial % 2 == 1, tie_scores=trial == 2)
        labels = rng.integers(0, num_labels, n) * 7 - 5  # any integers
        for thr in (0.3, 0.5, 0.7):
            got = batched_nms(boxes, scores, labels, thr)
            check(*got, ref_nms(boxes, scores, thr, labels), n)


def test_early_stop_with_large_label_groups():
    # 300 boxes in one label and in two: each pass stops once max_output boxes are kept.
    rng = np.random.default_rng(7)
    boxes, scores = random_problem(rng, 300, tie_scores=True)
    for labels in (np.zeros(300, int), rng.integers(0, 2, 300)):
        expected = ref_nms(boxes, scores, 0.5, labels, max_output=30)
        check(*batched_nms(boxes, scores, labels, 0.5, max_output=30), expected, 30)
    check(*nms(boxes, scores, 0.5, max_output=30), ref_nms(boxes, scores, 0.5, max_output=30), 30)


def test_band_and_triangle_of_label_runs():
    # 300 boxes (10 words): 31 of label -1, then a run of n disjoint boxes of label 0
    # whose last repeats its first (bit 31 of word 0), then label 1. A run of 225
    # ends at column 256, the band's end; a longer one takes the triangle.
    rng = np.random.default_rng(29)
    for n in (225, 226, 260):
        cell = np.arange(n)
        x, y = cell % 20 * 10.0, cell // 20 * 10.0
        run = np.stack([x, y, x + 8, y + 8], 1)
        run[-1] = run[0]
        others, _ = random_problem(rng, 300 - n)
        boxes = np.concatenate([run, others + 300]).astype(np.float32)
        scores = rng.permutation(300).astype(np.float32)
        scores[:n] = np.sort(scores[:n])[::-1]  # the run's first box is visited first
        labels = np.r_[np.zeros(n, int), -np.ones(31, int), np.ones(300 - n - 31, int)]
        expected = ref_nms(boxes, scores, 0.5, labels)
        assert n - 1 not in expected
        check(*batched_nms(boxes, scores, labels, 0.5), expected, 300)


@pytest.mark.parametrize("npad", [64, 46368])  # one int32 key; two keys (npad^2 > 2^31)
def test_group_sorts_labels_stably_into_runs(npad):
    labels = np.random.default_rng(npad).integers(-3, 3, npad).astype(np.int32)
    seq, start, end = jax.jit(_group)(labels)
    expected = np.argsort(labels, kind="stable")
    assert np.array_equal(seq, expected)
    ranked = labels[expected]
    assert np.array_equal(start, np.searchsorted(ranked, ranked, side="left"))
    assert np.array_equal(end, np.searchsorted(ranked, ranked, side="right"))


def test_labels_are_separated_exactly_where_a_coordinate_offset_rounds():
    # torchvision's coordinate trick adds label * (max_coordinate + 1) = 60 * 501 to
    # boxes 0 and 1: float32 keeps no bits below 2**-9 there, and their IoU, exactly
    # the threshold, rounds above it. Per label (torchvision above 1,000 boxes on
    # CPU, and here) box 1 is kept.
    boxes = np.array(
        [
            [63.6961669921875, 26.97867202758789, 85.3351058959961, 47.63977813720703],
            [68.70848846435547, 33.582759857177734, 87.04127502441406, 51.31172180175781],
            [0.0, 0.0, 500.0, 500.0],
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.1], np.float32)
    labels = np.array([60, 60, 0])
    thr = float(ref_iou32(boxes[0], boxes[1]))
    offset = (labels * (boxes.max() + np.float32(1))).astype(np.float32)
    assert ref_nms(boxes + offset[:, None], scores, thr) == [0, 2]  # the offset's decision
    check(*batched_nms(boxes, scores, labels, thr), [0, 1, 2], 3)
    tv = pytest.importorskip("torchvision")
    torch = pytest.importorskip("torch")
    tb, ts, tl = torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels)
    assert tv.ops.boxes._batched_nms_vanilla(tb, ts, tl, thr).tolist() == [0, 1, 2]


@pytest.mark.parametrize("k", [1, 3, 20])
def test_multiclass_nms_matches_reference(k):
    rng = np.random.default_rng(100 + k)
    for trial in range(3):
        boxes, _ = random_problem(rng, 30, grid=trial == 1)
        scores = rng.random((30, k)).astype(np.float32)
        if trial == 2:  # ties within and across classes
            scores = np.round(scores * 4) / 4
        scores[rng.random((30, k)) < 0.2] = np.nan
        for thr, m, st in ((0.3, None, None), (0.5, 10, None), (0.7, 25, 0.5)):
            keep, classes, count = multiclass_nms(
                boxes, scores, thr, max_output=m, score_threshold=st
            )
            expected_keep, expected_classes = ref_multiclass(boxes, scores, thr, m, st)
            size = 30 * k if m is None else m
            check(keep, count, expected_keep, size)
            check(classes, count, expected_classes, size)


def test_threshold_is_compared_as_a_real_number():
    # IoU 1/2 exactly: kept at 0.5, suppressed just below.
    boxes = np.array([[0, 0, 2, 1], [0, 0, 1, 1]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    check(*nms(boxes, scores, 0.5), [0, 1], 2)
    check(*nms(boxes, scores, 0.4999), [0], 2)
    # IoU 3/10 is float32(0.3) = 0.30000001 > 0.3: suppressed at 0.3 (torchvision
    # compares its float IoU with a double threshold), kept at float32(0.3).
    boxes = np.array([[0, 0, 10, 1], [0, 0, 3, 1]], np.float32)
    check(*nms(boxes, scores, 0.3), [0], 2)
    check(*nms(boxes, scores, float(np.float32(0.3))), [0, 1], 2)


def test_ties_nan_scores_and_score_threshold():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]], float)
    # Equal scores: the lower index first and it suppresses its twin; -0.0 equals 0.0.
    check(*nms(boxes, np.array([0.5, 0.5, 0.5, 0.5]), 0.5), [0, 2, 3], 4)
    check(*nms(boxes, np.array([-0.0, 0.0, 0.0, -0.0]), 0.5), [0, 2, 3], 4)
    check(*nms(boxes, np.array([0.1, 0.9, 0.9, 0.2]), 0.5), [1, 2, 3], 4)
    # NaN scores never take part (nor suppress).
    check(*nms(boxes, np.array([np.nan, 0.1, np.nan, 0.3]), 0.5), [3, 1], 4)
    # score_threshold: strictly greater; as a real number.
    scores = np.array([0.9, 0.8, 0.5, 0.3], np.float32)
    check(*nms(boxes, scores, 0.5, score_threshold=0.5), [0], 4)
    check(*nms(boxes, scores, 0.5, score_threshold=0.2999), [0, 2, 3], 4)
    check(*nms(boxes, scores, 0.5, score_threshold=0.3), [0, 2, 3], 4)  # float32(0.3) < 0.3
    check(*nms(boxes, -np.inf * np.ones(4), 0.5), [0, 2, 3], 4)


def test_empty_and_degenerate_inputs():
    keep, count = nms(np.zeros((0, 4)), np.zeros(0), 0.5)
    assert keep.shape == (0,) and int(count) == 0
    keep, count = nms(np.zeros((0, 4)), np.zeros(0), 0.5, max_output=3)
    check(keep, count, [], 3)
    check(*batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0, int), 0.5, max_output=2), [], 2)
    for scores in (np.zeros((0, 3)), np.zeros((2, 0))):
        keep, classes, count = multiclass_nms(np.ones((len(scores), 4)), scores, 0.5)
        assert keep.shape == classes.shape == (0,) and int(count) == 0
        keep, classes, count = multiclass_nms(np.ones((len(scores), 4)), scores, 0.5, max_output=2)
        check(keep, count, [], 2)
        check(classes, count, [], 2)
    boxes = np.array([[0, 0, 10, 10], [1, 1, 9, 9], [5, 5, 5, 5], [5, 5, 5, 5]], np.float32)
    scores = np.array([0.1, 0.9, 0.5, 0.4])
    # Empty boxes (IoU 0 / 0) suppress nothing and are not suppressed.
    check(*nms(boxes, scores, 0.5), [1, 2, 3], 4)
    check(*nms(boxes, scores, 0.5, max_output=0), [], 0)
    check(*nms(boxes, scores, 0.5, max_output=6), [1, 2, 3], 6)  # padded past N
    check(*nms(boxes, np.full(4, np.nan), 0.5), [], 4)  # nothing takes part


def test_bad_input_raises_clear_errors():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 9, 9]], np.float32)
    scores = np.array([0.5, 0.4])
    with pytest.raises(ValueError, match=r"boxes must have shape \(N, 4\)"):
        nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(ValueError, match=r"scores must have shape \(N,\) = \(2,\)"):
        nms(boxes, scores[:1], 0.5)
    with pytest.raises(ValueError, match=r"row 1 is \[1.0, 1.0, 0.0, 9.0\]"):
        nms(np.array([[0, 0, 1, 1], [1, 1, 0, 9]], float), scores, 0.5)
    with pytest.raises(ValueError, match="must be finite; row 0"):
        nms(np.array([[0, 0, np.inf, 1], [1, 1, 2, 9]], float), scores, 0.5)
    with pytest.raises(ValueError, match=r"iou_threshold must be a number in \[0.0, 1.0\]"):
        nms(boxes, scores, 1.5)
    with pytest.raises(ValueError, match="iou_threshold must be a number"):
        nms(boxes, scores, math.nan)
    with pytest.raises(ValueError, match="max_output must be >= 0"):
        nms(boxes, scores, 0.5, max_output=-1)
    with pytest.raises(TypeError, match="max_output must be a static Python int"):
        nms(boxes, scores, 0.5, max_output=2.0)
    with pytest.raises(TypeError, match="labels must be an integer array"):
        batched_nms(boxes, scores, np.array([0.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\)"):
        batched_nms(boxes, scores, np.array([0, 1, 2]), 0.5)
    with pytest.raises(ValueError, match=r"scores must have shape \(N, K\) with N = 2 like boxes"):
        multiclass_nms(boxes, scores, 0.5)


@pytest.fixture(scope="module")
def jitted():
    """One compiled function per entry point, shared (the threshold is an argument)."""
    plain = jax.jit(lambda b, s, t: nms(b, s, t, max_output=12))
    grouped = jax.jit(lambda b, s, lab, t: batched_nms(b, s, lab, t, max_output=12))
    multi = jax.jit(lambda b, s, t: multiclass_nms(b, s, t, max_output=12))
    return plain, grouped, multi


def test_jit_traced_thresholds_and_nan_boxes(jitted):
    plain, grouped, multi = jitted
    rng = np.random.default_rng(3)
    boxes, scores = random_problem(rng, 40)
    labels = rng.integers(0, 3, 40)
    class_scores = rng.random((40, 3)).astype(np.float32)
    for thr in (0.3, 0.5):  # a traced float32 threshold
        t = float(np.float32(thr))
        check(*plain(boxes, scores, thr), ref_nms(boxes, scores, t, max_output=12), 12)
        expected = ref_nms(boxes, scores, t, labels, max_output=12)
        check(*grouped(boxes, scores, labels, thr), expected, 12)
        keep, classes, count = multi(boxes, class_scores, thr)
        expected_keep, expected_classes = ref_multiclass(boxes, class_scores, t, 12)
        check(keep, count, expected_keep, 12)
        check(classes, count, expected_classes, 12)
    # Under jit values are not checked: a NaN box suppresses nothing and is kept.
    bad = boxes.copy()
    bad[0] = np.nan
    scores = scores.copy()
    scores[0] = 2.0
    keep, count = plain(bad, scores, 0.5)
    assert int(keep[0]) == 0
    rest = ref_nms(boxes[1:], scores[1:], float(np.float32(0.5)), max_output=11)
    assert np.asarray(keep)[1 : int(count)].tolist() == [i + 1 for i in rest]


def test_thresholds_do_not_recompile():
    rng = np.random.default_rng(5)
    boxes, scores = random_problem(rng, 9)
    nms(boxes, scores, 0.5)
    before = _nms._cache_size()
    for thr in (0.1, 0.2, 0.9):
        nms(boxes, scores, thr, score_threshold=thr)
    nms(boxes, scores, 0.3, score_threshold=0.5)
    assert _nms._cache_size() - before <= 1  # the first score_threshold call only


@pytest.mark.parametrize("n", [40, 300])
def test_vmap_over_a_padded_batch(n):
    rng = np.random.default_rng(11)
    sizes = (n, 17, 0, n - 7)
    boxes = np.zeros((4, n, 4), np.float32)
    scores = np.full((4, n), np.nan, np.float32)  # padding: NaN scores never take part
    labels = np.zeros((4, n), np.int32)
    for i, m in enumerate(sizes):
        boxes[i, :m], scores[i, :m] = random_problem(rng, m)
        labels[i, :m] = rng.integers(0, 3, m)
    keep, count = jax.vmap(lambda b, s: nms(b, s, 0.5, max_output=20))(boxes, scores)
    keep_b, count_b = jax.vmap(lambda b, s, lab: batched_nms(b, s, lab, 0.5, max_output=20))(
        boxes, scores, labels
    )
    for i, m in enumerate(sizes):
        check(keep[i], count[i], ref_nms(boxes[i, :m], scores[i, :m], 0.5, max_output=20), 20)
        expected = ref_nms(boxes[i, :m], scores[i, :m], 0.5, labels[i, :m], max_output=20)
        check(keep_b[i], count_b[i], expected, 20)


@pytest.mark.parametrize("n", [40, 300])
def test_any_int32_labels(n):
    rng = np.random.default_rng(13)
    boxes, scores = random_problem(rng, n, grid=True)
    dense = rng.integers(0, 3, n)
    expected = ref_nms(boxes, scores, 0.5, dense)
    # Far apart, and distinct integers that are one float32 (2**24 + 1 rounds to 2**24).
    for values in ([-(2**31), 5, 2**31 - 1], [2**24, 2**24 + 1, 2**24 + 2]):
        check(*batched_nms(boxes, scores, np.array(values)[dense], 0.5), expected, n)
    check(*batched_nms(boxes, scores, dense, 0.5), expected, n)


def _no_ties(scores):
    return len(np.unique(scores)) == len(scores)


def test_torchvision_parity():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    rng = np.random.default_rng(17)
    # 1,040 boxes: torchvision's batched_nms runs nms per label above 1,000 boxes
    # on CPU, and offsets the coordinates per label below (other float rounding).
    n = 1040
    xy = rng.uniform(0, 600, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 200, (n, 2))], 1).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    assert _no_ties(scores)  # torchvision's order of ties is unspecified
    labels = rng.integers(0, 20, n)
    tb, ts, tl = torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels)
    for thr in (0.3, 0.5, 0.7):
        check(*nms(boxes, scores, thr), tv.ops.nms(tb, ts, thr).numpy().tolist(), n)
        expected = tv.ops.batched_nms(tb, ts, tl, thr).numpy().tolist()
        check(*batched_nms(boxes, scores, labels, thr), expected, n)


def test_multiclass_nms_torchvision_parity():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    rng = np.random.default_rng(23)
    n, k = 300, 20
    xy = rng.uniform(0, 600, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(8, 200, (n, 2))], 1).astype(np.float32)
    scores = (rng.permutation(n * k).reshape(n, k) / (n * k)).astype(np.float32)
    assert _no_ties(scores.ravel())
    pairs = (
        torch.tensor(np.tile(boxes, (k, 1))),
        torch.tensor(scores.T.reshape(-1)),
        torch.tensor(np.repeat(np.arange(k), n)),
    )
    for thr in (0.3, 0.7):
        expected = tv.ops.batched_nms(*pairs, thr).numpy()
        keep, classes, count = multiclass_nms(boxes, scores, thr)
        check(keep, count, (expected % n).tolist(), n * k)
        check(classes, count, (expected // n).tolist(), n * k)


def test_borderline_thresholds_match_the_reference():
    # Thresholds equal to pairs' own float32 IoUs (and one float32 below): the
    # decisions at the last bit, inside the blocked N^2 program (64 boxes).
    rng = np.random.default_rng(19)
    boxes, scores = random_problem(rng, 64)
    ious = [float(ref_iou32(boxes[0], boxes[j])) for j in range(1, 64)]
    ious = [t for t in ious if 0.05 < t < 0.95][:8]
    assert len(ious) >= 4
    thresholds = np.array(
        [v for t in ious for v in (t, np.nextafter(np.float32(t), np.float32(0)))], np.float32
    )
    keep, count = jax.vmap(lambda t: nms(boxes, scores, t))(thresholds)
    for t, k, c in zip(thresholds, keep, count, strict=True):
        check(k, c, ref_nms(boxes, scores, float(t)), 64)
