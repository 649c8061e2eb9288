"""Box formats, GIoU, DIoU and CIoU with their losses, small boxes, mask boxes, in JAX.

Each function is ``torchvision.ops``' function of the same name, with the same
formulas in the same order (values and, for the losses, gradients equal to
torchvision's to float32 rounding), written in ``jax.numpy`` only: every one
works under ``jit``, ``vmap``, ``grad``, ``jvp`` and ``hessian`` (no Python
branch on a value; the CIoU ``alpha`` term, computed under ``torch.no_grad`` in
torchvision, is wrapped in ``lax.stop_gradient`` here, so derivatives of every
order match torchvision's).

Boxes are ``(x1, y1, x2, y2)`` unless a format says otherwise. Float32 and
float64 boxes keep their dtype (a float32 and a float64 argument give float64);
ints, bools and other floats compute in float32, as torchvision's
``_upcast_non_float``. Only shapes and names are checked (``ValueError``
naming the value and what is accepted); values are not: a loss's predicted
boxes may be inverted during training and the formulas then apply as they stand,
as in torchvision.

Where this module differs from torchvision:

- the pairwise IoU part is :func:`~spp_jax.detection.boxes.box_iou`'s, which
  gives 0 (not NaN) for a pair whose union is not positive (two empty boxes);
  :func:`generalized_box_iou` likewise gives 0 for the penalty of a pair whose
  enclosing box is empty;
- :func:`remove_small_boxes` returns a boolean mask of static shape, not the
  indices ``nonzero(mask)``;
- :func:`masks_to_boxes` of masks with ``H = 0`` or ``W = 0`` returns ``N``
  rows of zeros (torchvision returns ``(0, 4)``).

>>> import jax.numpy as jnp
>>> a = jnp.array([[0.0, 0.0, 2.0, 2.0]])
>>> b = jnp.array([[1.0, 0.0, 3.0, 2.0]])
>>> generalized_box_iou(a, b).tolist()
[[0.3333333432674408]]
>>> float(generalized_box_iou_loss(a, b, reduction="sum"))
0.6666666269302368
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax.detection.boxes import _iou_matrix, box_area

__all__ = [
    "BOX_FORMATS",
    "REDUCTIONS",
    "box_convert",
    "complete_box_iou",
    "complete_box_iou_loss",
    "distance_box_iou",
    "distance_box_iou_loss",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "masks_to_boxes",
    "remove_small_boxes",
]

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
"""The formats :func:`box_convert` accepts (torchvision's axis-aligned ones)."""

REDUCTIONS = ("none", "mean", "sum")
"""The ``reduction`` values the losses accept."""


def _as_array(x: Any) -> Any:
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _float_dtype(*arrays: Any) -> Any:
    # torchvision's _upcast_non_float: float32 and float64 stay, the rest is float32.
    dtypes = {np.dtype(a.dtype) for a in arrays}
    if np.dtype(np.float64) in dtypes:
        return jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is enabled
    return jnp.float32


def _boxes(x: Any, name: str, *, ndim: int | None, width: int = 4) -> Any:
    arr = _as_array(x)
    if arr.ndim < 1 or arr.shape[-1] != width or (ndim is not None and arr.ndim != ndim):
        want = f"(N, {width})" if ndim == 2 else f"(..., {width})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(arr.shape)}")
    if not (
        jnp.issubdtype(arr.dtype, jnp.floating)
        or jnp.issubdtype(arr.dtype, jnp.integer)
        or arr.dtype == np.bool_
    ):
        raise TypeError(f"{name} must be a float (or int) array, got dtype {arr.dtype}")
    return arr


def _pair(boxes1: Any, boxes2: Any, *, ndim: int | None) -> tuple[jax.Array, jax.Array]:
    a = _boxes(boxes1, "boxes1", ndim=ndim)
    b = _boxes(boxes2, "boxes2", ndim=ndim)
    dtype = _float_dtype(a, b)
    return jnp.asarray(a, dtype), jnp.asarray(b, dtype)


def _eps(eps: Any, dtype: Any) -> jax.Array:
    if _is_concrete(eps):
        try:
            v = float(eps)
        except (TypeError, ValueError):
            raise TypeError(f"eps must be a number, got {eps!r}") from None
        if not (np.isfinite(v) and v >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return jnp.asarray(eps, dtype)


# ---------------------------------------------------------------------------
# Formats


def box_convert(boxes: Any, in_fmt: str, out_fmt: str) -> jax.Array:
    """Converts boxes between ``"xyxy"``, ``"xywh"`` and ``"cxcywh"``.

    ``torchvision.ops.box_convert`` for its axis-aligned formats, the same
    operations: ``"xyxy"`` is ``(x1, y1, x2, y2)``; ``"xywh"`` is
    ``(x1, y1, w, h)``; ``"cxcywh"`` is ``(cx, cy, w, h)`` with
    ``cx = (x1 + x2) / 2`` and ``x1 = cx - 0.5 * w``. Conversions between
    ``"xywh"`` and ``"cxcywh"`` go through ``"xyxy"``, as torchvision's.

    Args:
      boxes: ``(..., 4)`` boxes in ``in_fmt``.
      in_fmt: the format of ``boxes``, one of :data:`BOX_FORMATS`.
      out_fmt: the format wanted, one of :data:`BOX_FORMATS`.

    Returns:
      ``(..., 4)`` boxes in ``out_fmt`` (float32, or float64 for float64 input).

    Raises:
      ValueError: a format not in :data:`BOX_FORMATS`, or a shape not ``(..., 4)``.

    >>> box_convert(jnp.array([[1.0, 2.0, 5.0, 4.0]]), "xyxy", "cxcywh").tolist()
    [[3.0, 3.0, 4.0, 2.0]]
    """
    for name, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if not isinstance(fmt, str) or fmt not in BOX_FORMATS:
            raise ValueError(f"{name} must be one of {BOX_FORMATS}, got {fmt!r}")
    arr = _boxes(boxes, "boxes", ndim=None)
    return _convert(jnp.asarray(arr, _float_dtype(arr)), in_fmt, out_fmt)


@partial(jax.jit, static_argnames=("in_fmt", "out_fmt"))
def _convert(b: jax.Array, in_fmt: str, out_fmt: str) -> jax.Array:
    if in_fmt == out_fmt:
        return b
    if in_fmt == "xywh":
        x, y, w, h = (b[..., i] for i in range(4))
        b = jnp.stack([x, y, x + w, y + h], axis=-1)
    elif in_fmt == "cxcywh":
        cx, cy, w, h = (b[..., i] for i in range(4))
        b = jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)
    if out_fmt == "xyxy":
        return b
    x1, y1, x2, y2 = (b[..., i] for i in range(4))
    if out_fmt == "xywh":
        return jnp.stack([x1, y1, x2 - x1, y2 - y1], axis=-1)
    return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


# ---------------------------------------------------------------------------
# Pairwise (N, M)


def _enclosing_sides(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Sides of the smallest box enclosing a[i] and b[j], clamped at 0 (torchvision's whi).
    w = jnp.maximum(
        jnp.maximum(a[:, None, 2], b[None, :, 2]) - jnp.minimum(a[:, None, 0], b[None, :, 0]), 0
    )
    h = jnp.maximum(
        jnp.maximum(a[:, None, 3], b[None, :, 3]) - jnp.minimum(a[:, None, 1], b[None, :, 1]), 0
    )
    return w, h


def _union(a: jax.Array, b: jax.Array) -> jax.Array:
    # torchvision's _box_inter_union's union, with _iou_matrix's roundings.
    w = jnp.maximum(
        jnp.minimum(a[:, None, 2], b[None, :, 2]) - jnp.maximum(a[:, None, 0], b[None, :, 0]), 0
    )
    h = jnp.maximum(
        jnp.minimum(a[:, None, 3], b[None, :, 3]) - jnp.maximum(a[:, None, 1], b[None, :, 1]), 0
    )
    inter = jnp.where(w > 0, w * h, 0.0)
    return box_area(a)[:, None] + box_area(b)[None, :] - inter


def generalized_box_iou(boxes1: Any, boxes2: Any) -> jax.Array:
    """Generalized IoU of every pair of boxes: ``torchvision.ops.generalized_box_iou``.

    ``giou = iou - (area_c - union) / area_c``, ``area_c`` the area of the
    smallest box enclosing both. In ``[-1, 1]``. The IoU is
    :func:`~spp_jax.detection.boxes.box_iou`'s (0 where the union is not
    positive); a pair whose enclosing box is empty gets no penalty (torchvision: NaN).

    Args:
      boxes1: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.
      boxes2: ``(M, 4)`` boxes.

    Returns:
      ``(N, M)``: ``giou[i, j]`` of ``boxes1[i]`` and ``boxes2[j]``.

    Raises:
      ValueError: a shape not ``(N, 4)``.

    >>> a = jnp.array([[0.0, 0.0, 1.0, 1.0]])
    >>> generalized_box_iou(a, jnp.array([[2.0, 0.0, 3.0, 1.0]])).tolist()
    [[-0.3333333432674408]]
    """
    return _giou_matrix(*_pair(boxes1, boxes2, ndim=2))


@jax.jit
def _giou_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
    iou = _iou_matrix(a, b)
    union = _union(a, b)
    w, h = _enclosing_sides(a, b)
    area_c = w * h
    positive = area_c > 0
    penalty = (area_c - union) / jnp.where(positive, area_c, 1)
    return iou - jnp.where(positive, penalty, 0)


def _diou_iou(a: jax.Array, b: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    # torchvision's _box_diou_iou.
    iou = _iou_matrix(a, b)
    w, h = _enclosing_sides(a, b)
    diagonal_squared = (w**2) + (h**2) + eps
    x_p = (a[:, 0] + a[:, 2]) / 2
    y_p = (a[:, 1] + a[:, 3]) / 2
    x_g = (b[:, 0] + b[:, 2]) / 2
    y_g = (b[:, 1] + b[:, 3]) / 2
    centres_squared = ((x_p[:, None] - x_g[None, :]) ** 2) + ((y_p[:, None] - y_g[None, :]) ** 2)
    return iou - (centres_squared / diagonal_squared), iou


def distance_box_iou(boxes1: Any, boxes2: Any, eps: float = 1e-7) -> jax.Array:
    """Distance IoU of every pair of boxes: ``torchvision.ops.distance_box_iou``.

    ``diou = iou - d^2 / (c^2 + eps)``, ``d`` the distance between the boxes'
    centres, ``c`` the diagonal of the smallest box enclosing both. The IoU is
    :func:`~spp_jax.detection.boxes.box_iou`'s (0 where the union is not positive).

    Args:
      boxes1: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.
      boxes2: ``(M, 4)`` boxes.
      eps: added to ``c^2``, a number ``>= 0`` (may be traced).

    Returns:
      ``(N, M)``: ``diou[i, j]`` of ``boxes1[i]`` and ``boxes2[j]``, in ``[-1, 1]``.

    Raises:
      ValueError: a shape not ``(N, 4)``, a concrete ``eps`` that is negative or not finite.

    >>> a = jnp.array([[0.0, 0.0, 1.0, 1.0]])
    >>> distance_box_iou(a, jnp.array([[2.0, 0.0, 3.0, 1.0]])).tolist()
    [[-0.4000000059604645]]
    """
    a, b = _pair(boxes1, boxes2, ndim=2)
    return _diou_matrix(a, b, _eps(eps, a.dtype))


@jax.jit
def _diou_matrix(a: jax.Array, b: jax.Array, eps: jax.Array) -> jax.Array:
    return _diou_iou(a, b, eps)[0]


def complete_box_iou(boxes1: Any, boxes2: Any, eps: float = 1e-7) -> jax.Array:
    """Complete IoU of every pair of boxes: ``torchvision.ops.complete_box_iou``.

    ``ciou = diou - alpha * v`` with
    ``v = 4 / pi^2 * (atan(w1 / h1) - atan(w2 / h2))^2`` and
    ``alpha = v / (1 - iou + v + eps)``, ``alpha`` held constant under
    differentiation (``lax.stop_gradient``; torchvision's ``torch.no_grad``).
    A box of zero height gives ``atan(inf)`` (or NaN for ``0 / 0``), as in torchvision.

    Args:
      boxes1: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.
      boxes2: ``(M, 4)`` boxes.
      eps: see :func:`distance_box_iou`; also added to ``alpha``'s denominator.

    Returns:
      ``(N, M)``: ``ciou[i, j]`` of ``boxes1[i]`` and ``boxes2[j]``.

    Raises:
      ValueError: a shape not ``(N, 4)``, a concrete ``eps`` that is negative or not finite.

    >>> a = jnp.array([[0.0, 0.0, 2.0, 1.0]])
    >>> complete_box_iou(a, jnp.array([[0.0, 0.0, 1.0, 1.0]])).tolist()
    [[0.4467518627643585]]
    """
    a, b = _pair(boxes1, boxes2, ndim=2)
    return _ciou_matrix(a, b, _eps(eps, a.dtype))


@jax.jit
def _ciou_matrix(a: jax.Array, b: jax.Array, e: jax.Array) -> jax.Array:
    diou, iou = _diou_iou(a, b, e)
    w_pred = a[:, None, 2] - a[:, None, 0]
    h_pred = a[:, None, 3] - a[:, None, 1]
    w_gt = b[None, :, 2] - b[None, :, 0]
    h_gt = b[None, :, 3] - b[None, :, 1]
    v = (4 / (np.pi**2)) * ((jnp.arctan(w_pred / h_pred) - jnp.arctan(w_gt / h_gt)) ** 2)
    alpha = lax.stop_gradient(v / (1 - iou + v + e))
    return diou - alpha * v


# ---------------------------------------------------------------------------
# Losses (elementwise over matching boxes)


def _check_reduction(reduction: Any) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _loss_pair(boxes1: Any, boxes2: Any) -> tuple[jax.Array, jax.Array]:
    a, b = _pair(boxes1, boxes2, ndim=None)
    if a.shape != b.shape:
        raise ValueError(
            f"boxes1 and boxes2 must have the same shape (..., 4), got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    return a, b


def _reduce(loss: jax.Array, reduction: str) -> jax.Array:
    if reduction == "mean":
        # torchvision: 0.0 * loss.sum() for no boxes (not mean's NaN).
        return jnp.mean(loss) if loss.size else 0.0 * jnp.sum(loss)
    if reduction == "sum":
        return jnp.sum(loss)
    return loss


def _loss_inter_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    # torchvision's ops._utils._loss_inter_union.
    x1, y1, x2, y2 = (a[..., i] for i in range(4))
    x1g, y1g, x2g, y2g = (b[..., i] for i in range(4))
    xkis1 = jnp.maximum(x1, x1g)
    ykis1 = jnp.maximum(y1, y1g)
    xkis2 = jnp.minimum(x2, x2g)
    ykis2 = jnp.minimum(y2, y2g)
    mask = (ykis2 > ykis1) & (xkis2 > xkis1)
    inter = jnp.where(mask, (xkis2 - xkis1) * (ykis2 - ykis1), 0.0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    return inter, union


def _enclosing(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Sides of the smallest enclosing box, not clamped (torchvision's losses).
    xc1 = jnp.minimum(a[..., 0], b[..., 0])
    yc1 = jnp.minimum(a[..., 1], b[..., 1])
    xc2 = jnp.maximum(a[..., 2], b[..., 2])
    yc2 = jnp.maximum(a[..., 3], b[..., 3])
    return xc2 - xc1, yc2 - yc1


def generalized_box_iou_loss(
    boxes1: Any, boxes2: Any, reduction: str = "none", eps: float = 1e-7
) -> jax.Array:
    """``1 - GIoU`` of matching boxes: ``torchvision.ops.generalized_box_iou_loss``.

    ``iou = inter / (union + eps)``,
    ``loss = 1 - (iou - (area_c - union) / (area_c + eps))``, ``area_c`` the
    area of the smallest box enclosing both. Symmetric in its arguments.

    Args:
      boxes1: ``(..., 4)`` boxes ``(x1, y1, x2, y2)`` (e.g. predicted).
      boxes2: boxes of the same shape (e.g. the targets).
      reduction: ``"none"`` (a loss per box, shape ``(...)``), ``"mean"`` or
        ``"sum"`` (a scalar; the mean of no boxes is 0, as torchvision's).
      eps: a number ``>= 0`` (may be traced) keeping the divisions finite.

    Returns:
      The loss, reduced as asked.

    Raises:
      ValueError: shapes not ``(..., 4)`` or not equal, an unknown ``reduction``,
        a concrete ``eps`` that is negative or not finite.

    >>> p = jnp.array([[0.0, 0.0, 1.0, 1.0]])
    >>> generalized_box_iou_loss(p, jnp.array([[2.0, 0.0, 3.0, 1.0]])).tolist()
    [1.3333333730697632]
    """
    _check_reduction(reduction)
    a, b = _loss_pair(boxes1, boxes2)
    return _giou_loss(a, b, _eps(eps, a.dtype), reduction)


@partial(jax.jit, static_argnames="reduction")
def _giou_loss(a: jax.Array, b: jax.Array, e: jax.Array, reduction: str) -> jax.Array:
    inter, union = _loss_inter_union(a, b)
    iou = inter / (union + e)
    w, h = _enclosing(a, b)
    area_c = w * h
    giou = iou - ((area_c - union) / (area_c + e))
    return _reduce(1 - giou, reduction)


def _diou_iou_loss(a: jax.Array, b: jax.Array, eps: jax.Array) -> tuple[jax.Array, jax.Array]:
    # torchvision's ops.diou_loss._diou_iou_loss.
    inter, union = _loss_inter_union(a, b)
    iou = inter / (union + eps)
    w, h = _enclosing(a, b)
    diagonal_squared = (w**2) + (h**2) + eps
    x_p = (a[..., 2] + a[..., 0]) / 2
    y_p = (a[..., 3] + a[..., 1]) / 2
    x_g = (b[..., 0] + b[..., 2]) / 2
    y_g = (b[..., 1] + b[..., 3]) / 2
    centres_squared = ((x_p - x_g) ** 2) + ((y_p - y_g) ** 2)
    return 1 - iou + (centres_squared / diagonal_squared), iou


def distance_box_iou_loss(
    boxes1: Any, boxes2: Any, reduction: str = "none", eps: float = 1e-7
) -> jax.Array:
    """``1 - DIoU`` of matching boxes: ``torchvision.ops.distance_box_iou_loss``.

    ``loss = 1 - inter / (union + eps) + d^2 / (c^2 + eps)``, ``d`` the distance
    between the centres, ``c`` the diagonal of the smallest enclosing box.

    Args:
      boxes1: ``(..., 4)`` boxes ``(x1, y1, x2, y2)``.
      boxes2: boxes of the same shape.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``, as in
        :func:`generalized_box_iou_loss`.
      eps: a number ``>= 0`` (may be traced).

    Returns:
      The loss, reduced as asked.

    Raises:
      ValueError: as :func:`generalized_box_iou_loss`.

    >>> p = jnp.array([[0.0, 0.0, 1.0, 1.0]])
    >>> distance_box_iou_loss(p, jnp.array([[2.0, 0.0, 3.0, 1.0]])).tolist()
    [1.399999976158142]
    """
    _check_reduction(reduction)
    a, b = _loss_pair(boxes1, boxes2)
    return _diou_loss(a, b, _eps(eps, a.dtype), reduction)


@partial(jax.jit, static_argnames="reduction")
def _diou_loss(a: jax.Array, b: jax.Array, e: jax.Array, reduction: str) -> jax.Array:
    return _reduce(_diou_iou_loss(a, b, e)[0], reduction)


def complete_box_iou_loss(
    boxes1: Any, boxes2: Any, reduction: str = "none", eps: float = 1e-7
) -> jax.Array:
    """``1 - CIoU`` of matching boxes: ``torchvision.ops.complete_box_iou_loss``.

    ``loss = diou_loss + alpha * v`` with
    ``v = 4 / pi^2 * (atan(w2 / h2) - atan(w1 / h1))^2`` and
    ``alpha = v / (1 - iou + v + eps)`` held constant under differentiation
    (``lax.stop_gradient``; torchvision's ``torch.no_grad``). As in
    torchvision, ``eps`` enters only ``alpha``: the DIoU part and its ``iou``
    use ``eps = 1e-7`` whatever ``eps`` is. A zero height gives ``atan(inf)``
    (NaN for ``0 / 0``), as in torchvision.

    Args:
      boxes1: ``(..., 4)`` boxes ``(x1, y1, x2, y2)``.
      boxes2: boxes of the same shape.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``, as in
        :func:`generalized_box_iou_loss`.
      eps: a number ``>= 0`` (may be traced), in ``alpha``'s denominator.

    Returns:
      The loss, reduced as asked.

    Raises:
      ValueError: as :func:`generalized_box_iou_loss`.

    >>> p = jnp.array([[0.0, 0.0, 2.0, 1.0]])
    >>> complete_box_iou_loss(p, jnp.array([[0.0, 0.0, 1.0, 1.0]])).tolist()
    [0.5532481670379639]
    """
    _check_reduction(reduction)
    a, b = _loss_pair(boxes1, boxes2)
    return _ciou_loss(a, b, _eps(eps, a.dtype), reduction)


@partial(jax.jit, static_argnames="reduction")
def _ciou_loss(a: jax.Array, b: jax.Array, e: jax.Array, reduction: str) -> jax.Array:
    diou_loss, iou = _diou_iou_loss(a, b, jnp.asarray(1e-7, a.dtype))
    w_pred = a[..., 2] - a[..., 0]
    h_pred = a[..., 3] - a[..., 1]
    w_gt = b[..., 2] - b[..., 0]
    h_gt = b[..., 3] - b[..., 1]
    v = (4 / (np.pi**2)) * ((jnp.arctan(w_gt / h_gt) - jnp.arctan(w_pred / h_pred)) ** 2)
    alpha = lax.stop_gradient(v / (1 - iou + v + e))
    return _reduce(diou_loss + alpha * v, reduction)


# ---------------------------------------------------------------------------
# Small boxes, masks


def remove_small_boxes(boxes: Any, min_size: float) -> jax.Array:
    """Which boxes have both sides ``>= min_size``: ``torchvision.ops.remove_small_boxes``.

    ``keep = (x2 - x1 >= min_size) & (y2 - y1 >= min_size)``, returned as a
    mask of static shape (torchvision returns the indices
    ``torch.where(keep)[0]``; ``jnp.flatnonzero(keep)`` gives them outside ``jit``).

    Args:
      boxes: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.
      min_size: the smallest side kept, a number ``>= 0`` (may be traced).

    Returns:
      bool ``(N,)``: True for the boxes to keep.

    Raises:
      ValueError: a shape not ``(N, 4)``, a concrete ``min_size`` that is
        negative or NaN.

    >>> b = jnp.array([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 0.5]])
    >>> remove_small_boxes(b, 1.0).tolist()
    [True, False]
    """
    arr = _boxes(boxes, "boxes", ndim=2)
    b = jnp.asarray(arr, _float_dtype(arr))
    if _is_concrete(min_size):
        try:
            m = float(min_size)
        except (TypeError, ValueError):
            raise TypeError(f"min_size must be a number, got {min_size!r}") from None
        if not m >= 0:
            raise ValueError(f"min_size must be a number >= 0, got {min_size!r}")
    return _keep(b, jnp.asarray(min_size, b.dtype))


@jax.jit
def _keep(b: jax.Array, min_size: jax.Array) -> jax.Array:
    ws = b[:, 2] - b[:, 0]
    hs = b[:, 3] - b[:, 1]
    return (ws >= min_size) & (hs >= min_size)


def masks_to_boxes(masks: Any) -> jax.Array:
    """The box around each mask's nonzero pixels: ``torchvision.ops.masks_to_boxes``.

    ``(x1, y1, x2, y2)`` are the first and last columns and rows holding a
    nonzero pixel, in pixel indices (inclusive: a single pixel at ``(y, x)``
    gives ``(x, y, x, y)``, as torchvision's). An empty mask (no nonzero pixel)
    gives ``(0, 0, 0, 0)``, as torchvision's; so do all masks when ``H`` or
    ``W`` is 0 (torchvision then returns shape ``(0, 4)``). Piecewise constant:
    its derivative with respect to float masks is 0.

    Args:
      masks: ``(N, H, W)``, any dtype; nonzero is in the mask.

    Returns:
      float32 ``(N, 4)`` boxes.

    Raises:
      ValueError: a shape not ``(N, H, W)``.

    >>> m = jnp.zeros((2, 4, 5)).at[0, 1:3, 2:5].set(1)
    >>> masks_to_boxes(m).tolist()
    [[2.0, 1.0, 4.0, 2.0], [0.0, 0.0, 0.0, 0.0]]
    """
    arr = _as_array(masks)
    if arr.ndim != 3:
        raise ValueError(f"masks must have shape (N, H, W), got {tuple(arr.shape)}")
    n, h, w = arr.shape
    if h == 0 or w == 0:
        return jnp.zeros((n, 4), jnp.float32)
    return _mask_boxes(jnp.asarray(arr))


@jax.jit
def _mask_boxes(masks: jax.Array) -> jax.Array:
    _, h, w = masks.shape
    m = masks.astype(bool)
    rows = jnp.any(m, axis=2)
    cols = jnp.any(m, axis=1)
    y1 = jnp.argmax(rows, axis=1)
    x1 = jnp.argmax(cols, axis=1)
    y2 = (h - 1) - jnp.argmax(rows[:, ::-1], axis=1)
    x2 = (w - 1) - jnp.argmax(cols[:, ::-1], axis=1)
    out = jnp.stack([x1, y1, x2, y2], axis=1).astype(jnp.float32)
    empty = ~jnp.any(rows, axis=1)
    return jnp.where(empty[:, None], 0.0, out)
