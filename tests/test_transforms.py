"""Every JAX transformation of both ops, both implementations, max and avg, with and
without padding (``valid_sizes`` / ``valid``), against naive per-bin slicing
(``x[b, hs:he, ws:we].max((0, 1))``, which JAX differentiates natively).

One jitted function per case computes all transformations (and ``vmap`` of each),
so a case compiles twice: once for spp_jax, once for the naive reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax import geometry
from tests.reference import ref_max_grad
from tests.roi_reference import ref_bins as roi_ref_bins
from tests.roi_reference import ref_project

LEVELS = (3, 1)
SHAPE = (2, 5, 4, 2)  # odd, non-square; its 3 x 3 bins overlap
SIZES = np.array([[5, 4], [2, 3]])  # the second example smaller than the finest level
BOXES = np.array([[0, 0, 100, 90], [20, 10, 60, 50], [50, 40, 111, 95]], np.float32)
BOX_B = np.array([0, 1, 1])
VALID = np.array([True, False, True])
ROI_LEVELS = (2, 1)


def _tie_free(shape, seed):
    # A permutation: every value distinct, so every bin has one maximum.
    vals = np.random.default_rng(seed).permutation(int(np.prod(shape))).astype(np.float32)
    return jnp.asarray((vals / vals.size - 0.5).reshape(shape))


def _naive_spp(x, mode, sizes):
    outs = []
    for b in range(x.shape[0]):
        h, w = (x.shape[1], x.shape[2]) if sizes is None else (int(v) for v in sizes[b])
        parts = []
        for lb in geometry.pyramid_bins(h, w, LEVELS):
            for hs, he in lb.rows:
                for ws, we in lb.cols:
                    blk = x[b, hs:he, ws:we]
                    parts.append(blk.max((0, 1)) if mode == "max" else blk.mean((0, 1)))
        outs.append(jnp.stack(parts).reshape(-1))
    return jnp.stack(outs)


def _naive_roi(x, mode, projection, valid):
    h, w = x.shape[1], x.shape[2]
    outs = []
    for r, box in enumerate(BOXES):
        x1, y1, x2, y2 = ref_project(box, 1 / 16, projection, h, w)
        parts = []
        for n in ROI_LEVELS:
            for hs, he in roi_ref_bins(y1, y2, n, projection, h):
                for ws, we in roi_ref_bins(x1, x2, n, projection, w):
                    if he <= hs or we <= ws or (valid is not None and not valid[r]):
                        parts.append(jnp.zeros(x.shape[3], x.dtype))
                        continue
                    blk = x[BOX_B[r], hs:he, ws:we]
                    parts.append(blk.max((0, 1)) if mode == "max" else blk.mean((0, 1)))
        outs.append(jnp.stack(parts).reshape(-1))
    return jnp.stack(outs)


SECOND_ORDER = ("hessian", "grad_of_grad", "fwd_over_rev", "rev_over_fwd")


def _all_transforms(f, x, t, xs, ts, vmap_second_order=True):
    """Every transformation of f at x (tangent t), and vmap of each over xs, ts
    (of the first-order ones only if not ``vmap_second_order``: compile time)."""
    loss = lambda x: jnp.sum(jnp.sin(f(x)) ** 2)  # curved: nonzero second derivatives

    transforms = {
        "value": lambda x, t: f(x),
        "jvp": lambda x, t: jax.jvp(f, (x,), (t,))[1],
        "jacfwd": lambda x, t: jax.jacfwd(f)(x),
        "jacrev": lambda x, t: jax.jacrev(f)(x),
        "hessian": lambda x, t: jax.hessian(loss)(x),
        "grad_of_grad": lambda x, t: jax.grad(lambda x: jnp.sum(jax.grad(loss)(x) ** 2))(x),
        "fwd_over_rev": lambda x, t: jax.jvp(jax.grad(loss), (x,), (t,))[1],
        "rev_over_fwd": lambda x, t: jax.grad(lambda x: jnp.sum(jax.jvp(f, (x,), (t,))[1] ** 2))(x),
    }
    out = {k: fn(x, t) for k, fn in transforms.items()}
    out |= {
        f"vmap_{k}": jax.vmap(fn)(xs, ts)
        for k, fn in transforms.items()
        if vmap_second_order or k not in SECOND_ORDER
    }
    # vmap inside the transformation too: grad of a vmapped loss, jvp of vmap.
    out["grad_of_vmap"] = jax.grad(lambda xs: jnp.sum(jnp.sin(jax.vmap(f)(xs)) ** 2))(xs)
    out["jvp_of_vmap"] = jax.jvp(jax.vmap(f), (xs,), (ts,))[1]
    return out


_NAIVE: dict = {}  # naive results per case, shared by both implementations


def _compare(fast, naive, x, case, vmap_second_order=True):
    t = _tie_free(x.shape, 1)
    xs = jnp.stack([x, -x, _tie_free(x.shape, 2)])
    ts = jnp.stack([t, 2 * t, _tie_free(x.shape, 3)])
    every = functools.partial(_all_transforms, vmap_second_order=vmap_second_order)
    got = jax.jit(functools.partial(every, fast))(x, t, xs, ts)
    if case not in _NAIVE:
        _NAIVE[case] = jax.jit(functools.partial(every, naive))(x, t, xs, ts)
    want = _NAIVE[case]
    assert set(got) == set(want)
    for k in got:
        np.testing.assert_allclose(
            np.asarray(got[k]), np.asarray(want[k]), rtol=2e-5, atol=2e-6, err_msg=k
        )
    # The tests must be able to fail: the curved transforms are not all zero.
    assert float(jnp.abs(want["hessian"]).max()) > 0.01
    assert float(jnp.abs(want["grad_of_grad"]).max()) > 0.01


@pytest.mark.parametrize("padded", [False, True], ids=["full", "valid_sizes"])
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spatial_pyramid_pool_every_transformation(impl, mode, padded):
    if mode == "avg" and impl == "cpu_kernel":
        pytest.skip("average pooling never uses the CPU kernel: tested once, under 'jax'")
    sizes = SIZES if padded else None
    x = _tie_free(SHAPE, 0)
    fast = lambda x: spp_jax.spatial_pyramid_pool(x, LEVELS, mode=mode, valid_sizes=sizes)
    naive = lambda x: _naive_spp(x, mode, sizes)
    _compare(fast, naive, x, ("spp", mode, padded), vmap_second_order=not padded)


@pytest.mark.parametrize(
    ("mode", "projection", "padded"),
    [
        ("max", "sppnet", False),
        ("max", "sppnet", True),
        ("max", "roi_pool", False),  # empty bins: no value, no derivative
        ("avg", "sppnet", False),
        ("avg", "sppnet", True),
    ],
)
def test_roi_pyramid_pool_every_transformation(impl, mode, projection, padded):
    if mode == "avg" and impl == "cpu_kernel":
        pytest.skip("average pooling never uses the CPU kernel: tested once, under 'jax'")
    valid = VALID if padded else None
    x = _tie_free((2, 5, 6, 2), 4)

    def fast(x):
        return spp_jax.roi_pyramid_pool(
            x, BOXES, BOX_B, levels=ROI_LEVELS, projection=projection, mode=mode, valid=valid
        )

    naive = lambda x: _naive_roi(x, mode, projection, valid)
    _compare(fast, naive, x, (projection, mode, padded), vmap_second_order=not padded)


@pytest.mark.usefixtures("impl")
def test_tangents_follow_the_gradients_first_maximum_under_ties():
    # ReLU-like input: many zeros, so most bins tie. The tangent of each bin is
    # the tangent of its first maximum in row-major order (PyTorch's gradient
    # rule): <cot, jvp(t)> == <ref_max_grad(cot), t> for any cot and t.
    rng = np.random.default_rng(5)
    x = np.maximum(rng.integers(-3, 2, (2, 7, 6, 2)), 0).astype(np.float32)
    t = rng.standard_normal(x.shape).astype(np.float32)
    f = lambda x: spp_jax.spatial_pyramid_pool(x, LEVELS)
    tangent = jax.jit(lambda x, t: jax.jvp(f, (x,), (t,))[1])(x, t)
    jac_fwd, jac_rev = jax.jit(jax.jacfwd(f))(x), jax.jit(jax.jacrev(f))(x)
    np.testing.assert_array_equal(np.asarray(jac_fwd), np.asarray(jac_rev))
    for seed in range(3):
        cot = np.random.default_rng(seed).standard_normal(tangent.shape)
        want = np.vdot(ref_max_grad(x, LEVELS, cot), t)
        np.testing.assert_allclose(np.vdot(cot, np.asarray(tangent, np.float64)), want, rtol=1e-5)
    # And for windows: forward and reverse mode agree bin by bin.
    xr = np.maximum(rng.integers(-3, 2, (2, 6, 7, 2)), 0).astype(np.float32)
    g = lambda x: spp_jax.roi_pyramid_pool(x, BOXES, BOX_B, levels=ROI_LEVELS)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(jax.jacfwd(g))(xr)), np.asarray(jax.jit(jax.jacrev(g))(xr))
    )


def test_hessian_of_max_pooling_is_zero_like_reduce_window():
    x = _tie_free((1, 6, 6, 2), 6)
    f = lambda x: jnp.sum(spp_jax.spatial_pyramid_pool(x, (2, 1)))
    g = lambda x: jnp.sum(lax_max_pool(x))
    np.testing.assert_array_equal(np.asarray(jax.hessian(f)(x)), np.zeros((1, 6, 6, 2) * 2))
    np.testing.assert_array_equal(np.asarray(jax.hessian(g)(x)), np.zeros((1, 6, 6, 2) * 2))


def lax_max_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 3, 3, 1), "VALID")
