"""Greedy non-maximum suppression (NMS) that works under ``jit`` and ``vmap``.

The rule (``docs/detection-reference.md`` section 7): boxes are visited by
decreasing score, equal scores by increasing index; a box is kept unless its IoU
with an already kept box is ``> iou_threshold`` (a box at exactly the threshold
is kept). Results are torchvision's ``nms`` / ``batched_nms`` (whose order of
tied scores is unspecified; here it is fixed). :func:`nms`, :func:`batched_nms`
and :func:`multiclass_nms` run one program, :func:`nms`'s.

Exact arithmetic: the IoU is computed in float32 as torchvision computes it,
``inter / (area_i + area_j - inter)`` with ``area = (x2 - x1) * (y2 - y1)``, and
compared with the threshold as a real number, as torchvision's C++ compares its
float IoU with a double threshold: a Python float threshold is replaced by the
largest float32 not above it, which gives the same decisions (so with
``iou_threshold=0.3`` a pair whose float32 IoU is ``float32(0.3)``, slightly
above 0.3, is suppressed, as in torchvision). A traced threshold is compared in
float32. ``score_threshold`` is applied in the same way (``score >
score_threshold``). Two empty boxes have IoU ``0 / 0 = NaN``, which suppresses
nothing.

How it is computed (one program for every backend, built from fused
elementwise loops and single-operand sorts, which XLA's CPU backend runs fast):

1. The visiting order: scores become distinct int32 keys (boxes that do not
   take part get keys above all scores, in index order), sorted alone, and each
   box finds its rank by binary search (tied scores take a two-key sort instead,
   the same order).
2. The suppression bits ``IoU(i, j) > t`` (and, for :func:`batched_nms`,
   ``label_i == label_j``) of the upper triangle of the visiting order, packed 32
   columns to a uint32 word, in at most 16 blocks of rows.
3. The greedy pass, one box per step of a ``lax.while_loop`` whose body is one
   fused loop: a box not yet removed ORs its row of bits into the removed set.
   The pass stops once ``max_output`` boxes are kept or no box that takes part is
   left.
4. The kept indices are compacted in score order (a scatter).

Under ``vmap`` the two branches of step 1 (``lax.cond``) both run. Memory:
``N^2 / 8`` bytes for the triangle's bits.

Bad input: as in :mod:`~spp_jax.detection.boxes`. Under ``jit`` a box with a NaN
coordinate has NaN IoUs, which suppress nothing, so it is kept if its score takes
part. Scores that are NaN never take part (use NaN scores, or a
``score_threshold``, to pad a batch for ``vmap``).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax.detection.boxes import _as_array, _is_concrete, box_area, check_boxes

__all__ = ["batched_nms", "multiclass_nms", "nms"]

_WORD = 32
_MAX_BLOCKS = 16
_BITS = np.left_shift(np.uint32(1), np.arange(_WORD, dtype=np.uint32))
# _ABOVE[b]: the bits strictly above bit b (a box only suppresses later boxes).
_ABOVE = np.array([(0xFFFFFFFF << (b + 1)) & 0xFFFFFFFF for b in range(_WORD)], np.uint32)


def _f32_not_above(name: str, value: Any, lo: float, hi: float) -> jax.Array:
    """A threshold as a float32 scalar that compares like the real number.

    For a float32 ``x``, ``x > t`` (``t`` real) equals ``x > f`` with ``f`` the
    largest float32 ``<= t``. Traced values are used as they are (float32).
    """
    arr = _as_array(value)
    if arr.shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {tuple(arr.shape)}")
    if not _is_concrete(arr):
        return jnp.asarray(arr, jnp.float32)
    t = float(np.asarray(arr, np.float64))
    if not lo <= t <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {t}")
    f = np.float32(t)
    if float(f) > t:
        f = np.nextafter(f, np.float32(-np.inf))
    return jnp.asarray(f, jnp.float32)


def _check_max_output(max_output: Any, n: int) -> int:
    if max_output is None:
        return n
    if not isinstance(max_output, numbers.Integral) or isinstance(max_output, bool):
        raise TypeError(
            f"max_output must be a static Python int >= 0 or None (all N boxes), got {max_output!r}"
        )
    if max_output < 0:
        raise ValueError(f"max_output must be >= 0 or None, got {max_output}")
    return int(max_output)


def _check_values(values: Any, name: str, n: int, kind: str, ndim: int = 1) -> Any:
    arr = _as_array(values)
    if arr.ndim != ndim or arr.shape[0] != n:
        want = f"(N,) = ({n},)" if ndim == 1 else f"(N, K) with N = {n}"
        raise ValueError(f"{name} must have shape {want} like boxes, got {tuple(arr.shape)}")
    ok = jnp.issubdtype(arr.dtype, jnp.integer) or (
        kind == "float" and jnp.issubdtype(arr.dtype, jnp.floating)
    )
    if not ok:
        want = "a float (or int)" if kind == "float" else "an integer"
        raise TypeError(f"{name} must be {want} array, got dtype {arr.dtype}")
    return arr


def _checked(
    boxes: Any,
    scores: Any,
    labels: Any,
    iou_threshold: Any,
    max_output: Any,
    score_threshold: Any,
    score_ndim: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array | None, int]:
    """The arguments as :func:`_nms` takes them (``max_output`` None: every box)."""
    boxes = check_boxes(boxes)
    n = boxes.shape[0]
    scores = jnp.asarray(_check_values(scores, "scores", n, "float", score_ndim), jnp.float32)
    if labels is not None:
        labels = jnp.asarray(_check_values(labels, "labels", n, "int"), jnp.int32)
    thr = _f32_not_above("iou_threshold", iou_threshold, 0.0, 1.0)
    st = None
    if score_threshold is not None:
        st = _f32_not_above("score_threshold", score_threshold, -math.inf, math.inf)
    return boxes, scores, labels, thr, st, _check_max_output(max_output, scores.size)


def nms(
    boxes: jax.Array,
    scores: jax.Array,
    iou_threshold: float | jax.Array,
    *,
    max_output: int | None = None,
    score_threshold: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Greedy NMS: the indices of the kept boxes, by decreasing score.

    Args:
      boxes: ``(N, 4)`` boxes ``(x1, y1, x2, y2)``.
      scores: ``(N,)`` scores. NaN scores never take part.
      iou_threshold: a box whose IoU with a kept box is ``> iou_threshold`` is
        suppressed; in ``[0, 1]``; may be traced (no recompilation).
      max_output: static length of ``keep`` (None: N). The pass stops once this
        many boxes are kept.
      score_threshold: if given, only boxes with ``score > score_threshold``
        take part; may be traced.

    Returns:
      ``(keep, count)``: ``keep`` int32 ``(max_output,)``, the indices into
      ``boxes`` of the kept boxes in decreasing score order (ties: lower index
      first), padded with -1; ``count`` the int32 number of valid entries.

    Raises:
      ValueError / TypeError: bad shapes, dtypes, thresholds or ``max_output``;
        concrete non-finite or inverted boxes.

    >>> import jax.numpy as jnp
    >>> boxes = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30.0]])
    >>> keep, count = nms(boxes, jnp.array([0.9, 0.8, 0.7]), 0.5)
    >>> keep.tolist(), int(count)
    ([0, 2, -1], 2)
    """
    b, s, _, thr, st, m = _checked(boxes, scores, None, iou_threshold, max_output, score_threshold)
    return _nms(b, s, None, thr, st, max_output=m)


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    labels: jax.Array,
    iou_threshold: float | jax.Array,
    *,
    max_output: int | None = None,
    score_threshold: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """NMS within each label: boxes only suppress boxes of their own label.

    The same rule, output and arguments as :func:`nms`; the kept boxes of all
    labels come in one order (decreasing score, ties by lower index), so
    ``max_output`` keeps the best boxes over all labels. torchvision's
    ``batched_nms`` adds ``label * (max_coordinate + 1)`` to the coordinates so
    that boxes of different labels never overlap; in float32 that offset rounds
    the coordinates (at 2**14 they keep no bits below 2**-9), which can move an
    IoU across the threshold. Here a pair of different labels never suppresses
    (one integer comparison per pair), with no rounding; every pair of the
    triangle is computed, as in :func:`nms`, whatever the labels.

    Args:
      boxes: ``(N, 4)`` boxes.
      scores: ``(N,)`` scores.
      labels: ``(N,)`` integer labels (any int32 values, e.g. class ids).
      iou_threshold, max_output, score_threshold: see :func:`nms`.

    Returns:
      ``(keep, count)`` as for :func:`nms`.

    >>> import jax.numpy as jnp
    >>> boxes = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11], [1, 1, 11, 11.0]])
    >>> keep, count = batched_nms(boxes, jnp.array([0.9, 0.8, 0.7]), jnp.array([0, 0, 1]), 0.5)
    >>> keep.tolist(), int(count)
    ([0, 2, -1], 2)
    """
    b, s, lab, thr, st, m = _checked(
        boxes, scores, labels, iou_threshold, max_output, score_threshold
    )
    return _nms(b, s, lab, thr, st, max_output=m)


def multiclass_nms(
    boxes: jax.Array,
    scores: jax.Array,
    iou_threshold: float | jax.Array,
    *,
    max_output: int | None = None,
    score_threshold: float | jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """NMS per class of boxes that each have a score for every class.

    Every class ``k`` runs :func:`nms` on all boxes with ``scores[:, k]``; the
    kept (box, class) pairs of all classes are then ordered by decreasing score
    (ties: lower class, then lower box index) and the first ``max_output`` are
    returned. This is :func:`batched_nms` of the ``N K`` pairs (box ``i`` with
    label ``k`` and score ``scores[i, k]``, pair index ``k N + i``), computed as
    ``K`` problems of ``N`` boxes (``vmap``: ``K`` times fewer pairs compared): a
    detector's per-class NMS (R-CNN, SPP-net), TensorFlow's
    ``combined_non_max_suppression``.

    Args:
      boxes: ``(N, 4)`` boxes.
      scores: ``(N, K)`` scores, one column per class. NaN scores never take
        part.
      iou_threshold, score_threshold: see :func:`nms`.
      max_output: static number of pairs returned, over all classes (None:
        ``N K``); each class's pass stops once this many of its boxes are kept.

    Returns:
      ``(keep, classes, count)``: int32 ``(max_output,)`` box indices and their
      classes (columns of ``scores``) in the order above, both padded with -1;
      ``count`` the int32 number of valid entries.

    >>> import jax.numpy as jnp
    >>> boxes = jnp.array([[0, 0, 10, 10], [1, 1, 11, 11.0]])
    >>> scores = jnp.array([[0.9, 0.1], [0.8, 0.7]])
    >>> keep, classes, count = multiclass_nms(boxes, scores, 0.5)
    >>> keep.tolist(), classes.tolist(), int(count)
    ([0, 1, -1, -1], [0, 1, -1, -1], 2)
    """
    b, s, _, thr, st, m = _checked(
        boxes, scores, None, iou_threshold, max_output, score_threshold, score_ndim=2
    )
    return _multiclass_nms(b, s, thr, st, max_output=m)


@functools.partial(jax.jit, static_argnames=("max_output",))
def _multiclass_nms(
    boxes: jax.Array,
    scores: jax.Array,
    thr: jax.Array,
    score_threshold: jax.Array | None,
    *,
    max_output: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    n, k = scores.shape
    per_class = min(max_output, n)
    if per_class == 0 or k == 0:
        empty = jnp.full((max_output,), -1, jnp.int32)
        return empty, empty, jnp.zeros((), jnp.int32)
    keep, count = jax.vmap(
        lambda s: _nms(boxes, s, None, thr, score_threshold, max_output=per_class)
    )(scores.T)  # (K, per_class), (K,)
    # Merge: by decreasing score; ties by position (class, then rank in its class).
    valid = lax.iota(jnp.int32, per_class)[None, :] < count[:, None]
    kept_scores = jnp.take_along_axis(scores.T, jnp.maximum(keep, 0), axis=1)
    key = jnp.where(valid, _sortable(-kept_scores), jnp.iinfo(jnp.int32).max).reshape(-1)
    pos = lax.sort((key, lax.iota(jnp.int32, key.shape[0])), num_keys=2)[1]
    pos = jnp.pad(pos, (0, max(0, max_output - pos.shape[0])))[:max_output]
    total = jnp.minimum(jnp.sum(count), max_output)
    taken = lax.iota(jnp.int32, max_output) < total
    out_keep = jnp.where(taken, keep.reshape(-1)[pos], -1)
    out_class = jnp.where(taken, pos // per_class, -1)
    return out_keep, out_class, total


@functools.partial(jax.jit, static_argnames=("max_output",))
def _nms(
    boxes: jax.Array,
    scores: jax.Array,
    labels: jax.Array | None,
    thr: jax.Array,
    score_threshold: jax.Array | None,
    *,
    max_output: int,
) -> tuple[jax.Array, jax.Array]:
    n = boxes.shape[0]
    if n == 0 or max_output == 0:
        return jnp.full((max_output,), -1, jnp.int32), jnp.zeros((), jnp.int32)
    npad = -(-n // _WORD) * _WORD

    # 1. Visiting order: decreasing score, then increasing index; boxes that do
    # not take part last.
    valid = ~jnp.isnan(scores)
    if score_threshold is not None:
        valid = valid & (scores > score_threshold)
    valid = jnp.pad(valid, (0, npad - n))
    order = _score_order(jnp.pad(scores, (0, npad - n)), valid)
    f = jnp.pad(boxes, ((0, npad - n), (0, 0)))[order].T
    f = jnp.concatenate([f, box_area(f.T)[None]], axis=0)  # x1, y1, x2, y2, area
    lab = None if labels is None else jnp.pad(labels, (0, npad - n))[order]
    # Materialised once: fused into the N^2 / 2 IoUs, the gathers would run per pair.
    f, lab = lax.optimization_barrier((f, lab))

    # 2-3. Suppression bits and the greedy pass.
    num_valid = jnp.sum(valid, dtype=jnp.int32)
    kept = _greedy(f, lab, thr, ~valid[order], num_valid, max_output)

    # 4. Compaction in score order.
    pos = jnp.cumsum(kept, dtype=jnp.int32) - 1
    count = jnp.minimum(jnp.sum(kept, dtype=jnp.int32), max_output)
    keep = jnp.full((max_output,), -1, jnp.int32)
    keep = keep.at[jnp.where(kept, pos, max_output)].set(order, mode="drop")
    return keep, count


def _sortable(x: jax.Array) -> jax.Array:
    """float32 to int32 with the same order (``-0.0`` and ``0.0`` equal; no NaN)."""
    i = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _score_order(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """Positions by decreasing score, then index; invalid ones last (module docstring, step 1)."""
    npad = scores.shape[0]
    idx = lax.iota(jnp.int32, npad)
    # Invalid boxes: distinct keys above every score's (-inf maps to 0x7F800000).
    key = jnp.where(valid, _sortable(-scores), jnp.int32(0x7F800001) + idx)
    sorted_keys = lax.sort(key)
    distinct = jnp.all(sorted_keys[1:] != sorted_keys[:-1])

    def by_search() -> jax.Array:
        pos = jnp.searchsorted(sorted_keys, key, method="scan")
        return jnp.zeros((npad,), jnp.int32).at[pos].set(idx, unique_indices=True)

    def by_pairs() -> jax.Array:
        return lax.sort((key, idx), num_keys=2)[1]

    return lax.cond(distinct, by_search, by_pairs)


def _pack_bits(hit: jax.Array) -> jax.Array:
    """Packs the last axis (32) of a bool array into uint32 words."""
    bits = jnp.asarray(_BITS).reshape((1,) * (hit.ndim - 1) + (_WORD,))
    return jnp.sum(jnp.where(hit, bits, jnp.uint32(0)), axis=-1, dtype=jnp.uint32)


def _hits(r: jax.Array, c: jax.Array, thr: jax.Array) -> jax.Array:
    """IoU(r, c) > thr, broadcast, torchvision's float32 arithmetic (features x1..area)."""
    w = jnp.maximum(jnp.minimum(r[2], c[2]) - jnp.maximum(r[0], c[0]), 0.0)
    h = jnp.maximum(jnp.minimum(r[3], c[3]) - jnp.maximum(r[1], c[1]), 0.0)
    # The select keeps XLA's CPU code from fusing w * h into the subtraction (a
    # multiply-add rounds once, torchvision twice).
    inter = jnp.where(w > 0, w * h, 0.0)
    return inter / (r[4] + c[4] - inter) > thr


def _greedy(
    f: jax.Array,
    labels: jax.Array | None,
    thr: jax.Array,
    invalid: jax.Array,
    num_valid: jax.Array,
    max_kept: int,
) -> jax.Array:
    """The greedy pass over boxes in visiting order; returns their kept flags.

    ``f``: the boxes' features ``(5, npad)``; ``labels``: if given, a box only
    suppresses boxes of its own label.
    """
    npad = f.shape[1]
    words = npad // _WORD
    rows_per_block = _WORD * -(-words // min(words, _MAX_BLOCKS))
    blocks = []
    for r0 in range(0, npad, rows_per_block):
        r1 = min(r0 + rows_per_block, npad)
        r = f[:, r0:r1, None, None]  # (5, R, 1, 1)
        c = f[:, r0:].reshape(5, 1, (npad - r0) // _WORD, _WORD)  # (5, 1, Wc, 32)
        hit = _hits(r, c, thr)
        if labels is not None:
            hit = hit & (labels[r0:r1, None, None] == labels[r0:].reshape(1, -1, _WORD))
        blocks.append(jnp.pad(_pack_bits(hit), ((0, 0), (r0 // _WORD, 0))))
    bits = jnp.concatenate(blocks, axis=0)  # (npad, words); left of each block zero
    word_ids = lax.iota(jnp.int32, words)
    above = jnp.asarray(_ABOVE)

    def cond(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        i, _, kept = state
        return (i < num_valid) & (kept < max_kept)

    def body(
        state: tuple[jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        i, removed, kept = state
        w, b = i // _WORD, i % _WORD
        gone = (removed[w] >> b.astype(jnp.uint32)) & 1 == 1
        row = lax.dynamic_index_in_dim(bits, i, axis=0, keepdims=False)
        row = jnp.where(word_ids > w, row, jnp.where(word_ids == w, row & above[b], 0))
        removed = jnp.where(gone, removed, removed | row)
        return i + 1, removed, kept + (~gone).astype(jnp.int32)

    start = (jnp.int32(0), _pack_bits(invalid.reshape(words, _WORD)), jnp.int32(0))
    visited, removed, _ = lax.while_loop(cond, body, start)
    # Kept: the visited boxes not removed.
    kept_words = jnp.where(word_ids < visited // _WORD, ~removed, jnp.uint32(0))
    partial = (visited // _WORD < words) & (word_ids == visited // _WORD)
    tail = jnp.asarray(_BITS - 1)[visited % _WORD]  # bits below `visited` in its word
    kept_words = jnp.where(partial, ~removed & tail, kept_words)
    bit_ids = jnp.arange(_WORD, dtype=jnp.uint32)
    return (((kept_words[:, None] >> bit_ids[None, :]) & 1) == 1).reshape(-1)
