"""Boxes: IoU, clipping and the R-CNN box-regression coding, in JAX.

Boxes are ``(x1, y1, x2, y2)`` floats in continuous pixel edges: a box covers
``[x1, x2) x [y1, y2)``, its area is ``(x2 - x1) * (y2 - y1)``, with no "+1"
anywhere (torchvision's convention; ``docs/detection-reference.md`` section 1).
Every function computes in float32 (ints and other float dtypes are converted)
and works under ``jit`` and ``vmap``.

Bad input: shapes that do not fit raise ``ValueError`` at once. Where the values
are concrete (not traced by ``jit`` / ``vmap``), boxes with a non-finite
coordinate or with ``x2 < x1`` or ``y2 < y1`` ("inverted") raise ``ValueError``
naming the first bad row. Under ``jit`` values are not checked and each function
applies its formula as it stands (a NaN coordinate gives NaN, or in :func:`box_iou`
IoU 0; an inverted box intersects nothing).

>>> import jax.numpy as jnp
>>> a = jnp.array([[0.0, 0.0, 2.0, 2.0]])
>>> b = jnp.array([[1.0, 0.0, 3.0, 2.0], [4.0, 4.0, 5.0, 5.0]])
>>> box_iou(a, b).tolist()
[[0.3333333432674408, 0.0]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["box_iou", "clip_boxes", "decode_boxes", "encode_boxes"]

DEFAULT_MAX_LOG_SCALE = math.log(1000.0 / 16)
"""torchvision's ``bbox_xform_clip``: ``dw`` and ``dh`` are clamped here before ``exp``."""


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_array(x: Any) -> Any:
    return x if hasattr(x, "shape") and hasattr(x, "dtype") else np.asarray(x)


def check_boxes(boxes: Any, name: str = "boxes", *, ndim: int | None = 2) -> jax.Array:
    """Checks a box array and returns it as float32.

    Args:
      boxes: ``(..., 4)`` (``(N, 4)`` if ``ndim=2``) holding ``(x1, y1, x2, y2)``.
      name: the argument's name, for the error messages.
      ndim: the number of dimensions required, or None for any ``(..., 4)``.

    Returns:
      The boxes as a float32 JAX array.

    Raises:
      ValueError: a shape that is not ``(N, 4)`` / ``(..., 4)``; where the values
        are concrete, a non-finite coordinate or an inverted box.
      TypeError: a dtype that is neither float nor int.
    """
    arr = _as_array(boxes)
    want = "(N, 4)" if ndim == 2 else "(..., 4)"
    if arr.ndim < 1 or arr.shape[-1] != 4 or (ndim is not None and arr.ndim != ndim):
        raise ValueError(
            f"{name} must have shape {want} holding (x1, y1, x2, y2), got {tuple(arr.shape)}"
        )
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
        raise TypeError(f"{name} must be a float (or int) array, got dtype {arr.dtype}")
    if _is_concrete(arr):
        values = np.asarray(arr, np.float64).reshape(-1, 4)
        bad = np.flatnonzero(~np.isfinite(values).all(axis=1))
        if bad.size:
            raise ValueError(
                f"{name} must be finite; row {int(bad[0])} is {values[bad[0]].tolist()} "
                f"({bad.size} such rows)"
            )
        bad = np.flatnonzero((values[:, 2] < values[:, 0]) | (values[:, 3] < values[:, 1]))
        if bad.size:
            raise ValueError(
                f"{name} must have x1 <= x2 and y1 <= y2 (x1, y1, x2, y2 in pixel edges); "
                f"row {int(bad[0])} is {values[bad[0]].tolist()} ({bad.size} such rows)"
            )
    return jnp.asarray(arr, jnp.float32)


def box_area(boxes: jax.Array) -> jax.Array:
    """``(x2 - x1) * (y2 - y1)`` of ``(..., 4)`` boxes (no checks).

    Rounded to float32 as computed, also where a sum follows: XLA's CPU code
    contracts a product followed by a sum into one fused multiply-add (one
    rounding, not torchvision's two) unless a select stands between them.
    """
    dx = boxes[..., 2] - boxes[..., 0]
    return jnp.where(dx == 0, 0.0, dx * (boxes[..., 3] - boxes[..., 1]))


def box_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Intersection over union of every pair of boxes.

    The same float32 arithmetic as ``torchvision.ops.box_iou``: areas
    ``(x2 - x1) * (y2 - y1)``, intersection sides clamped at 0,
    ``iou = inter / (area_a + area_b - inter)`` (bit-exact), except that a pair
    whose union is not positive (two empty boxes; under ``jit`` also NaN boxes)
    gets IoU 0, not torchvision's NaN.

    Args:
      a: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.
      b: ``(M, 4)`` boxes.

    Returns:
      float32 ``(N, M)``: ``iou[i, j]`` of ``a[i]`` and ``b[j]``, in ``[0, 1]``.

    Raises:
      ValueError: see the module docstring (shapes; concrete non-finite or
        inverted boxes).

    >>> box_iou(jnp.array([[0.0, 0.0, 4.0, 4.0]]), jnp.array([[0.0, 0.0, 4.0, 2.0]])).tolist()
    [[0.5]]
    """
    a = check_boxes(a, "a")
    b = check_boxes(b, "b")
    return _iou_matrix(a, b)


@jax.jit
def _iou_matrix(a: jax.Array, b: jax.Array) -> jax.Array:
    # torchvision's roundings: products go through a select (see box_area).
    area_a, area_b = box_area(a), box_area(b)
    w = jnp.maximum(
        jnp.minimum(a[:, None, 2], b[None, :, 2]) - jnp.maximum(a[:, None, 0], b[None, :, 0]), 0
    )
    h = jnp.maximum(
        jnp.minimum(a[:, None, 3], b[None, :, 3]) - jnp.maximum(a[:, None, 1], b[None, :, 1]), 0
    )
    inter = jnp.where(w > 0, w * h, 0.0)
    union = area_a[:, None] + area_b[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def clip_boxes(boxes: jax.Array, image_size: Sequence[int] | jax.Array) -> jax.Array:
    """Clips boxes to the image: x into ``[0, w]``, y into ``[0, h]``.

    torchvision's ``clip_boxes_to_image``. A box wholly outside the image becomes
    an empty box on its border.

    Args:
      boxes: ``(..., 4)`` boxes ``(x1, y1, x2, y2)``.
      image_size: ``(h, w)``: Python numbers, or an array of shape ``(2,)``
        (which may be traced, e.g. one size per image under ``vmap``).

    Returns:
      float32 boxes of the same shape.

    Raises:
      ValueError: a bad shape, a concrete ``h`` or ``w`` that is negative or not
        finite, or (concrete) non-finite or inverted boxes.

    >>> clip_boxes(jnp.array([[-5.0, 10.0, 40.0, 90.0]]), (50, 30)).tolist()
    [[0.0, 10.0, 30.0, 50.0]]
    """
    boxes = check_boxes(boxes, ndim=None)
    size = jnp.asarray(check_image_size(image_size), jnp.float32)
    h, w = size[0], size[1]
    x = jnp.clip(boxes[..., 0::2], 0, w)
    y = jnp.clip(boxes[..., 1::2], 0, h)
    return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def check_image_size(image_size: Any) -> Any:
    """``image_size`` as an array of shape ``(2,)`` ``(h, w)``, concrete values finite, ``>= 0``."""
    size = _as_array(image_size)
    if size.shape != (2,):
        raise ValueError(f"image_size must be (h, w), got shape {tuple(size.shape)}")
    if _is_concrete(size):
        hw = np.asarray(size, np.float64)
        if not (np.isfinite(hw).all() and (hw >= 0).all()):
            raise ValueError(f"image_size (h, w) must be finite and >= 0, got {hw.tolist()}")
    return size


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        w = tuple(float(v) for v in weights)
    except (TypeError, ValueError):
        raise TypeError(f"weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}") from None
    if len(w) != 4 or not all(math.isfinite(v) and v > 0 for v in w):
        raise ValueError(f"weights must be 4 finite positive numbers (wx, wy, ww, wh), got {w}")
    return w[0], w[1], w[2], w[3]


def _centres(boxes: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def encode_boxes(
    proposals: jax.Array,
    targets: jax.Array,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> jax.Array:
    """R-CNN box-regression targets of ``targets`` relative to ``proposals``.

    With centres ``px = x1 + 0.5 * pw`` (``pw = x2 - x1``; same for y, h and the
    target's ``g``): ``dx = wx * (gx - px) / pw``, ``dy = wy * (gy - py) / ph``,
    ``dw = ww * log(gw / pw)``, ``dh = wh * log(gh / ph)``: the same float32
    operations as torchvision's ``BoxCoder(weights).encode_single``.
    ``(1, 1, 1, 1)`` gives the paper's targets; torchvision's detection heads use
    ``(10, 10, 5, 5)``.

    Args:
      proposals: ``(..., 4)`` boxes the targets are relative to.
      targets: ``(..., 4)`` boxes of the same shape (e.g. each proposal's
        matched ground truth).
      weights: ``(wx, wy, ww, wh)``, positive numbers.

    Returns:
      float32 ``(..., 4)`` deltas ``(dx, dy, dw, dh)``.

    Raises:
      ValueError: shapes that differ or are not ``(..., 4)``; concrete boxes
        that are non-finite, inverted, or (here) empty: a zero width or height
        has no log. Under ``jit`` an empty box gives inf or NaN deltas.

    >>> p = jnp.array([[0.0, 0.0, 10.0, 20.0]])
    >>> encode_boxes(p, jnp.array([[5.0, 0.0, 15.0, 40.0]])).tolist()
    [[0.5, 0.5, 0.0, 0.6931471824645996]]
    """
    w = _check_weights(weights)
    proposals = check_boxes(proposals, "proposals", ndim=None)
    targets = check_boxes(targets, "targets", ndim=None)
    if proposals.shape != targets.shape:
        raise ValueError(
            f"proposals and targets must have the same shape (..., 4), got "
            f"{tuple(proposals.shape)} and {tuple(targets.shape)}"
        )
    for name, arr in (("proposals", proposals), ("targets", targets)):
        if _is_concrete(arr) and arr.size:
            sides = np.asarray(arr[..., 2:] - arr[..., :2]).reshape(-1, 2)
            bad = np.flatnonzero((sides <= 0).any(axis=1))
            if bad.size:
                raise ValueError(
                    f"{name} must have positive width and height to be encoded (log of the "
                    f"size ratio); row {int(bad[0])} is "
                    f"{np.asarray(arr).reshape(-1, 4)[bad[0]].tolist()}"
                )
    return _encode(proposals, targets, jnp.asarray(w, jnp.float32))


@jax.jit
def _encode(proposals: jax.Array, targets: jax.Array, w: jax.Array) -> jax.Array:
    # The weights are arguments, not constants: XLA would turn a division by a
    # constant into a product with its (inexact) reciprocal in some programs.
    px, py, pw, ph = _centres(proposals)
    gx, gy, gw, gh = _centres(targets)
    wx, wy, ww, wh = w[0], w[1], w[2], w[3]
    dx = wx * (gx - px) / pw
    dy = wy * (gy - py) / ph
    dw = ww * jnp.log(gw / pw)
    dh = wh * jnp.log(gh / ph)
    return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode_boxes(
    proposals: jax.Array,
    deltas: jax.Array,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    max_log_scale: float = DEFAULT_MAX_LOG_SCALE,
) -> jax.Array:
    """Applies regression deltas to proposals: the inverse of :func:`encode_boxes`.

    ``dx, dy, dw, dh`` are divided by the weights, ``dw`` and ``dh`` clamped at
    ``max_log_scale`` (torchvision's ``log(1000 / 16)``: a box grows at most 62.5x
    per side), then ``cx = dx * pw + px``, ``w = exp(dw) * pw`` and the box is
    ``(cx - 0.5 w, cy - 0.5 h, cx + 0.5 w, cy + 0.5 h)``: the same float32
    operations as torchvision's ``BoxCoder(weights).decode_single``. The result
    is not clipped (see :func:`clip_boxes`).

    Args:
      proposals: ``(..., 4)`` boxes.
      deltas: ``(..., 4 * K)`` deltas ``(dx, dy, dw, dh)`` for each proposal,
        ``K >= 1`` sets per proposal (e.g. one per class), leading dims equal to
        the proposals'.
      weights: ``(wx, wy, ww, wh)``, positive numbers.
      max_log_scale: the clamp of ``dw`` and ``dh`` (after the weights).

    Returns:
      float32 ``(..., 4 * K)`` boxes.

    Raises:
      ValueError: shapes that do not fit; concrete non-finite or inverted
        proposals, or non-finite deltas. Under ``jit`` a NaN delta gives a NaN box.

    >>> p = jnp.array([[0.0, 0.0, 10.0, 20.0]])
    >>> decode_boxes(p, jnp.array([[0.5, 0.5, 0.0, 0.6931471824645996]])).tolist()
    [[5.0, 0.0, 15.0, 40.0]]
    """
    w = _check_weights(weights)
    max_log_scale = float(max_log_scale)
    if math.isnan(max_log_scale):
        raise ValueError("max_log_scale must be a number (or inf), got nan")
    proposals = check_boxes(proposals, "proposals", ndim=None)
    d = _as_array(deltas)
    if (
        d.ndim != proposals.ndim
        or d.shape[:-1] != proposals.shape[:-1]
        or d.shape[-1] % 4
        or d.shape[-1] == 0
    ):
        raise ValueError(
            f"deltas must have shape (..., 4 * K) with the proposals' leading dims "
            f"{tuple(proposals.shape[:-1])}, got {tuple(d.shape)}"
        )
    if not jnp.issubdtype(d.dtype, jnp.floating):
        raise TypeError(f"deltas must be a float array, got dtype {d.dtype}")
    if _is_concrete(d):
        flat = np.asarray(d, np.float64).reshape(-1, d.shape[-1])
        bad = np.flatnonzero(~np.isfinite(flat).all(axis=1))
        if bad.size:
            raise ValueError(f"deltas must be finite; row {int(bad[0])} is {flat[bad[0]].tolist()}")
    return _decode(
        proposals,
        jnp.asarray(d, jnp.float32),
        jnp.asarray(w, jnp.float32),
        jnp.asarray(max_log_scale, jnp.float32),
    )


@jax.jit
def _decode(
    proposals: jax.Array, deltas: jax.Array, w: jax.Array, max_log_scale: jax.Array
) -> jax.Array:
    # Weights as arguments: see _encode.
    px, py, pw, ph = (v[..., None] for v in _centres(proposals))
    k = deltas.shape[-1] // 4
    d = deltas.reshape(*deltas.shape[:-1], k, 4)
    dx = d[..., 0] / w[0]
    dy = d[..., 1] / w[1]
    dw = jnp.minimum(d[..., 2] / w[2], max_log_scale)
    dh = jnp.minimum(d[..., 3] / w[3], max_log_scale)
    cx = dx * pw + px
    cy = dy * ph + py
    half_w = 0.5 * (jnp.exp(dw) * pw)
    half_h = 0.5 * (jnp.exp(dh) * ph)
    out = jnp.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
    return out.reshape(deltas.shape)
