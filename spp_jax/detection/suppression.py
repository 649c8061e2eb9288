"""Greedy non-maximum suppression (NMS) that works under ``jit`` and ``vmap``.

The rule (``docs/detection-reference.md`` section 7): boxes are visited by
decreasing score, equal scores by increasing index; a box is kept unless its IoU
with an already kept box is ``> iou_threshold`` (a box at exactly the threshold
is kept). Results are torchvision's ``nms`` / ``batched_nms`` (whose order of
tied scores is unspecified; here it is fixed). :func:`nms`, :func:`batched_nms`
and :func:`multiclass_nms` share one greedy pass; they differ in which pairs'
IoUs they compute.

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
2. The suppression bits ``IoU(i, j) > t``, packed 32 columns to a uint32 word.
   :func:`nms`: the upper triangle of the visiting order, in at most 16 blocks
   of rows. :func:`batched_nms` of at most 256 boxes: the same, with the labels
   compared per pair. Of more: the boxes grouped by label (each label's run in
   visiting order; two int32 sorts) and each row's bits masked to its own run;
   a band of 8 words (256 columns) per box when no label has more than 225
   boxes, else the triangle.
   :func:`multiclass_nms`: every pair once, in index order, for all classes
   (the IoUs do not depend on the class).
3. The greedy pass, one box per step of a ``lax.while_loop`` whose body is one
   fused loop: a box not yet removed ORs its row of bits into the removed set.
   The pass stops once ``max_output`` boxes are kept or no box that takes part is
   left.
4. The kept indices are compacted in score order (a scatter).

Under ``vmap`` the two branches of each ``lax.cond`` (step 1; the band or the
triangle) both run. Memory: ``N^2 / 8`` bytes for the bits (``32 N`` for the
band).

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
_BAND_WORDS = 8  # batched_nms: label runs of up to 225 boxes take the band
_BITS = np.left_shift(np.uint32(1), np.arange(_WORD, dtype=np.uint32))


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
    IoU across the threshold. Here a pair of different labels never
    suppresses, with no rounding (module docstring, step 2).

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
    one set of ``N^2`` box pairs and ``K`` greedy passes (``vmap``): a
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
    npad = -(-n // _WORD) * _WORD
    # The box pairs' bits once for all classes, in index order: every pair, as a
    # class visits the boxes in its own order.
    bits = _block_bits(lax.optimization_barrier(_features(boxes, npad)), thr, square=True)
    order, valid = _score_order(scores.T, score_threshold, npad)  # (K, npad)
    greedy = functools.partial(_greedy, bits, False, max_output=per_class)
    keep, count = jax.vmap(lambda o, v: greedy(o, o, ~v))(order, valid)  # (K, per_class), (K,)
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
    order, valid = _score_order(scores, score_threshold, npad)  # step 1
    if labels is None or npad // _WORD <= _BAND_WORDS:  # the triangle: no band is narrower
        lab = None if labels is None else jnp.pad(labels, (0, npad - n))[order]
        # Materialised once: fused into the IoUs, the gathers would run per pair.
        f, lab = lax.optimization_barrier((_features(boxes, npad, order), lab))
        return _greedy(_block_bits(f, thr, lab), False, None, order, ~valid[order], max_output)
    # Rows grouped by label, each label's run in visiting order.
    lab = jnp.where(valid, jnp.pad(labels, (0, npad - n)), jnp.iinfo(jnp.int32).max)[order]
    seq, start, end = _group(lab)
    at = order[seq]
    f = lax.optimization_barrier(_features(boxes, npad, at))
    pos = jnp.zeros((npad,), jnp.int32).at[seq].set(lax.iota(jnp.int32, npad))
    invalid = ~valid[at]

    def greedy(bits: jax.Array, banded: bool) -> tuple[jax.Array, jax.Array]:
        # A row keeps the columns of its own run: boxes of other labels never hit.
        col = lax.iota(jnp.int32, bits.shape[1])[None, :] * _WORD
        col = col + (lax.iota(jnp.int32, npad)[:, None] // _WORD * _WORD if banded else 0)
        bits = bits & _below(end[:, None], col) & ~_below(start[:, None], col)
        return _greedy(bits, banded, pos, order, invalid, max_output)

    # A box's run ends within the band of its own word if no run is longer.
    largest = jnp.max(jnp.where(invalid, 0, end - start))
    return lax.cond(
        largest <= _WORD * (_BAND_WORDS - 1) + 1,
        lambda: greedy(_band_bits(f, thr, _BAND_WORDS), True),
        lambda: greedy(_block_bits(f, thr), False),
    )


def _features(boxes: jax.Array, npad: int, at: jax.Array | None = None) -> jax.Array:
    """``(5, npad)``: x1, y1, x2, y2 and area of the boxes (zero-padded), in order ``at``."""
    boxes = jnp.pad(boxes, ((0, npad - boxes.shape[0]), (0, 0)))
    boxes = boxes if at is None else boxes[at]
    return jnp.concatenate([boxes.T, box_area(boxes)[None]], axis=0)


def _sortable(x: jax.Array) -> jax.Array:
    """float32 to int32 with the same order (``-0.0`` and ``0.0`` equal; no NaN)."""
    i = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _score_order(
    scores: jax.Array, score_threshold: jax.Array | None, npad: int
) -> tuple[jax.Array, jax.Array]:
    """The visiting order (box indices, padded to ``npad``) and which boxes take part.

    ``scores``: ``(..., N)``, one problem per row; one branch for all rows.
    """
    pad = [(0, 0)] * (scores.ndim - 1) + [(0, npad - scores.shape[-1])]
    valid = ~jnp.isnan(scores)
    if score_threshold is not None:
        valid = valid & (scores > score_threshold)
    valid = jnp.pad(valid, pad)
    idx = jnp.broadcast_to(lax.iota(jnp.int32, npad), valid.shape)
    # Invalid boxes: distinct keys above every score's (-inf maps to 0x7F800000).
    key = jnp.where(valid, _sortable(-jnp.pad(scores, pad)), jnp.int32(0x7F800001) + idx)
    sorted_keys = lax.sort(key)
    distinct = jnp.all(sorted_keys[..., 1:] != sorted_keys[..., :-1])

    @functools.partial(jnp.vectorize, signature="(n),(n)->(n)")
    def search(sorted_keys: jax.Array, key: jax.Array) -> jax.Array:
        pos = jnp.searchsorted(sorted_keys, key, method="scan")
        rank = lax.iota(jnp.int32, npad)
        return jnp.zeros((npad,), jnp.int32).at[pos].set(rank, unique_indices=True)

    def by_pairs() -> jax.Array:
        return lax.sort((key, idx), num_keys=2)[1]

    return lax.cond(distinct, lambda: search(sorted_keys, key), by_pairs), valid


def _group(labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The stable order that sorts ``labels``; per sorted position, its run's start and end."""
    npad = labels.shape[0]
    idx = lax.iota(jnp.int32, npad)
    ranked = lax.sort(labels)
    first = jnp.searchsorted(ranked, labels, method="scan").astype(jnp.int32)
    if npad * npad <= 2**31 - 1:  # one int32 key (run start, position): the fast sort
        key = lax.sort(first * npad + idx)
        start, seq = key // npad, key % npad
    else:
        start, seq = lax.sort((first, idx), num_keys=2)
    end = jnp.searchsorted(ranked, ranked, side="right", method="scan").astype(jnp.int32)
    return seq, start, end


def _below(limit: jax.Array, col: jax.Array) -> jax.Array:
    """Words whose bit ``b`` is set where ``col + b < limit`` (broadcast)."""
    m = jnp.clip(limit - col, 0, _WORD).astype(jnp.uint32)
    return jnp.where(m == _WORD, jnp.uint32(0xFFFFFFFF), (jnp.uint32(1) << m) - 1)


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


def _block_bits(
    f: jax.Array, thr: jax.Array, labels: jax.Array | None = None, square: bool = False
) -> jax.Array:
    """``(npad, words)`` bits of the upper triangle (``square``: of every pair).

    ``f``: features ``(5, npad)``; ``labels``: if given, only pairs of one label
    hit. Computed in at most 16 blocks of rows; a triangle's block starts at its
    first row's column (the bits to its left are zero).
    """
    npad = f.shape[1]
    words = npad // _WORD
    rows_per_block = _WORD * -(-words // min(words, _MAX_BLOCKS))
    blocks = []
    for r0 in range(0, npad, rows_per_block):
        r1, c0 = min(r0 + rows_per_block, npad), 0 if square else r0
        hit = _hits(f[:, r0:r1, None, None], f[:, c0:].reshape(5, 1, -1, _WORD), thr)
        if labels is not None:
            hit = hit & (labels[r0:r1, None, None] == labels[c0:].reshape(1, -1, _WORD))
        blocks.append(jnp.pad(_pack_bits(hit), ((0, 0), (c0 // _WORD, 0))))
    return jnp.concatenate(blocks, axis=0)


def _band_bits(f: jax.Array, thr: jax.Array, band: int) -> jax.Array:
    """``(npad, band)`` bits: row ``i``'s word ``k`` is word ``i // 32 + k`` of its row.

    ``f`` as in :func:`_block_bits`.
    """
    npad = f.shape[1]
    words = npad // _WORD
    fp = jnp.pad(f, ((0, 0), (0, band * _WORD)))
    cols = [fp[:, k * _WORD : k * _WORD + npad].reshape(5, words, _WORD) for k in range(band)]
    c = lax.optimization_barrier(jnp.stack(cols, axis=2))  # a copy: cheaper than per pair
    hit = _hits(f.reshape(5, words, _WORD, 1, 1), c[:, :, None], thr)  # (words, 32, band, 32)
    return _pack_bits(hit).reshape(npad, band)


def _greedy(
    bits: jax.Array,
    banded: bool,
    pos: jax.Array | None,
    box: jax.Array,
    invalid: jax.Array,
    max_output: int,
) -> tuple[jax.Array, jax.Array]:
    """The greedy pass (module docstring, steps 3-4): ``(keep, count)`` as :func:`nms`'s.

    Step ``i`` visits box ``box[i]``, whose row of ``bits`` is ``pos[i]`` (None:
    ``i``); the row's word ``k`` is word ``k`` of the removed set (``banded``:
    word ``pos[i] // 32 + k``). ``invalid``: per row, whether its box takes no
    part (such boxes come last in the visiting order and are never visited). A
    row must hold the bits of every box visited after it that it may suppress,
    and may hold boxes visited before: hits are symmetric, so a kept box never
    hits an earlier kept one (that one would have removed it).
    """
    width = bits.shape[1]
    start = _pack_bits(jnp.pad(invalid, (0, width * _WORD if banded else 0)).reshape(-1, _WORD))
    num_valid = jnp.sum(~invalid, dtype=jnp.int32)
    cols = lax.iota(jnp.int32, width)

    def cond(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        i, _, kept = state
        return (i < num_valid) & (kept < max_output)

    def body(
        state: tuple[jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        i, removed, kept = state
        p = i if pos is None else pos[i]
        w, bit = p // _WORD, jnp.asarray(_BITS)[p % _WORD]
        gone = removed[w] & bit != 0
        off = w if banded else 0
        window = lax.dynamic_slice_in_dim(removed, off, width)
        row = lax.dynamic_index_in_dim(bits, p, axis=0, keepdims=False)
        row = jnp.where(cols + off == w, row & ~bit, row)  # not itself: kept
        removed = lax.dynamic_update_slice_in_dim(
            removed, jnp.where(gone, window, window | row), off, axis=0
        )
        return i + 1, removed, kept + (~gone).astype(jnp.int32)

    visited, removed, _ = lax.while_loop(cond, body, (jnp.int32(0), start, jnp.int32(0)))
    bit_ids = jnp.arange(_WORD, dtype=jnp.uint32)
    stays = ((removed[:, None] >> bit_ids[None, :]) & 1 == 0).reshape(-1)
    stays = stays if pos is None else stays[pos]
    kept = stays & (lax.iota(jnp.int32, stays.shape[0]) < visited)
    # Step 4: compaction in visiting order.
    at = jnp.where(kept, jnp.cumsum(kept, dtype=jnp.int32) - 1, max_output)
    keep = jnp.full((max_output,), -1, jnp.int32).at[at].set(box, mode="drop")
    return keep, jnp.minimum(jnp.sum(kept, dtype=jnp.int32), max_output)
