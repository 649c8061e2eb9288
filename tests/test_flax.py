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
