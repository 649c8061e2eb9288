"""spp_jax.conv.conv2d (oneDNN on CPU, XLA elsewhere) against lax.conv_general_dilated,
under every transformation, in both implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from spp_jax._cpu import conv

needs_onednn = pytest.mark.skipif(
    conv._load() is not None, reason=f"oneDNN unavailable: {conv._load()}"
)

# (N, H, W, I, K, O, stride, pad): RGB and 4+ channels, padded and unpadded, odd and
# non-square maps, strides that leave rows no window reads.
CASES = [
    (2, 13, 11, 3, 7, 5, 2, 1),
    (2, 12, 12, 3, 7, 4, 2, 0),
    (3, 9, 7, 6, 3, 5, 1, 1),
    (1, 10, 11, 4, 5, 3, 2, 2),
]


def _ref(x, w, stride, pad):
    return lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@pytest.fixture(scope="module", params=["onednn", "xla"])
def mode(request):
    if request.param == "onednn" and conv._load() is not None:
        pytest.skip(f"oneDNN unavailable: {conv._load()}")
    with conv.forced(request.param == "onednn"):
        yield request.param


def _data(case, seed=0):
    n, h, w, i, k, o, _, _ = case
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, h, w, i)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, i, o)), jnp.float32)
    return x, kernel


# Unit roundoff of float32. A sum of n products computed in any order is within
# gamma_n = n * u / (1 - n * u) of the exact one, relative to the sum of the products'
# magnitudes (Higham, "Accuracy and Stability of Numerical Algorithms", section 3.1).
# oneDNN and XLA pick their summation order by CPU and ISA, so two correct
# implementations may differ by up to twice that.
U32 = 2.0**-24
# The longest chain of convolutions in TRANSFORMS (hvp and grad_of_grad: forward,
# two transposes and their tangents); rounding errors add along a chain.
CHAIN = 4


def _reduction_length(case) -> int:
    """The longest sum any of the three convolutions computes for ``case``: the
    forward (K*K*I terms), the input gradient (K*K*O) and the kernel gradient
    (N*Ho*Wo)."""
    n, h, w, i, k, o, stride, pad = case
    ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    return max(k * k * i, k * k * o, n * ho * wo)


def _tolerance(case) -> float:
    """Relative to the output's largest magnitude: CHAIN chained sums of n terms,
    each within 2 * gamma_n of the other implementation's."""
    n = _reduction_length(case)
    return CHAIN * 2 * n * U32 / (1 - n * U32)


def _close(got, want, tol):
    for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        v = np.asarray(v)
        np.testing.assert_allclose(np.asarray(g), v, rtol=tol, atol=tol * max(1.0, np.abs(v).max()))


TRANSFORMS = {
    "value": lambda f, x, w: f(x, w),
    "grad": lambda f, x, w: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1))(x, w),
    "jvp": lambda f, x, w: jax.jvp(f, (x, w), (jnp.cos(x), jnp.sin(w))),
    "jacfwd_w": lambda f, x, w: jax.jacfwd(lambda w: f(x, w)[:, :2, :2])(w),
    "jacrev_x": lambda f, x, w: jax.jacrev(lambda x: f(x, w)[:1, :2, :2])(x),
    "hvp": lambda f, x, w: jax.jvp(
        jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1)), (x, w), (x, w)
    )[1],
    "grad_of_grad": lambda f, x, w: jax.grad(
        lambda w: jnp.sum(jax.grad(lambda x: jnp.sum(f(x, w) ** 2))(x) ** 2)
    )(w),
    "vmap_x": lambda f, x, w: jax.vmap(f, (0, None))(jnp.stack([x, 2 * x]), w),
    "vmap_w": lambda f, x, w: jax.vmap(f, (None, 0))(x, jnp.stack([w, -w])),
    "vmap_both": lambda f, x, w: jax.vmap(f)(jnp.stack([x, 2 * x]), jnp.stack([w, -w])),
    "per_example_grad": lambda f, x, w: jax.vmap(
        jax.grad(lambda x, w: jnp.sum(f(x[None], w) ** 2), 1), (0, None)
    )(x, w),
    "grad_of_vmap": lambda f, x, w: jax.grad(
        lambda w: jnp.sum(jax.vmap(f, (0, None))(jnp.stack([x, x + 1]), w) ** 2)
    )(w),
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_matches_lax_under_every_transformation(mode, case, transform):
    x, w = _data(case)
    stride, pad = case[6:]
    t = TRANSFORMS[transform]
    got = jax.jit(lambda x, w: t(lambda x, w: conv.conv2d(x, w, stride, pad), x, w))(x, w)
    _close(got, t(lambda x, w: _ref(x, w, stride, pad), x, w), _tolerance(case))


def test_eager_calls_match_lax(mode):
    x, w = _data(CASES[0])
    _close(conv.conv2d(x, w, 2, 1), _ref(x, w, 2, 1), _tolerance(CASES[0]))


def test_tolerance_rejects_a_one_term_error():
    """The bound is far below what a real defect gives: dropping one product of the
    forward sum (a wrong window offset) shows up."""
    case = CASES[2]
    x, w = _data(case)
    stride, pad = case[6:]
    want = _ref(x, w, stride, pad)
    wrong = want.at[0, 0, 0, 0].add(-x[0, 0, 0, 0] * w[1, 1, 0, 0])
    with pytest.raises(AssertionError):
        _close(wrong, want, _tolerance(case))


def _custom_calls(fn, *args) -> list[str]:
    text = jax.jit(fn).lower(*args).as_text()
    return [
        line.split("@")[1].split("(")[0] for line in text.splitlines() if "custom_call @" in line
    ]


@needs_onednn
def test_a_gradient_is_three_onednn_calls_and_vmap_folds_into_one_call():
    x, w = _data(CASES[2])
    with conv.forced(True):
        grad = jax.grad(lambda x, w: jnp.sum(conv.conv2d(x, w, 1, 1) ** 2), (0, 1))
        assert sorted(_custom_calls(grad, x, w)) == [
            "SppJaxConv",
            "SppJaxConvInput",
            "SppJaxConvKernel",
        ]
        xs = jnp.stack([x, x])
        mapped = jax.vmap(lambda x: conv.conv2d(x, w, 1, 1))
        assert _custom_calls(mapped, xs) == ["SppJaxConv"]
        text = jax.jit(mapped).lower(xs).as_text()
        assert "stablehlo.while" not in text and "convolution" not in text


def test_off_means_plain_lax_and_no_custom_call():
    x, w = _data(CASES[0])
    with conv.forced(False):
        assert (
            _custom_calls(
                lambda x, w: jax.grad(lambda w: jnp.sum(conv.conv2d(x, w, 2, 1)))(w), x, w
            )
            == []
        )


def test_other_dtypes_take_xla(mode):
    x, w = _data(CASES[2])
    got = jax.jit(lambda x, w: conv.conv2d(x, w, 1, 1))(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    )
    assert got.dtype == jnp.bfloat16
    want = _ref(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), 1, 1)
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=5e-2
    )


def test_input_smaller_than_the_kernel_names_the_sizes():
    x, w = _data((1, 4, 5, 3, 7, 2, 1, 0))
    with pytest.raises(ValueError, match=r"7x7 conv.*at least 7x7, got 4x5"):
        conv.conv2d(x, w, 1, 0)


def test_without_onednn_it_lowers_to_xla_and_says_why_once(monkeypatch, caplog):
    x, w = _data(CASES[0])
    monkeypatch.setattr(conv, "find_onednn", lambda: None)
    monkeypatch.setattr(conv, "_forced", None)
    monkeypatch.setenv(conv.ENV, "auto")
    conv._load.cache_clear()
    conv._log_once.cache_clear()
    jax.clear_caches()
    try:
        fn = lambda x, w: jax.grad(lambda w: jnp.sum(conv.conv2d(x, w, 2, 1) ** 2))(w)
        with caplog.at_level("INFO", logger="spp_jax"):
            assert _custom_calls(fn, x, w) == []
            _close(
                jax.jit(fn)(x, w),
                jax.grad(lambda w: jnp.sum(_ref(x, w, 2, 1) ** 2))(w),
                _tolerance(CASES[0]),
            )
        assert sum("oneDNN not found" in r.message for r in caplog.records) == 1
        monkeypatch.setenv(conv.ENV, "1")
        with pytest.raises(RuntimeError, match="oneDNN convolutions are unavailable"):
            conv.usable()
        monkeypatch.setenv(conv.ENV, "maybe")
        with pytest.raises(ValueError, match=r"'maybe'.*auto"):
            conv._setting()
    finally:
        conv._load.cache_clear()
        jax.clear_caches()


def test_geometry_padding_is_the_exact_fit():
    # 12 rows, 7x7 kernel, stride 2, no padding: windows read rows 0..10; the last row
    # is dropped, so the implied bottom padding is 0.
    geo = conv._geometry((1, 12, 13, 3), (7, 7, 3, 4), 2, 0)
    assert geo.size == (11, 13) and geo.out == (3, 4) and geo.padding() == ((0, 0), (0, 0))
    geo = conv._geometry((1, 13, 13, 3), (7, 7, 3, 4), 2, 1)
    assert geo.out == (5, 5) and geo.padding() == ((1, 1), (1, 1))


@needs_onednn
def test_auto_honours_the_recorded_choice(monkeypatch):
    from spp_jax._cpu import native

    x, w = _data(CASES[2])
    grad = lambda x, w: jax.grad(lambda x, w: jnp.sum(conv.conv2d(x, w, 1, 1) ** 2), (0, 1))(x, w)
    monkeypatch.setattr(conv, "_forced", None)
    monkeypatch.setenv(conv.ENV, "auto")
    got = {}
    for kernel in (True, False):
        monkeypatch.setattr(native, "tuned", lambda library, k=kernel: {"conv": k})
        jax.clear_caches()
        assert bool(_custom_calls(grad, x, w)) == kernel
        got[kernel] = jax.jit(grad)(x, w)
    jax.clear_caches()
    _close(got[True], got[False], _tolerance(CASES[2]))
