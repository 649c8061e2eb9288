"""Greedy non-maximum suppression (NMS) that works under ``jit`` and ``vmap``.

The rule (``docs/detection-reference.md`` section 7): boxes are visited by
decreasing score, equal scores by increasing index; a box is kept unless its IoU
with an already kept box is ``> iou_threshold`` (a box at exactly the threshold
is kept). :func:`batched_nms` applies the rule within each label, with one
order over all labels. Results are torchvision's ``nms`` / ``batched_nms``
(whose order of tied scores is unspecified; here it is fixed).

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

How it is computed (one program for every backend; the choices measured on CPU,
where XLA runs a fused elementwise loop fast and each separate small op, or a
sort with a two-operand comparator, slowly):

1. The visiting order: scores become distinct int32 keys (boxes that do not
   take part get keys above all scores, in index order), sorted alone, and each
   box finds its rank by binary search (tied scores take a two-key sort instead,
   the same order). :func:`batched_nms` then groups the sorted boxes by label
   (one int32 sort of ``label * N + rank``), which makes each box's possible
   victims a contiguous run: the later boxes of its group.
2. The suppression bits ``IoU(i, j) > t`` of the visiting order, packed 32
   columns to a uint32 word, computed by fused elementwise loops: for
   :func:`nms` the upper triangle (in at most 16 blocks of rows; about 2M IoUs
   for 2,000 boxes); for :func:`batched_nms` a band of 8 words (256 columns)
   per box when every label group fits in it (label groups of at most 225
   boxes), else the upper triangle. A word mask ends each box's bits at its
   group's end, so labels are never compared per pair.
3. The greedy pass, one box per step of a ``lax.while_loop`` whose body is one
   fused loop: a box not yet removed ORs its row of bits into the removed set.
   :func:`nms` stops once ``max_output`` boxes are kept or no box that takes
   part is left (:func:`batched_nms` visits labels, not scores, in order, so it
   cannot stop early).
4. The kept indices are compacted in score order (a scatter).

Under ``vmap`` the two branches of steps 1 and 2 (``lax.cond``) both run.
Memory: ``N^2 / 8`` bytes for the triangle's bits (0.5 MB at 2,000 boxes);
``N x 32`` bytes for the band. Measured on 2 CPU cores at 2,000 boxes
(``experiments/benchmarks/nms.py``): 8-18x faster than torchvision's ``nms``,
about 3x faster than its ``batched_nms`` with 20 labels. For per-class NMS of
many boxes (each class scoring the same proposals), ``vmap`` :func:`nms` over
the classes: :func:`batched_nms` with one big group per label would fall back
to the whole triangle.

Bad input: shapes raise ``ValueError``; concrete boxes that are non-finite or
inverted raise ``ValueError`` (``spp_jax.detection.boxes``). Under ``jit`` the
values are not checked: a box with a NaN coordinate has NaN IoUs, which suppress
nothing, so it is kept if its score takes part. Scores that are NaN never take
part (use NaN scores, or a ``score_threshold``, to pad a batch for ``vmap``).
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

__all__ = ["batched_nms", "nms"]

_WORD = 32
_MAX_BLOCKS = 16
_BAND_WORDS = 8  # batched: the band path covers label groups of up to 225 boxes
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


def _check_vector(values: Any, name: str, n: int, kind: str) -> Any:
    arr = _as_array(values)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape (N,) = ({n},) like boxes, got {tuple(arr.shape)}")
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
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array | None, int]:
    boxes = check_boxes(boxes)
    n = boxes.shape[0]
    scores = jnp.asarray(_check_vector(scores, "scores", n, "float"), jnp.float32)
    if labels is not None:
        labels = jnp.asarray(_check_vector(labels, "labels", n, "int"), jnp.int32)
    thr = _f32_not_above("iou_threshold", iou_threshold, 0.0, 1.0)
    st = None
    if score_threshold is not None:
        st = _f32_not_above("score_threshold", score_threshold, -math.inf, math.inf)
    return boxes, scores, labels, thr, st, _check_max_output(max_output, n)


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
    ``batched_nms`` (which needs no label range either).

    Args:
      boxes: ``(N, 4)`` boxes.
      scores: ``(N,)`` scores.
      labels: ``(N,)`` integer labels (any values, e.g. class ids).
      iou_threshold: see :func:`nms`.
      max_output: see :func:`nms`.
      score_threshold: see :func:`nms`.

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
    words = npad // _WORD

    # 1. Visiting order: decreasing score, then increasing index; boxes that do
    # not take part last. Batched: grouped by label (stable), suppression being
    # per label, so a label's boxes are near each other.
    valid = ~jnp.isnan(scores)
    if score_threshold is not None:
        valid = valid & (scores > score_threshold)
    valid = jnp.pad(valid, (0, npad - n))
    order = _score_order(jnp.pad(scores, (0, npad - n)), valid)
    num_valid = jnp.sum(valid, dtype=jnp.int32)
    valid_s = valid[order]
    feats = jnp.pad(boxes, ((0, npad - n), (0, 0))).T
    if labels is None:
        seq = order
    else:
        group = _group_by_label(jnp.pad(labels, (0, npad - n))[order], valid_s)
        seq = order[group]
    f = feats[:, seq]
    f = jnp.concatenate([f, box_area(f.T)[None]], axis=0)  # + area
    # Materialised once: fused into the N^2 / 2 IoUs, the gather would run per pair.
    f = lax.optimization_barrier(f)
    invalid_seq = ~valid[seq]

    # 2-3. Suppression bits and the greedy pass.
    if labels is None:
        kept = _greedy_triangle(f, None, thr, invalid_seq, num_valid, max_output)
    else:
        # In label-grouped order the boxes a box may suppress are exactly the
        # later ones before its group's end: a bit mask, no label comparisons.
        ends = _group_ends(jnp.pad(labels, (0, npad - n))[seq], invalid_seq)
        band = min(words, _BAND_WORDS)
        limit = (lax.iota(jnp.int32, npad) // _WORD + band) * _WORD
        fits = jnp.all(invalid_seq | (ends <= limit))
        everything = npad  # no early stop: the visiting order is not the output order
        kept = lax.cond(
            fits,
            lambda: _greedy_band(f, ends, thr, invalid_seq, num_valid, band),
            lambda: _greedy_triangle(f, ends, thr, invalid_seq, num_valid, everything),
        )
        kept = jnp.zeros((npad,), bool).at[group].set(kept, unique_indices=True)

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
    """Positions by decreasing score, then increasing index; invalid ones last.

    XLA's CPU sort is fast for one int32 operand and slow with a comparator over
    two (0.07 vs 0.4 ms at 2,000), so distinct keys are sorted alone and each
    element finds its place by binary search; tied scores take the two-operand
    sort (the same result).
    """
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


def _group_by_label(labels: jax.Array, valid: jax.Array) -> jax.Array:
    """The stable permutation that sorts ``labels`` (invalid entries last)."""
    npad = labels.shape[0]
    idx = lax.iota(jnp.int32, npad)
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.min(jnp.where(valid, labels, big))
    hi = jnp.max(jnp.where(valid, labels, -big - 1))
    span = hi.astype(jnp.float32) - lo.astype(jnp.float32)
    # One int32 key (label, position) when it fits: the fast single-operand sort.
    fits = jnp.all(~valid) | ((span + 2.0) * npad < 2.0**30)

    def packed() -> jax.Array:
        rel = jnp.where(valid, labels - lo, hi - lo + 1)
        return lax.sort(rel * npad + idx) % npad

    def by_pairs() -> jax.Array:
        # (invalid flag, label, position): three keys, the slow comparator sort.
        return lax.sort((~valid, labels, idx), num_keys=3)[2]

    return lax.cond(fits, packed, by_pairs)


def _group_ends(labels: jax.Array, invalid: jax.Array) -> jax.Array:
    """For labels sorted ascending (invalid entries last): where each one's run ends."""
    key = jnp.where(invalid, jnp.iinfo(jnp.int32).max, labels)
    return jnp.searchsorted(key, key, side="right", method="scan").astype(jnp.int32)


def _below(limit: jax.Array, first_bit: jax.Array) -> jax.Array:
    """Words whose bit b is set where ``first_bit + b < limit`` (broadcast)."""
    m = jnp.clip(limit - first_bit, 0, _WORD)
    return jnp.where(
        m >= _WORD, jnp.uint32(0xFFFFFFFF), (jnp.uint32(1) << m.astype(jnp.uint32)) - 1
    )


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


def _greedy_triangle(
    f: jax.Array,
    ends: jax.Array | None,
    thr: jax.Array,
    invalid: jax.Array,
    num_valid: jax.Array,
    max_kept: int,
) -> jax.Array:
    """Greedy pass over the upper triangle; returns the kept flags in visiting order.

    ``ends``: box i only suppresses boxes before ``ends[i]`` (None: all later ones).
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
        blocks.append(jnp.pad(_pack_bits(hit), ((0, 0), (r0 // _WORD, 0))))
    bits = jnp.concatenate(blocks, axis=0)  # (npad, words); left of each block zero
    word_ids = lax.iota(jnp.int32, words)
    above = jnp.asarray(_ABOVE)

    def step(i: jax.Array, removed: jax.Array) -> tuple[jax.Array, jax.Array]:
        w, b = i // _WORD, i % _WORD
        gone = (removed[w] >> b.astype(jnp.uint32)) & 1 == 1
        row = lax.dynamic_index_in_dim(bits, i, axis=0, keepdims=False)
        row = jnp.where(word_ids > w, row, jnp.where(word_ids == w, row & above[b], 0))
        if ends is not None:
            row = row & _below(ends[i], word_ids * _WORD)
        return jnp.where(gone, removed, removed | row), ~gone

    removed, c_end = _walk(step, _pack(invalid), num_valid, max_kept)
    kept_words = jnp.where(word_ids < c_end // _WORD, ~removed, jnp.uint32(0))
    partial = (c_end // _WORD < words) & (word_ids == c_end // _WORD)
    tail = jnp.asarray(_BITS - 1)[c_end % _WORD]  # bits below c_end in its word
    kept_words = jnp.where(partial, ~removed & tail, kept_words)
    return _unpack(kept_words)


def _greedy_band(
    f: jax.Array,
    ends: jax.Array,
    thr: jax.Array,
    invalid: jax.Array,
    num_valid: jax.Array,
    band: int,
) -> jax.Array:
    """Greedy pass when each box's ``ends[i]`` lies within ``band`` words of it.

    Bits are kept for the ``band`` words from each box's own word on.
    """
    npad = f.shape[1]
    words = npad // _WORD
    fp = jnp.pad(f, ((0, 0), (0, band * _WORD)))
    # Columns of row word w, band word k: sorted boxes 32 (w + k) .. + 31.
    c = jnp.stack(
        [fp[:, k * _WORD : k * _WORD + npad].reshape(5, words, _WORD) for k in range(band)],
        axis=2,
    )  # (5, words, band, 32)
    c = lax.optimization_barrier(c)  # a copy: cheaper than re-slicing per pair
    hit = _hits(f.reshape(5, words, _WORD, 1, 1), c[:, :, None], thr)  # (words, 32, band, 32)
    first_col = (
        lax.iota(jnp.int32, npad)[:, None] // _WORD + lax.iota(jnp.int32, band)[None, :]
    ) * _WORD
    bits = _pack_bits(hit).reshape(npad, band) & _below(ends[:, None], first_col)
    above = jnp.asarray(_ABOVE)
    first = lax.iota(jnp.int32, band) == 0

    def step(i: jax.Array, removed: jax.Array) -> tuple[jax.Array, jax.Array]:
        w, b = i // _WORD, i % _WORD
        gone = (removed[w] >> b.astype(jnp.uint32)) & 1 == 1
        row = lax.dynamic_index_in_dim(bits, i, axis=0, keepdims=False)
        row = jnp.where(first, row & above[b], row)
        window = lax.dynamic_slice_in_dim(removed, w, band)
        new = lax.dynamic_update_slice_in_dim(removed, window | row, w, axis=0)
        return jnp.where(gone, removed, new), ~gone

    removed0 = jnp.pad(_pack(invalid), (0, band))
    removed, _ = _walk(step, removed0, num_valid, npad)
    return _unpack(~removed[:words])


def _walk(
    step: Any, removed: jax.Array, num_valid: jax.Array, max_kept: int
) -> tuple[jax.Array, jax.Array]:
    """Runs ``step`` over boxes 0, 1, ... until ``max_kept`` kept or no valid box left.

    Returns the removed bits and the number of boxes visited.
    """

    def cond(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        i, _, kept = state
        return (i < num_valid) & (kept < max_kept)

    def body(
        state: tuple[jax.Array, jax.Array, jax.Array],
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        i, removed, kept = state
        removed, is_kept = step(i, removed)
        return i + 1, removed, kept + is_kept.astype(jnp.int32)

    i, removed, _ = lax.while_loop(cond, body, (jnp.int32(0), removed, jnp.int32(0)))
    return removed, i


def _pack(flags: jax.Array) -> jax.Array:
    """``(32 k,)`` bools to ``(k,)`` uint32 words, bit b of word w = flag 32 w + b."""
    return _pack_bits(flags.reshape(-1, _WORD))


def _unpack(words: jax.Array) -> jax.Array:
    bit_ids = jnp.arange(_WORD, dtype=jnp.uint32)
    return (((words[:, None] >> bit_ids[None, :]) & 1) == 1).reshape(-1)
