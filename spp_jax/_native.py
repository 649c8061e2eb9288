"""Compiled CPU kernels for max pooling of window pyramids (optional, XLA FFI).

On CPU, max-mode :func:`spp_jax.spatial_pyramid_pool` and
:func:`spp_jax.roi_pyramid_pool` run a small C++ kernel (``csrc/window_max.cc``)
through the XLA FFI: it pools every bin of every window in one pass and, for the
gradient, recomputes each bin's first maximum and adds the cotangent there.
XLA's CPU code generation needs several passes and large intermediate arrays
for the same work; ``experiments/benchmarks/`` measures the difference. Other
platforms (GPU, TPU), average pooling and machines without a C++ compiler use
the pure-JAX code, which gives the same results: both are tested against the
same NumPy references.

The kernel is compiled on first use with the system's C++ compiler (``$CXX``,
else ``c++``; about 5 s), against the FFI headers shipped with jaxlib, and
cached per machine under ``$SPP_JAX_CACHE_DIR`` (default
``~/.cache/spp_jax``). The file is written atomically, so concurrent processes
are safe. ``SPP_JAX_CPU_KERNELS`` chooses:

* ``auto`` (default): use the kernel if it builds, else warn once and use JAX;
* ``0`` / ``off``: never use it;
* ``1`` / ``on``: require it (raise if it cannot be built).

The choice is made when a function is traced, per platform: under ``jit`` the
CPU lowering calls the kernel and every other platform's lowering uses the
pure-JAX code (``lax.platform_dependent``), so exported or multi-platform
programs stay correct.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("spp_jax")

ENV = "SPP_JAX_CPU_KERNELS"
SOURCE = Path(__file__).parent / "csrc" / "window_max.cc"
_TARGETS = ("SppJaxWindowMax", "SppJaxWindowMaxGrad")
_FLAG_SETS = (("-march=native",), ())  # tuned for this CPU; else portable


def _setting() -> str:
    raw = os.environ.get(ENV, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw in ("1", "on", "true", "yes"):
        return "on"
    raise ValueError(f"{ENV}={raw!r} is not understood; use auto, 0/off or 1/on")


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$SPP_JAX_CACHE_DIR`` or ``~/.cache/spp_jax``."""
    if os.environ.get("SPP_JAX_CACHE_DIR"):
        return Path(os.environ["SPP_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spp_jax"


def _cpu_signature() -> str:
    # -march=native code must not run on another CPU that shares the cache.
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(cxx: str, flags: Sequence[str]) -> Path:
    """Compiles the kernel (or finds it in the cache) and returns the library path."""
    include = jax.ffi.include_dir()
    command = [cxx, "-O3", *flags, "-std=c++17", "-shared", "-fPIC", "-I", include]
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (
                SOURCE.read_text(),
                " ".join(command),
                jax.__version__,
                platform.machine(),
                sys.platform,
                _cpu_signature() if flags else "",
            )
        )
    ).hexdigest()[:16]
    target = cache_dir() / f"window_max-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        t0 = time.perf_counter()
        subprocess.run(
            [*command, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True
        )
        os.replace(tmp, target)  # atomic: another process may be doing the same
        log.info("compiled spp_jax CPU kernels in %.1f s: %s", time.perf_counter() - t0, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


_registered: set[str] = set()
_forced: bool | None = None


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the kernels once; returns None or why not."""
    if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
        return f"jax {jax.__version__} has no jax.ffi (needs jax >= 0.5)"
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return "no C++ compiler found (set $CXX)"
    errors = []
    for flags in _FLAG_SETS:
        try:
            lib = ctypes.cdll.LoadLibrary(str(_build(cxx, flags)))
            for name in _TARGETS:
                if name not in _registered:  # XLA keeps the first registration
                    jax.ffi.register_ffi_target(
                        name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu"
                    )
                    _registered.add(name)
            return None
        except subprocess.CalledProcessError as e:
            errors.append(f"{' '.join(e.cmd[:3])} ...: {e.stderr.strip()[-500:]}")
        except OSError as e:
            errors.append(str(e))
    return "; ".join(errors)


def available() -> bool:
    """True if the CPU kernels are switched on and built (builds them if needed).

    Raises:
      RuntimeError: ``SPP_JAX_CPU_KERNELS=1`` and the kernels cannot be built.
    """
    setting = _setting() if _forced is None else ("on" if _forced else "off")
    if setting == "off":
        return False
    problem = _load()
    if problem is None:
        return True
    if setting == "on":
        raise RuntimeError(f"{ENV}=1 but the spp_jax CPU kernels cannot be built: {problem}")
    _warn_once(problem)
    return False


@contextlib.contextmanager
def forced(enabled: bool) -> Iterator[None]:
    """Uses (True) or bypasses (False) the CPU kernels in code traced inside.

    For tests and benchmarks that compare the two implementations; it overrides
    ``SPP_JAX_CPU_KERNELS``. JAX's caches are cleared on entry and exit, since a
    cached trace keeps the choice it was traced with.
    """
    global _forced
    old, _forced = _forced, enabled
    jax.clear_caches()
    try:
        yield
    finally:
        _forced = old
        jax.clear_caches()


@functools.cache
def _warn_once(problem: str) -> None:
    warnings.warn(
        f"spp_jax: using the pure-JAX code on CPU, the compiled kernels are unavailable "
        f"({problem}). Set {ENV}=0 to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )


# --------------------------------------------------------------------------------------
# The op.
# --------------------------------------------------------------------------------------


class Pyramid(tuple):
    """Static kernel attributes: ``(levels, base, cover)`` (hashable)."""

    __slots__ = ()

    def __new__(cls, levels, base, cover):
        return super().__new__(cls, (tuple(levels), tuple(base), tuple(cover)))

    def attrs(self) -> dict[str, np.ndarray]:
        levels, base, cover = self
        return {
            "levels_h": np.asarray([h for h, _ in levels], np.int64),
            "levels_w": np.asarray([w for _, w in levels], np.int64),
            "base": np.asarray(base, np.int64),
            "cover": np.asarray(cover, np.int64).reshape(-1),
        }


def pyramid(levels, plan_steps) -> Pyramid:
    """The kernel's description of a pyramid from a reduction plan.

    ``plan_steps[l]`` is ``(base_level, rows_cover, cols_cover)`` for a level
    reduced from the bins of ``base_level``, or None for a level reduced from
    the input.
    """
    base, cover = [], []
    for (nh, nw), step in zip(levels, plan_steps, strict=True):
        if step is None:
            base.append(-1)
            cover.extend([0] * (2 * (nh + nw)))
        else:
            b, rows, cols = step
            base.append(b)
            cover.extend(v for pair in (*rows, *cols) for v in pair)
    return Pyramid(levels, base, cover)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def window_max(
    x: jax.Array, bidx: jax.Array, rows: jax.Array, cols: jax.Array, pyr: Pyramid
) -> jax.Array:
    """Max of every bin of every window: ``(R, NB, C)`` float32.

    Args:
      x: ``(B, H, W, C)`` float32.
      bidx: ``(R,)`` int32, the batch element of each window.
      rows: ``(R, sum n_h, 2)`` int32 ``[start, end)`` of every row bin of every
        level, in input cells (clipped into the map by the kernel).
      cols: ``(R, sum n_w, 2)`` the same for columns.
      pyr: static :class:`Pyramid`.

    A bin that is empty after clipping gives 0 and no gradient. The gradient of
    every other bin goes to its first maximum in row-major order (NaN largest).
    """
    nb = sum(h * w for h, w in pyr[0])
    out = jax.ShapeDtypeStruct((bidx.shape[0], nb, x.shape[3]), jnp.float32)
    y = jax.ffi.ffi_call("SppJaxWindowMax", out, vmap_method="sequential")(
        x, bidx, rows, cols, **pyr.attrs()
    )
    return _varying_like(y, x, bidx, rows, cols)


def _window_max_fwd(x, bidx, rows, cols, pyr):
    # No argmax residuals: the backward kernel recomputes the winners from x.
    return window_max(x, bidx, rows, cols, pyr), (x, bidx, rows, cols)


def _window_max_bwd(pyr, res, g):
    x, bidx, rows, cols = res
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    gx = jax.ffi.ffi_call("SppJaxWindowMaxGrad", out, vmap_method="sequential")(
        x, g.astype(jnp.float32), bidx, rows, cols, **pyr.attrs()
    )
    return _varying_like(gx, x, g, bidx, rows, cols), None, None, None


window_max.defvjp(_window_max_fwd, _window_max_bwd)


def _varying_like(y: jax.Array, *inputs: jax.Array) -> jax.Array:
    """Marks an FFI result as varying over the manual mesh axes its inputs vary
    over (inside ``shard_map``); the FFI call itself does not."""
    axes: set = set()
    for a in inputs:
        axes |= _varying_axes(a)
    axes -= _varying_axes(y)
    return jax.lax.pcast(y, tuple(sorted(axes)), to="varying") if axes else y


def _varying_axes(a: jax.Array) -> set:
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)  # jax >= 0.9; older releases call it vma
    return set(mat.varying) if mat is not None else set(getattr(aval, "vma", ()))


def bounds(starts: Sequence[jax.Array], ends: Sequence[jax.Array]) -> jax.Array:
    """Stacks per-level ``(R, n)`` starts and ends into ``(R, sum n, 2)`` int32."""
    return jnp.stack(
        [jnp.concatenate(starts, axis=1), jnp.concatenate(ends, axis=1)], axis=2
    ).astype(jnp.int32)
