"""Feature-pyramid RoIAlign and its level mapping against NumPy references of
torchvision's ``MultiScaleRoIAlign`` (and torchvision itself where it is installed)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from spp_jax import roi_align
from spp_jax.detection import fpn_levels, fpn_scales, multiscale_roi_align
from tests import align_reference as ref

# name: (image sizes, map sizes finest first, canonical_scale, canonical_level)
PYRAMIDS = {
    # torchvision's defaults; strides 16 to 128 (levels 4 to 7), two image sizes
    "default": ([(448, 512), (400, 480)], [(28, 32), (14, 16), (7, 8), (4, 4)], 224, 4),
    # strides 4 to 32 (levels 2 to 5), a small canonical box
    "small": ([(64, 80)], [(16, 20), (8, 10), (4, 5), (2, 3)], 32, 4),
}


def _pyramid_boxes(seed: int, s0: float, k0: int, k_min: int, k_max: int) -> np.ndarray:
    """Boxes of every level, clamped ones below and above, sides exactly ``s0 * 2**j``,
    a zero-area box and an inverted one."""
    rng = np.random.default_rng(seed)
    # sides from two levels below k_min to two above k_max (log-uniform)
    lo, hi = s0 * 2.0 ** (k_min - k0 - 2), s0 * 2.0 ** (k_max - k0 + 2)
    side = np.exp(rng.uniform(np.log(lo), np.log(hi), 16))
    aspect = rng.uniform(0.5, 2, 16)
    wh = np.stack([side * aspect, side / aspect], 1)
    exact = s0 * 2.0 ** np.arange(k_min - k0 - 1, k_max - k0 + 2)
    wh = np.concatenate([wh, np.stack([exact, exact], 1)])
    xy = rng.uniform(-8, s0, (len(wh), 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    edge = [[5, 6, 5, 20], [30, 10, 20, 40]]  # zero width; one side inverted
    return np.concatenate([boxes, edge]).astype(np.float32)


def _case(name: str, seed: int = 0, c: int = 3):
    images, maps, s0, k0 = PYRAMIDS[name]
    rng = np.random.default_rng(seed)
    feats = [rng.standard_normal((2, h, w, c)).astype(np.float32) for h, w in maps]
    scales = ref.fpn_scales(maps, images)
    k_min, k_max = round(-np.log2(scales[0])), round(-np.log2(scales[-1]))
    boxes = _pyramid_boxes(seed, s0, k0, k_min, k_max)
    idx = (np.arange(len(boxes)) % 2).astype(np.int32)
    return feats, boxes, idx, images, s0, k0, k_min, k_max


def _nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _close(got, want, rtol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    scale = max(np.abs(want).max(), 1e-6)
    np.testing.assert_array_less(np.abs(got - want).max() / scale, rtol)


@functools.cache
def _jitted(images: tuple, **kw):
    return jax.jit(functools.partial(multiscale_roi_align, image_sizes=images, **kw))


# ---------------------------------------------------------------------------
# The level mapper and the scales


@pytest.mark.parametrize("name", sorted(PYRAMIDS))
def test_boxes_hit_every_level_and_the_clamps(name):
    """The test boxes reach every level, and fall below k_min and above k_max before
    the clamp (so the other tests cover each)."""
    _, boxes, _, _, s0, k0, k_min, k_max = _case(name)
    raw = ref.fpn_levels(boxes, -100, 100, s0, k0) - 100  # unclamped levels
    got = np.asarray(fpn_levels(boxes, k_min, k_max, s0, k0))
    assert set(got[:-1]) == set(range(k_max - k_min + 1)) and got[-1] == -1
    assert (raw[:-1] < k_min).any() and (raw[:-1] > k_max).any()


@pytest.mark.parametrize("name", sorted(PYRAMIDS))
@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_fpn_levels_equal_reference(name, eps):
    _, boxes, _, _, s0, k0, k_min, k_max = _case(name, seed=1)
    rng = np.random.default_rng(2)
    more = rng.uniform(0, 3 * s0, (500, 4)).astype(np.float32)  # many inverted
    boxes = np.concatenate([boxes, more])
    got = fpn_levels(boxes, k_min, k_max, s0, k0, eps)
    np.testing.assert_array_equal(got, ref.fpn_levels(boxes, k_min, k_max, s0, k0, eps))


def test_exact_powers_of_two_stay_on_their_level():
    """A box of side 224 * 2**j is on level 4 + j (eps keeps it off the level below)."""
    sides = 224.0 * 2.0 ** np.arange(-3, 4)
    boxes = np.stack([np.zeros(7), np.zeros(7), sides, sides], 1)
    np.testing.assert_array_equal(fpn_levels(boxes, 0, 10), 4 + np.arange(-3, 4))
    just_below = boxes * np.float32(1 - 1e-5)
    np.testing.assert_array_equal(fpn_levels(just_below, 0, 10), 3 + np.arange(-3, 4))


def test_fpn_levels_equal_torchvision():
    torch = pytest.importorskip("torch")
    poolers = pytest.importorskip("torchvision.ops.poolers")
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 500, (4000, 2))
    wh = np.exp(rng.uniform(np.log(1), np.log(2000), (4000, 2)))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    boxes = np.concatenate([boxes, _case("default")[1]])
    for k_min, k_max in [(2, 5), (4, 7), (3, 3)]:
        want = poolers.LevelMapper(k_min, k_max)([torch.from_numpy(boxes)]).numpy()
        got = np.asarray(fpn_levels(boxes, k_min, k_max))
        no_level = got == -1  # torchvision's NaN cast: an index beyond every map
        assert no_level.sum() == 1
        assert not (0 <= want[no_level] <= k_max - k_min).any()
        np.testing.assert_array_equal(got[~no_level], want[~no_level])


@pytest.mark.parametrize(
    ("images", "maps"),
    [
        ([(800, 1216), (704, 1000)], [(200, 304), (100, 152), (50, 76), (25, 38), (13, 19)]),
        ([(600, 1000)], [(38, 63), (19, 32)]),
        ([(33, 47)], [(66, 94), (33, 47), (17, 24), (9, 12), (5, 6), (3, 3), (2, 2)]),
        ([(100, 30), (20, 300)], [(7, 3), (3, 1)]),  # only the largest height counts
    ],
)
def test_fpn_scales_equal_torchvision(images, maps):
    want = ref.fpn_scales(maps, images)
    assert fpn_scales(maps, images) == tuple(want)
    torch = pytest.importorskip("torch")
    poolers = pytest.importorskip("torchvision.ops.poolers")
    feats = [torch.zeros(1, 1, h, w) for h, w in maps]
    scales, _ = poolers._setup_scales(feats, images, 224, 4)
    assert fpn_scales(maps, images) == tuple(scales)


# ---------------------------------------------------------------------------
# The pooling


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("name", sorted(PYRAMIDS))
def test_multiscale_roi_align_equals_reference(name, sampling_ratio):
    feats, boxes, idx, images, s0, k0, _, _ = _case(name, seed=4)
    fn = _jitted(tuple(images), output_size=(3, 2), sampling_ratio=sampling_ratio,
                 canonical_scale=s0, canonical_level=k0)  # fmt: skip
    got = fn(feats, boxes, idx)
    want = ref.multiscale_roi_align(
        [_nchw(f) for f in feats], boxes, idx, images, 3, 2, sampling_ratio, s0, k0
    )
    _close(got, want.transpose(0, 2, 3, 1))
    assert not np.any(np.asarray(got)[-1])  # the inverted box: no level


@pytest.mark.parametrize("name", sorted(PYRAMIDS))
def test_multiscale_roi_align_equals_torchvision(name):
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    feats, boxes, idx, images, s0, k0, _, _ = _case(name, seed=5)
    names = [f"p{i}" for i in range(len(feats))]
    pooler = tv.ops.MultiScaleRoIAlign(names, 3, 2, canonical_scale=s0, canonical_level=k0)
    xt = [torch.from_numpy(_nchw(f)).requires_grad_() for f in feats]
    per_image = [torch.from_numpy(boxes[idx == i]) for i in range(2)]
    want = pooler(dict(zip(names, xt, strict=True)), per_image, images)
    order = np.argsort(idx, kind="stable")  # torchvision's rows: image 0's boxes, then 1's
    cot = np.random.default_rng(6).standard_normal(want.shape).astype(np.float32)
    (want * torch.from_numpy(cot)).sum().backward()

    def loss(maps):
        out = multiscale_roi_align(maps, boxes[order], idx[order], images, output_size=3,
                                   sampling_ratio=2, canonical_scale=s0, canonical_level=k0,
                                   data_format="NCHW")  # fmt: skip
        return jnp.sum(out * cot), out

    grads, got = jax.jit(jax.grad(loss, has_aux=True))([jnp.asarray(_nchw(f)) for f in feats])
    _close(got, want.detach().numpy())
    for g, t in zip(grads, xt, strict=True):
        _close(g, t.grad.numpy())


def test_one_map_is_roi_align_at_its_scale():
    """One map: no level mapping (the inverted box is pooled too), as in torchvision."""
    feats, boxes, idx, _, _, _, _, _ = _case("small", seed=7)
    got = _jitted(((64, 80),), output_size=2, sampling_ratio=-1)(feats[1:2], boxes, idx)
    want = jax.jit(functools.partial(roi_align, output_size=2, spatial_scale=1 / 8,
                                     sampling_ratio=-1))(feats[1], boxes, idx)  # fmt: skip
    np.testing.assert_array_equal(got, want)
    assert np.any(np.asarray(got)[-1])
    torch = pytest.importorskip("torch")
    tv = pytest.importorskip("torchvision")
    pooler = tv.ops.MultiScaleRoIAlign(["p"], 2, -1)
    per_image = [torch.from_numpy(boxes[idx == i]) for i in range(2)]
    theirs = pooler({"p": torch.from_numpy(_nchw(feats[1]))}, per_image, [(64, 80)])
    order = np.argsort(idx, kind="stable")
    _close(np.asarray(got)[order], theirs.numpy().transpose(0, 2, 3, 1))


def test_valid_padding_and_jit_reuse():
    feats, boxes, idx, images, s0, k0, _, _ = _case("small", seed=8)
    feats = feats[:2]  # levels 2 and 3 (a cheaper program)
    valid = np.arange(len(boxes)) % 3 != 1
    fn = _jitted(tuple(images), output_size=2, sampling_ratio=2, canonical_scale=s0,
                 canonical_level=k0)  # fmt: skip
    full = np.asarray(fn(feats, boxes, idx))
    padded = np.asarray(fn(feats, boxes, idx, valid=valid))
    assert not padded[~valid].any()
    np.testing.assert_array_equal(padded[valid], full[valid])
    fn(feats, boxes[::-1].copy(), idx)
    assert fn._cache_size() == 2  # new box values reuse the program (valid given or not)

    gb = jax.grad(lambda b: jnp.sum(fn(feats, b, idx, valid=valid) ** 2))(jnp.asarray(boxes))
    assert np.all(np.isfinite(gb)) and not np.asarray(gb)[~valid].any()


def _zeros(side: int, c: int) -> np.ndarray:
    return np.zeros((1, side, side, c), np.float32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(features=[]), ValueError, "non-empty list"),
        (dict(features=np.zeros((1, 8, 8, 2), np.float32)), ValueError, "non-empty list"),
        (dict(features=[_zeros(8, 2), _zeros(4, 3)]), ValueError, "same batch size and channels"),
        (dict(features=[_zeros(4, 2), _zeros(8, 2)]), ValueError, "finest map to the coarsest"),
        (dict(features=[np.zeros((8, 8, 2), np.float32)]), ValueError, r"features\[0\]"),
        (dict(image_sizes=[]), ValueError, "one image size"),
        (dict(image_sizes=[(32, 0)]), ValueError, r"\(32, 0\)"),
        (dict(image_sizes=[(32.0, 32)]), ValueError, "positive ints"),
        (dict(valid=np.array([1, 0])), TypeError, "valid"),
        (dict(data_format="HWC"), ValueError, "data_format"),
        (dict(output_size=0), ValueError, "output_size"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    args = dict(
        features=[_zeros(8, 2), _zeros(4, 2)],
        boxes=np.zeros((2, 4), np.float32), box_indices=None, image_sizes=[(32, 32)],
        output_size=2, sampling_ratio=2,
    ) | kwargs  # fmt: skip
    with pytest.raises(error, match=match):
        multiscale_roi_align(**args)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((3, 2), ValueError, "k_min=3, k_max=2"),
        ((2.0, 5), TypeError, "k_min"),
        ((2, 5, -1), ValueError, "canonical_scale"),
    ],
)
def test_fpn_levels_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        fpn_levels(np.zeros((1, 4), np.float32), *args)


# ---------------------------------------------------------------------------
# Transformations and lowering


def _generic_case():
    """Two levels (strides 4 and 8) and boxes well inside one level each, with no sample
    on a cell boundary: finite differences stay on one branch."""
    rng = np.random.default_rng(11)
    feats = [jnp.asarray(rng.standard_normal((1, 8, 10, 2)), jnp.float32),
             jnp.asarray(rng.standard_normal((1, 4, 5, 2)), jnp.float32)]  # fmt: skip
    boxes = jnp.asarray([[3.3, 2.9, 14.1, 12.7], [5.1, 4.3, 33.7, 27.9]], jnp.float32)
    fn = functools.partial(multiscale_roi_align, box_indices=None, image_sizes=[(32, 40)],
                           output_size=2, sampling_ratio=2, canonical_scale=16,
                           canonical_level=3)  # fmt: skip
    return feats, boxes, fn


def test_multiscale_second_order_derivatives():
    feats, boxes, fn = _generic_case()
    levels = fpn_levels(boxes, 2, 3, canonical_scale=16, canonical_level=3)
    assert sorted(np.asarray(levels).tolist()) == [0, 1]  # one box per level

    def f(f0, f1, b):
        return fn([f0, f1], b)

    check = functools.partial(check_grads, order=2, modes=("fwd", "rev"),
                              eps=1e-3, atol=2e-2, rtol=2e-2)  # fmt: skip
    check(f, (*feats, boxes))
    assert jax.hessian(lambda b: jnp.sum(f(*feats, b) ** 2))(boxes).shape == (2, 4, 2, 4)


def test_multiscale_vmap_equals_a_loop():
    feats, boxes, fn = _generic_case()
    batch = [jnp.stack([f, 2 * f + 1]) for f in feats]
    bs = jnp.stack([boxes, boxes + 1.5])
    got = jax.vmap(lambda f0, f1, b: fn([f0, f1], b))(*batch, bs)
    for k in range(2):
        np.testing.assert_allclose(got[k], fn([f[k] for f in batch], bs[k]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampling_ratio,loops", [(2, 0), (-1, 2)])
def test_multiscale_lowers_without_custom_calls_or_box_loops(sampling_ratio, loops):
    maps = [jax.ShapeDtypeStruct((2, 16, 20, 8), jnp.float32),
            jax.ShapeDtypeStruct((2, 8, 10, 8), jnp.float32)]  # fmt: skip
    b = jax.ShapeDtypeStruct((30, 4), jnp.float32)
    i = jax.ShapeDtypeStruct((30,), jnp.int32)
    fn = jax.jit(lambda m, b, i: multiscale_roi_align(
        m, b, i, [(64, 80), (60, 70)], output_size=3, sampling_ratio=sampling_ratio,
        canonical_scale=32, canonical_level=3))  # fmt: skip
    text = jax.export.export(fn, platforms=("tpu", "cuda"))(maps, b, i).mlir_module()
    assert "stablehlo.custom_call" not in text
    # no loop over boxes; an adaptive grid's windows are one loop per level
    assert text.count("stablehlo.while") == loops
