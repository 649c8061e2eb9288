"""The window-max kernel of max pooling on CPU, and the build of every kernel library.

On CPU, max-mode :func:`spp_jax.spatial_pyramid_pool`, :func:`spp_jax.roi_pyramid_pool`
and :func:`spp_jax.pooling.max_pool2d` may run ``csrc/window_max.cc`` through the XLA
FFI: it pools every bin of every window in one pass; for derivatives it recomputes
each bin's first maximum and reads the tangent (forward mode) or adds the cotangent
(reverse mode) there. Its three entry points are primitives (``_prims.py``) whose
CPU lowering emits the custom call and whose lowering elsewhere is the calling op's
pure-JAX code (:class:`Pure`), so they compose with every transformation like
``lax`` ops. When and how it is built (:func:`load`), cached and measured against the
pure-JAX code (:func:`tuned`, :func:`kernel_chosen`), and the ``SPP_JAX_CPU_KERNELS``
and ``SPP_JAX_CPU_MARCH`` settings: ``docs/install.md``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, mlir

from spp_jax import _prims
from spp_jax._io import atomic_path

try:  # POSIX; elsewhere concurrent builders just race to an atomic rename
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("spp_jax")

ENV = "SPP_JAX_CPU_KERNELS"
SOURCE = Path(__file__).parent / "csrc" / "window_max.cc"
_TARGETS = ("SppJaxWindowMax", "SppJaxWindowMaxTangent", "SppJaxWindowMaxGrad")
MARCH_ENV = "SPP_JAX_CPU_MARCH"


def _flag_sets() -> tuple[tuple[str, ...], ...]:
    """The compiler flags to try, in order: ``-march=$SPP_JAX_CPU_MARCH`` alone when
    that is set (e.g. ``x86-64-v3`` to build the AVX2 code on any newer CPU), else
    ``-march=native`` (tuned for this CPU), then the compiler's portable default."""
    march = os.environ.get(MARCH_ENV, "").strip()
    if march:
        return ((f"-march={march}",),)
    return (("-march=native",), ())


def env_setting(env: str, forced: bool | None = None) -> str:
    """``"auto"``, ``"off"`` or ``"on"``: ``forced`` if not None, else the variable ``env``."""
    if forced is not None:
        return "on" if forced else "off"
    raw = os.environ.get(env, "auto").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw in ("1", "on", "true", "yes"):
        return "on"
    raise ValueError(f"{env}={raw!r} is not understood; use auto, 0/off or 1/on")


def _setting() -> str:
    return env_setting(ENV, _forced)


def decide(setting: str, load_fn: Callable[[], str | None], fail: str, report) -> bool:
    """Whether a compiled library is used: never when ``setting`` is off; else it is
    built (``load_fn`` returns None or why not); a failure raises ``RuntimeError(fail:
    why)`` when on, and is passed to ``report`` (once per reason) in auto mode."""
    if setting == "off":
        return False
    problem = load_fn()
    if problem is None:
        return True
    if setting == "on":
        raise RuntimeError(f"{fail}: {problem}")
    report(problem)
    return False


@contextlib.contextmanager
def override(module: Any, enabled: bool) -> Iterator[None]:
    """Sets ``module._forced`` to ``enabled`` inside; clears JAX's caches on entry and
    exit (a cached trace keeps the choice it was traced with)."""
    old, module._forced = module._forced, enabled
    jax.clear_caches()
    try:
        yield
    finally:
        module._forced = old
        jax.clear_caches()


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$SPP_JAX_CACHE_DIR`` or ``~/.cache/spp_jax``."""
    if os.environ.get("SPP_JAX_CACHE_DIR"):
        return Path(os.environ["SPP_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "spp_jax"


def cpuinfo_line(*prefixes: str) -> str:
    """The first line of ``/proc/cpuinfo`` that starts with one of ``prefixes``, or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(prefixes)), "")
    except OSError:
        return ""


def _cpu_signature() -> str:
    # -march=native code must not run on another CPU that shares the cache.
    return cpuinfo_line("flags", "Features") or platform.processor()


@functools.cache
def _compiler_version(cxx: str) -> str:
    """``$CXX --version``'s first line: a compiler upgrade rebuilds the kernel."""
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"unknown ({e})"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else "unknown"


@dataclasses.dataclass(frozen=True)
class Library:
    """One C++ source compiled into a shared library of XLA FFI targets.

    ``cflags`` come before the source on the command line, ``ldflags`` (``-l``,
    ``-L``, rpath) after it.
    """

    source: Path
    targets: tuple[str, ...]
    cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.source.stem


WINDOW_MAX = Library(SOURCE, _TARGETS)


def cache_key(cxx: str, flags: Sequence[str], library: Library = WINDOW_MAX) -> str:
    """The cache key of a build: source, command, compiler version, jax version,
    machine and (for ``-march=native``) the CPU's flags."""
    command = _command(cxx, flags, library)
    parts = (
        library.source.read_text(),
        " ".join(command),
        _compiler_version(cxx),
        jax.__version__,
        platform.machine(),
        sys.platform,
        _cpu_signature() if flags else "",
    )
    return hashlib.sha256(b"\0".join(p.encode() for p in parts)).hexdigest()[:16]


def _command(cxx: str, flags: Sequence[str], library: Library = WINDOW_MAX) -> list[str]:
    include = jax.ffi.include_dir()
    return [
        cxx, "-O3", *flags, "-std=c++17", "-shared", "-fPIC", "-I", include, *library.cflags,
        str(library.source), *library.ldflags,
    ]  # fmt: skip


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _build(cxx: str, flags: Sequence[str], library: Library = WINDOW_MAX) -> Path:
    """Compiles the kernel (or finds it in the cache) and returns the library path.

    One process at a time builds a given key (a lock file beside the library);
    the library is written to a temporary file and renamed, so a reader never
    sees a half-written one.
    """
    target = cache_dir() / f"{library.name}-{cache_key(cxx, flags, library)}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_suffix(".lock")):
        if target.exists():  # another process built it while we waited
            return target
        t0 = time.perf_counter()
        with atomic_path(target) as tmp:
            subprocess.run(
                [*_command(cxx, flags, library), "-o", tmp],
                check=True,
                capture_output=True,
                text=True,
            )
        log.info("compiled spp_jax CPU kernels in %.1f s: %s", time.perf_counter() - t0, target)
    return target


_registered: set[str] = set()
_built: dict[str, Path] = {}  # library name -> the compiled library loaded
_forced: bool | None = None


@functools.cache
def _load() -> str | None:
    """Builds, loads and registers the window-max kernels once; returns None or why not."""
    return load(WINDOW_MAX)


def load(library: Library) -> str | None:
    """Builds (or finds in the cache), loads and registers ``library``'s FFI targets
    for CPU; returns None, or why they are unavailable. Callers cache the answer."""
    if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
        return f"jax {jax.__version__} has no jax.ffi (needs jax >= 0.5)"
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return "no C++ compiler found (set $CXX)"
    errors = []
    for flags in _flag_sets():
        try:
            path = _build(cxx, flags, library)
            lib = ctypes.cdll.LoadLibrary(str(path))
            for name in library.targets:
                if name not in _registered:  # XLA keeps the first registration
                    jax.ffi.register_ffi_target(
                        name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu"
                    )
                    _registered.add(name)
            _built.setdefault(library.name, path)
            return None
        except subprocess.CalledProcessError as e:
            errors.append(f"{' '.join(e.cmd[:3])} ...: {e.stderr.strip()[-500:]}")
        except (OSError, AttributeError) as e:
            errors.append(str(e))
    return "; ".join(errors)


def enabled() -> bool:
    """True unless the kernels are switched off. Builds nothing (used while tracing)."""
    return _setting() != "off"


def usable() -> bool:
    """True if the kernels are switched on and built: builds them on first call.

    Called when a CPU process traces an op (:func:`kernel_chosen`) or a computation
    is lowered for CPU; never by a process whose default backend is a GPU or TPU.

    Raises:
      RuntimeError: ``SPP_JAX_CPU_KERNELS=1`` and the kernels cannot be built.
    """
    return decide(
        _setting(), _load, f"{ENV}=1 but the spp_jax CPU kernels cannot be built", _warn_once
    )


@functools.cache
def tuned(library: str) -> dict[str, bool]:
    """Per op family of the built ``library``, whether its kernel is at least as fast
    as the fallback on this machine (:mod:`spp_jax._cpu.tune`).

    Measured once per build and kept beside the library (``<library>.tune.json``):
    the first process to need it runs the measurement in a child process (a few
    seconds), holding a lock so that concurrent processes wait for it and read the
    same file. If the measurement fails, the kernels are used and a warning says why.
    A measurement taken on a busy machine (:func:`measured_busy`) is used but not
    kept: the first process that starts on a machine that is not busy measures again,
    since other processes competing for the cores slow the multi-threaded kernels
    more than their fallbacks and can turn the choice around.
    """
    from spp_jax._cpu import tune

    families = tune.FAMILIES[library]
    path = _built[library].with_suffix(".tune.json")

    def read(remeasure_busy: bool = False) -> dict[str, bool] | None:
        try:
            record = json.loads(path.read_text())
            got = record["families"]
            choice = {f: bool(got[f]["kernel"]) for f in families}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if remeasure_busy and measured_busy(record.get("cpu"), _load_now()):
            return None
        return choice

    choice = read(remeasure_busy=True)
    if choice is not None:
        return choice
    with _file_lock(path.with_suffix(".lock")):
        choice = read(remeasure_busy=True)
        if choice is not None:
            return choice
        # One CPU device (the choice is about one device using every core), the
        # kernels forced on (the child never measures again).
        env = {**os.environ, "JAX_PLATFORMS": "cpu", ENV: "1", "SPP_JAX_ONEDNN": "1"}
        env.pop("XLA_FLAGS", None)
        log.info(
            "spp_jax: timing the %s kernels against their fallbacks, once for this machine "
            "and build (seconds)",
            library,
        )
        t0 = time.perf_counter()
        try:
            subprocess.run(
                [sys.executable, "-m", "spp_jax._cpu.tune", library, str(path)],
                env=env,
                check=True,
                capture_output=True,
                text=True,
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            warnings.warn(
                f"spp_jax: could not measure whether the {library} kernels are faster than "
                f"their fallback on this CPU; using the kernels ({detail.strip()[-300:]})",
                RuntimeWarning,
                stacklevel=2,
            )
            return dict.fromkeys(families, True)
        choice = read()
    if choice is None:
        raise RuntimeError(f"spp_jax: the kernel measurement wrote no valid {path}")
    log.info(
        "spp_jax: measured the %s kernels against their fallbacks in %.1f s (%s): %s",
        library,
        time.perf_counter() - t0,
        path,
        ", ".join(f"{f}: {'kernel' if k else 'fallback'}" for f, k in choice.items()),
    )
    return choice


def _load_now() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def measured_busy(cpu: dict | None, load_now: float | None) -> bool:
    """Whether a kernel measurement recorded on ``cpu`` (``tune.cpu_description()``:
    ``cores``, ``load_1min``) was taken on a busy machine that is not busy now: its
    1-minute load was above the core count, and the load ``load_now`` is not.

    >>> measured_busy({"cores": 2, "load_1min": 9.3}, 0.4)
    True
    >>> measured_busy({"cores": 2, "load_1min": 9.3}, 8.0)  # still busy: keep it
    False
    >>> measured_busy({"cores": 2, "load_1min": 0.2}, 0.4)
    False
    """
    try:
        cores, load = float(cpu["cores"]), float(cpu["load_1min"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        return False
    return load > cores and load_now is not None and load_now <= cores


def kernel_chosen(family: str) -> bool:
    """Whether code traced now takes the kernel's branch for ``family`` (``"spp"``,
    ``"roi"``, ``"max_pool"``) rather than the pure-JAX code.

    Off: never. On (``SPP_JAX_CPU_KERNELS=1`` or :func:`forced`): always. Auto: in a
    process whose default backend is the CPU, the kernel is built (if it can be)
    and used where :func:`tuned` found it at least as fast; elsewhere (GPU, TPU)
    nothing is built now and each platform's lowering decides (GPU and TPU lower
    the pure-JAX code).
    """
    setting = _setting()
    if setting != "auto":
        return setting == "on"
    if jax.default_backend() != "cpu":
        return True
    return usable() and tuned(WINDOW_MAX.name)[family]


def forced(enabled: bool):
    """Uses (True) or bypasses (False) the CPU kernels in code traced inside, whatever
    ``SPP_JAX_CPU_KERNELS`` says (:func:`override`): for tests and benchmarks that
    compare the two implementations."""
    return override(sys.modules[__name__], enabled)


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


class Pure(NamedTuple):
    """The pure-JAX code that a kernel call stands for, lowered where the kernel is not.

    ``fn(x, bidx, rows, cols, *static)`` returns what :func:`window_max` does, with
    first-maximum derivatives of its own: the caller's portable code (static slices
    for :func:`spp_jax.spatial_pyramid_pool`, ``lax.reduce_window`` for
    :func:`spp_jax.pooling.max_pool2d`, sparse tables for
    :func:`spp_jax.roi_pyramid_pool`). Other platforms lower it, and so does a CPU
    where the kernel cannot be built. ``fn`` must be a module-level function and
    ``static`` hashable: both are primitive parameters.
    """

    fn: Callable[..., jax.Array]
    static: tuple = ()

    def __call__(self, x, bidx, rows, cols) -> jax.Array:
        return self.fn(x, bidx, rows, cols, *self.static)


def _pure_values(x, bidx, rows, cols, *, pyr, pure):
    return pure(x, bidx, rows, cols)


def _pure_tangent(t, x, bidx, rows, cols, *, pyr, pure):
    return jax.jvp(lambda x: pure(x, bidx, rows, cols), (x,), (t,))[1]


def _pure_grad(g, x, bidx, rows, cols, *, pyr, pure):
    return jax.vjp(lambda x: pure(x, bidx, rows, cols), x)[1](g)[0]


def _bins_shape(x, bidx, pyr) -> tuple[int, int, int]:
    return (bidx.shape[0], sum(h * w for h, w in pyr[0]), x.shape[3])


_I, _W, _X = _prims.IMAGE, _prims.WINDOW, _prims.INDEX
_values = _prims.Op(
    "spp_jax_window_max",
    _pure_values,
    lambda x, bidx, rows, cols, *, pyr, pure: (_bins_shape(x, bidx, pyr), jnp.float32),
    (_I, _X, _W, _W),
    _W,
)
_tangent = _prims.Op(
    "spp_jax_window_max_tangent",
    _pure_tangent,
    lambda t, x, bidx, rows, cols, *, pyr, pure: (_bins_shape(x, bidx, pyr), jnp.float32),
    (_I, _I, _X, _W, _W),
    _W,
)
_grad = _prims.Op(
    "spp_jax_window_max_grad",
    _pure_grad,
    lambda g, x, bidx, rows, cols, *, pyr, pure: (x.shape, jnp.float32),
    (_W, _I, _X, _W, _W),
    _I,
)
_prims.linear_pair(_tangent, _grad)


def lower_on_cpu(op: _prims.Op, target: str, fallback: Callable, attrs: Callable) -> None:
    """Registers ``op``'s CPU lowering: the custom call ``target`` with the attributes
    ``attrs(ctx, **params)`` returns, or, where that returns None (the kernel is not
    usable or not chosen: decided here, on the first CPU lowering), the pure-JAX or XLA
    code ``fallback``, which other platforms always lower."""
    kernel = jax.ffi.ffi_lowering(target)
    portable = mlir.lower_fun(fallback, multiple_results=False)

    def rule(ctx, *args, **params):
        kernel_attrs = attrs(ctx, **params)
        if kernel_attrs is None:
            return portable(ctx, *args, **params)
        return kernel(ctx, *args, **kernel_attrs)

    op.lower_on("cpu", rule)


def _kernel_attrs(ctx, *, pyr: Pyramid, pure: Pure) -> dict | None:
    return pyr.attrs() if usable() else None


for _op, _target, _pure in (
    (_values, "SppJaxWindowMax", _pure_values),
    (_tangent, "SppJaxWindowMaxTangent", _pure_tangent),
    (_grad, "SppJaxWindowMaxGrad", _pure_grad),
):
    lower_on_cpu(_op, _target, _pure, _kernel_attrs)


def _values_jvp(primals, tangents, *, pyr, pure):
    x, bidx, rows, cols = primals
    t = tangents[0]
    y = _values(x, bidx, rows, cols, pyr=pyr, pure=pure)
    if type(t) is ad.Zero:
        return y, _prims.zero_tangent(y)
    return y, _tangent(t, x, bidx, rows, cols, pyr=pyr, pure=pure)


_values.def_jvp(_values_jvp)


def window_max(
    x: jax.Array, bidx: jax.Array, rows: jax.Array, cols: jax.Array, pyr: Pyramid, pure: Pure
) -> jax.Array:
    """Max of every bin of every window: ``(R, NB, C)`` float32, by the kernel.

    Args:
      x: ``(B, H, W, C)`` float32.
      bidx: ``(R,)`` int32, the batch element of each window.
      rows: ``(R, sum n_h, 2)`` int32 ``[start, end)`` of every row bin of every
        level, in input cells (clipped into the map by the kernel).
      cols: ``(R, sum n_w, 2)`` the same for columns.
      pyr: static :class:`Pyramid`.
      pure: the same computation in pure JAX (:class:`Pure`), lowered where the
        kernel is not.

    A bin that is empty after clipping gives 0 and no derivative; every other bin's
    derivative is that of its first maximum in row-major order (NaN largest), at
    every order, under every transformation.
    """
    return _values(x, bidx, rows, cols, pyr=pyr, pure=pure)


def bounds(bins: Sequence[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """Stacks per-level ``(start, end)`` pairs, each ``(R, n)``, into ``(R, sum n, 2)`` int32."""
    starts = jnp.concatenate([s for s, _ in bins], axis=1)
    ends = jnp.concatenate([e for _, e in bins], axis=1)
    return jnp.stack([starts, ends], axis=2).astype(jnp.int32)
