"""The few JAX primitives behind the pooling ops' derivatives (internal).

Max pooling picks one input cell per output value, its first maximum (the
"winner"), so its derivative is a pair of linear maps that depend on ``x`` only
through the winners:

* the tangent map ``gather(t)[o] = t[winner(o)]`` (forward mode, ``jax.jvp``),
* its transpose ``scatter(g)[i] = sum of g[o] over the o won by i`` (reverse mode).

Each is a primitive here, registered as the other's transpose, so JAX can
linearise, transpose, differentiate again and batch them like ``lax`` ops: the
pooling ops are ``custom_jvp`` functions whose tangent is ``gather``; ``grad``
transposes it into ``scatter``, the fast routing code the backward pass always
used; ``grad`` of ``grad`` transposes ``scatter`` back into ``gather``; the
derivative of either map with respect to ``x`` is zero (the winners are
piecewise constant), so Hessians are exactly zero, as for ``lax.reduce_window``.
Average pooling's stage sums are linear in ``x`` and use the same machinery.

Batching folds the mapped axis into the batch axis of the op (or into its
windows), so ``vmap`` runs one call, not one per mapped element. Operands are
described by a *kind*:

* ``"image"``: leading axis ``B`` (feature maps, per-example arrays);
* ``"window"``: leading axis ``R`` (boxes, per-window bins, per-window results);
* ``"index"``: ``(R,)`` int, each window's element of the image batch (shifted
  by ``n * B`` when the image batch is folded).

A primitive's lowering is a JAX function (``mlir.lower_fun``), per platform if
needed (the CPU kernel registers its own CPU lowering in ``_cpu/native.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

IMAGE, WINDOW, INDEX = "image", "window", "index"


def _varying(aval) -> frozenset:
    mat = getattr(aval, "mat", None)  # jax >= 0.9; older releases call it vma
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def match_varying(args: Sequence[jax.Array]) -> list[jax.Array]:
    """Marks every operand as varying over the manual mesh axes (inside
    ``shard_map``) that any operand varies over, as ``lax`` ops do for their
    operands. An invariant value made varying is exact: its cotangent is summed
    over the axes, as it should be."""
    avals = [jax.typeof(a) for a in args]
    union = frozenset().union(*(_varying(a) for a in avals))
    if not union:
        return list(args)
    return [
        jax.lax.pcast(a, tuple(sorted(union - _varying(v))), to="varying")
        if union - _varying(v)
        else a
        for a, v in zip(args, avals, strict=True)
    ]


def _out_aval(shape, dtype, avals):
    ref = max(avals, key=lambda a: len(_varying(a)))
    if not _varying(ref):
        return jax.core.ShapedArray(shape, dtype)
    return ref.update(shape=tuple(shape), dtype=dtype, weak_type=False)


class Op:
    """One primitive: ``impl(*operands, **params)`` computes it, ``shape(*avals,
    **params)`` gives its ``(shape, dtype)`` (a list of them if
    ``multiple_results``), ``kinds`` (one per operand, or one for all) and
    ``out_kind`` say how ``vmap`` folds its operands and results (see the module
    docstring; default: all images). Its derivative comes from :func:`linear_pair` or
    :meth:`def_jvp`."""

    def __init__(
        self,
        name: str,
        impl: Callable[..., Any],
        shape: Callable[..., Any],
        kinds: tuple[str, ...] | str = IMAGE,
        out_kind: str = IMAGE,
        multiple_results: bool = False,
    ):
        self.prim = Primitive(name)
        self.prim.multiple_results = multiple_results
        self.kinds, self.out_kind = kinds, out_kind

        def abstract_eval(*avals, **params):
            if multiple_results:
                return [_out_aval(s, d, avals) for s, d in shape(*avals, **params)]
            return _out_aval(*shape(*avals, **params), avals)

        self.prim.def_impl(self._eager)
        self.prim.def_abstract_eval(abstract_eval)
        mlir.register_lowering(self.prim, mlir.lower_fun(impl, multiple_results=multiple_results))
        batching.primitive_batchers[self.prim] = self._batch

    def __call__(self, *args: jax.Array, **params: Any) -> Any:
        return self.prim.bind(*match_varying(args), **params)

    def lower_on(self, platform: str, rule) -> None:
        """Registers another lowering rule for one platform."""
        mlir.register_lowering(self.prim, rule, platform=platform)

    def def_jvp(self, rule) -> None:
        """``rule(primals, tangents, **params) -> (outs, tangent_outs)``."""
        ad.primitive_jvps[self.prim] = rule

    def _eager(self, *args, **params):
        return _jitted_bind(self.prim, tuple(sorted(params.items())))(*args)

    def _batch(self, args, dims, **params):
        mapped = [d is not None for d in dims]
        n = next(a.shape[d] for a, d, m in zip(args, dims, mapped, strict=True) if m)
        kinds = (self.kinds,) * len(args) if isinstance(self.kinds, str) else self.kinds
        moved = [
            jnp.moveaxis(a, d, 0) if m else a for a, d, m in zip(args, dims, mapped, strict=True)
        ]
        images_mapped = any(m for m, k in zip(mapped, kinds, strict=True) if k == IMAGE)
        if self.out_kind == WINDOW and not images_mapped:
            # Only windows are mapped (e.g. boxes of one feature map): fold them
            # into the window axis; the images stay as they are.
            folded = [
                _fold(_full(a, n, m), n) if k != IMAGE else a
                for a, k, m in zip(moved, kinds, mapped, strict=True)
            ]
        else:
            b = _image_batch(moved, mapped, kinds, params)
            if "image_shape" in params:
                params = {**params, "image_shape": (n * b, *params["image_shape"][1:])}
            folded = []
            for a, k, m in zip(moved, kinds, mapped, strict=True):
                a = _full(a, n, m)
                if k == INDEX:
                    a = a + (jnp.arange(n, dtype=a.dtype) * b).reshape(n, *[1] * (a.ndim - 1))
                folded.append(_fold(a, n))
        out = self(*folded, **params)
        unfold = lambda o: o.reshape(n, o.shape[0] // n, *o.shape[1:])
        if self.prim.multiple_results:
            return [unfold(o) for o in out], [0] * len(out)
        return unfold(out), 0


def _image_batch(moved, mapped, kinds, params) -> int:
    for a, m, k in zip(moved, mapped, kinds, strict=True):
        if k == IMAGE:
            return a.shape[1] if m else a.shape[0]
    return params["image_shape"][0]


def _full(a: jax.Array, n: int, mapped: bool) -> jax.Array:
    return a if mapped else jnp.broadcast_to(a, (n, *a.shape))


def _fold(a: jax.Array, n: int) -> jax.Array:
    return a.reshape(n * a.shape[1], *a.shape[2:])


@functools.lru_cache(maxsize=256)
def _jitted_bind(prim: Primitive, params: tuple) -> Callable:
    return jax.jit(functools.partial(prim.bind, **dict(params)))


def linear_pair(forward: Op, transpose: Op) -> None:
    """Registers ``forward`` and ``transpose`` as each other's transpose.

    Both are linear in their first operand; the other operands (winners,
    indices, bins, the input they were found in) are residuals, held fixed: the
    derivative with respect to them is zero. Both take the same params.
    """
    for op, other in ((forward, transpose), (transpose, forward)):
        ad.primitive_jvps[op.prim] = functools.partial(_linear_jvp, op)
        ad.primitive_transposes[op.prim] = functools.partial(_linear_transpose, op, other)


def zero_tangent(x: jax.Array):
    """A symbolic zero tangent for the primal value ``x`` (float0 for ints)."""
    return ad.Zero(jax.typeof(x).to_tangent_aval())


def _linear_jvp(op: Op, primals, tangents, **params):
    out = op(*primals, **params)
    t = tangents[0]
    if type(t) is ad.Zero:
        return out, zero_tangent(out)
    return out, op(ad.instantiate_zeros(t), *primals[1:], **params)


def _linear_transpose(op: Op, other: Op, ct, *args, **params):
    v, *res = args
    # The map does not depend on its residuals (winners, bins, the input they were
    # found in) to first order: their cotangents are zero.
    res_ct = [ad.Zero(r.aval) if ad.is_undefined_primal(r) else None for r in res]
    if not ad.is_undefined_primal(v):
        return [None, *res_ct]
    if any(ad.is_undefined_primal(r) for r in res):
        # Linear in v for fixed residuals only; JAX's own rules never build this.
        raise TypeError(
            f"{op.prim.name} is linear in its first operand for fixed residuals; it was "
            "asked to transpose with respect to a residual too"
        )
    if type(ct) is ad.Zero:
        return [ad.Zero(v.aval), *res_ct]
    return [other(ct, *res, **params), *res_ct]
