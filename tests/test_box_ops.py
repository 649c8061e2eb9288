"""spp_jax.detection.box_ops against torchvision.ops (values and gradients) and by hand."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from spp_jax.detection import box_ops

PAIRWISE = ("generalized_box_iou", "distance_box_iou", "complete_box_iou")
LOSSES = ("generalized_box_iou_loss", "distance_box_iou_loss", "complete_box_iou_loss")
REDUCTIONS = ("none", "mean", "sum")
FORMATS = ("xyxy", "xywh", "cxcywh")
NAMES = LOSSES + PAIRWISE

VALUE_RTOL = 1e-6
GRAD_RTOL = 1e-5
# An absolute floor for values that are 0 in real arithmetic (1 - IoU of identical boxes,
# the gradient of a max at a tie): float32 rounding of the terms that cancel there.
ATOL = 1e-6


def random_boxes(seed: int, n: int, size: float = 50.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-10, size, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(1, size / 2, (n, 2))], 1).astype(np.float32)


def degenerate_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Matching pairs: zero width, identical, disjoint, touching, nested, shared edges."""
    a = [
        [1.0, 2.0, 1.0, 6.0],  # zero width vs a box crossing it
        [1.0, 2.0, 1.0, 6.0],  # zero width vs the same zero-width box (union 0)
        [0.0, 0.0, 4.0, 3.0],  # identical
        [0.0, 0.0, 1.0, 1.0],  # disjoint
        [0.0, 0.0, 2.0, 2.0],  # touching at x = 2
        [0.0, 0.0, 8.0, 8.0],  # nested
        [0.0, 0.0, 4.0, 2.0],  # shared left, top and bottom edges
        [3.0, 5.0, 3.0, 9.0],  # zero width vs a disjoint box
    ]
    b = [
        [0.0, 3.0, 2.0, 5.0],
        [1.0, 2.0, 1.0, 6.0],
        [0.0, 0.0, 4.0, 3.0],
        [5.0, 7.0, 6.0, 9.0],
        [2.0, 0.0, 3.0, 2.0],
        [2.0, 3.0, 4.0, 5.0],
        [0.0, 0.0, 3.0, 2.0],
        [10.0, 0.0, 12.0, 1.0],
    ]
    return np.array(a, np.float32), np.array(b, np.float32)


CASES = {  # both 8 pairs: one compiled program per function serves both
    "random": lambda: (random_boxes(0, 8), random_boxes(1, 8)),
    "degenerate": degenerate_pairs,
}


# ---------------------------------------------------------------------------
# Against torchvision


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_equals_torchvision(name, case):
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.ops")
    a, b = CASES[case]()
    got = np.asarray(getattr(box_ops, name)(a, b))
    want = getattr(tv, name)(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    # torchvision's IoU is 0 / 0 = NaN for two empty boxes (a pair with no union), ours 0.
    no_union = np.isnan(want)
    assert case == "degenerate" or not no_union.any()
    np.testing.assert_allclose(got[~no_union], want[~no_union], rtol=VALUE_RTOL, atol=ATOL)
    assert np.isfinite(got).all()


def _torch_loss_and_grads(name, a, b, reduction, eps):
    import torch
    import torchvision.ops as tv

    ta = torch.from_numpy(a).requires_grad_(True)
    tb = torch.from_numpy(b).requires_grad_(True)
    loss = getattr(tv, name)(ta, tb, reduction=reduction, eps=eps)
    loss.sum().backward()
    return loss.detach().numpy(), ta.grad.numpy(), tb.grad.numpy()


@functools.cache
def jitted_loss_and_grads(name, reduction):
    fn = getattr(box_ops, name)

    def loss_and_grads(a, b, eps):
        loss = fn(a, b, reduction=reduction, eps=eps)
        grads = jax.grad(lambda p, q: jnp.sum(fn(p, q, reduction=reduction, eps=eps)), (0, 1))
        return (loss, *grads(a, b))

    return jax.jit(loss_and_grads)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", LOSSES)
def test_loss_values_and_gradients_equal_torchvision(name, case):
    pytest.importorskip("torch")
    pytest.importorskip("torchvision.ops")
    a, b = CASES[case]()
    for reduction in REDUCTIONS:
        want = _torch_loss_and_grads(name, a, b, reduction, 1e-7)
        got = getattr(box_ops, name)(a, b, reduction=reduction)
        assert got.shape == want[0].shape
        np.testing.assert_allclose(got, want[0], rtol=VALUE_RTOL, atol=ATOL, err_msg=reduction)
        got = jitted_loss_and_grads(name, reduction)(a, b, 1e-7)
        for g, w, tol in zip(got, want, (VALUE_RTOL, GRAD_RTOL, GRAD_RTOL), strict=True):
            np.testing.assert_allclose(g, w, rtol=tol, atol=ATOL, err_msg=reduction)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_eps_enters_as_in_torchvision(name):
    # complete_box_iou_loss: torchvision passes eps to alpha only (its DIoU part uses 1e-7).
    pytest.importorskip("torch")
    pytest.importorskip("torchvision.ops")
    a, b = random_boxes(2, 8, size=2.0), random_boxes(3, 8, size=2.0)
    want, want_ga, want_gb = _torch_loss_and_grads(name, a, b, "none", 0.5)
    loss, ga, gb = jitted_loss_and_grads(name, "none")(a, b, 0.5)
    np.testing.assert_allclose(loss, want, rtol=VALUE_RTOL, atol=ATOL)
    np.testing.assert_allclose(ga, want_ga, rtol=GRAD_RTOL, atol=ATOL)
    np.testing.assert_allclose(gb, want_gb, rtol=GRAD_RTOL, atol=ATOL)


@pytest.mark.parametrize("name", LOSSES)
def test_loss_of_no_boxes_equals_torchvision(name):
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.ops")
    a = np.zeros((0, 4), np.float32)
    for reduction in REDUCTIONS:
        want = getattr(tv, name)(torch.from_numpy(a), torch.from_numpy(a), reduction=reduction)
        got = getattr(box_ops, name)(a, a, reduction=reduction)
        assert got.shape == tuple(want.shape)
        np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("in_fmt", FORMATS)
@pytest.mark.parametrize("out_fmt", FORMATS)
def test_box_convert_equals_torchvision(in_fmt, out_fmt):
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.ops")
    boxes = random_boxes(4, 10).reshape(2, 5, 4)
    want = tv.box_convert(torch.from_numpy(boxes), in_fmt, out_fmt).numpy()
    np.testing.assert_array_equal(box_ops.box_convert(boxes, in_fmt, out_fmt), want)


def test_remove_small_boxes_equals_torchvision():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.ops")
    boxes = random_boxes(5, 40, size=10.0)
    boxes[:3] = [[0, 0, 2, 5], [0, 0, 5, 2], [1, 1, 1.5, 1.5]]  # sides exactly at min_size
    for min_size in (0.0, 2.0, 4.5):
        keep = np.asarray(box_ops.remove_small_boxes(boxes, min_size))
        want = tv.remove_small_boxes(torch.from_numpy(boxes), min_size).numpy()
        np.testing.assert_array_equal(np.flatnonzero(keep), want)
    assert np.asarray(box_ops.remove_small_boxes(boxes, 2.0))[:3].tolist() == [True, True, False]


def test_masks_to_boxes_equals_torchvision():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(6)
    masks = rng.uniform(size=(6, 7, 9)) > 0.93
    masks[0] = False  # empty
    masks[1] = False
    masks[1, 3, 4] = True  # one pixel
    masks[2, :, 0] = True  # one column
    for m in (masks, masks.astype(np.float32), masks.astype(np.uint8)):
        want = tv.masks_to_boxes(torch.from_numpy(m)).numpy()
        got = box_ops.masks_to_boxes(m)
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------
# Without torch


def test_generalized_box_iou_by_hand():
    a = np.array([[0.0, 0.0, 2.0, 2.0]], np.float32)
    b = np.array([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 2.0]], np.float32)
    # inter 1, union 7, enclosing 9: 1/7 - 2/9 = -5/63; disjoint: 0 - (10 - 6) / 10.
    np.testing.assert_allclose(box_ops.generalized_box_iou(a, b), [[-5 / 63, -0.4]], rtol=1e-6)
    np.testing.assert_allclose(
        box_ops.generalized_box_iou_loss(np.repeat(a, 2, 0), b), [1 + 5 / 63, 1.4], rtol=1e-6
    )


def test_pairwise_of_two_empty_boxes_is_finite():
    e = np.array([[1.0, 2.0, 1.0, 6.0]], np.float32)
    assert box_ops.generalized_box_iou(e, e).tolist() == [[0.0]]
    assert box_ops.distance_box_iou(e, e).tolist() == [[0.0]]


@pytest.mark.parametrize("in_fmt", FORMATS)
@pytest.mark.parametrize("out_fmt", FORMATS)
def test_box_convert_round_trip(in_fmt, out_fmt):
    boxes = box_ops.box_convert(random_boxes(7, 8), "xyxy", in_fmt)
    there = box_ops.box_convert(boxes, in_fmt, out_fmt)
    np.testing.assert_allclose(box_ops.box_convert(there, out_fmt, in_fmt), boxes, atol=1e-5)


def test_box_convert_by_hand():
    xyxy = np.array([1.0, 2.0, 5.0, 8.0], np.float32)
    assert box_ops.box_convert(xyxy, "xyxy", "xywh").tolist() == [1, 2, 4, 6]
    assert box_ops.box_convert(xyxy, "xyxy", "cxcywh").tolist() == [3, 5, 4, 6]
    assert box_ops.box_convert([3, 5, 4, 6], "cxcywh", "xywh").tolist() == [1, 2, 4, 6]


def test_derivatives_to_second_order():
    # The GIoU and DIoU losses in one function (one set of compilations). Not CIoU: its alpha
    # is held constant (stop_gradient), so finite differences of the function are not its
    # derivatives. test_hessians_equal_torchvision checks the second derivatives of all six
    # functions (pairwise ones included) against torch's in float64, forward over reverse.
    def giou_diou(a, b):
        return jnp.concatenate(
            [box_ops.generalized_box_iou_loss(a, b), box_ops.distance_box_iou_loss(a, b)]
        )

    with jax.enable_x64(True):
        a = jnp.asarray(random_boxes(8, 3, size=6.0), jnp.float64)
        b = jnp.asarray(random_boxes(9, 3, size=6.0), jnp.float64)
        # Forward mode only, to keep this test fast (reverse mode's repeated tracing took a
        # minute on 2 busy cores); reverse mode's second derivatives are the Hessian test's.
        check_grads(giou_diou, (a, b), order=2, modes=("fwd",), atol=1e-5, rtol=1e-5)


def test_hessians_equal_torchvision():
    # All six functions: jax.hessian (forward over reverse) against torch's, in float64.
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision.ops")
    a = random_boxes(8, 3, size=6.0).astype(np.float64)
    b = random_boxes(9, 3, size=6.0).astype(np.float64)
    tb = torch.from_numpy(b)
    with jax.enable_x64(True):

        @jax.jit
        def hessians(p, q):
            return [
                jax.hessian(lambda x, n=n: jnp.sum(getattr(box_ops, n)(x, q)))(p) for n in NAMES
            ]

        got = hessians(jnp.asarray(a), jnp.asarray(b))
    for name, hess in zip(NAMES, got, strict=True):
        want = torch.autograd.functional.hessian(
            lambda p, n=name: getattr(tv, n)(p, tb).sum(), torch.from_numpy(a)
        ).numpy()
        assert hess.dtype == jnp.float64
        np.testing.assert_allclose(hess, want, rtol=1e-9, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("name", LOSSES + PAIRWISE)
def test_vmap_and_jit_equal_a_loop(name):
    fn = getattr(box_ops, name)
    a = random_boxes(10, 15).reshape(3, 5, 4)
    b = random_boxes(11, 15).reshape(3, 5, 4)
    batched = jax.jit(jax.vmap(fn))(a, b)  # fn's own (jitted) program serves the loop
    for i in range(3):
        np.testing.assert_allclose(batched[i], fn(a[i], b[i]), rtol=1e-6, atol=1e-7)


def test_vmap_of_the_others():
    boxes = random_boxes(12, 12, size=8.0).reshape(3, 4, 4)
    sizes = jnp.array([1.0, 2.0, 3.0])
    keep = jax.vmap(box_ops.remove_small_boxes)(boxes, sizes)
    for i in range(3):
        assert keep[i].tolist() == box_ops.remove_small_boxes(boxes[i], float(sizes[i])).tolist()
    masks = np.random.default_rng(13).uniform(size=(2, 3, 5, 6)) > 0.8
    got = jax.jit(jax.vmap(box_ops.masks_to_boxes))(masks)
    for i in range(2):
        np.testing.assert_array_equal(got[i], box_ops.masks_to_boxes(masks[i]))
    conv = jax.vmap(lambda x: box_ops.box_convert(x, "xywh", "cxcywh"))(boxes)
    np.testing.assert_array_equal(conv, box_ops.box_convert(boxes, "xywh", "cxcywh"))


def test_masks_to_boxes_empty_and_degenerate():
    masks = np.zeros((3, 4, 5), bool)
    masks[1, 2, 3] = True
    masks[2, 0:4, 4] = True
    assert box_ops.masks_to_boxes(masks).tolist() == [
        [0.0, 0.0, 0.0, 0.0],
        [3.0, 2.0, 3.0, 2.0],
        [4.0, 0.0, 4.0, 3.0],
    ]
    assert box_ops.masks_to_boxes(np.zeros((2, 0, 5))).tolist() == [[0.0] * 4] * 2
    grad = jax.grad(lambda m: jnp.sum(box_ops.masks_to_boxes(m)))(jnp.asarray(masks, jnp.float32))
    assert not grad.any()


def test_remove_small_boxes_under_jit_with_traced_size():
    boxes = np.array([[0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 1.0, 3.0]], np.float32)
    keep = jax.jit(box_ops.remove_small_boxes)(boxes, 2.0)
    assert keep.dtype == jnp.bool_ and keep.tolist() == [True, False]


def test_float64_stays_float64():
    with jax.enable_x64(True):
        a = np.asarray(random_boxes(14, 3), np.float64)
        assert box_ops.complete_box_iou(a, a).dtype == jnp.float64
        assert box_ops.generalized_box_iou_loss(a, a).dtype == jnp.float64
        assert box_ops.box_convert(a, "xyxy", "xywh").dtype == jnp.float64
    ints = np.array([[0, 0, 2, 2]])
    assert box_ops.distance_box_iou_loss(ints, ints).dtype == jnp.float32


BOX = np.zeros((2, 4), np.float32)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: box_ops.box_convert(BOX, "xyxy", "yxyx"), r"out_fmt must be one of .*'yxyx'"),
        (lambda: box_ops.box_convert(BOX, "XYXY", "xywh"), r"in_fmt must be one of .*'XYXY'"),
        (lambda: box_ops.box_convert(np.zeros((2, 5)), "xyxy", "xywh"), r"\(\.\.\., 4\).*\(2, 5\)"),
        (lambda: box_ops.box_convert(np.zeros(()), "xyxy", "xywh"), r"\(\.\.\., 4\), got \(\)"),
        (lambda: box_ops.generalized_box_iou(BOX[0], BOX), r"boxes1 must have shape \(N, 4\)"),
        (lambda: box_ops.distance_box_iou(BOX, np.zeros((2, 3))), r"boxes2 .*\(N, 4\).*\(2, 3\)"),
        (lambda: box_ops.complete_box_iou(BOX, BOX[None]), r"boxes2 .*\(N, 4\), got \(1, 2, 4\)"),
        (lambda: box_ops.distance_box_iou(BOX, BOX, eps=-1.0), r"eps must be .*>= 0, got -1.0"),
        (
            lambda: box_ops.generalized_box_iou_loss(BOX, BOX, reduction="avg"),
            r"reduction must be one of \('none', 'mean', 'sum'\), got 'avg'",
        ),
        (
            lambda: box_ops.distance_box_iou_loss(BOX, BOX[:1]),
            r"same shape .*\(2, 4\) and \(1, 4\)",
        ),
        (lambda: box_ops.complete_box_iou_loss(BOX, np.zeros((2, 2))), r"boxes2 .*\(\.\.\., 4\)"),
        (lambda: box_ops.complete_box_iou_loss(BOX, BOX, eps=np.nan), r"eps must be .*nan"),
        (lambda: box_ops.remove_small_boxes(BOX, -0.5), r"min_size must be .*>= 0, got -0.5"),
        (lambda: box_ops.remove_small_boxes(BOX[0], 1.0), r"boxes must .*\(N, 4\), got \(4,\)"),
        (lambda: box_ops.masks_to_boxes(np.zeros((4, 4))), r"masks .*\(N, H, W\), got \(4, 4\)"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_exported_from_detection():
    import spp_jax.detection as det

    for name in box_ops.__all__:
        if name.islower():
            assert getattr(det, name) is getattr(box_ops, name)
