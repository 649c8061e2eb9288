import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from tests.roi_reference import ref_project, ref_roi_grad, ref_roi_pool

# Tests marked usefixtures("impl") run twice: with the compiled CPU kernels and with
# the pure-JAX code (what GPU and TPU run), see conftest.py.

LEVELS = (3, (2, 1), 1)
# Inside, half-pixel coordinates (rounding), partly and fully outside the image,
# zero-size, inverted, the whole image and more.
BOXES = np.array(
    [
        [0, 0, 100, 80],
        [8.5, 7.5, 40.5, 23.5],
        [24.0, 8.0, 56.0, 40.0],
        [50, 40, 60, 45],
        [170, 140, 200, 150],
        [300, 300, 400, 400],
        [30, 20, 10, 5],
        [-20, -20, 500, 500],
        [16, 16, 16, 16],
    ],
    np.float32,
)
BOX_B = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0])


def _features(seed=0, shape=(2, 9, 11, 3)):
    # Small integers: many ties, so gradient routing is tested for real.
    return np.round(np.random.default_rng(seed).standard_normal(shape) * 2).astype(np.float32)


@pytest.fixture(scope="module")
def pool_fns(impl):
    def pool(f, b, idx, valid, projection, mode):
        return spp_jax.roi_pyramid_pool(
            f, b, idx, levels=LEVELS, projection=projection, mode=mode, valid=valid
        )

    fwd = jax.jit(pool, static_argnums=(4, 5))
    grad = jax.jit(
        jax.grad(lambda f, b, idx, valid, cot, p: jnp.sum(pool(f, b, idx, valid, p, "max") * cot)),
        static_argnums=5,
    )
    return fwd, grad


@pytest.mark.parametrize("projection", ["sppnet", "roi_pool"])
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.usefixtures("impl")
def test_matches_reference(pool_fns, projection, mode):
    x = _features()
    y = pool_fns[0](x, BOXES, BOX_B, None, projection, mode)
    want, _ = ref_roi_pool(x, BOXES, BOX_B, LEVELS, 1 / 16, projection, mode)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projection", ["sppnet", "roi_pool"])
@pytest.mark.usefixtures("impl")
def test_max_gradient_routes_to_first_max(pool_fns, projection):
    x = _features(1)
    want, wins = ref_roi_pool(x, BOXES, BOX_B, LEVELS, 1 / 16, projection)
    cot = np.random.default_rng(2).standard_normal(want.shape).astype(np.float32)
    g = pool_fns[1](x, BOXES, BOX_B, None, cot, projection)
    np.testing.assert_allclose(np.asarray(g), ref_roi_grad(x, wins, cot), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projection", ["sppnet", "roi_pool"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.usefixtures("impl")
def test_many_channels_max_and_gradient(projection, batch):
    # 83 = 64 + 16 + 3 channels: every vector block of the CPU kernel and its tail.
    x = _features(13, (batch, 9, 11, 83))
    idx = BOX_B % batch
    levels = (6, 3, 2, 1)
    want, wins = ref_roi_pool(x, BOXES, idx, levels, 1 / 16, projection)
    cot = np.random.default_rng(14).standard_normal(want.shape).astype(np.float32)

    def pool(f):
        return spp_jax.roi_pyramid_pool(f, BOXES, idx, levels=levels, projection=projection)

    np.testing.assert_allclose(np.asarray(pool(x)), want, rtol=1e-6, atol=1e-6)
    g = jax.jit(jax.grad(lambda f: jnp.sum(pool(f) * cot)))(x)
    np.testing.assert_allclose(np.asarray(g), ref_roi_grad(x, wins, cot), rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("impl")
def test_padding_rows_give_zeros_and_no_gradient(pool_fns):
    x = _features(3)
    valid = np.array([True, False] * 4 + [True])
    y = np.asarray(pool_fns[0](x, BOXES, BOX_B, valid, "sppnet", "max"))
    assert not y[~valid].any()
    cot = np.ones(y.shape, np.float32)
    cot[valid] = 0.0  # only padding rows get a cotangent
    assert not np.asarray(pool_fns[1](x, BOXES, BOX_B, valid, cot, "sppnet")).any()


def test_projection_hand_cases():
    b = np.array([[0.0, 0.0, 160.0, 100.0], [17.0, 31.0, 15.0, 33.0], [8.0, 8.0, 8.0, 8.0]])
    got = spp_jax.project_boxes(b, 1 / 16, "sppnet", (38, 50)).tolist()
    # left = floor(0/16)+1 = 1, right = ceil(160/16)-1 = 9, bottom = ceil(100/16)-1 = 6
    assert got[0] == [1, 1, 9, 6]
    # inverted: left 2 > right 0 -> both floor((2+0)/2) = 1; top 2 <= bottom 2
    assert got[1] == [1, 2, 1, 2]
    # a point: left 1 > right 0 -> 0
    assert got[2] == [0, 0, 0, 0]
    for box in b:
        assert (
            ref_project(box, 1 / 16, "sppnet", 38, 50) == got[list(map(tuple, b)).index(tuple(box))]
        )
    # roi_pool rounds halves away from zero (jnp.round would give 0 and 2 here).
    half = np.array([[8.0, 40.0, -8.0, 24.0]])  # * 1/16 -> 0.5, 2.5, -0.5, 1.5
    assert spp_jax.project_boxes(half, 1 / 16, "roi_pool").tolist() == [[1, 3, -1, 2]]
    # a stride that is not a power of two, box edges exactly on cell boundaries
    assert spp_jax.project_boxes(
        [[24.0, 36.0, 48.0, 60.0]], 1 / 12, "sppnet", (20, 20)
    ).tolist() == [[3, 4, 3, 4]]


@pytest.mark.usefixtures("impl")
def test_no_boxes_or_no_channels_give_empty_outputs():
    f = _features()
    y = spp_jax.roi_pyramid_pool(f, np.zeros((0, 4), np.float32), levels=LEVELS)
    assert y.shape == (0, 3 * (9 + 2 + 1))
    g = jax.grad(lambda f: spp_jax.roi_pyramid_pool(f, np.zeros((0, 4), np.float32)).sum())(f)
    assert g.shape == f.shape and not np.asarray(g).any()
    assert spp_jax.roi_pyramid_pool(f[..., :0], BOXES, BOX_B, levels=LEVELS).shape == (9, 0)


@pytest.mark.usefixtures("impl")
def test_nan_boxes_do_not_crash():
    x = _features(4)
    b = np.array([[np.nan, 0, 50, np.nan], [0, 0, 50, 50]], np.float32)
    y = spp_jax.roi_pyramid_pool(x, b, levels=(2, 1))
    assert np.isfinite(np.asarray(y)).all()  # NaN coordinates count as 0


def test_select_scales_hand_cases():
    image = (480, 640)
    boxes = np.array([[0, 0, 100, 100], [0, 0, 224, 224], [0, 0, 480, 640], [0, 0, 1, 1]])
    # 100px box: area 1e4 * (s/480)^2 closest to 224^2 at s=1200 (index 4);
    # 224px box: exactly at s=480 (index 0); whole image: smallest scale; tiny: largest.
    assert spp_jax.select_scales(boxes, image).tolist() == [4, 0, 0, 4]
    assert spp_jax.select_scales([[0, 0, 300, 300]], image, scales=(360, 480)).tolist() == [0]
    with pytest.raises(ValueError, match=r"image_size.*\(0, 640\)"):
        spp_jax.select_scales(boxes, (0, 640))
    # NumPy boxes are computed in float64 on the host, JAX boxes in float32 under jit;
    # both rules give the same indices on these boxes.
    for rule in ("paper", "code"):
        host = spp_jax.select_scales(boxes, image, rule=rule)
        traced = jax.jit(lambda b, rule=rule: spp_jax.select_scales(b, image, rule=rule))(
            jnp.asarray(boxes, jnp.float32)
        )
        assert isinstance(host, np.ndarray) and isinstance(traced, jax.Array)
        assert host.tolist() == np.asarray(traced).tolist()
    with pytest.raises(ValueError, match=r"'nope'.*paper"):
        spp_jax.select_scales(boxes, image, rule="nope")


@pytest.mark.usefixtures("impl")
def test_multiscale_pools_each_box_at_its_scale():
    image = (96, 128)
    scales = (96, 192)
    feats = [_features(5, (1, 6, 8, 2)), _features(6, (1, 12, 16, 2))]
    boxes = np.array([[0, 0, 64, 48], [16, 16, 40, 40]], np.float32)
    idx = np.array([1, 0])
    y = spp_jax.multiscale_roi_pyramid_pool(feats, boxes, idx, image, scales, levels=(2, 1))
    for r, k in enumerate(idx):
        want = spp_jax.roi_pyramid_pool(
            feats[k], boxes[r : r + 1] * (scales[k] / 96), levels=(2, 1)
        )
        np.testing.assert_array_equal(np.asarray(y[r]), np.asarray(want[0]))
    # The same scales as per-image factors (fy, fx).
    factors = [np.full((1, 2), s / 96, np.float32) for s in scales]
    y2 = spp_jax.multiscale_roi_pyramid_pool(feats, boxes, idx, factors=factors, levels=(2, 1))
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    with pytest.raises(ValueError, match=r"image_size.*or factors"):
        spp_jax.multiscale_roi_pyramid_pool(feats, boxes, idx, image, factors=factors)


@pytest.mark.parametrize("projection", ["sppnet", "roi_pool"])
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.usefixtures("impl")
def test_valid_sizes_pool_as_the_unpadded_maps(projection, mode):
    # Element 1 is a 6 x 8 map zero-padded to 9 x 11: with valid_sizes its windows are
    # projected onto (and clipped by) the 6 x 8 region, as if the map were unpadded.
    x = _features(20)
    x[1, 6:], x[1, :, 8:] = 0.0, 0.0
    sizes = np.array([[9, 11], [6, 8]], np.int32)
    kw = {"levels": LEVELS, "projection": projection, "mode": mode}

    def pool(f):
        return spp_jax.roi_pyramid_pool(f, BOXES, BOX_B, valid_sizes=sizes, **kw)

    got = jax.jit(pool)(x)
    cot = np.random.default_rng(21).standard_normal(got.shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda f: jnp.sum(pool(f) * cot)))(x)
    for b, (h, w) in enumerate(sizes):
        rows = np.equal(BOX_B, b)
        alone = x[b : b + 1, :h, :w]

        def pool_alone(f, rows=rows):
            return spp_jax.roi_pyramid_pool(f, BOXES[rows], **kw)

        want = pool_alone(alone)
        np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(want), rtol=1e-6, atol=1e-6)
        if mode == "max":
            g = jax.grad(lambda f, rows=rows: jnp.sum(pool_alone(f) * cot[rows]))(alone)
            np.testing.assert_allclose(  # sums of cotangents: float rounding only
                np.asarray(grad)[b, :h, :w], np.asarray(g)[0], rtol=1e-5, atol=1e-5
            )
            assert not np.asarray(grad)[b, h:].any() and not np.asarray(grad)[b, :, w:].any()


@pytest.mark.parametrize("projection", ["sppnet", "roi_pool"])
@pytest.mark.usefixtures("impl")
def test_projected_cells_pool_as_their_pixel_boxes(projection):
    x = _features(22)
    size = None if projection == "roi_pool" else (9, 11)
    cells = spp_jax.project_boxes(BOXES, 1 / 16, projection, size)
    kw = {"levels": LEVELS, "projection": projection}
    want = spp_jax.roi_pyramid_pool(x, BOXES, BOX_B, **kw)
    got = jax.jit(lambda c: spp_jax.roi_pyramid_pool(x, c, BOX_B, projected=True, **kw))(cells)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    if projection == "sppnet":
        # Cells outside the map are clamped into it, an empty window collapsed.
        wild = np.array([[-3, 2, 40, 1], [20, 20, 30, 30]], np.int32)
        kept = np.array([[0, 1, 10, 1], [10, 8, 10, 8]], np.int32)
        np.testing.assert_array_equal(
            np.asarray(spp_jax.roi_pyramid_pool(x, wild, projected=True, **kw)),
            np.asarray(spp_jax.roi_pyramid_pool(x, kept, projected=True, **kw)),
        )


@pytest.mark.usefixtures("impl")
def test_one_compile_for_many_box_sets():
    traces = []

    @jax.jit
    def f(x, b):
        traces.append(1)
        return spp_jax.roi_pyramid_pool(x, b, levels=(2, 1))

    x = _features(7)
    for seed in range(3):
        b = np.random.default_rng(seed).uniform(0, 150, (5, 4)).astype(np.float32)
        jax.block_until_ready(f(x, b))
    assert len(traces) == 1


@pytest.mark.usefixtures("impl")
def test_nchw_and_channel_major_match_nhwc():
    x = _features(8)
    y = spp_jax.roi_pyramid_pool(x, BOXES, BOX_B, levels=(2,), channel_major=True)
    y2 = spp_jax.roi_pyramid_pool(
        np.transpose(x, (0, 3, 1, 2)), BOXES, BOX_B, levels=(2,), data_format="NCHW"
    )
    r = BOXES.shape[0]
    np.testing.assert_array_equal(
        np.asarray(y).reshape(r, 3, 2, 2), np.asarray(y2).reshape(r, 2, 2, 3).transpose(0, 3, 1, 2)
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"boxes": np.zeros((3, 5), np.float32)}, ValueError, r"\(R, 4\).*\(3, 5\)"),
        ({"box_indices": np.array([0, 2, 0])}, ValueError, r"\[0, 2\).*\[2\]"),
        ({"box_indices": np.array([0, 1])}, ValueError, r"\(3,\)"),
        ({"projection": "crop"}, ValueError, "'crop'"),
        ({"mode": "median"}, ValueError, "'median'"),
        ({"valid": np.ones(2, bool)}, ValueError, r"\(3,\)"),
        ({"spatial_scale": 0.0}, ValueError, "spatial_scale.*0.0"),
        ({"levels": ()}, ValueError, "empty"),
        ({"valid_sizes": np.array([[5, 5]])}, ValueError, r"valid_sizes.*\(2, 2\).*\(1, 2\)"),
        ({"valid_sizes": np.ones((2, 2), np.float32)}, TypeError, "valid_sizes.*float32"),
    ],
)
def test_errors(kwargs, error, match):
    args = {"features": _features(9), "boxes": BOXES[:3], "box_indices": None}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        spp_jax.roi_pyramid_pool(
            args.pop("features"), args.pop("boxes"), args.pop("box_indices"), **args
        )


@pytest.mark.usefixtures("impl")
def test_modules_in_a_tiny_detector_head():
    boxes = jnp.asarray(BOXES[:4])
    idx = jnp.asarray(BOX_B[:4])
    labels = jnp.array([0, 1, 2, 0])

    class Head(nn.Module):
        @nn.compact
        def __call__(self, img):
            f = nn.relu(nn.Conv(4, (3, 3), strides=16)(img))  # stride 16 like SPP-net
            v = spp_jax.linen.RoIPyramidPooling(levels=(2, 1))(f, boxes, idx)
            return nn.Dense(3)(v)

    imgs = jnp.ones((2, 144, 176, 3))
    head = Head()
    params = head.init(jax.random.key(0), imgs)

    @jax.jit
    def loss(p):
        logits = head.apply(p, imgs)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    grads = jax.grad(loss)(params)
    assert np.isfinite(loss(params))
    assert float(jnp.abs(grads["params"]["Conv_0"]["kernel"]).sum()) > 0

    layer = spp_jax.nnx.RoIPyramidPooling((2, 1))
    f = jnp.asarray(_features(10))
    np.testing.assert_array_equal(
        np.asarray(layer(f, boxes, idx)),
        np.asarray(spp_jax.roi_pyramid_pool(f, boxes, idx, levels=(2, 1))),
    )
    with pytest.raises(ValueError, match="'crop'"):
        spp_jax.nnx.RoIPyramidPooling(projection="crop")


@pytest.mark.usefixtures("impl")
def test_torchvision_roi_pool_parity_if_available():
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    x = _features(11, (2, 13, 17, 3))
    boxes = np.concatenate([BOXES, np.array([[3.5, 2.5, 150.5, 170.5], [0, 0, 0, 0]])]).astype(
        np.float32
    )
    idx = np.concatenate([BOX_B, [1, 0]])
    xt = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy()).requires_grad_(True)
    rois = torch.from_numpy(np.concatenate([idx[:, None], boxes], 1).astype(np.float32))
    for n in (1, 2, 3, 6, 7):
        want = tv_ops.roi_pool(xt, rois, (n, n), 1 / 16)
        cot = np.random.default_rng(n).standard_normal(tuple(want.shape)).astype(np.float32)
        (g_want,) = torch.autograd.grad(want, xt, torch.from_numpy(cot))

        def pool(f, n=n):
            return spp_jax.roi_pyramid_pool(
                f, boxes, idx, levels=(n,), projection="roi_pool", channel_major=True
            )

        y = pool(jnp.asarray(x))
        np.testing.assert_array_equal(np.asarray(y), want.detach().numpy().reshape(len(boxes), -1))
        g = jax.grad(lambda f, cot=cot, pool=pool: jnp.sum(pool(f) * cot.reshape(len(boxes), -1)))(
            jnp.asarray(x)
        )
        np.testing.assert_array_equal(np.asarray(g), np.transpose(g_want.numpy(), (0, 2, 3, 1)))


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.usefixtures("impl")
def test_bfloat16_features(mode):
    x = _features(12)  # small integers: exact in bfloat16
    y16 = spp_jax.roi_pyramid_pool(
        jnp.asarray(x, jnp.bfloat16), BOXES, BOX_B, levels=(2, 1), mode=mode
    )
    y32 = spp_jax.roi_pyramid_pool(x, BOXES, BOX_B, levels=(2, 1), mode=mode)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=1e-2, atol=1e-2)


@pytest.mark.usefixtures("impl")
def test_valid_sizes_and_projected_compose_with_transformations():
    # jvp, grad-of-grad (check_grads order 2, both modes) and vmap with the valid-region
    # and projected-cells arguments, on generic inputs (distinct values: no ties).
    from jax.test_util import check_grads

    x = jnp.asarray(np.random.default_rng(23).standard_normal((2, 9, 11, 3)), jnp.float32)
    sizes = np.array([[9, 11], [6, 8]], np.int32)
    cells = spp_jax.project_boxes(BOXES, 1 / 16, "sppnet", (6, 8))

    def pool(f):
        a = spp_jax.roi_pyramid_pool(f, BOXES, BOX_B, levels=LEVELS, valid_sizes=sizes)
        b = spp_jax.roi_pyramid_pool(f, cells, BOX_B, levels=LEVELS, projected=True)
        return jnp.concatenate([a, b], axis=1)

    check_grads(pool, (x,), order=2, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)
    batched = jax.vmap(pool)(jnp.stack([x, 2.0 * x]))
    np.testing.assert_array_equal(np.asarray(batched[1]), np.asarray(pool(2.0 * x)))
    np.testing.assert_array_equal(np.asarray(batched[0]), np.asarray(pool(x)))
