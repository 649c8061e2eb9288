"""spp_jax.detection.bbox_regression: ridge solves against lstsq and SPP-net's code."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.detection.bbox_regression import (
    BoxRegressors,
    RidgeAccumulator,
    fit_box_regressors,
    match_proposals,
)
from spp_jax.detection.boxes import encode_boxes


def np_decode(p, d):
    p, d = np.asarray(p, np.float64), np.asarray(d, np.float64)
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    cx, cy = p[:, 0] + 0.5 * pw + d[:, 0] * pw, p[:, 1] + 0.5 * ph + d[:, 1] * ph
    w, h = np.exp(d[:, 2]) * pw, np.exp(d[:, 3]) * ph
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)


def random_boxes(rng, n):
    xy = rng.uniform(0, 200, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(30, 80, (n, 2))], 1).astype(np.float32)


def effective(reg, k):
    """The class's map from features to deltas, float64: (W (D, 4), b (4,))."""
    return np.asarray(reg.weights[:, k - 1], np.float64), np.asarray(reg.biases[k - 1], np.float64)


def linear_data(rng, n=400, d=6, k=2, noise=0.0, mean=0.0):
    """Features, proposals, their ground truths and classes with deltas linear in x."""
    a = rng.normal(size=(k, d, 4)) * 0.04
    b = rng.normal(size=(k, 4)) * 0.05
    x = (rng.normal(size=(n, d)) + mean).astype(np.float32)
    labels = rng.integers(1, k + 1, n)
    deltas = np.einsum("nd,ndj->nj", x, a[labels - 1]) + b[labels - 1]
    deltas += rng.normal(size=deltas.shape) * noise
    props = random_boxes(rng, n)
    gts = np_decode(props, deltas).astype(np.float32)
    return x, props, gts, labels, a, b


def test_exact_recovery_of_a_linear_map():
    rng = np.random.default_rng(0)
    x, props, gts, labels, a, b = linear_data(rng)
    reg = fit_box_regressors(x, props, gts, labels, 2, lam=1e-3, min_iou=0.0)
    assert reg.counts == (int((labels == 1).sum()), int((labels == 2).sum()))
    for k in (1, 2):
        w, bias = effective(reg, k)
        np.testing.assert_allclose(w, a[k - 1], atol=2e-4)
        np.testing.assert_allclose(bias, b[k - 1], atol=2e-4)
    # New boxes: the refined box is the linear map's box.
    x2 = rng.normal(size=(50, 6)).astype(np.float32)
    props2, labels2 = random_boxes(rng, 50), rng.integers(1, 3, 50)
    want = np_decode(props2, np.einsum("nd,ndj->nj", x2, a[labels2 - 1]) + b[labels2 - 1])
    want = np.clip(want, 0, 1000)
    got = np.asarray(reg.apply(x2, props2, labels2, (1000, 1000)))
    assert got.dtype == np.float32 and got.shape == (50, 4)
    np.testing.assert_allclose(got, want, atol=0.02)


def lstsq_reference(x, y, lam, regularize_bias, centre):
    """min ||[x, 1] B - y||^2 + lam ||B (minus the bias row unless regularised)||^2, float64.

    ``centre``: fit ``y - mean(y)`` and add the mean back (SPP-net's centring).
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, d = x.shape
    mu = y.mean(0) if centre else np.zeros(4)
    penalty = np.sqrt(lam) * np.eye(d + 1)
    if not regularize_bias:
        penalty = penalty[:d]
    a = np.concatenate([np.c_[x, np.ones(n)], penalty])
    rhs = np.concatenate([y - mu, np.zeros((len(penalty), 4))])
    beta = np.linalg.lstsq(a, rhs, rcond=None)[0]
    return beta[:d], beta[d] + mu


@pytest.mark.parametrize("regularize_bias", [False, True])
def test_agrees_with_lstsq_on_the_augmented_system(regularize_bias):
    rng = np.random.default_rng(1)
    x, props, gts, labels, _, _ = linear_data(rng, n=300, k=1, noise=0.05, mean=2.0)
    scale = 0.5
    reg = fit_box_regressors(
        x,
        props,
        gts,
        labels,
        1,
        lam=50.0,
        min_iou=0.0,
        feature_scale=scale,
        regularize_bias=regularize_bias,
    )
    y = np.asarray(encode_boxes(props, gts), np.float64)
    w_ref, b_ref = lstsq_reference(x * scale, y, 50.0, regularize_bias, centre=True)
    w, b = effective(reg, 1)
    tol = 2e-4 * max(np.abs(w_ref).max(), np.abs(b_ref).max())
    np.testing.assert_allclose(w, w_ref, atol=tol)
    np.testing.assert_allclose(b, b_ref, atol=tol)
    pred = np.asarray(reg.deltas(x, labels), np.float64)
    np.testing.assert_allclose(pred, x * scale @ w_ref + b_ref, atol=20 * tol)


def test_float64_when_x64_is_enabled():
    rng = np.random.default_rng(2)
    x, props, gts, labels, _, _ = linear_data(rng, n=200, d=6, k=1, noise=0.05, mean=3.0)
    with jax.enable_x64(True):
        acc = RidgeAccumulator(6, 1)
        assert acc.dtype == np.float64
        acc.add(x, props, gts, labels)
        reg = acc.solve(10.0)
    y = np.asarray(encode_boxes(props, gts), np.float64)
    w_ref, b_ref = lstsq_reference(x, y, 10.0, False, centre=True)
    w, b = effective(reg, 1)
    # Limited by the float32 storage of the result only.
    np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, b_ref, rtol=1e-5, atol=1e-6)


def spp_code_reference(x, y, lam):
    """A NumPy port of SPP-net's spp_train_bbox_regressor.m (one class), float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a = np.c_[x, np.ones(len(x))].T  # (D + 1, N): a bias feature
    mu = y.mean(0)
    yc = y - mu
    s = yc.T @ yc / len(y)
    d, v = np.linalg.eigh(s)
    t = v @ np.diag(1 / np.sqrt(d + 0.001)) @ v.T
    t_inv = v @ np.diag(np.sqrt(d + 0.001)) @ v.T
    r = np.linalg.cholesky(a @ a.T + lam * np.eye(len(a))).T  # chol: R'R
    beta = np.linalg.solve(r, np.linalg.solve(r.T, a @ (yc @ t)))
    return mu, t_inv, beta


def test_matches_spp_net_code():
    """The code's whitened regressor, un-whitened, makes our predictions."""
    rng = np.random.default_rng(3)
    x, props, gts, labels, _, _ = linear_data(rng, n=250, k=1, noise=0.1, mean=1.0)
    reg = fit_box_regressors(x, props, gts, labels, 1, lam=30.0, min_iou=0.0, regularize_bias=True)
    y = np.asarray(encode_boxes(props, gts), np.float64)
    mu, t_inv, beta = spp_code_reference(x, y, 30.0)
    w_ref, b_ref = beta[:-1] @ t_inv, beta[-1] @ t_inv + mu
    w, b = effective(reg, 1)
    tol = 2e-4 * max(np.abs(w_ref).max(), np.abs(b_ref).max())
    np.testing.assert_allclose(w, w_ref, atol=tol)
    np.testing.assert_allclose(b, b_ref, atol=tol)


def test_streaming_equals_batch_and_add_image():
    rng = np.random.default_rng(5)
    x, props, gts, labels, _, _ = linear_data(rng, n=333, d=6, k=3, noise=0.1, mean=1.0)
    batch = fit_box_regressors(x, props, gts, labels, 3, lam=20.0, min_iou=0.0, feature_scale=2.0)
    acc = RidgeAccumulator(6, 3, feature_scale=2.0)
    for lo, hi in ((0, 1), (1, 40), (40, 41), (41, 200), (200, 333)):
        acc.add(x[lo:hi], props[lo:hi], gts[lo:hi], labels[lo:hi])
    acc.add(x[:0], props[:0], gts[:0], labels[:0])
    streamed = acc.solve(20.0)
    assert streamed.counts == batch.counts and sum(streamed.counts) == 333
    for name in ("weights", "biases"):
        a, b = np.asarray(getattr(streamed, name)), np.asarray(getattr(batch, name))
        np.testing.assert_allclose(a, b, atol=2e-5 * max(1.0, np.abs(b).max()), err_msg=name)
    # Per image: proposals matched to each image's ground truths by IoU > 0.5.
    acc = RidgeAccumulator(6, 3)
    chosen = []
    for i in range(4):
        gt = random_boxes(rng, 3)
        gt_labels = np.array([1, 2, 3])
        props_i = np.concatenate([gt + rng.normal(0, 4, gt.shape), random_boxes(rng, 20)])
        props_i = np.concatenate(
            [
                np.minimum(props_i[:, :2], props_i[:, 2:]),
                np.maximum(props_i[:, :2], props_i[:, 2:]),
            ],
            1,
        )
        feats = rng.normal(size=(len(props_i), 6)).astype(np.float32)
        n = acc.add_image(feats, props_i, gt, gt_labels) if i != 2 else 0
        if i == 2:
            assert acc.add_image(feats, props_i, gt[:0], gt_labels[:0]) == 0  # no objects
            continue
        idx, matched, lab, iou = match_proposals(props_i, gt, gt_labels)
        assert n == len(idx) and (iou > 0.5).all()
        chosen.append((feats[idx], props_i[idx], matched, lab))
    per_image = acc.solve(5.0)
    cat = [np.concatenate(c) for c in zip(*chosen, strict=True)]
    direct = fit_box_regressors(*cat, 3, lam=5.0)
    np.testing.assert_allclose(per_image.weights, direct.weights, atol=1e-5)
    np.testing.assert_allclose(per_image.biases, direct.biases, atol=1e-5)


def test_match_proposals_rules():
    gt = np.array([[0, 0, 10, 10], [20, 0, 30, 10.0]])
    props = np.array(
        [
            [0, 0, 10, 10],  # 1.0 with gt 0
            [0, 0, 10, 5],  # exactly 0.5: not > 0.5
            [0, 0, 10, 6],  # 0.6
            [21, 0, 30, 10],  # 0.9 with gt 1
            [50, 50, 60, 60],  # nothing
        ],
        np.float32,
    )
    idx, matched, labels, ious = match_proposals(props, gt, np.array([7, 2]))
    assert idx.tolist() == [0, 2, 3]
    assert labels.tolist() == [7, 7, 2]
    np.testing.assert_array_equal(matched, gt[[0, 0, 1]])
    np.testing.assert_allclose(ious, [1.0, 0.6, 0.9], rtol=1e-6)
    idx, *_ = match_proposals(props, gt, np.array([7, 2]), min_iou=0.6)
    assert idx.tolist() == [0, 3]  # 0.6 is not > 0.6 (R-CNN's threshold)
    # Ties: the first ground truth.
    idx, matched, labels, _ = match_proposals(props[:1], np.stack([gt[0], gt[0]]), [4, 5])
    assert labels.tolist() == [4]
    assert match_proposals(props, gt[:0], np.zeros(0, int))[0].shape == (0,)
    with pytest.raises(ValueError, match=r"gt_labels must have shape \(2,\)"):
        match_proposals(props, gt, np.array([1]))
    with pytest.raises(ValueError, match=r"min_iou must be in \[0, 1\)"):
        match_proposals(props, gt, np.array([1, 2]), min_iou=1.0)


def test_min_iou_filters_rows_in_fit():
    rng = np.random.default_rng(6)
    x, props, gts, labels, _, _ = linear_data(rng, n=60, k=1)
    ious = np.r_[np.full(30, 0.7), np.full(30, 0.5)]
    reg = fit_box_regressors(x, props, gts, labels, 1, lam=1.0, ious=ious)
    assert reg.counts == (30,)
    reg = fit_box_regressors(x, props, gts, labels, 1, lam=1.0, ious=ious, min_iou=0.4)
    assert reg.counts == (60,)
    with pytest.raises(ValueError, match=r"ious must have shape \(60,\)"):
        fit_box_regressors(x, props, gts, labels, 1, ious=ious[:5])


def test_apply_under_jit_and_clipping():
    rng = np.random.default_rng(7)
    x, props, gts, labels, _, _ = linear_data(rng, n=200, k=2, noise=0.05)
    reg = fit_box_regressors(x, props, gts, labels, 2, lam=1.0, min_iou=0.0)
    eager = np.asarray(reg.apply(x[:20], props[:20], labels[:20], (240, 260)))
    jitted = jax.jit(lambda r, f, b, lab: r.apply(f, b, lab, (240, 260)))
    got = np.asarray(jitted(reg, x[:20], props[:20], jnp.asarray(labels[:20], jnp.int32)))
    np.testing.assert_allclose(got, eager, atol=1e-4)
    closed = jax.jit(lambda f, b, lab, size: reg.apply(f, b, lab, size))
    got = closed(x[:20], props[:20], labels[:20], jnp.array([240.0, 260.0]))
    np.testing.assert_allclose(np.asarray(got), eager, atol=1e-4)
    assert (eager[:, 0::2] >= 0).all() and (eager[:, 0::2] <= 260).all()
    assert (eager[:, 1::2] >= 0).all() and (eager[:, 1::2] <= 240).all()
    # A regressor that moves every box 100 px right and doubles it: clipped at W.
    ident = BoxRegressors.identity(6, 2)
    moved = BoxRegressors(ident.weights, np.tile(np.float32([1.0, 0.0, np.log(2.0), 0.0]), (2, 1)))
    box = np.float32([[100, 10, 200, 60]])
    out = np.asarray(moved.apply(x[:1], box, [2], (100, 300)))
    np.testing.assert_allclose(out, [[150, 10, 300, 60]], atol=1e-4)  # 350 clipped to 300
    assert np.asarray(moved.apply(x[:0], box[:0], np.zeros(0, int), (10, 10))).shape == (0, 4)


def test_class_without_boxes_is_identity_and_logged(caplog):
    rng = np.random.default_rng(8)
    x, props, gts, _, _, _ = linear_data(rng, n=50, k=1, noise=0.05)
    labels = np.ones(50, np.int64)
    with caplog.at_level(logging.INFO, logger="spp_jax.detection.bbox_regression"):
        reg = fit_box_regressors(x, props, gts, labels, 3, lam=1.0, min_iou=0.0)
    assert "class(es) [2, 3]" in caplog.text
    assert reg.counts == (50, 0, 0)
    out = np.asarray(reg.apply(x[:5], props[:5], np.full(5, 3), (1000, 1000)))
    np.testing.assert_allclose(out, props[:5], atol=1e-4)
    # An accumulator for some classes only skips the others.
    acc = RidgeAccumulator(6, 3, classes=[2])
    acc.add(x, props, gts, np.r_[np.ones(25, int), np.full(25, 2)])
    assert acc.counts.tolist() == [0, 25, 0]


def test_save_load(tmp_path):
    rng = np.random.default_rng(9)
    x, props, gts, labels, _, _ = linear_data(rng, n=80, k=2, noise=0.05)
    reg = fit_box_regressors(x, props, gts, labels, 2, lam=3.0, min_iou=0.0, feature_scale=1.5)
    path = tmp_path / "bbox.npz"
    reg.save(path)
    reg.save(path)
    assert os.listdir(tmp_path) == ["bbox.npz"]
    back = BoxRegressors.load(path)
    for name in ("weights", "biases"):
        np.testing.assert_array_equal(getattr(back, name), np.asarray(getattr(reg, name)))
    assert back.scale == 1.5 and back.counts == reg.counts
    np.testing.assert_array_equal(
        np.asarray(back.apply(x, props, labels, (500, 500))),
        np.asarray(reg.apply(x, props, labels, (500, 500))),
    )
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="is not a BoxRegressors file"):
        BoxRegressors.load(tmp_path / "other.npz")


def test_load_whitened_file(tmp_path):
    """A file with the targets' whitening (format /1) predicts ``(x W + b) T^-1 + mu``."""
    rng = np.random.default_rng(11)
    d, k = 5, 2
    w, b, mu = rng.normal(size=(d, k, 4)), rng.normal(size=(k, 4)), rng.normal(size=(k, 4))
    a = rng.normal(size=(k, 4, 4))
    t_inv = a @ a.transpose(0, 2, 1) + np.eye(4)
    arrays = {"weights": w, "biases": b, "target_mean": mu, "target_unwhitening": t_inv}
    arrays = {name: v.astype(np.float32) for name, v in arrays.items()}
    path = tmp_path / "bbox.npz"
    np.savez(
        path,
        format=np.array("spp_jax.detection.bbox_regression/1"),
        target_whitening=np.linalg.inv(arrays["target_unwhitening"]),
        scale=np.array(1.5),
        counts=np.array([3, 4]),
        **arrays,
    )
    reg = BoxRegressors.load(path)
    assert reg.scale == 1.5 and reg.counts == (3, 4)
    x, labels = rng.normal(size=(20, d)).astype(np.float32), rng.integers(1, k + 1, 20)
    f = {name: v.astype(np.float64) for name, v in arrays.items()}
    z = np.einsum("nd,ndj->nj", x * 1.5, f["weights"].transpose(1, 0, 2)[labels - 1])
    z += f["biases"][labels - 1]
    want = np.einsum("ni,nij->nj", z, f["target_unwhitening"][labels - 1])
    want += f["target_mean"][labels - 1]
    np.testing.assert_allclose(np.asarray(reg.deltas(x, labels)), want, rtol=1e-5, atol=1e-4)


def test_bad_input_is_named():
    rng = np.random.default_rng(10)
    x, props, gts, labels, _, _ = linear_data(rng, n=20, k=2)
    acc = RidgeAccumulator(6, 2)
    with pytest.raises(ValueError, match=r"labels must be classes in 1..2 .* entry 4 is 0"):
        acc.add(x, props, gts, np.where(np.arange(20) == 4, 0, labels))
    with pytest.raises(ValueError, match=r"labels must be classes in 1..2 .* is 3"):
        acc.add(x, props, gts, np.full(20, 3))
    with pytest.raises(TypeError, match="labels must be ints"):
        acc.add(x, props, gts, labels.astype(float))
    with pytest.raises(ValueError, match=r"features must have shape \(N, 6\)"):
        acc.add(x[:, :5], props, gts, labels)
    with pytest.raises(ValueError, match=r"gt_boxes must have shape \(20, 4\)"):
        acc.add(x, props, gts[:5], labels)
    with pytest.raises(ValueError, match="positive width and height"):
        acc.add(x[:1], np.float32([[5, 5, 5, 9]]), gts[:1], labels[:1])
    bad = x.copy()
    bad[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"features must be finite.*row 2"):
        acc.add(bad, props, gts, labels)
    with pytest.raises(ValueError, match="lam must be a finite number >= 0"):
        acc.solve(-1.0)
    with pytest.raises(ValueError, match="feature_scale must be a finite number > 0"):
        RidgeAccumulator(6, 2, feature_scale=0.0)
    with pytest.raises(ValueError, match=r"classes must be classes in 1..2"):
        RidgeAccumulator(6, 2, classes=[3])
    acc.add(x[:2], props[:2], gts[:2], np.array([1, 1]))  # 2 boxes, 6 features + bias
    with pytest.raises(ValueError, match=r"class 1 .* is singular: use lam > 0"):
        acc.solve(0.0)
    reg = acc.solve(1.0)
    with pytest.raises(ValueError, match=r"features must have shape \(R, 6\)"):
        reg.apply(x[:, :5], props, labels, (10, 10))
    with pytest.raises(ValueError, match=r"boxes must have shape \(R, 4\) with R = 20"):
        reg.apply(x, props[:3], labels, (10, 10))
    with pytest.raises(ValueError, match=r"labels must be classes in 1..2 .* is 0"):
        reg.apply(x, props, np.zeros(20, int), (10, 10))
    with pytest.raises(ValueError, match="BoxRegressors needs weights"):
        BoxRegressors(np.zeros((3, 2, 4)), np.zeros((1, 4)))
