"""The compiled CPU kernels: when they are used, and the fallback when they cannot be.

Their results are checked against the NumPy references by every test marked
``usefixtures("impl")`` in test_pooling.py and test_roi.py.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spp_jax
from spp_jax._cpu import native

needs_kernels = pytest.mark.skipif(
    native._load() is not None, reason=f"CPU kernels unavailable: {native._load()}"
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
        with native.forced(True):
            assert "SppJaxWindowMax" in _hlo(fn, x)
            assert "SppJaxWindowMaxGrad" in _hlo(grad, x)
            g1, g2 = jax.jit(grad)(x), jax.jit(grad)(x)
            np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))  # deterministic
        with native.forced(False):
            assert "SppJaxWindowMax" not in _hlo(fn, x)
            assert "SppJaxWindowMaxGrad" not in _hlo(grad, x)
    avg = lambda x: spp_jax.spatial_pyramid_pool(x, (3, 1), mode="avg")
    with native.forced(True):
        assert "SppJaxWindowMax" not in _hlo(avg, x)  # average pooling stays in JAX


@needs_kernels
def test_other_platforms_lower_the_pure_jax_code():
    from jax import export

    f = jax.jit(lambda x: spp_jax.spatial_pyramid_pool(x, (2, 1)))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 6, 3)), jnp.float32)
    with native.forced(True):
        exp = export.export(
            f,
            platforms=["cpu", "cuda"],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("SppJaxWindowMax")],
        )(jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert exp.platforms == ("cpu", "cuda")
    np.testing.assert_array_equal(np.asarray(exp.call(x)), np.asarray(f(x)))
    # Lowered for GPU alone (no GPU needed to lower), neither op calls the kernel.
    grad = jax.jit(jax.grad(lambda x: spp_jax.spatial_pyramid_pool(x, (2, 1)).sum()))
    with native.forced(True):
        for fn in (f, grad):
            gpu = export.export(fn, platforms=["cuda"])(jax.ShapeDtypeStruct(x.shape, x.dtype))
            assert "SppJax" not in gpu.mlir_module()


def test_a_cpu_lowering_without_the_kernel_lowers_the_ops_own_pure_jax_code(monkeypatch):
    # Where the kernel's branch was traced (a GPU or TPU process) and the CPU lowering
    # cannot build it, each op lowers its own pure-JAX code: static slices for
    # spatial_pyramid_pool (no gather), reduce_window for max_pool2d, sparse tables
    # for roi_pyramid_pool; the same values and gradients, bit for bit.
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((3, 9, 7, 5)), jnp.float32)
    sizes = jnp.array([[9, 7], [5, 6], [3, 2]])
    boxes = jnp.array([[0.0, 0.0, 60.0, 50.0], [10.0, 5.0, 90.0, 100.0]])
    ops = {
        "spp": lambda x: spp_jax.spatial_pyramid_pool(x, (3, 2, 1), valid_sizes=sizes),
        "max_pool": lambda x: spp_jax.pooling.max_pool2d(x, 3, 2, ceil=True),
        "roi": lambda x: spp_jax.roi_pyramid_pool(x, boxes, levels=(2, 1)),
    }
    fns = {
        (name, what): fn
        for name, op in ops.items()
        for what, fn in (("value", op), ("grad", jax.grad(lambda x, op=op: jnp.sum(op(x) ** 2))))
    }
    with native.forced(False):
        want = {k: np.asarray(jax.jit(fn)(x)) for k, fn in fns.items()}
    monkeypatch.setattr(native, "kernel_chosen", lambda family: True)
    monkeypatch.setattr(native, "usable", lambda: False)
    jax.clear_caches()
    try:
        for key, fn in fns.items():
            hlo = _hlo(fn, x)
            assert "SppJaxWindowMax" not in hlo, key
            if key == ("spp", "value"):
                assert "gather" not in hlo
            np.testing.assert_array_equal(np.asarray(jax.jit(fn)(x)), want[key], err_msg=str(key))
    finally:
        jax.clear_caches()


@pytest.mark.parametrize(
    ("value", "want"),
    [("", "auto"), ("auto", "auto"), ("0", "off"), ("OFF", "off"), ("1", "on"), ("true", "on")],
)
def test_setting_from_the_environment(monkeypatch, value, want):
    monkeypatch.setenv(native.ENV, value)
    assert native._setting() == want


def test_bad_setting_names_the_value(monkeypatch):
    monkeypatch.setenv(native.ENV, "maybe")
    with pytest.raises(ValueError, match=r"'maybe'.*auto"):
        native._setting()


def test_build_failure_falls_back_to_jax_with_a_warning(monkeypatch, tmp_path):
    x = np.random.default_rng(2).standard_normal((1, 5, 5, 2)).astype(np.float32)
    pool = lambda x: spp_jax.spatial_pyramid_pool(x, (2, 1))
    grad = jax.grad(lambda x: jnp.sum(pool(x) ** 2))
    want, want_g = np.asarray(pool(x)), np.asarray(grad(x))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPP_JAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_forced", None)
    native._load.cache_clear()
    native._warn_once.cache_clear()
    jax.clear_caches()
    try:
        monkeypatch.setenv(native.ENV, "auto")
        # The kernel cannot be built: the pure-JAX code is traced, with one warning.
        with pytest.warns(RuntimeWarning, match=r"pure-JAX.*no-such-compiler"):
            hlo = _hlo(grad, x)
        assert "SppJaxWindowMax" not in hlo
        np.testing.assert_array_equal(np.asarray(jax.jit(pool)(x)), want)
        np.testing.assert_allclose(np.asarray(jax.jit(grad)(x)), want_g, rtol=1e-6)
        assert not native.usable()
        monkeypatch.setenv(native.ENV, "1")
        with pytest.raises(RuntimeError, match="cannot be built"):
            native.usable()
        monkeypatch.setenv(native.ENV, "0")
        assert not native.usable() and not native.enabled()
    finally:
        native._load.cache_clear()  # later tests build (or find) the real kernels
        jax.clear_caches()


@needs_kernels
def test_vmap_folds_the_mapped_axis_into_one_kernel_call():
    rng = np.random.default_rng(3)
    xs = jnp.asarray(rng.standard_normal((5, 2, 7, 6, 3)), jnp.float32)  # (N, B, H, W, C)
    boxes = jnp.asarray(rng.uniform(0, 90, (5, 4, 4)), jnp.float32)  # (N, R, 4)
    pool = lambda x: spp_jax.spatial_pyramid_pool(x, (3, 1))
    roi = lambda x, b: spp_jax.roi_pyramid_pool(x, b, levels=(2, 1))
    loss = lambda x: jnp.sum(pool(x) ** 2)
    cases = [  # (function, arguments, kernel calls: values, tangent or gradient)
        (jax.vmap(pool), (xs,), 1),
        (jax.vmap(jax.grad(loss)), (xs,), 2),
        (jax.vmap(lambda x, t: jax.jvp(pool, (x,), (t,))[1]), (xs, xs), 1),  # tangent only
        (jax.vmap(roi), (xs[:, :1], boxes), 1),
        (jax.vmap(roi, in_axes=(None, 0)), (xs[0, :1], boxes), 1),  # only boxes mapped
        (jax.vmap(jax.grad(lambda x, b: jnp.sum(roi(x, b) ** 2))), (xs[:, :1], boxes), 2),
    ]
    with native.forced(True):
        for fn, args, calls in cases:
            hlo = _hlo(fn, *args)
            assert hlo.count('custom_call_target="SppJaxWindowMax') == calls, hlo
            assert "while" not in hlo, "vmap ran a loop"
            # Results equal a Python loop over the mapped axis.
            got = jax.jit(fn)(*args)
            in_axes = (None, 0) if args[0].ndim == 4 else (0,) * len(args)
            want = [
                fn(
                    *(
                        a if ax is None else a[i : i + 1]
                        for a, ax in zip(args, in_axes, strict=True)
                    )
                )[0]
                for i in range(5)
            ]
            np.testing.assert_allclose(np.asarray(got), np.stack(want), rtol=1e-6, atol=1e-7)


def test_cache_key_names_the_compiler_version(monkeypatch):
    keys = set()
    for version in ("g++ (Debian 12.2.0-14) 12.2.0", "g++ (Debian 14.2.0-1) 14.2.0"):
        monkeypatch.setattr(native, "_compiler_version", lambda cxx, v=version: v)
        keys.add(native.cache_key("c++", ()))
    assert len(keys) == 2


# A process whose default backend is a GPU or TPU (simulated: there is none here)
# and that exports for them.
_GPU_ONLY = """
import warnings, jax, jax.numpy as jnp
from jax import export
warnings.simplefilter("error")
import spp_jax
from spp_jax._cpu import conv, native
native.jax.default_backend = lambda: "gpu"
x = jax.ShapeDtypeStruct((2, 7, 6, 3), jnp.float32)
boxes = jnp.array([[0.0, 0.0, 60.0, 50.0]])
pool = lambda x: spp_jax.spatial_pyramid_pool(x, (3, 1))
roi = lambda x: spp_jax.roi_pyramid_pool(x, boxes, levels=(2, 1))
convolve = lambda x: conv.conv2d(x, jnp.ones((3, 3, 3, 4)), 2, 1)
for fn in (pool, roi, convolve):
    for f in (fn, jax.grad(lambda x: jnp.sum(fn(x) ** 2)), jax.jacfwd(fn)):
        for platform in ("cuda", "tpu"):
            text = export.export(jax.jit(f), platforms=[platform])(x).mlir_module()
            assert "SppJax" not in text
assert native._load.cache_info().misses == 0, "the kernel was probed"
assert conv._load.cache_info().misses == 0, "oneDNN was probed"
print("OK")
"""


def test_a_gpu_or_tpu_process_builds_and_prints_nothing(tmp_path):
    # With a compiler that does not exist, any probe would warn (an error here).
    env = {
        **os.environ,
        "CXX": str(tmp_path / "no-such-compiler"),
        "SPP_JAX_CACHE_DIR": str(tmp_path / "cache"),
        "SPP_JAX_CPU_KERNELS": "auto",
    }
    out = subprocess.run(
        [sys.executable, "-c", _GPU_ONLY], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"
    assert "spp_jax" not in out.stderr
    assert not (tmp_path / "cache").exists()


def _run_at_once(n: int, cmd: list[str], env: dict[str, str]) -> list[tuple[str, str]]:
    """Starts ``n`` copies of ``cmd`` together; their (stdout, stderr), all exit 0."""
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    return outs


_BUILD_AND_POOL = """
import sys, numpy as np, jax, spp_jax
from spp_jax._cpu import native
x = np.random.default_rng(0).standard_normal((2, 9, 8, 5)).astype(np.float32)
y = jax.jit(lambda x: spp_jax.spatial_pyramid_pool(x, (3, 2, 1)))(x)
assert native.usable()
print(float(np.asarray(y, np.float64).sum()))
"""


@needs_kernels
def test_concurrent_builds_are_safe(tmp_path):
    # Three processes start at once with an empty cache: one compiles (the others
    # wait on the lock), all load a complete library and compute the same result.
    cache = tmp_path / "cache"
    env = {**os.environ, "SPP_JAX_CACHE_DIR": str(cache), "SPP_JAX_CPU_KERNELS": "1"}
    outs = _run_at_once(3, [sys.executable, "-c", _BUILD_AND_POOL], env)
    assert len({out.strip() for out, _ in outs}) == 1
    libraries = sorted(p.name for p in cache.iterdir() if p.suffix == ".so")
    assert len(libraries) == 1, libraries  # one build, no temporary files left
    x = np.random.default_rng(0).standard_normal((2, 9, 8, 5)).astype(np.float32)
    want = float(np.asarray(spp_jax.spatial_pyramid_pool(x, (3, 2, 1)), np.float64).sum())
    np.testing.assert_allclose(float(outs[0][0]), want, rtol=1e-6)


# --------------------------------------------------------------------------------------
# The measured choice between kernel and pure-JAX code (spp_jax._cpu.tune).
# --------------------------------------------------------------------------------------


@needs_kernels
def test_auto_honours_the_recorded_choice_with_equal_results(monkeypatch):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 5)), jnp.float32)
    boxes = jnp.array([[0.0, 0.0, 60.0, 50.0], [10.0, 5.0, 90.0, 100.0]])
    ops = {
        "spp": lambda x: spp_jax.spatial_pyramid_pool(x, (3, 2, 1)),
        "roi": lambda x: spp_jax.roi_pyramid_pool(x, boxes, levels=(2, 1)),
        "max_pool": lambda x: spp_jax.pooling.max_pool2d(x, 3, 2),
    }
    monkeypatch.setenv(native.ENV, "auto")
    monkeypatch.setattr(native, "_forced", None)
    results = {}
    for kernel in (True, False):
        choice = {"spp": kernel, "roi": not kernel, "max_pool": kernel}
        monkeypatch.setattr(native, "tuned", lambda library, c=choice: c)
        jax.clear_caches()  # a cached trace keeps the choice it was traced with
        for family, op in ops.items():
            grad = jax.grad(lambda x, op=op: jnp.sum(jnp.sin(op(x))))
            hlo = _hlo(grad, x)
            assert ("SppJaxWindowMax" in hlo) == choice[family], (family, choice)
            results[(family, choice[family])] = (jax.jit(op)(x), jax.jit(grad)(x))
    jax.clear_caches()
    for family in ops:
        for a, b in zip(results[(family, True)], results[(family, False)], strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@needs_kernels
def test_forcing_either_side_bypasses_the_choice(monkeypatch):
    x = jnp.ones((1, 6, 6, 2), jnp.float32)
    pool = lambda x: spp_jax.spatial_pyramid_pool(x, (2, 1))
    monkeypatch.setattr(native, "tuned", lambda library: dict.fromkeys(("spp", "roi"), False))
    monkeypatch.setattr(native, "_forced", None)
    for value, kernel in (("1", True), ("0", False), ("auto", False)):
        monkeypatch.setenv(native.ENV, value)
        jax.clear_caches()
        assert ("SppJaxWindowMax" in _hlo(pool, x)) == kernel, value
    jax.clear_caches()


_TUNED = """
import json, sys
from spp_jax._cpu import conv, native
assert conv._load() is None
print(json.dumps(native.tuned("onednn_conv")))
"""


def test_the_choice_is_measured_once_and_kept_beside_the_library(tmp_path):
    # Two processes with an empty cache: one measures (the other waits on the lock and
    # reads the same file). The file says what was measured and on which CPU. (The
    # oneDNN library: the same code as the window-max kernel's, measured sooner.)
    from spp_jax._cpu import conv

    if conv._load() is not None:
        pytest.skip(f"oneDNN unavailable: {conv._load()}")
    env = {**os.environ, "SPP_JAX_CACHE_DIR": str(tmp_path), "SPP_JAX_CPU_KERNELS": "auto"}
    outs = _run_at_once(2, [sys.executable, "-c", _TUNED], env)
    assert outs[0][0] == outs[1][0]
    (path,) = tmp_path.glob("onednn_conv-*.tune.json")
    assert path.with_name(path.name.replace(".tune.json", ".so")).exists()
    record = json.loads(path.read_text())
    assert record["cpu"]["isa"] in ("avx512", "avx2", "avx", "baseline")
    assert set(record["families"]) == {"conv"}
    for family in record["families"].values():
        ratio = family["kernel_over_fallback"]
        assert family["kernel"] == (ratio <= 1.0)
        assert {t["what"] for t in family["times"]} == {"fwd", "fwd_bwd"}
    assert json.loads(outs[0][0]) == {f: v["kernel"] for f, v in record["families"].items()}


def test_a_choice_measured_on_a_busy_machine_is_measured_again_when_idle(tmp_path, monkeypatch):
    # The measurement itself is replaced by one that writes an idle machine's record,
    # so the test checks when `tuned` measures, not the kernels.
    from spp_jax._cpu import tune

    families = tune.FAMILIES["window_max"]
    library = tmp_path / "window_max-test.so"
    record_path = library.with_suffix(".tune.json")
    monkeypatch.setitem(native._built, "window_max", library)
    tuned = native.tuned.__wrapped__  # per process, `tuned` is cached: a new process each call

    def write(load: float, kernel: bool) -> None:
        cpu = {"cores": 2, "load_1min": load}
        record = {"cpu": cpu, "families": {f: {"kernel": kernel} for f in families}}
        record_path.write_text(json.dumps(record))

    measured = []

    def measure(cmd, **kwargs):
        measured.append(cmd)
        write(0.1, True)

    monkeypatch.setattr(native.subprocess, "run", measure)
    write(9.0, False)  # measured busy: the kernels lost
    monkeypatch.setattr(native, "_load_now", lambda: 8.0)  # still busy: kept
    assert tuned("window_max") == dict.fromkeys(families, False)
    assert measured == []
    monkeypatch.setattr(native, "_load_now", lambda: 0.5)  # idle now: measured again
    assert tuned("window_max") == dict.fromkeys(families, True)
    assert len(measured) == 1
    assert tuned("window_max") == dict.fromkeys(families, True)  # kept
    assert len(measured) == 1
