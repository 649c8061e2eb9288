"""spp_jax.detection.boxes: IoU, clipping and box coding against NumPy and torchvision."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.detection.boxes import box_iou, clip_boxes, decode_boxes, encode_boxes


def ref_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU in float64, one pair at a time (0 for an empty union)."""
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(np.asarray(a, np.float64)):
        for j, q in enumerate(np.asarray(b, np.float64)):
            w = max(0.0, min(p[2], q[2]) - max(p[0], q[0]))
            h = max(0.0, min(p[3], q[3]) - max(p[1], q[1]))
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - w * h
            out[i, j] = w * h / union if union > 0 else 0.0
    return out


def random_boxes(rng, n, size=100.0):
    xy = rng.uniform(-10, size, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(0, size / 2, (n, 2))], 1).astype(np.float32)


def ref_encode(p, g, w):
    pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
    gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    px, py = p[:, 0] + 0.5 * pw, p[:, 1] + 0.5 * ph
    gx, gy = g[:, 0] + 0.5 * gw, g[:, 1] + 0.5 * gh
    return np.stack(
        [
            w[0] * (gx - px) / pw,
            w[1] * (gy - py) / ph,
            w[2] * np.log(gw / pw),
            w[3] * np.log(gh / ph),
        ],
        1,
    )


def test_box_iou_matches_reference_and_hand_values():
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 7), random_boxes(rng, 5)
    b[0] = a[0]  # identical: 1
    b[1] = [200, 200, 210, 210]  # disjoint: 0
    a[2] = [5, 5, 5, 9]  # empty box
    got = np.asarray(box_iou(a, b))
    assert got.shape == (7, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_iou(a, b), rtol=1e-6, atol=1e-7)
    assert got[0, 0] == 1.0 and (got[:, 1] == 0).all()
    # Touching boxes share an edge, not area; two empty boxes have IoU 0 (not NaN).
    touch = box_iou(np.array([[0, 0, 1, 1.0]]), np.array([[1, 0, 2, 1.0], [0.5, 0, 1.5, 1]]))
    np.testing.assert_allclose(touch, [[0.0, 1 / 3]], rtol=1e-7)
    empty = np.array([[3, 3, 3, 3.0]])
    assert float(box_iou(empty, empty)[0, 0]) == 0.0
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 5)


def test_box_iou_under_jit_and_vmap():
    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, 3 * 4).reshape(3, 4, 4), random_boxes(rng, 3 * 6).reshape(3, 6, 4)
    got = jax.jit(jax.vmap(box_iou))(a, b)
    for i in range(3):
        np.testing.assert_allclose(got[i], ref_iou(a[i], b[i]), rtol=1e-6, atol=1e-7)


def test_clip_boxes():
    boxes = np.array([[-5, 10, 40, 90], [1, 2, 3, 4], [60, 60, 70, 70]], np.float32)
    got = clip_boxes(boxes, (50, 30))  # (h, w)
    assert got.tolist() == [[0, 10, 30, 50], [1, 2, 3, 4], [30, 50, 30, 50]]
    # One size per image, traced under vmap; any leading dims.
    sizes = jnp.array([[50, 30], [100, 100]])
    batch = jax.vmap(clip_boxes)(np.stack([boxes, boxes]), sizes)
    assert batch[0].tolist() == got.tolist()
    assert batch[1].tolist() == [[0, 10, 40, 90], [1, 2, 3, 4], [60, 60, 70, 70]]
    assert clip_boxes(np.zeros((2, 0, 4)), (5, 5)).shape == (2, 0, 4)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_encode_decode_reference_and_round_trip(weights):
    rng = np.random.default_rng(2)
    p = random_boxes(rng, 50) + np.array([0, 0, 1, 1], np.float32)  # positive sides
    g = random_boxes(rng, 50) + np.array([0, 0, 1, 1], np.float32)
    d = encode_boxes(p, g, weights)
    np.testing.assert_allclose(
        d, ref_encode(p.astype(float), g.astype(float), weights), rtol=2e-5, atol=2e-5
    )
    np.testing.assert_allclose(decode_boxes(p, d, weights), g, rtol=1e-5, atol=1e-4)
    # Per-class deltas (N, 4K), and (..., 4) leading dims.
    k3 = decode_boxes(p, np.concatenate([d, d, d], 1), weights)
    assert k3.shape == (50, 12)
    np.testing.assert_array_equal(k3[:, 4:8], decode_boxes(p, d, weights))
    batched = decode_boxes(p.reshape(5, 10, 4), np.asarray(d).reshape(5, 10, 4), weights)
    np.testing.assert_array_equal(batched.reshape(50, 4), decode_boxes(p, d, weights))


def test_decode_clamps_the_log_scale():
    p = np.array([[0, 0, 10, 10.0]])
    big = decode_boxes(p, np.array([[0, 0, 100.0, -1.0]]))
    width = float(big[0, 2] - big[0, 0])
    assert math.isclose(width, 1000 / 16 * 10, rel_tol=1e-6)  # exp(log(1000/16)) * 10
    assert math.isclose(float(big[0, 3] - big[0, 1]), 10 * math.exp(-1), rel_tol=1e-6)
    small = decode_boxes(p, np.array([[0, 0, 100.0, 0]]), max_log_scale=math.log(2))
    assert math.isclose(float(small[0, 2] - small[0, 0]), 20, rel_tol=1e-6)


def test_bad_boxes_raise_eagerly_and_jit_documents_the_result():
    good = np.array([[0, 0, 10, 10.0]])
    with pytest.raises(ValueError, match=r"a must have shape \(N, 4\)"):
        box_iou(np.zeros((3, 5)), good)
    with pytest.raises(
        ValueError, match=r"b must have x1 <= x2 and y1 <= y2.*row 1 is \[0.0, 5.0, 1.0, 4.0\]"
    ):
        box_iou(good, np.array([[0, 0, 1, 1], [0, 5, 1, 4.0]]))
    with pytest.raises(ValueError, match="a must be finite; row 0"):
        box_iou(np.array([[0, 0, np.nan, 1]]), good)
    with pytest.raises(TypeError, match="float"):
        box_iou(np.array([[True, False, True, True]]), good)
    with pytest.raises(ValueError, match=r"image_size must be \(h, w\)"):
        clip_boxes(good, (5, 5, 3))
    with pytest.raises(ValueError, match="image_size"):
        clip_boxes(good, (-1, 5))
    with pytest.raises(ValueError, match=r"positive width and height.*row 0"):
        encode_boxes(np.array([[0, 0, 0, 10.0]]), good)
    with pytest.raises(ValueError, match="same shape"):
        encode_boxes(good, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="weights must be 4 finite positive"):
        encode_boxes(good, good, (1, 1, 0, 1))
    with pytest.raises(ValueError, match="deltas must be finite"):
        decode_boxes(good, np.array([[0, np.inf, 0, 0]]))
    with pytest.raises(ValueError, match=r"deltas must have shape \(..., 4 \* K\)"):
        decode_boxes(good, np.zeros((1, 6)))
    # Under jit nothing is checked: an empty proposal encodes to inf/NaN, an
    # inverted box has a negative width that counts as no intersection.
    enc = jax.jit(encode_boxes)(np.array([[0, 0, 0, 10.0]]), good)
    assert not np.isfinite(np.asarray(enc)).all()
    iou = jax.jit(box_iou)(np.array([[10, 10, 0, 0.0]]), good)
    assert float(iou[0, 0]) == 0.0


def test_torchvision_parity():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    from torchvision.models.detection._utils import BoxCoder

    rng = np.random.default_rng(3)
    a, b = random_boxes(rng, 30), random_boxes(rng, 20)
    a[:, 2:] += 1
    b[:, 2:] += 1
    np.testing.assert_allclose(
        box_iou(a, b),
        tv.ops.box_iou(torch.tensor(a), torch.tensor(b)).numpy(),
        rtol=1e-6,
        atol=1e-7,
    )
    np.testing.assert_array_equal(
        clip_boxes(a, (60, 50)), tv.ops.clip_boxes_to_image(torch.tensor(a), (60, 50)).numpy()
    )
    g = random_boxes(rng, 30)
    g[:, 2:] += 1
    for weights in ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)):
        coder = BoxCoder(weights)
        expected = coder.encode_single(torch.tensor(g), torch.tensor(a)).numpy()
        d = encode_boxes(a, g, weights)
        np.testing.assert_allclose(d, expected, rtol=1e-6, atol=1e-6)
        deltas = rng.normal(0, 2, (30, 8)).astype(np.float32)
        deltas[0, 2] = 9.0  # beyond the clamp
        expected = coder.decode_single(torch.tensor(deltas), torch.tensor(a)).numpy()
        np.testing.assert_allclose(decode_boxes(a, deltas, weights), expected, rtol=1e-6, atol=1e-4)


def test_box_iou_of_a_nan_box_under_jit_is_zero():
    boxes = np.array([[0, 0, 10, 10], [np.nan, 0, 10, 10], [0, 0, 10, np.nan]], np.float32)
    got = np.asarray(jax.jit(box_iou)(boxes, boxes))
    assert got[0, 0] == 1.0
    assert (got[1:, :] == 0).all() and (got[:, 1:] == 0).all()
