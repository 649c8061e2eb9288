import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import spp_jax


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, valid_sizes=None):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = spp_jax.linen.SpatialPyramidPooling(levels=(4, 2, 1))(x, valid_sizes)
        return nn.Dense(3)(x)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
        self.spp = spp_jax.nnx.SpatialPyramidPooling((4, 2, 1))
        self.fc = nnx.Linear(spp_jax.output_dim(4, (4, 2, 1)), 3, rngs=rngs)

    def __call__(self, x, valid_sizes=None):
        return self.fc(self.spp(nnx.relu(self.conv(x)), valid_sizes))


SIZES = [(9, 11), (16, 16)]


def test_linen_model_two_input_sizes_jit_grad():
    model = LinenNet()
    params = model.init(jax.random.key(0), jnp.ones((2, 9, 11, 2)))
    opt = optax.sgd(0.1)
    opt_state = opt.init(params)
    labels = jnp.array([0, 2])

    @jax.jit
    def step(params, opt_state, x):
        def loss_fn(p):
            logits = model.apply(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    for h, w in SIZES:
        x = jax.random.normal(jax.random.key(h), (2, h, w, 2))
        new, opt_state, loss, grads = step(params, opt_state, x)
        chex.assert_trees_all_equal_shapes(new, params)
        assert np.isfinite(loss)
        assert float(jnp.abs(grads["params"]["Conv_0"]["kernel"]).sum()) > 0
        params = new
    assert step._cache_size() == len(SIZES)


def test_nnx_model_two_input_sizes_jit_grad():
    model = NnxNet(nnx.Rngs(0))
    labels = jnp.array([1, 0])

    @nnx.jit
    def grads_of(model, x):
        def loss_fn(m):
            return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

        return nnx.value_and_grad(loss_fn)(model)

    for h, w in SIZES:
        loss, grads = grads_of(model, jax.random.normal(jax.random.key(h), (2, h, w, 2)))
        assert np.isfinite(loss)
        assert float(jnp.abs(grads.conv.kernel[...]).sum()) > 0


def test_wrappers_equal_functional_call():
    x = np.random.default_rng(0).standard_normal((2, 7, 5, 3)).astype(np.float32)
    sizes = np.array([[7, 5], [4, 3]])
    want = spp_jax.spatial_pyramid_pool(
        x, (3, 1), mode="avg", channel_major=True, valid_sizes=sizes
    )
    lin = spp_jax.linen.SpatialPyramidPooling(levels=(3, 1), mode="avg", channel_major=True)
    nx = spp_jax.nnx.SpatialPyramidPooling((3, 1), mode="avg", channel_major=True)
    np.testing.assert_array_equal(np.asarray(lin.apply({}, x, sizes)), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(nx(x, sizes)), np.asarray(want))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "min"}, "'min'"),
        ({"rule": "x"}, "'x'"),
        ({"levels": ()}, "empty"),
        ({"data_format": "HWC"}, "'HWC'"),
    ],
)
def test_wrapper_errors_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spp_jax.nnx.SpatialPyramidPooling(**kwargs)
    with pytest.raises(ValueError, match=match):
        spp_jax.linen.SpatialPyramidPooling(**kwargs)


def test_core_import_does_not_import_flax():
    import subprocess
    import sys

    code = "import sys, spp_jax; spp_jax.spatial_pyramid_pool; print('flax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# name: (function, channels: divisible by oh * ow for the position-sensitive ops)
ROI_LAYERS = {
    "RoIAlign": (spp_jax.roi_align, 4),
    "PSRoIAlign": (spp_jax.ps_roi_align, 12),
    "PSRoIPool": (spp_jax.ps_roi_pool, 12),
}
ROI_OPTIONS = {  # every keyword the op takes, none at its default
    "RoIAlign": dict(spatial_scale=0.5, sampling_ratio=2, aligned=True, data_format="NCHW"),
    "PSRoIAlign": dict(spatial_scale=0.5, sampling_ratio=1, data_format="NCHW"),
    "PSRoIPool": dict(spatial_scale=0.5, data_format="NCHW"),
}


@pytest.mark.parametrize("name", sorted(ROI_LAYERS))
def test_roi_layers_equal_functional_call(name):
    op, c = ROI_LAYERS[name]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 9, c)).astype(np.float32)
    xy = rng.uniform(-2, 12, (5, 2))
    b = np.concatenate([xy, xy + rng.uniform(1, 8, (5, 2))], 1).astype(np.float32)
    idx = np.array([0, 1, 1, 0, 1], np.int32)
    valid = np.array([True, True, False, True, True])
    x_nchw = x.transpose(0, 3, 1, 2)
    kw = ROI_OPTIONS[name]
    want = op(x_nchw, b, idx, output_size=(2, 3), valid=valid, **kw)
    lin = getattr(spp_jax.linen, name)(output_size=(2, 3), **kw)
    nx = getattr(spp_jax.nnx, name)((2, 3), **kw)
    np.testing.assert_array_equal(lin.apply({}, x_nchw, b, idx, valid), want)
    np.testing.assert_array_equal(nx(x_nchw, b, idx, valid), want)
    # attributes left out are the function's defaults
    want = op(x, b, output_size=2)
    np.testing.assert_array_equal(getattr(spp_jax.linen, name)(output_size=2).apply({}, x, b), want)
    np.testing.assert_array_equal(getattr(spp_jax.nnx, name)(2)(x, b), want)


ROI_BAD_OPTIONS = [
    ({"output_size": 0}, ValueError, "output_size"),
    ({"output_size": (2, 3, 1)}, ValueError, "output_size"),
    ({"spatial_scale": -1.0}, ValueError, "spatial_scale"),
    ({"data_format": "HWC"}, ValueError, "'HWC'"),
]


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "match"),
    [(name, *case) for name in sorted(ROI_LAYERS) for case in ROI_BAD_OPTIONS]
    + [
        (name, {"sampling_ratio": 1.5}, TypeError, "sampling_ratio")
        for name in ("PSRoIAlign", "RoIAlign")
    ],
)
def test_roi_layer_errors_at_construction(name, kwargs, error, match):
    kwargs = {"output_size": 2} | kwargs
    with pytest.raises(error, match=match):
        getattr(spp_jax.linen, name)(**kwargs)
    size = kwargs.pop("output_size")
    with pytest.raises(error, match=match):
        getattr(spp_jax.nnx, name)(size, **kwargs)
