"""RoIAlign and position-sensitive pooling against NumPy references of torchvision's
rules (and torchvision itself where it is installed), their transformations, memory
and lowering."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from spp_jax import align, ps_roi_align, ps_roi_pool, roi_align
from tests import align_reference as ref

H, W = 7, 9


def _boxes(seed: int, r: int = 12) -> np.ndarray:
    """Random boxes in pixels of a 2x-scaled image, and the edge cases: partly and
    wholly outside the map, inverted, smaller than a cell, on the border."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-6, 2 * W, (r, 2))
    wh = rng.uniform(0.2, 2 * H, (r, 2))
    b = np.concatenate([xy, xy + wh], 1)
    b[0] = [-9, -9, -3, -2]  # wholly outside (top left)
    b[1] = [2 * W + 3, 1, 2 * W + 9, 5]  # wholly outside (right)
    b[2] = [6, 5, 3, 2]  # inverted
    b[3] = [4.1, 4.3, 4.4, 4.5]  # smaller than a cell
    b[4] = [-3, -3, 2 * W + 3, 2 * H + 3]  # the whole map and more
    b[5] = [0, 0, 2 * W - 1, 2 * H - 1]  # exactly the map
    return b.astype(np.float32)


def _features(c: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, H, W, c)).astype(np.float32)


def _indices(r: int) -> np.ndarray:
    return (np.arange(r) % 2).astype(np.int32)


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _close(got, want, rtol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    scale = max(np.abs(want).max(), 1e-6)
    np.testing.assert_array_less(np.abs(got - want).max() / scale, rtol)


@functools.cache
def _jitted(op, **kw):
    return jax.jit(functools.partial(op, **kw))


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("scale", [0.5, 1 / 3])
def test_roi_align_equals_reference(sampling_ratio, aligned, scale):
    x, b = _features(3), _boxes(1)
    idx = _indices(len(b))
    fn = _jitted(roi_align, output_size=(3, 2), spatial_scale=scale,
                 sampling_ratio=sampling_ratio, aligned=aligned)  # fmt: skip
    want = ref.roi_align(_nchw(x), b, idx, 3, 2, scale, sampling_ratio, aligned)
    _close(fn(x, b, idx), want.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("sampling_ratio", [0, 1])
def test_ps_roi_align_equals_reference(sampling_ratio):
    x, b = _features(2 * 3 * 2), _boxes(2)
    idx = _indices(len(b))
    got = ps_roi_align(
        x, b, idx, output_size=(3, 2), spatial_scale=0.5, sampling_ratio=sampling_ratio
    )
    want = ref.ps_roi_align(_nchw(x), b, idx, 3, 2, 0.5, sampling_ratio)
    _close(got, want.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("scale", [0.5, 1 / 3])
def test_ps_roi_pool_equals_reference(scale):
    x, b = _features(2 * 3 * 3), _boxes(3, r=20)
    idx = _indices(len(b))
    got = ps_roi_pool(x, b, idx, output_size=3, spatial_scale=scale)
    want = ref.ps_roi_pool(_nchw(x), b, idx, 3, 3, scale)
    _close(got, want.transpose(0, 2, 3, 1))


def test_equal_to_torchvision_values_and_gradients():
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    rng = np.random.default_rng(4)
    b = np.concatenate([_boxes(4, r=40) * 4, rng.uniform(0, 60, (40, 4))]).astype(np.float32)
    idx = _indices(len(b))
    rois = torch.from_numpy(np.concatenate([idx[:, None], b], 1).astype(np.float32))
    cases = [
        (roi_align, tv.ops.roi_align, 5, dict(sampling_ratio=-1, aligned=False)),
        (roi_align, tv.ops.roi_align, 5, dict(sampling_ratio=2, aligned=True)),
        (ps_roi_align, tv.ops.ps_roi_align, 2 * 3 * 3, dict(sampling_ratio=2)),
        (ps_roi_pool, tv.ops.ps_roi_pool, 2 * 3 * 3, {}),
    ]
    for ours, theirs, c, kw in cases:
        x = _features(c, seed=5)
        xt = torch.from_numpy(_nchw(x)).requires_grad_()
        want = theirs(xt, rois, 3, 1 / 8, *kw.values())
        cot = rng.standard_normal(want.shape).astype(np.float32)
        (want * torch.from_numpy(cot)).sum().backward()

        def loss(x, ours=ours, kw=kw, cot=cot):
            out = ours(x, b, idx, output_size=3, spatial_scale=1 / 8, data_format="NCHW", **kw)
            return jnp.sum(out * cot), out

        grad, got = jax.grad(loss, has_aux=True)(jnp.asarray(_nchw(x)))
        _close(got, want.detach().numpy())
        if ours is not ps_roi_pool:  # its backward also spreads into the unread last row
            _close(grad, xt.grad.numpy())


def test_forms_of_the_arguments():
    x, b = _features(4), _boxes(5)
    out = roi_align(x, b, output_size=2, spatial_scale=0.5)
    np.testing.assert_array_equal(out, roi_align(x, b, None, output_size=(2, 2), spatial_scale=0.5))
    nchw = roi_align(_nchw(x), b, output_size=2, spatial_scale=0.5, data_format="NCHW")
    np.testing.assert_array_equal(np.asarray(nchw).transpose(0, 2, 3, 1), out)
    assert roi_align(x, b[:0], output_size=2).shape == (0, 2, 2, 4)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_chunks_and_windows_give_the_same_result(monkeypatch, sampling_ratio):
    x, b = _features(3), _boxes(6, r=11)
    idx = _indices(len(b))

    def f(x):
        return roi_align(x, b, idx, output_size=2, spatial_scale=0.5,
                         sampling_ratio=sampling_ratio)  # fmt: skip

    whole, grad = f(x), jax.grad(lambda x: jnp.sum(f(x) ** 2))(x)
    monkeypatch.setattr(align, "_CHUNK_BYTES", 1)  # one box per step
    monkeypatch.setattr(align, "_GATHER_CHUNK_BYTES", 1)
    monkeypatch.setattr(align, "_WINDOW", 1)  # adaptive: one cell per step and side
    np.testing.assert_allclose(f(x), whole, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(f(x) ** 2))(x), grad,
                               rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("sampling_ratio", [-1, 2, 5])
def test_value_equals_the_dense_contraction(sampling_ratio):
    """The forward's gathered sums (sampling ratio 5: more taps than are unrolled, the
    dense contraction itself) equal the contraction its derivatives come from."""
    x, b = _features(3), _boxes(11, r=30)
    idx = _indices(len(b))
    kw = dict(output_size=(3, 2), spatial_scale=0.5, sampling_ratio=sampling_ratio)
    got = roi_align(x, b, idx, **kw)
    tangent = jax.jvp(lambda x: roi_align(x, b, idx, **kw), (x,), (x,))[1]  # linear in x
    _close(got, tangent, rtol=1e-6)


def test_jitted_gradients_are_finite_on_a_detection_map():
    """A map and boxes of a detection head: XLA:CPU has turned a fused multiply-and-sum
    in such gradients into NaN and huge values; the derivatives are dot products."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, 38, 50, 256)).astype(np.float32)
    wh = rng.uniform(16, 400, (50, 2))
    xy = rng.uniform(0, 1, (50, 2)) * (np.array([800, 600]) - wh)
    b = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    g = jax.jit(jax.grad(lambda x, b, i: jnp.sum(roi_align(x, b, i, output_size=7,
                                                           spatial_scale=1 / 16,
                                                           sampling_ratio=2))))  # fmt: skip
    for _ in range(3):
        assert np.all(np.isfinite(g(x, b, _indices(50))))


@pytest.mark.parametrize("op", [roi_align, ps_roi_align, ps_roi_pool])
def test_padding_rows_give_zeros_and_no_gradient(op):
    x, b = _features(2 * 2 * 2), _boxes(7, r=6)
    b[1] = np.nan  # padding may hold anything
    valid = np.array([True, False, True, False, True, True])

    def f(x, b):
        return op(x, b, output_size=2, spatial_scale=0.5, valid=valid)

    out = f(x, b)
    assert np.all(np.asarray(out)[~valid] == 0) and np.all(np.isfinite(out))
    gx = jax.grad(lambda x: jnp.sum(f(x, b)[1]))(x)
    assert not np.any(np.asarray(gx))
    if op is not ps_roi_pool:
        gb = jax.grad(lambda b: jnp.sum(f(x, b)))(jnp.asarray(b))
        assert np.all(np.asarray(gb)[~valid] == 0) and np.all(np.isfinite(gb))


def test_vmap_equals_a_loop():
    xs = np.stack([_features(3, seed=s) for s in range(3)])
    bs = np.stack([_boxes(s, r=7) for s in range(3)])
    fn = functools.partial(roi_align, output_size=2, spatial_scale=0.5, sampling_ratio=-1)
    got = jax.vmap(fn)(xs, bs)
    for k in range(3):
        np.testing.assert_allclose(got[k], fn(xs[k], bs[k]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_second_order_derivatives(sampling_ratio):
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((1, 5, 6, 2)))
    # generic boxes: no sample on a cell boundary, none on the map's border
    b = jnp.asarray([[1.3, 0.7, 7.9, 6.1], [3.1, 2.2, 9.6, 8.3]])

    def f(x, b):
        return roi_align(x, b, output_size=2, spatial_scale=0.5, sampling_ratio=sampling_ratio,
                         aligned=True)  # fmt: skip

    check_grads(f, (x, b), order=2, modes=("fwd", "rev"), eps=1e-3, atol=2e-2, rtol=2e-2)
    g = jax.grad(lambda x: jnp.sum(f(x, b) ** 2))
    check_grads(lambda x: g(x), (x,), order=1, eps=1e-3, atol=2e-2, rtol=2e-2)
    assert jax.hessian(lambda b: jnp.sum(f(x, b) ** 2))(b).shape == (2, 4, 2, 4)


def test_position_sensitive_second_order():
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((1, 5, 6, 8)))
    b = jnp.asarray([[1.3, 0.7, 7.9, 6.1]])
    check_grads(lambda x, b: ps_roi_align(x, b, output_size=2, spatial_scale=0.5),
                (x, b), order=2, eps=1e-3, atol=2e-2, rtol=2e-2)  # fmt: skip
    check_grads(lambda x: ps_roi_pool(x, b, output_size=2, spatial_scale=0.5),
                (x,), order=2, eps=1e-3, atol=2e-2, rtol=2e-2)  # fmt: skip


def test_gradients_are_bitwise_deterministic():
    x, b = _features(3), _boxes(10)
    g = jax.jit(jax.grad(lambda x, b: jnp.sum(roi_align(x, b, output_size=3) ** 2), (0, 1)))
    first = g(x, b)
    for _ in range(2):
        for a, c in zip(first, g(x, b), strict=True):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_memory_of_2000_boxes_is_bounded(sampling_ratio):
    """Forward and backward of 2,000 boxes at 7x7 on a (2, 38, 50, 256) map: XLA's
    compiled temporaries stay under 1 GiB (compiled, not run)."""
    x = jax.ShapeDtypeStruct((2, 38, 50, 256), jnp.float32)
    b = jax.ShapeDtypeStruct((2000, 4), jnp.float32)
    i = jax.ShapeDtypeStruct((2000,), jnp.int32)

    def loss(x, b, i):
        out = roi_align(x, b, i, output_size=7, spatial_scale=1 / 16,
                        sampling_ratio=sampling_ratio)  # fmt: skip
        return jnp.sum(out**2)

    compiled = jax.jit(jax.grad(loss, (0, 1))).lower(x, b, i).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 2**30


def test_lowers_without_custom_calls_for_tpu_and_gpu():
    x = jax.ShapeDtypeStruct((2, 12, 14, 18), jnp.float32)
    b = jax.ShapeDtypeStruct((30, 4), jnp.float32)
    cases = [(roi_align, dict(sampling_ratio=2), 0), (roi_align, dict(sampling_ratio=-1), 1),
             (ps_roi_align, {}, 0), (ps_roi_pool, {}, 0)]  # fmt: skip
    for op, kw, loops in cases:
        fn = jax.jit(functools.partial(op, output_size=3, spatial_scale=0.25, **kw))
        exported = jax.export.export(fn, platforms=("tpu", "cuda"))(x, b)
        text = exported.mlir_module()
        assert "stablehlo.custom_call" not in text, op.__name__
        # 30 boxes: one chunk, no loop over boxes; an adaptive grid's windows are one loop
        assert text.count("stablehlo.while") == loops, (op.__name__, kw)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(features=np.zeros((3, 4, 5), np.float32)), ValueError, "rank 4"),
        (dict(features=np.zeros((1, 4, 5, 2), np.int32)), TypeError, "floating dtype"),
        (dict(boxes=np.zeros((2, 5), np.float32)), ValueError, r"\(R, 4\)"),
        (dict(output_size=0), ValueError, "output_size"),
        (dict(output_size=(2, -1)), ValueError, "output_size"),
        (dict(sampling_ratio=1.5), TypeError, "sampling_ratio"),
        (dict(data_format="HWC"), ValueError, "data_format"),
        (dict(spatial_scale=-1.0), ValueError, "spatial_scale"),
        (dict(box_indices=np.array([0, 3])), ValueError, "box_indices"),
        (dict(valid=np.array([1, 0])), TypeError, "valid"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(features=np.zeros((2, 4, 5, 2), np.float32),
                boxes=np.zeros((2, 4), np.float32), output_size=2) | kwargs  # fmt: skip
    with pytest.raises(error, match=match):
        roi_align(**args)


def test_position_sensitive_channels_must_divide():
    with pytest.raises(ValueError, match="divisible by oh \\* ow = 4"):
        ps_roi_pool(np.zeros((1, 4, 4, 6), np.float32), np.zeros((1, 4)), output_size=2)
