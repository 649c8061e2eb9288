"""The conv trunks' 2-D convolution: oneDNN on CPU where installed, XLA elsewhere.

XLA's CPU convolutions are slower than oneDNN's on the networks of
:mod:`spp_jax.models`, their gradients most of all (PyTorch runs its CPU convolutions
on oneDNN). So :func:`conv2d` is three JAX primitives:

* ``conv``: ``y = conv(x, w)``;
* ``conv_input``: ``dx``, the transpose of ``conv`` in ``x``, applied to ``dy``;
* ``conv_kernel``: ``dw``, the transpose of ``conv`` in ``w``, applied to ``dy``.

Each is bilinear and each is the transpose of another in one of its operands,
so JAX linearises, transposes, differentiates again (``jvp``, ``grad``,
``hessian``, ...) and batches them as it does ``lax.conv_general_dilated``:
``vmap`` over the images folds the mapped axis into the batch (one call); other
``vmap``s (per-example kernels) take XLA's own batched convolution.

On CPU each primitive lowers to a custom call into ``csrc/onednn_conv.cc`` where
oneDNN is installed, the file compiles (built and cached by
:mod:`spp_jax._cpu.native`) and it measured at least as fast as XLA
(:mod:`spp_jax._cpu.tune`); everywhere else to XLA's convolution, in the
formulation XLA runs fastest (:func:`_xla_forward`). Installing oneDNN and the
``SPP_JAX_ONEDNN`` settings: ``docs/install.md``.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad, batching

from spp_jax import _prims
from spp_jax._cpu import native

log = logging.getLogger("spp_jax")

ENV = "SPP_JAX_ONEDNN"
ROOT_ENV = "SPP_JAX_ONEDNN_ROOT"
SOURCE = Path(__file__).parent / "csrc" / "onednn_conv.cc"
_DN = ("NHWC", "HWIO", "NHWC")


class Geometry(NamedTuple):
    """Static attributes of a convolution whose windows fit the input exactly:
    the last window of each axis ends on the input's last row (column) or in the
    bottom (right) padding, so that padding is implied by the sizes."""

    stride: tuple[int, int]
    pad: tuple[int, int]  # top, left
    size: tuple[int, int]  # input height, width
    out: tuple[int, int]  # output height, width
    kernel: tuple[int, int]

    def padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``lax`` padding ``((top, bottom), (left, right))``."""
        return tuple(
            (p, (o - 1) * s + k - n - p)
            for p, o, s, k, n in zip(
                self.pad, self.out, self.stride, self.kernel, self.size, strict=True
            )
        )  # type: ignore[return-value]

    def attrs(self) -> dict[str, np.int64]:
        return {
            "stride_h": np.int64(self.stride[0]),
            "stride_w": np.int64(self.stride[1]),
            "pad_top": np.int64(self.pad[0]),
            "pad_left": np.int64(self.pad[1]),
        }


# --------------------------------------------------------------------------------------
# XLA formulations: the primitives' lowering where oneDNN is not used, and their
# reference.
# --------------------------------------------------------------------------------------


def _lax_conv(x: jax.Array, w: jax.Array, g: Geometry) -> jax.Array:
    return lax.conv_general_dilated(x, w, g.stride, g.padding(), dimension_numbers=_DN)


def _xla_forward(x: jax.Array, w: jax.Array, *, geo: Geometry) -> jax.Array:
    """The convolution in the formulation XLA's CPU backend runs fastest (exact)."""
    if x.shape[-1] >= 4:
        return _lax_conv(x, w, geo)
    # RGB: zero channels up to 4 (XLA's CPU conv is far slower on 3 channels; TPU
    # pads anyway).
    extra = 4 - x.shape[-1]
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    w = jnp.pad(w, ((0, 0), (0, 0), (0, extra), (0, 0)))
    return _xla_crop_trick(x, w, geo) if geo.padding() == ((0, 0), (0, 0)) else _lax_conv(x, w, geo)


def _xla_crop_trick(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """An unpadded conv as outputs ``1..n`` of the conv padded by one stride (the
    same values; XLA's CPU conv runs that, and its gradients, faster)."""
    (sh, sw), (oh, ow) = geo.stride, geo.out
    padded = geo._replace(pad=(sh, sw), out=(oh + 2, ow + 2))
    return _lax_conv(x, w, padded)[:, 1 : 1 + oh, 1 : 1 + ow]


def _xla_gradient_form(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """The conv whose ``lax`` derivatives XLA runs fastest (the crop trick for an
    unpadded RGB conv: its gradients measured several times faster)."""
    if x.shape[-1] < 4 and geo.padding() == ((0, 0), (0, 0)):
        return _xla_crop_trick(x, w, geo)
    return _lax_conv(x, w, geo)


def _transpose(f, shape: tuple[int, ...], ct: jax.Array, other: jax.Array) -> jax.Array:
    """The transpose of the linear map ``f`` (of an array of ``shape``) applied to ``ct``.

    Inside ``shard_map`` the per-device map must stay per device: its argument is
    typed as varying over the same axes as ``ct`` and ``other``, else JAX would treat
    it as replicated and sum its cotangent over the devices.
    """
    zero, ct, _ = _prims.match_varying([jnp.zeros(shape, ct.dtype), ct, other])
    return jax.vjp(f, zero)[1](ct)[0]


def _xla_input(dy: jax.Array, w: jax.Array, *, geo: Geometry) -> jax.Array:
    shape, _ = _shape_input(dy, w, geo=geo)
    return _transpose(lambda x: _xla_gradient_form(x, w, geo), shape, dy, w)


def _xla_kernel(x: jax.Array, dy: jax.Array, *, geo: Geometry) -> jax.Array:
    shape, _ = _shape_kernel(x, dy, geo=geo)
    return _transpose(lambda w: _xla_gradient_form(x, w, geo), shape, dy, x)


# --------------------------------------------------------------------------------------
# The primitives.
# --------------------------------------------------------------------------------------


def _shape_forward(x, w, *, geo):
    return (x.shape[0], *geo.out, w.shape[3]), x.dtype


def _shape_input(dy, w, *, geo):
    return (dy.shape[0], *geo.size, w.shape[2]), dy.dtype


def _shape_kernel(x, dy, *, geo):
    return (*geo.kernel, x.shape[3], dy.shape[3]), x.dtype


_conv = _prims.Op("spp_jax_conv", _xla_forward, _shape_forward)
_conv_input = _prims.Op("spp_jax_conv_input", _xla_input, _shape_input)
_conv_kernel = _prims.Op("spp_jax_conv_kernel", _xla_kernel, _shape_kernel)
_OPS = {"forward": _conv, "input": _conv_input, "kernel": _conv_kernel}


def _bilinear_jvp(op: _prims.Op, primals, tangents, *, geo):
    """``d op(a, b) = op(da, b) + op(a, db)``, skipping symbolic zeros."""
    (a, b), (da, db) = primals, tangents
    out = op(a, b, geo=geo)
    terms = []
    if type(da) is not ad.Zero:
        terms.append(op(da, b, geo=geo))
    if type(db) is not ad.Zero:
        terms.append(op(a, db, geo=geo))
    if not terms:
        return out, _prims.zero_tangent(out)
    return out, functools.reduce(jnp.add, terms)


# Transposes, from <conv(x, w), dy> = <x, conv_input(dy, w)> = <w, conv_kernel(x, dy)>:
# each op is linear in each operand, and its transpose in that operand is one of
# the other two ops.
_TRANSPOSES = {  # op: (its transpose in operand 0, its transpose in operand 1)
    "forward": (lambda ct, x, w, geo: _conv_input(ct, w, geo=geo),
                lambda ct, x, w, geo: _conv_kernel(x, ct, geo=geo)),
    "input": (lambda ct, dy, w, geo: _conv(ct, w, geo=geo),
              lambda ct, dy, w, geo: _conv_kernel(ct, dy, geo=geo)),
    "kernel": (lambda ct, x, dy, geo: _conv_input(dy, ct, geo=geo),
               lambda ct, x, dy, geo: _conv(x, ct, geo=geo)),
}  # fmt: skip


def _bilinear_transpose(name: str, ct, a, b, *, geo):
    undefined = [ad.is_undefined_primal(a), ad.is_undefined_primal(b)]
    if all(undefined):
        raise TypeError(f"spp_jax_conv_{name} is bilinear: transpose it in one operand at a time")
    i = undefined.index(True)
    aval = (a, b)[i].aval
    value = ad.Zero(aval) if type(ct) is ad.Zero else _TRANSPOSES[name][i](ct, a, b, geo)
    return [value, None] if i == 0 else [None, value]


# vmap: the images' axis folds into the batch when only the operand with a batch
# axis is mapped (one call); anything else (per-example kernels) takes the XLA
# formulation's own batching.
_FOLDABLE = {"forward": (True, False), "input": (True, False), "kernel": (False, False)}


def _batch(name: str, args, dims, *, geo):
    op, (fold_a, fold_b) = _OPS[name], _FOLDABLE[name]
    (a, b), (da, db) = args, dims
    if (da is None or fold_a) and (db is None or fold_b) and da is not None:
        a = jnp.moveaxis(a, da, 0)
        n, m = a.shape[:2]
        out = op(a.reshape(n * m, *a.shape[2:]), b, geo=geo)
        return out.reshape(n, m, *out.shape[1:]), 0
    reference = {"forward": _xla_forward, "input": _xla_input, "kernel": _xla_kernel}[name]
    return jax.vmap(functools.partial(reference, geo=geo), in_axes=(da, db))(a, b), 0


for _name, _op in _OPS.items():
    _op.def_jvp(functools.partial(_bilinear_jvp, _op))
    ad.primitive_transposes[_op.prim] = functools.partial(_bilinear_transpose, _name)
    batching.primitive_batchers[_op.prim] = functools.partial(_batch, _name)


# --------------------------------------------------------------------------------------
# oneDNN.
# --------------------------------------------------------------------------------------


def _setting() -> str:
    if _forced is None and not native.enabled():
        return "off"
    return native.env_setting(ENV, _forced)


_forced: bool | None = None


def forced(enabled: bool):
    """Uses (True) or bypasses (False) oneDNN in code traced inside, whatever the
    environment says (:func:`spp_jax._cpu.native.override`): for tests and benchmarks."""
    return native.override(sys.modules[__name__], enabled)


def find_onednn() -> tuple[Path, Path] | None:
    """``(include_dir, lib_dir)`` of a oneDNN install, or None.

    Looks in ``$SPP_JAX_ONEDNN_ROOT``, then in this Python's prefix (where the
    ``onednn-*`` wheels put ``include/`` and ``lib/``), then ``/usr/local`` and ``/usr``.
    """
    roots = [os.environ.get(ROOT_ENV), sys.prefix, sys.base_prefix, "/usr/local", "/usr"]
    for root in filter(None, roots):
        include, lib = Path(root) / "include", Path(root) / "lib"
        if (include / "oneapi" / "dnnl" / "dnnl.hpp").exists() and any(lib.glob("libdnnl.so*")):
            return include, lib
    return None


@functools.cache
def _load() -> str | None:
    """Builds and registers the oneDNN kernels once; returns None or why not."""
    found = find_onednn()
    if found is None:
        return (
            f"oneDNN not found (pip install 'spp-jax[cpu]', or set {ROOT_ENV} to a "
            "directory with include/oneapi/dnnl/dnnl.hpp and lib/libdnnl.so)"
        )
    include, lib = found
    library = native.Library(
        SOURCE,
        ("SppJaxConv", "SppJaxConvInput", "SppJaxConvKernel"),
        cflags=("-fopenmp", "-I", str(include)),
        ldflags=(f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}", "-fopenmp"),
    )
    return native.load(library)


def usable() -> bool:
    """True if oneDNN is switched on, installed and built (builds it on first
    call: only ever called while lowering for CPU).

    Raises:
      RuntimeError: ``SPP_JAX_ONEDNN=1`` and oneDNN is unavailable.
    """
    fail = f"{ENV}=1 but spp_jax's oneDNN convolutions are unavailable"
    return native.decide(_setting(), _load, fail, _log_once)


def _chosen() -> bool:
    """Once oneDNN is usable: always when required (``SPP_JAX_ONEDNN=1`` or
    :func:`forced`), else where it measured at least as fast as XLA on this
    machine (:func:`spp_jax._cpu.native.tuned`)."""
    return _setting() == "on" or native.tuned(SOURCE.stem)["conv"]


@functools.cache
def _log_once(problem: str) -> None:
    log.info("spp_jax: convolutions use XLA's CPU code: %s", problem)


def _threads() -> int:
    """oneDNN's threads per call: the cores (``$OMP_NUM_THREADS`` if set) shared by this
    process's CPU devices, which run at once under ``pmap``/``shard_map`` (all-core
    OpenMP teams per device measured to oversubscribe the cores and stall XLA's
    collectives past their timeout)."""
    cores = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    return max(1, cores // max(1, jax.local_device_count("cpu")))


def _kernel_attrs(ctx, *, geo: Geometry) -> dict | None:
    if ctx.avals_in[0].dtype == jnp.float32 and usable() and _chosen():
        return {**geo.attrs(), "threads": np.int64(_threads())}
    return None


for _op, _target, _xla in (
    (_conv, "SppJaxConv", _xla_forward),
    (_conv_input, "SppJaxConvInput", _xla_input),
    (_conv_kernel, "SppJaxConvKernel", _xla_kernel),
):
    native.lower_on_cpu(_op, _target, _xla, _kernel_attrs)


# --------------------------------------------------------------------------------------
# The op.
# --------------------------------------------------------------------------------------


def conv2d(x: jax.Array, w: jax.Array, stride: int, pad: int) -> jax.Array:
    """NHWC x HWIO convolution, square stride and symmetric zero padding.

    Args:
      x: ``(N, H, W, I)``.
      w: ``(KH, KW, I, O)``.
      stride: the stride of both axes.
      pad: zero cells added on every side.

    Returns:
      ``(N, OH, OW, O)``, ``OH = (H + 2 pad - KH) // stride + 1`` (the same for W):
      ``lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))`` up to float rounding order,
      under every transformation (see the module docstring for how it runs).
    """
    geo = _geometry(x.shape, w.shape, stride, pad)
    rows, cols = geo.size
    x = x[:, :rows, :cols]  # rows and columns no window reads: the windows fit exactly
    if _setting() == "off" or x.dtype != jnp.float32 or w.dtype != jnp.float32:
        return _xla_conv(x, w, geo)
    return _conv(x, w, geo=geo)


def _geometry(x_shape, w_shape, stride: int, pad: int) -> Geometry:
    (kh, kw), (h, wd) = w_shape[:2], x_shape[1:3]
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"a {kh}x{kw} conv with stride {stride} and padding {pad} needs an input of at "
            f"least {kh - 2 * pad}x{kw - 2 * pad}, got {h}x{wd}"
        )
    rows, cols = (oh - 1) * stride + kh - pad, (ow - 1) * stride + kw - pad
    return Geometry((stride, stride), (pad, pad), (min(h, rows), min(wd, cols)), (oh, ow), (kh, kw))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _xla_conv(x: jax.Array, w: jax.Array, geo: Geometry) -> jax.Array:
    """Without the primitives: XLA's fastest forward, the derivatives of the
    formulation whose ``lax`` derivatives XLA runs fastest."""
    return _xla_forward(x, w, geo=geo)


@_xla_conv.defjvp
def _xla_conv_jvp(geo, primals, tangents):
    return jax.jvp(lambda x, w: _xla_gradient_form(x, w, geo), primals, tangents)
