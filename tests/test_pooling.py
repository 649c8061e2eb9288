import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import spp_jax
from tests.reference import ref_max_grad, ref_pool

# Tests marked usefixtures("impl") run twice: with the compiled CPU kernels and with
# the pure-JAX code (what GPU and TPU run), see conftest.py.

# (B, H, W, C): odd, non-square, 1xW, smaller than the finest level, the paper's 13x13.
SHAPES = [(2, 13, 13, 3), (2, 10, 7, 2), (1, 1, 9, 2), (2, 3, 5, 2), (1, 4, 4, 1)]
LEVELS = [(6, 3, 2, 1), (4, 3, 2, 1), ((2, 3), 1)]


def _x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _nchw(x):
    return np.transpose(x, (0, 3, 1, 2))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("levels", LEVELS)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize("channel_major", [False, True])
@pytest.mark.usefixtures("impl")
def test_adaptive_matches_reference(shape, levels, mode, data_format, channel_major):
    x = _x(shape)
    xin = x if data_format == "NHWC" else _nchw(x)
    y = spp_jax.spatial_pyramid_pool(
        xin, levels, mode=mode, data_format=data_format, channel_major=channel_major
    )
    want = ref_pool(x, levels, mode, "adaptive", channel_major)
    chex.assert_shape(y, (shape[0], spp_jax.output_dim(shape[3], levels)))
    if mode == "max":
        np.testing.assert_array_equal(np.asarray(y), want)  # bit-exact
    else:
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["sliding", "partition"])
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("shape", [(2, 13, 13, 2), (1, 12, 9, 3)])
@pytest.mark.usefixtures("impl")
def test_other_rules_match_reference(rule, mode, shape):
    levels = (6, 3, 2, 1) if rule == "partition" else (3, 2, 1)
    x = _x(shape, 1)
    y = spp_jax.spatial_pyramid_pool(x, levels, mode=mode, rule=rule)
    want = ref_pool(x, levels, mode, rule)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.usefixtures("impl")
def test_low_precision_dtypes(dtype, mode):
    x = jnp.asarray(_x((2, 9, 11, 4), 2), dtype)
    y = spp_jax.spatial_pyramid_pool(x, (4, 2, 1), mode=mode)
    assert y.dtype == dtype
    want = ref_pool(np.asarray(x, np.float32), (4, 2, 1), mode)
    if mode == "max":
        np.testing.assert_array_equal(np.asarray(y, np.float32), want)
    else:  # float32 accumulation, one rounding to the output dtype
        np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2, atol=1e-2)


@pytest.mark.usefixtures("impl")
def test_pytorch_parity_if_available():
    torch = pytest.importorskip("torch")
    x = _x((2, 11, 7, 3), 3)
    xt = torch.from_numpy(_nchw(x).copy())
    for n in (6, 4, 3, 1):
        y = spp_jax.spatial_pyramid_pool(x, (n,), channel_major=True)
        want = torch.nn.functional.adaptive_max_pool2d(xt, n).flatten(1).numpy()
        np.testing.assert_array_equal(np.asarray(y), want)
        ya = spp_jax.spatial_pyramid_pool(x, (n,), mode="avg", channel_major=True)
        want = torch.nn.functional.adaptive_avg_pool2d(xt, n).flatten(1).numpy()
        np.testing.assert_allclose(np.asarray(ya), want, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("impl")
def test_nan_propagates():
    x = _x((1, 6, 6, 2))
    x[0, 1, 4, 0] = np.nan
    y = np.asarray(spp_jax.spatial_pyramid_pool(x, (2, 1))).reshape(5, 2)
    np.testing.assert_array_equal(np.isnan(y[:, 0]), [False, True, False, False, True])
    assert not np.isnan(y[:, 1]).any()


# ----------------------------------------------------------------------------- gradients


@pytest.fixture(scope="module")
def max_grad_fn(impl):
    def loss(x, cot, levels):
        return jnp.sum(spp_jax.spatial_pyramid_pool(x, levels) * cot)

    return jax.jit(jax.grad(loss), static_argnums=2)


@pytest.mark.parametrize("shape", [(2, 13, 13, 2), (1, 3, 5, 2), (2, 10, 7, 1)])
@pytest.mark.parametrize("levels", [(6, 3, 2, 1), (4, 3, 2, 1)])
@pytest.mark.usefixtures("impl")
def test_max_gradient_routes_to_first_max(max_grad_fn, shape, levels):
    # Quantised values force many ties, like ReLU outputs tying at 0.
    x = np.round(_x(shape, 4)).clip(-1, 1).astype(np.float32)
    cot = _x((shape[0], spp_jax.output_dim(shape[3], levels)), 5)
    g = max_grad_fn(x, cot, levels)
    np.testing.assert_allclose(np.asarray(g), ref_max_grad(x, levels, cot), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("shape", "mixed_sizes"), [((1, 13, 13, 83), False), ((8, 9, 10, 83), True)]
)
@pytest.mark.usefixtures("impl")
def test_many_channels_max_and_gradient(shape, mixed_sizes):
    # 83 = 64 + 16 + 3 channels: every vector block of the CPU kernel and its
    # scalar tail. B = 1 and B = 8 take the kernel's two ways of splitting work.
    x = np.round(_x(shape, 14)).clip(-1, 1).astype(np.float32)
    x[0, 2, 3, 5] = x[-1, 4, 1, 70] = np.nan
    levels = (6, 3, 2, 1)
    rng = np.random.default_rng(15)
    sizes = rng.integers(1, [shape[1] + 1, shape[2] + 1], (shape[0], 2)) if mixed_sizes else None
    cot = _x((shape[0], spp_jax.output_dim(shape[3], levels)), 16)

    def loss(x):
        return jnp.sum(spp_jax.spatial_pyramid_pool(x, levels, valid_sizes=sizes) * cot)

    y = np.asarray(spp_jax.spatial_pyramid_pool(x, levels, valid_sizes=sizes))
    g = np.asarray(jax.jit(jax.grad(loss))(x))
    for i in range(shape[0]):
        h, w = sizes[i] if mixed_sizes else shape[1:3]
        crop = x[i : i + 1, :h, :w]
        np.testing.assert_array_equal(y[i], ref_pool(crop, levels)[0])
        want = ref_max_grad(crop, levels, cot[i : i + 1])[0]
        np.testing.assert_allclose(g[i, :h, :w], want, rtol=1e-6, atol=1e-6)
        assert not g[i, h:].any() and not g[i, :, w:].any()


@pytest.mark.usefixtures("impl")
def test_infinities_pool_and_route_like_numbers():
    # +inf and -inf in one window make the CPU kernel's NaN scan (a sum) NaN: it
    # then takes its NaN-aware comparisons, which must give the same results.
    x = np.round(_x((2, 7, 6, 20), 17)).astype(np.float32)
    x[0, 1, 2, :5] = np.inf
    x[0, 4, 4, 3:9] = -np.inf
    x[1, :, :, 0] = -np.inf  # a channel of -inf only: the first cell wins
    levels = (6, 3, 2, 1)
    cot = _x((2, spp_jax.output_dim(20, levels)), 18)
    y = spp_jax.spatial_pyramid_pool(x, levels)
    np.testing.assert_array_equal(np.asarray(y), ref_pool(x, levels))
    g = jax.grad(lambda x: jnp.sum(spp_jax.spatial_pyramid_pool(x, levels) * cot))(x)
    np.testing.assert_allclose(np.asarray(g), ref_max_grad(x, levels, cot), rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("impl")
def test_max_gradient_all_ties_goes_to_one_cell():
    g = jax.grad(lambda x: spp_jax.spatial_pyramid_pool(x, (1,)).sum())(jnp.zeros((1, 5, 4, 1)))
    want = np.zeros((1, 5, 4, 1))
    want[0, 0, 0, 0] = 1.0
    np.testing.assert_array_equal(np.asarray(g), want)


@pytest.mark.usefixtures("impl")
def test_max_gradient_with_nan_goes_to_first_nan(max_grad_fn):
    x = np.zeros((1, 4, 4, 1), np.float32)
    x[0, 2, 1, 0] = x[0, 1, 3, 0] = np.nan
    cot = np.ones((1, 1), np.float32)
    g = np.asarray(max_grad_fn(x, cot, (1,)))
    assert g[0, 1, 3, 0] == 1.0 and g.sum() == 1.0


def test_avg_gradient_check_grads():
    x = jnp.asarray(_x((2, 7, 5, 2), 6), jnp.float32)
    f = lambda x: spp_jax.spatial_pyramid_pool(x, (3, 2, 1), mode="avg")
    check_grads(f, (x,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


def test_avg_gradient_is_cotangent_over_area():
    g = jax.grad(lambda x: spp_jax.spatial_pyramid_pool(x, (1,), mode="avg").sum())(
        jnp.ones((1, 3, 5, 1))
    )
    np.testing.assert_allclose(np.asarray(g), np.full((1, 3, 5, 1), 1 / 15), rtol=1e-6)


# ----------------------------------------------------------------------------- valid_sizes


@pytest.fixture(scope="module")
def padded_fn(impl):
    def f(x, sizes, mode):
        return spp_jax.spatial_pyramid_pool(x, (6, 3, 2, 1), mode=mode, valid_sizes=sizes)

    return jax.jit(f, static_argnums=2)


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.usefixtures("impl")
def test_valid_sizes_equal_per_example_crop(padded_fn, mode):
    x = _x((4, 12, 10, 2), 7)
    sizes = np.array([[12, 10], [7, 4], [3, 9], [1, 1]])
    xp = x.copy()
    for i, (h, w) in enumerate(sizes):  # garbage in the padding
        xp[i, h:] = np.nan
        xp[i, :, w:] = np.inf
    y = np.asarray(padded_fn(xp, sizes, mode))
    for i, (h, w) in enumerate(sizes):
        want = ref_pool(x[i : i + 1, :h, :w], (6, 3, 2, 1), mode)[0]
        np.testing.assert_allclose(y[i], want, rtol=1e-6, atol=1e-6)


@pytest.mark.usefixtures("impl")
def test_valid_sizes_gradient_ignores_padding():
    x = _x((2, 8, 8, 2), 8)
    sizes = jnp.array([[5, 3], [8, 8]])
    cot = _x((2, spp_jax.output_dim(2, (4, 2, 1))), 9)

    def loss(x):
        return jnp.sum(spp_jax.spatial_pyramid_pool(x, (4, 2, 1), valid_sizes=sizes) * cot)

    g = np.asarray(jax.jit(jax.grad(loss))(x))
    assert not g[0, 5:].any() and not g[0, :, 3:].any()
    np.testing.assert_allclose(
        g[0, :5, :3], ref_max_grad(x[:1, :5, :3], (4, 2, 1), cot[:1])[0], rtol=1e-6
    )
    np.testing.assert_allclose(g[1], ref_max_grad(x[1:], (4, 2, 1), cot[1:])[0], rtol=1e-6)


@pytest.mark.usefixtures("impl")
def test_valid_sizes_are_clipped():
    x = _x((2, 5, 6, 1), 10)
    y = spp_jax.spatial_pyramid_pool(x, (2, 1), valid_sizes=np.array([[0, 99], [-3, 2]]))
    np.testing.assert_array_equal(np.asarray(y[0]), ref_pool(x[:1, :1, :6], (2, 1))[0])
    np.testing.assert_array_equal(np.asarray(y[1]), ref_pool(x[1:, :1, :2], (2, 1))[0])


# ----------------------------------------------------------------------------- compiles


@pytest.mark.usefixtures("impl")
def test_one_compile_per_shape_bucket():
    traces = []

    @jax.jit
    def f(x, sizes):
        traces.append(x.shape)
        return spp_jax.spatial_pyramid_pool(x, valid_sizes=sizes)

    for seed in range(3):
        for shape in [(2, 13, 13, 4), (2, 10, 10, 4)]:
            sizes = np.random.default_rng(seed).integers(1, 11, (2, 2))
            jax.block_until_ready(f(_x(shape, seed), sizes))
    assert traces == [(2, 13, 13, 4), (2, 10, 10, 4)]


@pytest.mark.usefixtures("impl")
def test_works_under_vmap_and_pmap():
    x = _x((4, 2, 7, 6, 3), 11)  # (devices, B, H, W, C)
    f = lambda x: spp_jax.spatial_pyramid_pool(x, (2, 1))
    want = np.stack([ref_pool(xi, (2, 1)) for xi in x])
    np.testing.assert_array_equal(np.asarray(jax.vmap(f)(x)), want)
    n = min(jax.local_device_count(), 4)
    np.testing.assert_array_equal(np.asarray(jax.pmap(f)(x[:n])), want[:n])
    # shard_map over a mesh axis, with a gradient (results vary over the axis).
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("d",))
    spec = jax.sharding.PartitionSpec("d")
    g = jax.jit(
        jax.shard_map(jax.grad(lambda x: f(x).sum()), mesh=mesh, in_specs=spec, out_specs=spec)
    )(x[:n].reshape(-1, *x.shape[2:]))
    want_g = np.concatenate([ref_max_grad(xi, (2, 1), np.ones((2, 15))) for xi in x[:n]])
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-6)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mode": "min"}, ValueError, "'min'.*max"),
        ({"rule": "floor"}, ValueError, "'floor'.*adaptive"),
        ({"data_format": "NWHC"}, ValueError, "'NWHC'.*NHWC"),
        ({"levels": ()}, ValueError, "empty"),
        ({"levels": (6, 0)}, ValueError, "positive"),
        ({"levels": (1.5,)}, TypeError, "1.5"),
        ({"valid_sizes": np.ones((3, 2), int)}, ValueError, r"\(2, 2\).*\(3, 2\)"),
        ({"valid_sizes": np.ones((2, 2), np.float32)}, TypeError, "float32"),
        ({"valid_sizes": np.ones((2, 2), int), "rule": "partition"}, ValueError, "adaptive"),
        ({"rule": "sliding", "levels": (6,)}, ValueError, "gives 9 windows"),
        ({"rule": "partition", "levels": (11,)}, ValueError, "length 10 into 11"),
    ],
)
def test_errors(kwargs, error, match):
    x = np.zeros((2, 10, 10, 3), np.float32)
    with pytest.raises(error, match=match):
        spp_jax.spatial_pyramid_pool(x, **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"rank 4.*\(3, 4, 5\)"):
        spp_jax.spatial_pyramid_pool(np.zeros((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="H=0"):
        spp_jax.spatial_pyramid_pool(np.zeros((1, 0, 5, 2), np.float32))
    with pytest.raises(TypeError, match="int32"):
        spp_jax.spatial_pyramid_pool(np.zeros((1, 4, 5, 2), np.int32))
    with pytest.raises(TypeError, match="array"):
        spp_jax.spatial_pyramid_pool([[1.0]])


def test_unpacked_argmax_path_equals_packed(monkeypatch):
    # Huge maps cannot pack (key, position) into 31 bits; force that path here.
    from spp_jax import pooling
    from spp_jax._cpu import native

    monkeypatch.setattr(native, "_forced", False)  # a path of the pure-JAX code

    x = np.round(_x((2, 10, 7, 2), 12)).clip(-1, 1).astype(np.float32)
    cot = _x((2, spp_jax.output_dim(2, (6, 3, 1))), 13)
    sizes = np.array([[10, 7], [6, 5]])

    def grads():
        loss = lambda x, s: jnp.sum(spp_jax.spatial_pyramid_pool(x, (6, 3, 1), valid_sizes=s) * cot)
        return np.asarray(jax.grad(loss)(x, sizes)), np.asarray(jax.grad(loss)(x, None))

    packed = grads()
    monkeypatch.setattr(pooling, "_PACK_LIMIT", 0)
    unpacked = grads()
    np.testing.assert_array_equal(packed[0], unpacked[0])
    np.testing.assert_array_equal(packed[1], unpacked[1])
    np.testing.assert_allclose(packed[1], ref_max_grad(x, (6, 3, 1), cot), rtol=1e-6)


# ----------------------------------------------------------------------------- max_pool2d


@pytest.mark.parametrize(
    ("shape", "window", "stride", "ceil"),
    [
        ((2, 55, 55, 5), 3, 2, True),
        ((2, 12, 11, 3), 3, 2, True),
        ((1, 13, 9, 17), 3, 2, False),
        ((2, 9, 9, 2), 2, 2, False),
        ((1, 10, 10, 2), 3, 3, False),
    ],
)
@pytest.mark.usefixtures("impl")
def test_max_pool2d_equals_reduce_window(shape, window, stride, ceil):
    # ReLU-like input (ties at 0): values and gradients equal reduce_window's with
    # -inf padding, whose gradient (select_and_scatter) also takes the first maximum.
    rng = np.random.default_rng(7)
    x = jnp.asarray(np.maximum(rng.integers(-2, 3, shape), 0), jnp.float32)
    oh, ow = (spp_jax.pool_output_size(n, window, stride, ceil) for n in shape[1:3])
    pads = [(0, max(0, (o - 1) * stride + window - n)) for o, n in ((oh, shape[1]), (ow, shape[2]))]

    def ref(x):
        return jax.lax.reduce_window(
            x,
            -jnp.inf,
            jax.lax.max,
            (1, window, window, 1),
            (1, stride, stride, 1),
            ((0, 0), *pads, (0, 0)),
        )

    f = lambda x: spp_jax.max_pool2d(x, window, stride, ceil=ceil)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), np.asarray(ref(x)))
    g = jnp.asarray(rng.standard_normal((shape[0], oh, ow, shape[3])), jnp.float32)
    grad = lambda fn: jax.jit(lambda x: jax.vjp(fn, x)[1](g)[0])(x)
    np.testing.assert_array_equal(np.asarray(grad(f)), np.asarray(grad(ref)))
    t = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(jax.jvp(f, (x,), (t,))[1]), np.asarray(jax.jvp(ref, (x,), (t,))[1])
    )


def test_max_pool2d_errors():
    x = jnp.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="does not fit"):
        spp_jax.max_pool2d(x, 5, 1)
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        spp_jax.max_pool2d(x, 0, 1)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        spp_jax.max_pool2d(jnp.zeros((4, 4, 1)), 2, 2)
