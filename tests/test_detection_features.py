"""Detection features: conv5 per image and scale, windows pooled from padded maps, the
fine-tuning stacks, against the unpadded computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax.detection import features, finetune
from spp_jax.models import ConvTrunk


@pytest.fixture(scope="module")
def trunk():
    t = ConvTrunk(width=0.125)
    params = t.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))["params"]
    return t, params


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _boxes(h, w, n, seed=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, [w, h], (n, 2))
    wh = rng.uniform(4, [w, h], (n, 2))
    b = np.concatenate([xy, xy + wh], 1)
    b[:, 2:] = np.minimum(b[:, 2:], [w, h])
    b[0] = [w - 6, h - 5, w, h]  # a small window in the bottom-right corner
    return b.astype(np.float32)


@pytest.mark.parametrize("shape,scale", [((70, 93), 112), ((101, 64), 96), ((40, 40), 64)])
def test_padded_map_and_pooling_equal_the_unpadded_ones(trunk, shape, scale):
    t, params = trunk
    image = _image(*shape)
    m = features.Conv5Extractor(t, params, bucket=64)(image, scale)
    assert min(m.size) == scale
    x = features.resize(image, m.size)
    want = np.asarray(t.apply({"params": params}, x[None])[0])[0]
    np.testing.assert_allclose(m.fmap, want, rtol=1e-5, atol=1e-5)

    boxes = _boxes(*shape, 40)
    got = features.WindowPooler((3, 2, 1), t.total_stride).pool(m, boxes)
    fy, fx = m.factor
    ref = spp_jax.roi_pyramid_pool(
        jnp.asarray(want[None]),
        jnp.asarray(boxes * np.asarray([fx, fy, fx, fy], np.float32)),
        levels=(3, 2, 1),
        spatial_scale=1 / 16,
        projection="sppnet",
    )
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mode,channel_major", [("max", False), ("max", True), ("align", False), ("align", True)]
)
def test_fine_tuning_stacks_pool_what_inference_pools(trunk, mode, channel_major):
    # The training path (all images' maps stacked and padded, windows of many images at
    # their scales in one call) gives the test path's features (one image's map), in
    # the same layout.
    t, params = trunk
    ext = features.Conv5Extractor(t, params, bucket=32)
    pooler = features.WindowPooler((3, 2, 1), 16, channel_major=channel_major, mode=mode)
    images = [_image(60, 90, 1), _image(95, 70, 2), _image(50, 50, 3)]
    scales = (64, 96)
    maps = [[ext(im, s) for im in images] for s in scales]
    stacks = [finetune.stack_maps(m) for m in maps]
    rows, want = [], []
    for i, im in enumerate(images):
        boxes = _boxes(*im.shape[:2], 6, seed=i)
        for k in range(len(scales)):
            rows.append((boxes, i, k))
            want.append(pooler.pool(maps[k][i], boxes))
    boxes = np.concatenate([b for b, _, _ in rows])
    image = np.concatenate([np.full(len(b), i, np.int32) for b, i, _ in rows])
    scale = np.concatenate([np.full(len(b), k, np.int32) for b, _, k in rows])
    got = finetune.pool_stacks(
        stacks,
        jnp.asarray(boxes),
        jnp.asarray(image),
        jnp.asarray(scale),
        levels=(3, 2, 1),
        stride=16,
        channel_major=channel_major,
        mode=mode,
    )
    np.testing.assert_allclose(np.asarray(got), np.concatenate(want), rtol=1e-5, atol=1e-5)


def test_align_windows_equal_the_unpadded_maps_and_lay_out_levels_as_max_does():
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(5, 7, 3)).astype(np.float32)
    padded = features.pad_maps(fmap, 8, 12)
    boxes = jnp.asarray([[3.0, 5.0, 60.0, 41.0], [50.0, 30.0, 200.0, 150.0]], jnp.float32)
    kw = dict(levels=(2, 1), stride=16, valid_sizes=jnp.asarray([[5, 7]]), mode="align")
    got = features.pool_windows(jnp.asarray(padded[None]), boxes, **kw)
    want = features.pool_windows(jnp.asarray(fmap[None]), boxes, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # Level by level: roi_align of the window clipped to the valid region (7 x 5 cells).
    clipped = jnp.minimum(boxes, jnp.asarray([[112.0, 80.0, 112.0, 80.0]]))
    parts = [
        spp_jax.roi_align(
            jnp.asarray(fmap[None]), clipped, output_size=n, spatial_scale=1 / 16,
            sampling_ratio=features.ALIGN_SAMPLING_RATIO, aligned=True,
        ).reshape(2, -1)
        for n in (2, 1)
    ]  # fmt: skip
    np.testing.assert_allclose(np.asarray(want), np.concatenate(parts, 1), rtol=1e-6)
    with pytest.raises(ValueError, match=r"max.*align.*got 'avg'"):
        features.WindowPooler((2, 1), 16, mode="avg")


def test_mirrored_windows_pool_from_the_mirrored_image(trunk):
    t, params = trunk
    ext = features.Conv5Extractor(t, params, bucket=32)
    image = _image(60, 90, 4)
    maps = [[ext(image, 64), ext(image, 64, flip=True)]]
    sampler = finetune.WindowSampler(
        [_boxes(60, 90, 30)],
        [np.array([[10, 10, 50, 40]], np.float32)],
        [np.array([3])],
        [(60, 90)],
    )
    batch = sampler.sample(np.random.default_rng(0), 16, 0.25, flip=True)
    assert set(batch["image"].tolist()) <= {0, 1}
    got = finetune.pool_stacks(
        [finetune.stack_maps(maps[0])],
        jnp.asarray(batch["boxes"]),
        jnp.asarray(batch["image"]),
        jnp.asarray(batch["scale"]),
        levels=(2, 1),
        stride=16,
    )
    pooler = features.WindowPooler((2, 1), 16)
    for r in range(len(batch["label"])):
        want = pooler.pool(maps[0][batch["image"][r]], batch["boxes"][r : r + 1])
        np.testing.assert_allclose(np.asarray(got[r : r + 1]), want, rtol=1e-5, atol=1e-5)


def test_scale_rules():
    boxes = np.array([[0, 0, 40, 40], [0, 0, 200, 200], [0, 0, 100, 100]], np.float32)
    # Image short side 200: scale s multiplies areas by (s / 200)^2.
    got = features.assign_scales(boxes, (200, 300), (100, 200, 400), target=100)
    assert got.tolist() == [2, 0, 1]  # 40 -> 80 at 400; 200 -> 100 at 100; 100 at 200
    code = features.assign_scales(boxes, (200, 300), (100, 200, 400), target=100, rule="code")
    assert code.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"'nope'.*paper"):
        features.assign_scales(boxes, (200, 300), (100,), rule="nope")


def test_resized_size_caps_the_long_side():
    assert features.resized_size((375, 500), 688) == (688, 917)
    assert features.resized_size((300, 5000), 600, max_side=2000) == (120, 2000)
    with pytest.raises(ValueError, match="scale must be a positive int"):
        features.resized_size((10, 10), 0)
