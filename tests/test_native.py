"""The compiled CPU kernels: when they are used, and the fallback when they cannot be.

Their results are checked against the NumPy references by every test marked
``usefixtures("impl")`` in test_pooling.py and test_roi.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax import _native

needs_kernels = pytest.mark.skipif(
    _native._load() is not None, reason=f"CPU kernels unavailable: {_native._load()}"
)


def _hlo(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


@needs_kernels
def test_cpu_lowering_calls_the_kernel_unless_switched_off():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 6, 3)), jnp.float32)
    boxes = jnp.array([[0.0, 0.0, 60.0, 50.0], [10.0, 5.0, 90.0, 100.0]])
    pool = lambda x: spp_jax.spatial_pyramid_pool(x, (3, 1))
    roi = lambda x: spp_jax.roi_pyramid_pool(x, boxes, levels=(2, 1))
    for fn in (pool, roi):
        grad = jax.grad(lambda x, fn=fn: jnp.sum(fn(x) ** 2))
        with _native.forced(True):
            assert "SppJaxWindowMax" in _hlo(fn, x)
            assert "SppJaxWindowMaxGrad" in _hlo(grad, x)
            g1, g2 = jax.jit(grad)(x), jax.jit(grad)(x)
            np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))  # deterministic
        with _native.forced(False):
            assert "SppJaxWindowMax" not in _hlo(fn, x)
            assert "SppJaxWindowMaxGrad" not in _hlo(grad, x)
    avg = lambda x: spp_jax.spatial_pyramid_pool(x, (3, 1), mode="avg")
    with _native.forced(True):
        assert "SppJaxWindowMax" not in _hlo(avg, x)  # average pooling stays in JAX


@needs_kernels
def test_other_platforms_lower_the_pure_jax_code():
    from jax import export

    f = jax.jit(lambda x: spp_jax.spatial_pyramid_pool(x, (2, 1)))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 6, 3)), jnp.float32)
    with _native.forced(True):
        exp = export.export(
            f,
            platforms=["cpu", "cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("SppJaxWindowMax")],
        )(jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert exp.platforms == ("cpu", "cuda")
    np.testing.assert_array_equal(np.asarray(exp.call(x)), np.asarray(f(x)))
    # Lowered for GPU alone (no GPU needed to lower), neither op calls the kernel.
    grad = jax.jit(jax.grad(lambda x: spp_jax.spatial_pyramid_pool(x, (2, 1)).sum()))
    with _native.forced(True):
        for fn in (f, grad):
            gpu = export.export(fn, platforms=["cuda"])(jax.ShapeDtypeStruct(x.shape, x.dtype))
            assert "SppJax" not in gpu.mlir_module()


@pytest.mark.parametrize(
    ("value", "want"),
    [("", "auto"), ("auto", "auto"), ("0", "off"), ("OFF", "off"), ("1", "on"), ("true", "on")],
)
def test_setting_from_the_environment(monkeypatch, value, want):
    monkeypatch.setenv(_native.ENV, value)
    assert _native._setting() == want


def test_bad_setting_names_the_value(monkeypatch):
    monkeypatch.setenv(_native.ENV, "maybe")
    with pytest.raises(ValueError, match=r"'maybe'.*auto"):
        _native._setting()


def test_build_failure_falls_back_to_jax_with_a_warning(monkeypatch, tmp_path):
    x = np.random.default_rng(2).standard_normal((1, 5, 5, 2)).astype(np.float32)
    want = np.asarray(spp_jax.spatial_pyramid_pool(x, (2, 1)))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPP_JAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_native, "_forced", None)
    _native._load.cache_clear()
    _native._warn_once.cache_clear()
    try:
        monkeypatch.setenv(_native.ENV, "auto")
        with pytest.warns(RuntimeWarning, match=r"pure-JAX.*no-such-compiler"):
            assert not _native.available()
        got = spp_jax.spatial_pyramid_pool(x, (2, 1))
        np.testing.assert_array_equal(np.asarray(got), want)
        monkeypatch.setenv(_native.ENV, "1")
        with pytest.raises(RuntimeError, match="cannot be built"):
            _native.available()
        monkeypatch.setenv(_native.ENV, "0")
        assert not _native.available()
    finally:
        _native._load.cache_clear()  # later tests build (or find) the real kernels
