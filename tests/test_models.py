"""Tests for spp_jax.models: map sizes, parameter counts, heads, padded-batch exactness, LRN."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax import models
from spp_jax.models import (
    ARCHS,
    HEADS,
    ConvSpec,
    ConvTrunk,
    MLPHead,
    Pool6Head,
    PoolSpec,
    SPPHead,
    SPPNet,
    feature_map_size,
    layer_specs,
    local_response_norm,
    pool6_window,
)
from spp_jax.pooling import max_pool2d

KEY = jax.random.key(0)
PAPER_MAP_SIZE = {"zf5": 13, "convnet5": 13, "overfeat5": 18, "overfeat7": 18}
TINY = {"width": 0.125, "fc_dim": 32, "depth": 0.34, "num_classes": 5}


def _init_shapes(net: SPPNet, shape, **kwargs):
    """(output, variables) as ShapeDtypeStructs: no real compute or allocation."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda x: net.init_with_output(KEY, x, **kwargs), x)


def _conv5_shape(net: SPPNet, shape):
    _, variables = _init_shapes(net, shape, mutable=True)
    return variables["intermediates"]["last_conv"][0].shape


def _random_params(net: SPPNet, shape, seed: int = 0):
    """Random float32 params of the init's shapes, drawn with NumPy.

    Cheaper than compiling ``net.init`` (RNG-heavy) on CPU; non-zero biases make the
    padded-batch tests stricter (a bias computed on padding must still be masked).
    """
    _, variables = _init_shapes(net, shape)
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 10
        return jnp.asarray(rng.normal(scale=1 / np.sqrt(fan_in), size=leaf.shape), leaf.dtype)

    return jax.tree.map(draw, variables)


def _n_params(net: SPPNet, size: int) -> int:
    _, variables = _init_shapes(net, (1, size, size, 3))
    return sum(v.size for v in jax.tree.leaves(variables["params"]))


# --------------------------------------------------------------------------------------
# Map sizes.
# --------------------------------------------------------------------------------------


def test_zf5_conv5_is_13_at_224_and_10_at_180():
    net = SPPNet(arch="zf5")
    assert _conv5_shape(net, (1, 224, 224, 3)) == (1, 13, 13, 256)
    assert _conv5_shape(net, (1, 180, 180, 3)) == (1, 10, 10, 256)


def test_intermediate_sizes_match_paper():
    def walk(arch):
        sizes, n = [], 224
        for spec in layer_specs(arch):
            n = spec.out_size(n)
            sizes.append(n)
        return sizes

    # Sizes after each listed stage of the paper's Table 1 (and the brief).
    zf = walk("zf5")
    assert (zf[0], zf[2], zf[3], zf[5], zf[-1]) == (110, 55, 27, 13, 13)
    cn = walk("convnet5")
    assert (cn[0], cn[4], cn[6], cn[-1]) == (55, 27, 13, 13)
    for arch in ("overfeat5", "overfeat7"):
        of = walk(arch)
        assert (of[0], of[2], of[4], of[-1]) == (109, 36, 18, 18)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_arch_map_size_at_224(arch):
    m = PAPER_MAP_SIZE[arch]
    c5 = 256 if arch in ("zf5", "convnet5") else 512
    assert feature_map_size(arch, 224, 224) == (m, m)
    assert _conv5_shape(SPPNet(arch=arch), (2, 224, 224, 3)) == (2, m, m, c5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hw", [(97, 131), (180, 224), (151, 150), (67, 255), (225, 181)])
def test_feature_map_size_matches_module(arch, hw):
    h, w = hw
    net = SPPNet(arch=arch, width=0.125, depth=0.5, fc_dim=8)
    assert _conv5_shape(net, (1, h, w, 3))[1:3] == feature_map_size(arch, h, w)


@pytest.mark.parametrize("arch", ARCHS)
def test_feature_map_size_jnp_matches_int(arch):
    hs = np.arange(40, 300, dtype=np.int32)
    ws = hs[::-1].copy()
    h5, w5 = feature_map_size(arch, jnp.asarray(hs), jnp.asarray(ws))
    expect = [feature_map_size(arch, int(h), int(w)) for h, w in zip(hs, ws, strict=True)]
    np.testing.assert_array_equal(np.asarray(h5), [e[0] for e in expect])
    np.testing.assert_array_equal(np.asarray(w5), [e[1] for e in expect])
    # Also under jit, on a (B, 2) column pair as used for valid_sizes.
    sizes = jnp.stack([hs, ws], axis=1)
    h5j, w5j = jax.jit(lambda s: feature_map_size(arch, s[:, 0], s[:, 1]))(sizes)
    np.testing.assert_array_equal(np.asarray(h5j), np.asarray(h5))
    np.testing.assert_array_equal(np.asarray(w5j), np.asarray(w5))


def test_feature_map_size_too_small_input():
    with pytest.raises(ValueError, match="too small"):
        feature_map_size("overfeat5", 12, 224)


@pytest.mark.parametrize("arch", ARCHS)
def test_trunk_stride_and_min_input_size(arch):
    trunk = ConvTrunk(arch, depth=0.5)
    assert trunk.total_stride == {"zf5": 16, "convnet5": 16, "overfeat5": 12, "overfeat7": 12}[arch]
    n = trunk.min_input_size
    assert min(feature_map_size(arch, n, n)) >= 1
    with pytest.raises(ValueError, match="too small"):
        feature_map_size(arch, n - 1, n - 1)
    # One more cell of the last map per total_stride pixels of input.
    m, _ = feature_map_size(arch, 224, 224)
    assert feature_map_size(arch, 224 + trunk.total_stride, 224) == (m + 1, m)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 13, 27, 55, 110])
@pytest.mark.parametrize("window,stride", [(3, 2), (3, 3), (2, 2), (3, 1)])
@pytest.mark.parametrize("ceil", [False, True])
def test_pool_out_size_matches_caffe(n, window, stride, ceil):
    spec = PoolSpec(window, stride, ceil)
    if ceil:
        expect = int(np.ceil((n - window) / stride)) + 1
        if (expect - 1) * stride >= n:  # Caffe: the last window starts inside
            expect -= 1
    else:
        expect = int(np.floor((n - window) / stride)) + 1
    assert spec.out_size(n) == expect


def _np_max_pool(x, window, stride, out):
    b, _, _, c = x.shape
    y = np.empty((b, out[0], out[1], c), x.dtype)
    for i in range(out[0]):
        for j in range(out[1]):
            patch = x[:, i * stride : i * stride + window, j * stride : j * stride + window]
            y[:, i, j] = patch.max(axis=(1, 2))
    return y


@pytest.mark.parametrize("hw", [(13, 13), (10, 7), (27, 28), (4, 5)])
@pytest.mark.parametrize("ceil", [False, True])
def test_max_pool_matches_reference(hw, ceil):
    spec = PoolSpec(3, 2, ceil)
    x = np.random.default_rng(0).normal(size=(2, *hw, 3)).astype(np.float32)
    out = (spec.out_size(hw[0]), spec.out_size(hw[1]))
    got = max_pool2d(jnp.asarray(x), spec.window, spec.stride, ceil=spec.ceil)
    np.testing.assert_array_equal(np.asarray(got), _np_max_pool(x, 3, 2, out))


def test_depth_and_width_scaling():
    def convs(arch, **kw):
        return [s.features for s in layer_specs(arch, **kw) if isinstance(s, ConvSpec)]

    assert convs("zf5") == [96, 256, 384, 384, 256]
    assert convs("zf5", depth=2.0) == [96, 256, 384, 384, 384, 384, 384, 256]
    assert convs("zf5", depth=0.5) == [96, 256, 384, 256]  # round(1.5) = 2
    assert convs("zf5", depth=0.01) == [96, 256, 256]
    assert convs("overfeat7") == [96, 256] + [512] * 5
    assert convs("overfeat7", depth=0.6) == [96, 256] + [512] * 3
    assert convs("zf5", width=0.125) == [12, 32, 48, 48, 32]
    assert convs("zf5", width=1e-4) == [1] * 5
    # convnet5 keeps its pool after the first 3x3 conv at every depth.
    for depth in (0.01, 0.5, 1.0, 3.0):
        specs = layer_specs("convnet5", depth=depth)
        assert models._walk_sizes(specs, 224, 224)[-1] == (13, 13)
        assert isinstance(specs[6], PoolSpec) and isinstance(specs[5], ConvSpec)


# --------------------------------------------------------------------------------------
# Parameter counts.
# --------------------------------------------------------------------------------------


# The conv layers of the paper's Table 1 as (kernel, channels), written out here rather than
# read from layer_specs, so the count below checks the built network against the paper.
PAPER_CONVS = {
    "zf5": [(7, 96), (5, 256), (3, 384), (3, 384), (3, 256)],
    "convnet5": [(11, 96), (5, 256), (3, 384), (3, 384), (3, 256)],
    "overfeat5": [(7, 96), (5, 256), (3, 512), (3, 512), (3, 512)],
    "overfeat7": [(7, 96), (5, 256)] + [(3, 512)] * 5,
}


def _param_count(arch, head, *, width=1.0, fc_dim=4096, num_classes=1000, levels=(6, 3, 2, 1)):
    """Weights and biases of conv1 ... conv5, fc6, fc7 and fc8, counted from the layers."""
    n, c_in = 0, 3
    for k, c in PAPER_CONVS[arch]:
        c = max(1, int(c * width + 0.5))
        n += k * k * c_in * c + c
        c_in = c
    bins = 6 * 6 if head == "pool6" else sum(level * level for level in levels)
    dims = [c_in * bins, fc_dim, fc_dim, num_classes]
    return n + sum(a * b + b for a, b in itertools.pairwise(dims))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("head", HEADS)
def test_param_count_is_the_papers_layers(arch, head):
    assert _n_params(SPPNet(arch=arch, head=head), 224) == _param_count(arch, head)


def test_param_count_of_the_default_training_config():
    small = SPPNet(arch="zf5", width=0.25, fc_dim=512, num_classes=10)
    n = _param_count("zf5", "spp", width=0.25, fc_dim=512, num_classes=10)
    assert _n_params(small, 112) == _n_params(small, 90) == n
    assert round(n / 1e6, 1) == 2.1  # the figure spp_jax/configs/default.py states


def test_params_are_float32_with_bfloat16_compute():
    net = SPPNet(width=0.125, fc_dim=16, num_classes=3, dtype=jnp.bfloat16)
    out, variables = _init_shapes(net, (2, 112, 96, 3), mutable=True)
    assert out.shape == (2, 3) and out.dtype == jnp.float32
    assert {v.dtype for v in jax.tree.leaves(variables["params"])} == {jnp.dtype(jnp.float32)}
    assert variables["intermediates"]["last_conv"][0].dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------
# Heads and logits shapes.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hw", [(224, 224), (180, 201)])
def test_spp_logits_shape(arch, hw):
    net = SPPNet(arch=arch, num_classes=7)
    out, _ = _init_shapes(net, (3, *hw, 3))
    assert out.shape == (3, 7) and out.dtype == jnp.float32


@pytest.mark.parametrize("arch", ARCHS)
def test_pool6_logits_shape_and_error(arch):
    net = SPPNet(arch=arch, head="pool6", num_classes=7)
    out, _ = _init_shapes(net, (2, 224, 224, 3))
    assert out.shape == (2, 7)
    with pytest.raises(ValueError, match=r"180x180.*base_size=224.*224x224"):
        _init_shapes(net, (2, 180, 180, 3))
    with pytest.raises(ValueError, match=r"224x150"):
        _init_shapes(net, (2, 224, 150, 3))


def test_pool6_window_paper_values():
    assert pool6_window("zf5") == pool6_window("convnet5") == (3, 2)
    assert pool6_window("overfeat5") == pool6_window("overfeat7") == (3, 3)
    for arch in ARCHS:
        for base in (112, 150, 224, 300):
            win, stride = pool6_window(arch, base)
            m, _ = feature_map_size(arch, base, base)
            assert win >= stride >= 1 and (m - win) // stride + 1 == 6 and win + 5 * stride == m
    with pytest.raises(ValueError, match="base_size=64"):
        pool6_window("zf5", 64)


def test_pool6_other_accepted_size_and_base_size():
    net = SPPNet(arch="zf5", head="pool6", width=0.125, fc_dim=8)
    assert _init_shapes(net, (1, 230, 219, 3))[0].shape == (1, 1000)
    small = SPPNet(arch="zf5", head="pool6", base_size=112, width=0.25, fc_dim=512, num_classes=10)
    feats = jax.eval_shape(
        lambda x: small.init_with_output(KEY, x, method=SPPNet.features)[0],
        jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32),
    )
    assert feats.shape == (2, 36 * 64) == (2, small.output_dim)
    with pytest.raises(ValueError, match="base_size=112"):
        _init_shapes(small, (1, 224, 224, 3))
    with pytest.raises(ValueError, match="base_size"):
        SPPNet(head="pool6", base_size=60)


def test_pool6_rejects_valid_sizes():
    net = SPPNet(head="pool6", width=0.125, fc_dim=8)
    with pytest.raises(ValueError, match='valid_sizes needs head="spp"'):
        _init_shapes(net, (2, 224, 224, 3), valid_sizes=jnp.full((2, 2), 224))


def test_features_shape():
    net = SPPNet(arch="overfeat5", width=0.125, fc_dim=8, levels=(4, 2, 1))
    feats = jax.eval_shape(
        lambda x: net.init_with_output(KEY, x, method=SPPNet.features)[0],
        jax.ShapeDtypeStruct((2, 150, 170, 3), jnp.float32),
    )
    assert feats.shape == (2, 64 * 21) == (2, net.output_dim)
    assert SPPNet().output_dim == 12800


# --------------------------------------------------------------------------------------
# Padded batches.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["zf5", "convnet5", "overfeat5"])  # overfeat7 ~ overfeat5
def test_valid_sizes_match_unpadded_runs(arch):
    net = SPPNet(arch=arch, **TINY)
    sizes = [(101, 87), (70, 64), (88, 99)]
    H, W = 101, 99
    rng = np.random.default_rng(1)
    images = [rng.uniform(0, 1, size=(h, w, 3)).astype(np.float32) for h, w in sizes]
    batch = rng.uniform(-1e4, 1e4, size=(len(sizes), H, W, 3)).astype(np.float32)
    for i, (h, w) in enumerate(sizes):
        batch[i, :h, :w] = images[i]
    variables = _random_params(net, (1, H, W, 3))
    apply = jax.jit(net.apply)
    got = np.asarray(apply(variables, batch, valid_sizes=jnp.asarray(sizes, jnp.int32)))
    for i, img in enumerate(images):
        alone = np.asarray(apply(variables, img[None]))
        np.testing.assert_allclose(got[i], alone[0], rtol=1e-5, atol=1e-5)
    # Without valid_sizes the garbage padding does change the logits.
    leaky = np.asarray(apply(variables, batch))
    assert not np.allclose(leaky[1], got[1], rtol=1e-3, atol=1e-3)


def test_valid_sizes_features_and_nonfinite_padding():
    net = SPPNet(arch="zf5", **TINY)
    rng = np.random.default_rng(2)
    img = rng.uniform(0, 1, size=(75, 66, 3)).astype(np.float32)
    batch = np.full((2, 90, 80, 3), np.nan, np.float32)
    batch[0, :75, :66] = img
    batch[1] = np.inf
    batch[1, :75, :66] = img
    variables = _random_params(net, (1, 90, 80, 3))
    sizes = jnp.array([[75, 66], [75, 66]], jnp.int32)
    features = jax.jit(lambda v, x, s=None: net.apply(v, x, valid_sizes=s, method=SPPNet.features))
    feats = features(variables, batch, sizes)
    alone = features(variables, img[None])
    assert np.isfinite(np.asarray(feats)).all()
    np.testing.assert_allclose(feats, jnp.concatenate([alone, alone]), rtol=1e-5, atol=1e-6)


def test_valid_sizes_bad_shape():
    net = SPPNet(**TINY)
    with pytest.raises(ValueError, match="valid_sizes must have shape"):
        _init_shapes(net, (2, 96, 96, 3), valid_sizes=jnp.ones((3, 2), jnp.int32))


def test_dropout_only_in_train():
    net = SPPNet(**TINY, dropout_rate=0.5)
    x = np.random.default_rng(0).uniform(size=(2, 72, 72, 3)).astype(np.float32)
    variables = _random_params(net, x.shape)
    apply = jax.jit(net.apply, static_argnames="train")
    a = apply(variables, x)
    np.testing.assert_array_equal(a, apply(variables, x))
    b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert b.shape == a.shape and not np.allclose(a, b)


# --------------------------------------------------------------------------------------
# The parts: trunk, heads, classifier.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
def test_parameter_tree_is_flat_as_before_the_split(head):
    """Checkpoints written before SPPNet was split into parts still restore."""
    net = SPPNet(head=head, base_size=112, **TINY)
    _, variables = _init_shapes(net, (1, 112, 112, 3))
    flat = jax.tree_util.tree_leaves_with_path(variables["params"])
    paths = sorted("/".join(p.key for p in path) for path, _ in flat)
    n_conv = sum(isinstance(s, ConvSpec) for s in net.specs)
    names = [f"conv{i}" for i in range(1, n_conv + 1)] + ["fc6", "fc7", "fc8"]
    assert paths == sorted(f"{n}/{leaf}" for n in names for leaf in ("bias", "kernel"))


def test_trunk_alone_gives_the_networks_conv_map_and_valid_sizes():
    net = SPPNet(arch="zf5", **TINY)
    trunk = ConvTrunk(arch="zf5", width=TINY["width"], depth=TINY["depth"])
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 1, size=(75, 66, 3)).astype(np.float32)
    batch = rng.uniform(-10, 10, size=(2, 90, 80, 3)).astype(np.float32)
    batch[0, :75, :66] = img
    sizes = jnp.array([[75, 66], [90, 80]], jnp.int32)
    variables = _random_params(net, (1, 90, 80, 3))
    conv_params = {k: v for k, v in variables["params"].items() if k.startswith("conv")}
    _, state = net.apply(variables, batch, valid_sizes=sizes, mutable=["intermediates"])
    fmap, fsizes = jax.jit(trunk.apply)({"params": conv_params}, batch, sizes)
    np.testing.assert_allclose(fmap, state["intermediates"]["last_conv"][0], rtol=1e-5, atol=1e-6)
    h5, w5 = feature_map_size("zf5", 75, 66)
    np.testing.assert_array_equal(fsizes, [[h5, w5], [*feature_map_size("zf5", 90, 80)]])
    # Example 0's map on its valid region is the map of the image alone; zero outside.
    alone, none = trunk.apply({"params": conv_params}, img[None])
    assert none is None and alone.shape[1:3] == (h5, w5)
    np.testing.assert_allclose(fmap[0, :h5, :w5], alone[0], rtol=1e-5, atol=1e-6)
    assert not np.any(fmap[0, h5:]) and not np.any(fmap[0, :, w5:])
    assert trunk.out_channels == fmap.shape[-1] == 32


TINY_WD = (TINY["width"], TINY["depth"])


def test_center_input_subtracts_each_images_mean_colour_over_its_valid_region():
    plain = ConvTrunk(arch="zf5", width=TINY["width"], depth=TINY["depth"])
    centred = ConvTrunk(arch="zf5", width=TINY["width"], depth=TINY["depth"], center_input=True)
    made = SPPNet(**TINY, center_input=True).conv_trunk
    assert (made.arch, made.width, made.depth, made.center_input) == ("zf5", *TINY_WD, True)
    rng = np.random.default_rng(5)
    img = rng.uniform(0, 1, size=(75, 66, 3)).astype(np.float32)
    params = plain.init(KEY, img[None])["params"]
    # The NumPy reference: the plain trunk on the image minus its mean colour.
    want, _ = plain.apply({"params": params}, (img - img.mean(axis=(0, 1)))[None])
    got, _ = centred.apply({"params": params}, img[None])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # A colour cast added to the whole image changes nothing.
    cast, _ = centred.apply({"params": params}, (img + np.float32([0.7, -0.4, 2.0]))[None])
    np.testing.assert_allclose(cast, got, rtol=1e-4, atol=1e-4)
    # Padded: the mean is over the valid region only, whatever the padding holds.
    batch = rng.uniform(-10, 10, size=(1, 90, 80, 3)).astype(np.float32)
    batch[0, :75, :66] = img
    fmap, sizes = centred.apply({"params": params}, batch, jnp.array([[75, 66]], jnp.int32))
    h5, w5 = np.asarray(sizes[0])
    np.testing.assert_allclose(fmap[0, :h5, :w5], got[0], rtol=1e-5, atol=1e-5)


def test_heads_and_classifier_alone():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 13, 13, 8)), jnp.float32)
    spp = SPPHead((3, 1))
    assert spp.apply({}, x).shape == (2, spp.output_dim(8)) == (2, 80)
    pool6 = Pool6Head(3, 2)
    y = pool6.apply({}, x)
    assert y.shape == (2, pool6.output_dim(8)) == (2, 288)
    np.testing.assert_array_equal(y.reshape(2, 6, 6, 8), _np_max_pool(np.asarray(x), 3, 2, (6, 6)))
    with pytest.raises(ValueError, match=r"Pool6Head\(window=3, stride=2\).*10x13 -> 4x6"):
        pool6.apply({}, x[:, :10])
    with pytest.raises(ValueError, match='valid_sizes needs head="spp"'):
        pool6.apply({}, x, jnp.full((2, 2), 13))
    mlp = MLPHead(num_classes=4, fc_dim=6, dropout_rate=0.0)
    logits, variables = mlp.init_with_output(KEY, jnp.ones((3, 80)))
    assert logits.shape == (3, 4) and sorted(variables["params"]) == ["fc6", "fc7", "fc8"]
    for bad, match in (({"fc_dim": 0}, "fc_dim"), ({"dropout_rate": -0.1}, "dropout_rate")):
        with pytest.raises(ValueError, match=match):
            MLPHead(**bad)
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        Pool6Head(0, 1)
    with pytest.raises(ValueError, match="'vgg'"):
        ConvTrunk(arch="vgg")


# --------------------------------------------------------------------------------------
# Argument errors.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"arch": "zf6"}, r"'zf6'.*'zf5', 'convnet5', 'overfeat5', 'overfeat7'"),
        ({"arch": "ZF5"}, "'ZF5'"),
        ({"head": "fc"}, r"'fc'.*'spp', 'pool6'"),
        ({"width": 0}, "width"),
        ({"depth": -1.0}, "depth"),
        ({"fc_dim": 0}, "fc_dim"),
        ({"num_classes": 2.5}, "num_classes"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"levels": ()}, "levels"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPPNet(**kwargs)


def test_bad_arch_in_helpers():
    with pytest.raises(ValueError, match="'vgg16'"):
        feature_map_size("vgg16", 224, 224)
    with pytest.raises(ValueError, match="'vgg16'"):
        layer_specs("vgg16")


# --------------------------------------------------------------------------------------
# LRN.
# --------------------------------------------------------------------------------------


def _np_lrn(x, size, alpha, beta, k):
    x = x.astype(np.float64)
    c = x.shape[-1]
    out = np.empty_like(x)
    for ch in range(c):
        lo, hi = max(0, ch - (size - 1) // 2), min(c, ch + size // 2 + 1)
        s = (x[..., lo:hi] ** 2).sum(-1)
        out[..., ch] = x[..., ch] / (k + alpha / size * s) ** beta
    return out


@pytest.mark.parametrize("c", [1, 3, 8, 17])
@pytest.mark.parametrize("params", [(5, 1e-4, 0.75, 2.0), (3, 0.5, 0.5, 1.0), (4, 1e-2, 0.75, 1.0)])
def test_lrn_matches_reference(c, params):
    x = np.random.default_rng(c).normal(scale=20.0, size=(2, 3, 4, c)).astype(np.float32)
    got = local_response_norm(jnp.asarray(x), *params)
    assert got.shape == x.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _np_lrn(x, *params), rtol=1e-5, atol=1e-6)


def test_lrn_bfloat16():
    x = np.random.default_rng(0).normal(scale=30.0, size=(2, 5, 16)).astype(np.float32)
    got = local_response_norm(jnp.asarray(x, jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(got, np.float32), _np_lrn(x, 5, 1e-4, 0.75, 2.0), rtol=2e-2, atol=1e-2
    )


# ---------------------------------------------------------------- fast layers vs plain layers


def _plain_trunk(params, x, arch, width):
    """The trunk written with nn.Conv's op and reduce_window pools (the layers the fast
    ones replace): lax.conv_general_dilated on the 3-channel input, -inf padded pools."""
    from spp_jax.models import ConvSpec, LRNSpec, PoolSpec, layer_specs, local_response_norm

    n = 0
    for spec in layer_specs(arch, width=width):
        if isinstance(spec, ConvSpec):
            n += 1
            p = params[f"conv{n}"]
            x = jax.lax.conv_general_dilated(
                x,
                p["kernel"],
                (spec.stride,) * 2,
                ((spec.pad, spec.pad),) * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            x = jax.nn.relu(x + p["bias"].reshape(1, 1, 1, -1))
        elif isinstance(spec, PoolSpec):
            pads = [
                (0, max(0, (spec.out_size(m) - 1) * spec.stride + spec.window - m))
                for m in x.shape[1:3]
            ]
            x = jax.lax.reduce_window(
                x,
                -jnp.inf,
                jax.lax.max,
                (1, spec.window, spec.window, 1),
                (1, spec.stride, spec.stride, 1),
                ((0, 0), *pads, (0, 0)),
            )
        else:
            assert isinstance(spec, LRNSpec)
            x = local_response_norm(x, spec.size, spec.alpha, spec.beta, spec.k)
    return x


@pytest.mark.parametrize("arch", ["zf5", "convnet5", "overfeat5"])
@pytest.mark.usefixtures("impl")
def test_fast_trunk_layers_equal_the_plain_layers(arch):
    # ReLU maps tie at 0 a lot: the pools' gradients must pick the same cell as
    # select_and_scatter's. Values and gradients agree to float rounding (the first
    # conv's XLA forward pads the channels to 4; oneDNN sums in another order: measured
    # at most 7.4e-7 of each gradient's largest entry).
    trunk = ConvTrunk(arch, width=0.125)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 71, 64, 3)), jnp.float32)
    params = trunk.init(jax.random.key(0), x)["params"]
    fmap, _ = jax.jit(trunk.apply)({"params": params}, x)
    want = jax.jit(functools.partial(_plain_trunk, arch=arch, width=0.125))(params, x)
    np.testing.assert_allclose(np.asarray(fmap), np.asarray(want), rtol=1e-5, atol=1e-5)

    cot = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape), jnp.float32)
    loss_fast = lambda p: jnp.sum(trunk.apply({"params": p}, x)[0] * cot)
    loss_plain = lambda p: jnp.sum(_plain_trunk(p, x, arch, 0.125) * cot)
    g_fast, g_plain = jax.jit(jax.grad(loss_fast))(params), jax.jit(jax.grad(loss_plain))(params)
    for name in g_plain:
        for k in ("kernel", "bias"):
            want_g = np.asarray(g_plain[name][k])
            np.testing.assert_allclose(
                np.asarray(g_fast[name][k]),
                want_g,
                rtol=1e-5,
                atol=3e-6 * np.abs(want_g).max(),
                err_msg=f"{name}/{k}",
            )
