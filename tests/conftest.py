import os

# Several CPU devices for the tests that map over devices; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

# Strict promotion, as equinox's tests do: implicit rank broadcasting and mixed-dtype
# promotion raise, so silent broadcasting bugs fail here. Also handed to subprocesses.
os.environ.setdefault("JAX_NUMPY_RANK_PROMOTION", "raise")
os.environ.setdefault("JAX_NUMPY_DTYPE_PROMOTION", "strict")

# Many tests build the same small networks in separate runs (resume, schedules, CLI):
# a persistent compilation cache for this session compiles each program once. It is
# also handed to subprocesses through the environment.
import tempfile

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="spp_jax_xla_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


import pytest


@pytest.fixture(scope="module", params=["cpu_kernel", "jax"])
def impl(request):
    """Runs a test module twice: with the compiled CPU kernels and with pure JAX."""
    from spp_jax._cpu import native

    if request.param == "cpu_kernel" and native._load() is not None:
        pytest.skip(f"CPU kernels unavailable: {native._load()}")
    with native.forced(request.param == "cpu_kernel"):
        yield request.param
