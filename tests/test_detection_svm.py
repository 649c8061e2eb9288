"""spp_jax.detection.svm: liblinear against an independent solver, the mining rules."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from spp_jax.detection.svm import (
    HardNegativeMiner,
    SVMs,
    feature_scale,
    fit_linear_svm,
    svm_objective,
    train_svms,
)

# ---------------------------------------------------------------------------
# The objective and liblinear


def dual_optimum(X, y, C, pos_weight, bias_feature):
    """The SVM's optimum from its dual, solved by L-BFGS-B, with a duality-gap certificate.

    With ``x~ = [x, B]`` and box constraints ``0 <= a_i <= C_i``, the dual is
    ``max sum(a) - 0.5 ||sum_i a_i y_i x~_i||^2``; its maximiser gives
    ``w~ = sum_i a_i y_i x~_i``. Returns ``(w, b, primal, dual)``.
    """
    X = np.asarray(X, np.float64)
    Xt = np.concatenate([X, np.full((len(X), 1), bias_feature)], 1)
    Z = Xt * y[:, None]
    upper = C * np.where(y > 0, pos_weight, 1.0)

    def f(a):
        v = Z.T @ a
        return 0.5 * v @ v - a.sum(), Z @ v - 1.0

    res = scipy.optimize.minimize(
        f,
        np.zeros(len(X)),
        jac=True,
        method="L-BFGS-B",
        bounds=list(zip(np.zeros(len(X)), upper, strict=True)),
        options={"ftol": 1e-15, "gtol": 1e-13, "maxiter": 50_000, "maxfun": 100_000},
    )
    wt = Z.T @ res.x
    w, b = wt[:-1], wt[-1] * bias_feature
    primal = svm_objective(w, b, X, y, C, pos_weight, bias_feature)
    return w, b, primal, -res.fun


def make_data(rng, kind, n_pos=30, n_neg=60, d=6):
    """Features of mean norm about 20 (the scaled fc7 range)."""
    if kind == "separable":
        direction = rng.normal(size=d)
        direction /= np.linalg.norm(direction)
        pos = rng.normal(size=(n_pos, d)) * 3 + 12 * direction
        neg = rng.normal(size=(n_neg, d)) * 3 - 12 * direction + 5
    else:  # both classes from one distribution: no separating plane
        pos = rng.normal(size=(n_pos, d)) * 8 + 3
        neg = rng.normal(size=(n_neg, d)) * 8 + 3
    return pos.astype(np.float32), neg.astype(np.float32)


@pytest.mark.parametrize("kind", ["separable", "overlapping"])
@pytest.mark.parametrize("C", [0.001, 0.1])
def test_liblinear_reaches_the_reference_optimum(kind, C):
    rng = np.random.default_rng(1 if kind == "separable" else 2)
    pos, neg = make_data(rng, kind)
    X = np.concatenate([pos, neg]).astype(np.float64)
    y = np.r_[np.ones(len(pos)), -np.ones(len(neg))]
    w_ref, b_ref, primal, dual = dual_optimum(X, y, C, 2.0, 10.0)
    # The reference is certified: its primal and dual values meet (the optimum
    # lies between them).
    assert 0 <= primal - dual <= 2e-5 * dual, (primal, dual)
    w, b = fit_linear_svm(pos, neg, C=C, pos_weight=2.0, bias_feature=10.0)
    assert w.shape == (6,) and isinstance(b, float)
    got = svm_objective(w, b, X, y, C, 2.0, 10.0)
    # Weak duality bounds liblinear's objective from below: got - optimum <= got - dual.
    assert -1e-12 * dual <= got - dual <= 1e-3 * dual, (got, dual)
    assert abs(got - primal) <= 1e-3 * primal
    # The optimum is unique (strongly convex): the weights agree too.
    scale = np.linalg.norm(np.r_[w_ref, b_ref / 10])
    np.testing.assert_allclose(np.r_[w, b / 10], np.r_[w_ref, b_ref / 10], atol=0.05 * scale)
    if kind == "separable":
        assert (X[: len(pos)] @ w + b > 0).mean() > 0.9
        assert (X[len(pos) :] @ w + b < 0).mean() > 0.9


def test_objective_by_hand_and_the_bias_feature():
    X = np.array([[1.0, 2.0], [0.0, -1.0], [2.0, 0.0]])
    y = np.array([1, -1, -1])
    w, b, C, B = np.array([0.5, -0.25]), 0.3, 0.2, 4.0
    margins = y * (X @ w + b)  # 0.3, -0.05, -1.3
    hinge = np.maximum(0, 1 - margins)
    want = 0.5 * (w @ w + (b / B) ** 2) + C * (3.0 * hinge[0] + hinge[1] + hinge[2])
    assert svm_objective(w, b, X, y, C, 3.0, B) == pytest.approx(want, rel=1e-15)
    # liblinear's form: an appended feature B, the bias as its weight b / B.
    Xt = np.c_[X, np.full(3, B)]
    wt = np.r_[w, b / B]
    alt = 0.5 * wt @ wt + C * np.sum(np.where(y > 0, 3.0, 1.0) * np.maximum(0, 1 - y * (Xt @ wt)))
    assert svm_objective(w, b, X, y, C, 3.0, B) == pytest.approx(alt, rel=1e-14)
    with pytest.raises(ValueError, match=r"\+1 and -1"):
        svm_objective(w, b, X, np.array([1, 0, -1]), C, 1.0, B)
    with pytest.raises(ValueError, match="need w"):
        svm_objective(w, b, X[:, :1], y, C, 1.0, B)


def test_pos_weight_doubles_the_positive_hinge_losses():
    rng = np.random.default_rng(3)
    pos, neg = make_data(rng, "overlapping", n_pos=20, n_neg=40)
    X = np.concatenate([pos, neg]).astype(np.float64)
    y = np.r_[np.ones(20), -np.ones(40)]
    C = 0.01
    w, b = rng.normal(size=6) * 0.05, 0.2
    pos_hinge = np.maximum(0, 1 - (X[:20] @ w + b)).sum()
    assert pos_hinge > 0
    diff = svm_objective(w, b, X, y, C, 2.0, 10.0) - svm_objective(w, b, X, y, C, 1.0, 10.0)
    assert diff == pytest.approx(C * pos_hinge, rel=1e-12)
    # Weight 2 is the same problem as every positive twice with weight 1.
    w2, b2 = fit_linear_svm(pos, neg, C=C, pos_weight=2.0)
    wd, bd = fit_linear_svm(np.concatenate([pos, pos]), neg, C=C, pos_weight=1.0)
    w1, b1 = fit_linear_svm(pos, neg, C=C, pos_weight=1.0)
    obj = [svm_objective(v, c, X, y, C, 2.0, 10.0) for v, c in ((w2, b2), (wd, bd), (w1, b1))]
    assert abs(obj[0] - obj[1]) <= 1e-3 * obj[0]
    np.testing.assert_allclose(np.r_[w2, b2 / 10], np.r_[wd, bd / 10], atol=2e-3)
    assert obj[2] > obj[0] * (1 + 1e-2)  # weight 1 solves another problem
    # More weight on the positives raises their scores.
    assert (X[:20] @ w2 + b2).mean() > (X[:20] @ w1 + b1).mean()


def test_fit_linear_svm_is_deterministic_and_checks_input():
    rng = np.random.default_rng(4)
    pos, neg = make_data(rng, "overlapping")
    a = fit_linear_svm(pos, neg)
    b = fit_linear_svm(pos, neg)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        fit_linear_svm(pos, neg[:0])
    with pytest.raises(ValueError, match=r"X_neg must have shape \(N, 6\)"):
        fit_linear_svm(pos, neg[:, :5])
    with pytest.raises(ValueError, match="C must be a finite number > 0"):
        fit_linear_svm(pos, neg, C=0.0)
    bad = neg.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"X_neg must be finite.*row 3"):
        fit_linear_svm(pos, bad)


def test_fit_linear_svm_logs_when_it_stops_at_max_iter(caplog):
    rng = np.random.default_rng(5)
    pos, neg = make_data(rng, "overlapping")
    with caplog.at_level(logging.WARNING, logger="spp_jax.detection.svm"):
        fit_linear_svm(pos, neg, C=10.0, max_iter=1, tol=1e-12)
    assert "max_iter=1" in caplog.text


def test_feature_scale():
    x = np.array([[3.0, 4.0], [0.0, 10.0]], np.float32)
    assert feature_scale(x) == pytest.approx(20 / 7.5)
    assert feature_scale(x, target_norm=7.5) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    big = rng.normal(size=(1000, 8))
    s1 = feature_scale(big, sample_size=100, seed=1)
    assert s1 == feature_scale(big, sample_size=100, seed=1)
    assert s1 == pytest.approx(feature_scale(big), rel=0.1)
    with pytest.raises(ValueError, match="mean L2 norm > 0"):
        feature_scale(np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"shape \(N, D\) with N >= 1"):
        feature_scale(np.zeros((0, 2)))
    with pytest.raises(ValueError, match="target_norm"):
        feature_scale(x, target_norm=-1)


# ---------------------------------------------------------------------------
# Hard-negative mining, with a scripted solver


class Scripted:
    """A solver returning the given (w, b) in turn; records each call's X_neg."""

    def __init__(self, models):
        self.models = list(models)
        self.calls = []

    def __call__(self, X_pos, X_neg):
        self.calls.append((X_pos.copy(), X_neg.copy()))
        return self.models.pop(0)


def rows(x0, d=2):
    """Features whose first column is x0 (the score under w = e_0, b = 0)."""
    out = np.zeros((len(x0), d), np.float32)
    out[:, 0] = np.asarray(x0, np.float32)
    out[:, 1] = 0.5
    return out


E0 = np.array([1.0, 0.0])
POS = (rows([5.0]), np.array([1]))
HARD = float(np.float32(-1.0001))
EVICT = float(np.float32(-1.2))


def test_mining_rules_on_a_hand_made_stream():
    solver = Scripted([(E0, 0.0), (E0, -0.15), (E0, 0.0)])
    miner = HardNegativeMiner(*POS, 1, retrain_every=2, feature_scale=1.0, solver=solver)
    # Image a: untrained, so every negative (IoU < 0.3) joins; IoU 0.3 and 0.5 do not.
    miner.add_image("a", rows([-3.0, -1.1, 0.5, 9.0, 1.0]), [[0.0], [0.1], [0.29], [0.5], [0.3]])
    assert len(solver.calls) == 1  # the first negatives train the class
    np.testing.assert_array_equal(solver.calls[0][1][:, 0], np.float32([-3.0, -1.1, 0.5]))
    np.testing.assert_array_equal(solver.calls[0][0], POS[0])
    assert miner.cache_keys(1) == [("a", 1), ("a", 2)]  # -3 < -1.2: evicted
    # Image b: only scores > -1.0001 (float32) join: -1.00005 and 2; 2 added, not > 2.
    miner.add_image("b", rows([HARD, -1.00005, EVICT, 2.0, -5.0]), np.zeros((5, 1)))
    assert len(solver.calls) == 1
    assert miner.cache_keys(1) == [("a", 1), ("a", 2), ("b", 1), ("b", 3)]
    # Image c: a third new negative since the training: retrain, then scores under
    # x0 - 0.15: -1.25 (a1) is evicted, -1.15005 (b1) stays.
    miner.add_image("c", rows([0.0]), np.zeros((1, 1)))
    assert len(solver.calls) == 2
    np.testing.assert_array_equal(
        solver.calls[1][1][:, 0], np.float32([-1.1, 0.5, -1.00005, 2.0, 0.0])
    )
    assert miner.cache_keys(1) == [("a", 2), ("b", 1), ("b", 3), ("c", 0)]
    # Image d: scored by the new model (b = -0.15): -0.9 joins, -0.86 - 0.15 < -1.0001 not.
    miner.add_image("d", rows([-0.9 + 0.15, -0.86]), np.zeros((2, 1)))
    assert miner.cache_keys(1)[-1] == ("d", 0) and len(miner.cache_keys(1)) == 5
    # The end: the last image did not retrain, so finish() does, on all 5.
    svms = miner.finish()
    assert len(solver.calls) == 3 and len(solver.calls[2][1]) == 5
    np.testing.assert_array_equal(svms.weights[:, 0], np.float32(E0))
    assert svms.biases[0] == 0.0 and svms.scale == 1.0
    (s,) = svms.stats
    assert (s.label, s.positives, s.mined, s.evicted, s.retrains) == (1, 1, 7, 2, 3)
    assert s.negatives == 5  # nothing below -1.2 under the last model
    # Its objective is svm_objective's, of the final model on its last training data.
    X = np.concatenate([POS[0], solver.calls[2][1]])
    assert s.objective == svm_objective(E0, 0.0, X, np.r_[1, -np.ones(5)], 0.001, 2.0, 10.0)
    assert miner.finish() is svms
    with pytest.raises(RuntimeError, match="after finish"):
        miner.add_image("e", rows([0.0]), np.zeros((1, 1)))


def test_eviction_and_hard_thresholds_are_strict():
    solver = Scripted([(E0, 0.0), (E0, 0.0)])
    miner = HardNegativeMiner(
        *POS, 1, feature_scale=1.0, solver=solver, hard_thresh=-1.0, evict_thresh=-1.25
    )
    miner.add_image(0, rows([-1.25, -1.2500001, -1.0]), np.zeros((3, 1)))
    assert miner.cache_keys(1) == [(0, 0), (0, 2)]  # exactly -1.25 is kept
    miner.add_image(1, rows([-1.0, -0.9999999]), np.zeros((2, 1)))
    assert miner.cache_keys(1)[2:] == [(1, 1)]  # exactly -1.0 is not hard


def test_no_final_retrain_when_the_last_image_retrained():
    solver = Scripted([(E0, 0.0), (E0, 0.0)])
    miner = HardNegativeMiner(*POS, 1, retrain_every=1, feature_scale=1.0, solver=solver)
    miner.add_image("a", rows([0.0]), np.zeros((1, 1)))
    miner.add_image("b", rows([0.1, 0.2]), np.zeros((2, 1)))  # 2 > 1: retrain
    svms = miner.finish()
    assert len(solver.calls) == 2 and svms.stats[0].retrains == 2


def test_repeated_image_ids_are_deduplicated():
    solver = Scripted([(E0, 0.0)] * 3)
    miner = HardNegativeMiner(*POS, 1, feature_scale=1.0, solver=solver)
    feats = rows([0.0, 0.5, -3.0])
    miner.add_image("a", feats, np.zeros((3, 1)))
    assert miner.cache_keys(1) == [("a", 0), ("a", 1)]
    miner.add_image("a", feats, np.zeros((3, 1)))  # hard again, but cached: not added
    assert miner.cache_keys(1) == [("a", 0), ("a", 1)]
    # Another image under the same id is a caller's bug; a different row count is caught.
    with pytest.raises(ValueError, match="came before with 3 rows, now 2"):
        miner.add_image("a", feats[:2], np.zeros((2, 1)))
    svms = miner.finish()
    assert (svms.stats[0].mined, svms.stats[0].evicted, svms.stats[0].negatives) == (3, 1, 2)


def test_images_without_negatives_and_classes_first_seen_late():
    # Class 1 has negatives in image a; class 2 only in image c.
    solver = Scripted([(E0, 0.0)] * 4)
    pos = (rows([5.0, 6.0]), np.array([1, 2]))
    miner = HardNegativeMiner(*pos, 2, feature_scale=1.0, solver=solver, progress=False)
    miner.add_image("a", rows([0.0]), [[0.0, 0.9]])
    assert len(solver.calls) == 1  # class 1 only
    miner.add_image("empty", np.zeros((0, 2), np.float32), np.zeros((0, 2)))
    miner.add_image("covered", rows([0.0]), [[0.7, 0.3]])  # no negatives at all
    assert len(solver.calls) == 1
    miner.add_image("c", rows([-2.0, 0.5]), [[0.5, 0.0], [0.0, 0.1]])
    # Class 2 sees negatives for the first time: all of them, and it trains
    # (its positives are its own); class 1 adds only the hard row 1.
    assert len(solver.calls) == 2
    np.testing.assert_array_equal(solver.calls[1][0], pos[0][1:])
    np.testing.assert_array_equal(solver.calls[1][1][:, 0], np.float32([-2.0, 0.5]))
    assert miner.cache_keys(1) == [("a", 0), ("c", 1)]
    svms = miner.finish()  # class 1 retrains; class 2 trained on the last image
    assert len(solver.calls) == 3
    assert [s.retrains for s in svms.stats] == [2, 1]
    assert miner.num_images == 4


def test_classes_without_positives_or_negatives_are_errors():
    with pytest.raises(ValueError, match=r"class\(es\) \[2, 3\] have no positives"):
        HardNegativeMiner(rows([1.0]), np.array([1]), 3)
    miner = HardNegativeMiner(
        rows([1.0, 2.0]), np.array([1, 2]), 2, feature_scale=1.0, solver=Scripted([(E0, 0)])
    )
    miner.add_image("a", rows([0.0]), [[0.0, 0.6]])
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] never had a negative"):
        miner.finish()
    with pytest.raises(ValueError, match="no images were added"):
        HardNegativeMiner(*POS, 1).finish()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"positive_labels must be classes in 1..2 .*entry 1 is 0"):
        HardNegativeMiner(rows([1.0, 2.0]), np.array([1, 0]), 2)
    with pytest.raises(ValueError, match=r"positive_labels must be classes in 1..2 .*entry 1 is 3"):
        HardNegativeMiner(rows([1.0, 2.0]), np.array([1, 3]), 2)
    with pytest.raises(TypeError, match="positive_labels must be ints"):
        HardNegativeMiner(rows([1.0]), np.array([1.0]), 1)
    with pytest.raises(ValueError, match=r"positive_labels must have shape \(2,\)"):
        HardNegativeMiner(rows([1.0, 2.0]), np.array([1]), 1)
    with pytest.raises(ValueError, match="retrain_every must be an int >= 0"):
        HardNegativeMiner(*POS, 1, retrain_every=-1)
    with pytest.raises(ValueError, match=r"neg_iou must be in \(0, 1\]"):
        HardNegativeMiner(*POS, 1, neg_iou=1.5)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        HardNegativeMiner(*POS, 0)
    miner = HardNegativeMiner(*POS, 1, feature_scale=1.0, solver=Scripted([(E0, 0.0)]))
    with pytest.raises(ValueError, match=r"features of image 'a' must have shape \(N, 2\)"):
        miner.add_image("a", np.zeros((3, 5), np.float32), np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"overlaps of image 'a' must have shape .* \(3, 1\)"):
        miner.add_image("a", rows([0.0, 0.0, 0.0]), np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"IoUs in \[0, 1\]; overlaps\[1, 0\] is 1.5"):
        miner.add_image("a", rows([0.0, 0.0]), [[0.0], [1.5]])
    with pytest.raises(ValueError, match="must be finite"):
        miner.add_image("a", rows([np.nan]), [[0.0]])
    with pytest.raises(TypeError, match="image_id must be a str or an int"):
        miner.add_image(1.5, rows([0.0]), [[0.0]])
    with pytest.raises(ValueError, match=r"label must be in 1..1, got 2"):
        miner.cache_keys(2)
    with pytest.raises(TypeError, match="triples"):
        train_svms(POS, [("a", rows([0.0]))], 1)


# ---------------------------------------------------------------------------
# End to end with liblinear; the SVMs object


def synthetic_stream(rng, num_images=6, r=40, d=8, k=2):
    centres = 6.0 * np.eye(k, d) + 2.0  # background rows: around 0
    pos_feats, pos_labels, images = [], [], []
    for i in range(num_images):
        labels = rng.integers(0, k + 1, r)  # 0: background
        feats = rng.normal(size=(r, d)) + np.where(labels[:, None] > 0, centres[labels - 1], 0)
        ov = np.where(labels[:, None] == np.arange(1, k + 1)[None, :], 0.7, 0.05)
        images.append((f"im{i}", feats.astype(np.float32), ov.astype(np.float32)))
        for c in range(1, k + 1):
            g = rng.normal(size=(2, d)) + centres[c - 1]
            pos_feats.append(g.astype(np.float32))
            pos_labels += [c, c]
    return (np.concatenate(pos_feats), np.array(pos_labels)), images


def test_train_svms_end_to_end(caplog):
    rng = np.random.default_rng(7)
    positives, images = synthetic_stream(rng)
    with caplog.at_level(logging.INFO, logger="spp_jax.detection.svm"):
        svms = train_svms(positives, iter(images), 2, retrain_every=20)
    assert "SVM class 2" in caplog.text and "trainings" in caplog.text
    assert svms.weights.shape == (8, 2) and svms.weights.dtype == np.float32
    # The default scale: 20 / mean norm of the positives and the first image.
    norms = np.linalg.norm(np.concatenate([positives[0], images[0][1]]), axis=1)
    assert svms.scale == pytest.approx(20 / norms.mean(), rel=1e-6)
    # Each class ranks its positives above its negatives (pairwise, AUC-like).
    for k in (1, 2):
        pos_scores = np.asarray(svms.scores(positives[0][positives[1] == k]))[:, k - 1]
        neg_scores = np.concatenate(
            [np.asarray(svms.scores(f[ov[:, k - 1] < 0.3]))[:, k - 1] for _, f, ov in images]
        )
        assert (pos_scores[:, None] > neg_scores[None, :]).mean() > 0.95
    for s in svms.stats:
        assert s.retrains >= 2
        assert s.mined == s.negatives + s.evicted
        assert np.isfinite(s.objective) and s.objective > 0
    again = train_svms(positives, images, 2, retrain_every=20, progress=False)
    np.testing.assert_array_equal(again.weights, svms.weights)


def test_final_model_is_liblinear_on_the_final_cache():
    rng = np.random.default_rng(8)
    positives, images = synthetic_stream(rng, num_images=4, k=1)
    seen = []

    def solver(X_pos, X_neg):
        seen.append((X_pos, X_neg))
        return fit_linear_svm(X_pos, X_neg)

    svms = train_svms(positives, images, 1, solver=solver, progress=False)
    direct = train_svms(positives, images, 1, progress=False)
    np.testing.assert_array_equal(svms.weights, direct.weights)
    w, b = fit_linear_svm(*seen[-1])
    np.testing.assert_array_equal(svms.weights[:, 0], np.float32(w))
    assert svms.biases[0] == np.float32(b)


def test_svms_scores_jit_save_load(tmp_path):
    rng = np.random.default_rng(9)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    svms = SVMs(w, b, 0.5)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    want = (x * np.float32(0.5)) @ w + b
    np.testing.assert_allclose(np.asarray(svms.scores(x)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(svms.scores)(x)), want, rtol=1e-5, atol=1e-5)
    as_tree = jax.jit(lambda m, f: m.scores(f))(svms, jnp.asarray(x, jnp.bfloat16))
    assert as_tree.dtype == jnp.float32 and as_tree.shape == (7, 3)
    with pytest.raises(ValueError, match=r"features must have shape \(R, 5\)"):
        svms.scores(x[:, :4])
    # Save / load, with stats, atomically.
    positives, images = synthetic_stream(np.random.default_rng(10), num_images=3)
    trained = train_svms(positives, images, 2, progress=False)
    path = tmp_path / "svms.npz"
    trained.save(path)
    trained.save(path)  # overwrite
    assert sorted(os.listdir(tmp_path)) == ["svms.npz"]
    loaded = SVMs.load(path)
    np.testing.assert_array_equal(loaded.weights, trained.weights)
    np.testing.assert_array_equal(loaded.biases, trained.biases)
    assert loaded.scale == trained.scale and loaded.stats == trained.stats
    np.savez(tmp_path / "other.npz", weights=w)
    with pytest.raises(ValueError, match="is not an SVMs file"):
        SVMs.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match=r"weights must be \(D, K\) and biases \(K,\)"):
        SVMs(w, b[:2], 1.0)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        SVMs(w, b, 0.0)
