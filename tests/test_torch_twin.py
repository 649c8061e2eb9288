"""The PyTorch twins of experiments/benchmarks/torch_twin.py equal spp_jax's networks.

Skipped without torch (CI has none; ``pip install -e ".[bench]"`` brings it).
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from spp_jax.models import ConvTrunk, SPPNet  # noqa: E402

_PATH = pathlib.Path(__file__).parents[1] / "experiments" / "benchmarks" / "torch_twin.py"


@pytest.fixture(scope="module")
def twin_lib():
    spec = importlib.util.spec_from_file_location("torch_twin", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(2)
    return module


def _tiny(arch, head, base_size=224, **kw):
    return SPPNet(
        arch=arch,
        head=head,
        width=0.125,
        fc_dim=32,
        num_classes=5,
        base_size=base_size,
        dropout_rate=0.3,
        **kw,
    )


def _images(b, h, w, seed=0):
    return np.random.default_rng(seed).standard_normal((b, h, w, 3), np.float32)


def _params(module, x, seed=0):
    """Random weights of ``module``'s shapes (He scale, nonzero biases), without
    compiling its init."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(x[:1]))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if getattr(path[-1], "key", "") == "bias":
            return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        return (rng.standard_normal(s.shape) * np.sqrt(2 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.mark.parametrize(
    ("arch", "head", "h", "w", "base_size"),
    [
        ("zf5", "spp", 75, 97, 224),  # odd sizes: every ceil-mode pool's last window clipped
        ("convnet5", "pool6", 112, 112, 112),
        ("overfeat7", "spp", 64, 50, 224),
        ("overfeat5", "pool6", 90, 90, 90),
    ],
)
def test_twin_equals_network(twin_lib, arch, head, h, w, base_size):
    net = _tiny(arch, head, base_size)
    x = _images(3, h, w)
    params = _params(net, x)
    twin = twin_lib.torch_twin(net, params)
    got = twin_lib.check_twin(net, params, twin, x)
    assert got["params"] == sum(p.numel() for p in twin.parameters())
    assert got["rel_diff"] <= twin_lib.LOGITS_RTOL
    assert twin.training  # check_twin restores the mode


def test_twin_param_count_of_default_network(twin_lib):
    # The default config's network (SPPNet's docstring: 2,142,506 parameters).
    net = SPPNet(width=0.25, fc_dim=512, num_classes=10)
    shapes = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))["params"]
    twin = twin_lib.torch_twin(net)
    assert sum(p.numel() for p in twin.parameters()) == twin_lib.jax_param_count(shapes)
    assert twin_lib.jax_param_count(shapes) == 2_142_506


def test_trunk_twin_equals_trunk(twin_lib):
    trunk = ConvTrunk("zf5", width=0.125)
    x = _images(1, 99, 130)
    params = _params(trunk, x, seed=1)
    twin = twin_lib.torch_trunk(trunk.specs).to(memory_format=torch.channels_last)
    twin_lib.copy_weights(twin, params)
    got = twin_lib.check_trunk(trunk, params, twin, x)
    assert got["rel_diff"] <= twin_lib.LOGITS_RTOL


def test_check_fails_for_a_different_network(twin_lib):
    """The check is not vacuous: channel-major flattening or AlexNet's LRN alpha fail."""
    net = _tiny("zf5", "spp", levels=(2, 1))
    x = _images(2, 64, 64)
    params = _params(net, x)

    class ChannelMajor(torch.nn.Module):
        def forward(self, t):
            pool = torch.nn.functional.adaptive_max_pool2d
            return torch.cat([pool(t, n).flatten(1) for n in (2, 1)], 1)

    twin = twin_lib.torch_twin(net, params)
    twin.head = ChannelMajor()
    with pytest.raises(AssertionError, match="differ"):
        twin_lib.check_twin(net, params, twin, x)

    twin = twin_lib.torch_twin(net, params)
    twin.trunk.lrn1.alpha *= twin.trunk.lrn1.size  # alpha not divided by size
    with pytest.raises(AssertionError, match="differ"):
        twin_lib.check_twin(net, params, twin, x)

    twin = twin_lib.torch_twin(net, params)
    twin.trunk.pool1.ceil_mode = False  # floor-mode pool: other map sizes
    with pytest.raises(AssertionError, match="layer"):
        twin_lib.check_twin(net, params, twin, x)
