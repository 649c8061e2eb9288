"""Bounding-box regression: per-class ridge regression on pooled conv5 features.

The rules are SPP-net's ``spp_train_bbox_regressor.m``, adapted from R-CNN's
(``docs/detection-reference.md`` section 6). The training boxes are the proposals
with IoU ``> min_iou`` to their best ground truth (:func:`match_proposals`), whose
class picks the regressor and whose box is the target, coded by
:func:`~spp_jax.detection.boxes.encode_boxes` with weights ``(1, 1, 1, 1)``. Each
class has one ridge regression for the 4 targets at once,
``min ||X W + 1 b^T - Y||^2 + lam ||W||^2`` (:meth:`RidgeAccumulator.solve`), on
the features times ``feature_scale``: SPP-net scales pool5 as the SVMs' features
(:func:`spp_jax.detection.svm.feature_scale`), and its ``lam`` assumes that.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> feats = rng.normal(size=(50, 3)).astype(np.float32)
>>> props = np.tile(np.float32([[10, 10, 50, 30]]), (50, 1))
>>> gts = props + np.float32([2, 0, 2, 0])  # every box 2 px to the right
>>> reg = fit_box_regressors(feats, props, gts, np.ones(50, np.int32), 1, lam=1.0)
>>> np.round(np.asarray(reg.apply(feats[:1], props[:1], np.array([1]), (100, 100))), 3)
array([[12., 10., 52., 30.]], dtype=float32)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from spp_jax._io import atomic_write_npz
from spp_jax._padding import pad_rows, power_of_two
from spp_jax.detection._checks import class_labels, float_rows, int_at_least, number
from spp_jax.detection.boxes import (
    box_iou,
    check_boxes,
    check_image_size,
    clip_boxes,
    decode_boxes,
    encode_boxes,
)

__all__ = [
    "BoxRegressors",
    "RidgeAccumulator",
    "fit_box_regressors",
    "match_proposals",
]

logger = logging.getLogger(__name__)

DEFAULT_LAMBDA = 4000.0
"""SPP-net's code (R-CNN's: 1000)."""
DEFAULT_MIN_IOU = 0.5
"""SPP-net's code: IoU ``> 0.5`` (R-CNN's: 0.6)."""

_FORMAT = "spp_jax.detection.bbox_regression/2"
_FORMAT_WHITENED = "spp_jax.detection.bbox_regression/1"  # see BoxRegressors.load
_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Checks


def _iou_threshold(value: Any) -> float:
    v = number("min_iou", value, low=0)
    if v >= 1:
        raise ValueError(
            f"min_iou must be in [0, 1) (a box is used when its IoU is > min_iou), got {value!r}"
        )
    return v


def _boxes(name: str, boxes: Any, n: int | None = None) -> np.ndarray:
    arr = np.asarray(boxes)
    if arr.ndim != 2 or arr.shape[1] != 4 or (n is not None and arr.shape[0] != n):
        want = f"({n}, 4)" if n is not None else "(N, 4)"
        raise ValueError(f"{name} must have shape {want} holding (x1, y1, x2, y2), got {arr.shape}")
    return arr


# ---------------------------------------------------------------------------
# Matching proposals to ground truths


def match_proposals(
    proposals: Any,
    gt_boxes: Any,
    gt_labels: Any,
    *,
    min_iou: float = DEFAULT_MIN_IOU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training boxes of one image: proposals with IoU ``> min_iou`` to a ground truth.

    Each proposal takes the ground truth (of any class) with which it has the
    highest IoU (:func:`~spp_jax.detection.boxes.box_iou`, float32; ties: the
    first); it is kept if that IoU is ``> min_iou``.

    Args:
      proposals: ``(R, 4)`` boxes.
      gt_boxes: ``(G, 4)`` ground-truth boxes; ``G`` may be 0 (nothing kept).
      gt_labels: ``(G,)`` their classes (ints, any range: passed through).
      min_iou: 0.5 (SPP-net's code) or 0.6 (R-CNN's).

    Returns:
      ``(index (N,), matched (N, 4), labels (N,), ious (N,))``: the kept
      proposals' rows, their ground-truth boxes (float32), classes and IoUs.

    >>> idx, gt, lab, iou = match_proposals(
    ...     np.array([[0, 0, 10, 10], [0, 0, 4, 10], [5, 0, 15, 10.0]]),
    ...     np.array([[0, 0, 10, 10.0]]), np.array([3]))
    >>> idx.tolist(), lab.tolist(), iou.tolist()
    ([0], [3], [1.0])
    """
    min_iou = _iou_threshold(min_iou)
    proposals = _boxes("proposals", proposals)
    gt_boxes = _boxes("gt_boxes", gt_boxes)
    gt_labels = np.asarray(gt_labels)
    if gt_labels.shape != (gt_boxes.shape[0],):
        raise ValueError(
            f"gt_labels must have shape ({gt_boxes.shape[0]},) like gt_boxes, got {gt_labels.shape}"
        )
    if gt_boxes.shape[0] == 0 or proposals.shape[0] == 0:
        return (
            np.zeros(0, np.int64),
            np.zeros((0, 4), np.float32),
            gt_labels[:0].copy(),
            np.zeros(0, np.float32),
        )
    # Padded to powers of two (empty boxes, IoU 0 with everything; real columns
    # come first, so they win argmax ties): one compilation per bucket of sizes.
    r, g = proposals.shape[0], gt_boxes.shape[0]
    padded_p = jnp.asarray(pad_rows(proposals, power_of_two(r), 0.0), jnp.float32)
    padded_g = jnp.asarray(pad_rows(gt_boxes, power_of_two(g), 0.0), jnp.float32)
    iou = np.asarray(box_iou(padded_p, padded_g))[:r, :g]
    best = np.argmax(iou, axis=1)
    best_iou = iou[np.arange(len(best)), best]
    index = np.flatnonzero(best_iou > np.float32(min_iou))
    return (
        index,
        np.asarray(gt_boxes, np.float32)[best[index]],
        gt_labels[best[index]],
        best_iou[index],
    )


@jax.jit
def _pair_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.vmap(lambda p, q: box_iou(p[None], q[None])[0, 0])(a, b)


# ---------------------------------------------------------------------------
# The regressors


@dataclasses.dataclass(frozen=True, eq=False)
class BoxRegressors:
    """K box regressors (a pytree: arrays are leaves, ``scale`` and ``counts`` static).

    A row ``x`` of class ``k`` gets the deltas
    ``(x * scale) @ weights[:, k-1] + biases[k-1]``.

    Attributes:
      weights: ``(D, K, 4)`` float32.
      biases: ``(K, 4)`` float32.
      scale: the feature scale.
      counts: the training boxes per class (``()`` if unknown). A class with none
        has the identity regressor (zero deltas).
    """

    weights: Any
    biases: Any
    scale: float = 1.0
    counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", number("scale", self.scale, low=0, strict=True))
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        # Checked only for arrays: JAX rebuilds pytrees with other leaves too.
        if hasattr(self.weights, "shape") and hasattr(self.biases, "shape"):
            w_shape, b_shape = tuple(self.weights.shape), tuple(self.biases.shape)
            k = w_shape[1] if len(w_shape) == 3 else -1
            if len(w_shape) != 3 or w_shape[2] != 4 or b_shape != (k, 4):
                raise ValueError(
                    "BoxRegressors needs weights (D, K, 4) and biases (K, 4); got weights "
                    f"{w_shape} and biases {b_shape}"
                )
            if self.counts and len(self.counts) != k:
                raise ValueError(f"counts must have K = {k} entries, got {len(self.counts)}")

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[1])

    @property
    def num_features(self) -> int:
        return int(self.weights.shape[0])

    @classmethod
    def identity(cls, num_features: int, num_classes: int, scale: float = 1.0) -> BoxRegressors:
        """Regressors that predict zero deltas for every class."""
        d = int_at_least("num_features", num_features, 1)
        k = int_at_least("num_classes", num_classes, 1)
        return cls(np.zeros((d, k, 4), np.float32), np.zeros((k, 4), np.float32), scale, (0,) * k)

    def deltas(self, features: Any, labels: Any) -> jax.Array:
        """Predicted ``(dx, dy, dw, dh)`` (weights 1) of each row for its class.

        Args:
          features: ``(R, D)`` unscaled features (any float dtype; float32 compute).
          labels: ``(R,)`` ints in ``1..K``. Concrete labels outside are an
            error; under ``jit`` they are clamped into ``1..K``.

        Returns:
          float32 ``(R, 4)``.
        """
        x, labels = self._check(features, labels)
        if _traced(x, labels):
            return _deltas(self, x, labels)
        n = x.shape[0]
        rows = power_of_two(n)  # concrete calls: one compilation per bucket of R
        return _deltas(self, pad_rows(x, rows), pad_rows(labels, rows, 1))[:n]

    def apply(
        self,
        features: Any,
        boxes: Any,
        labels: Any,
        image_size: Sequence[int] | jax.Array,
    ) -> jax.Array:
        """Refines boxes: decodes the predicted deltas, then clips to the image.

        Works under ``jit`` (then labels are clamped into ``1..K``, and box values
        are not checked: see :mod:`~spp_jax.detection.boxes`). Called with
        concrete arrays, it pads ``R`` to a power of two, so a stream of images
        with different numbers of boxes compiles a few programs only.

        Args:
          features: ``(R, D)`` features of the boxes (pooled conv5, unscaled).
          boxes: ``(R, 4)`` boxes ``(x1, y1, x2, y2)`` (e.g. the final detections).
          labels: ``(R,)`` their classes, ints in ``1..K``.
          image_size: ``(H, W)``.

        Returns:
          float32 ``(R, 4)`` refined boxes inside ``[0, W] x [0, H]``.

        Raises:
          ValueError: shapes that do not fit; concrete labels outside ``1..K``,
            boxes that are not finite or inverted, a bad image size.
        """
        x, labels = self._check(features, labels)
        n = x.shape[0]
        shape = np.shape(boxes)
        if shape != (n, 4):
            raise ValueError(
                f"boxes must have shape (R, 4) with R = {n} (the features' rows), got "
                f"{tuple(shape)}"
            )
        size = check_image_size(image_size)
        if _traced(x, labels, boxes, size):
            return _apply(self, x, boxes, labels, size)
        boxes = np.asarray(check_boxes(boxes, "boxes"))
        rows = power_of_two(n)
        out = _apply(
            self,
            pad_rows(x, rows),
            pad_rows(boxes, rows, _UNIT_BOX),
            pad_rows(labels, rows, 1),
            np.asarray(size, np.float32),
        )
        return out[:n]

    def _check(self, features: Any, labels: Any) -> tuple[Any, Any]:
        d, k = self.num_features, self.num_classes
        shape = np.shape(features)
        if len(shape) != 2 or shape[1] != d:
            raise ValueError(f"features must have shape (R, {d}), got {tuple(shape)}")
        if isinstance(labels, jax.core.Tracer):
            if np.shape(labels) != (shape[0],):
                raise ValueError(f"labels must have shape ({shape[0]},), got {np.shape(labels)}")
        else:
            labels = class_labels("labels", labels, shape[0], k).astype(np.int32)
        if not isinstance(features, jax.core.Tracer):
            features = np.asarray(features)
            if not np.issubdtype(features.dtype, np.floating):
                features = features.astype(np.float32)
        return features, labels

    def save(self, path: str | os.PathLike) -> None:
        """Writes an ``.npz`` atomically (a temporary file, then ``os.replace``)."""
        arrays = {
            "format": np.array(_FORMAT),
            "weights": np.asarray(self.weights, np.float32),
            "biases": np.asarray(self.biases, np.float32),
            "scale": np.array(self.scale, np.float64),
            "counts": np.array(self.counts, np.int64),
        }
        atomic_write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BoxRegressors:
        """Reads what :meth:`save` wrote.

        A file that stores whitened regressors (format ``.../1``,
        with ``target_mean`` ``mu`` and ``target_unwhitening`` ``T^-1`` per class)
        is read as the same predictions: ``weights T^-1`` and ``biases T^-1 + mu``,
        in float64, rounded to float32.

        Raises:
          ValueError: not a file written by :meth:`save`.
        """
        with np.load(path, allow_pickle=False) as f:
            fmt = str(f["format"]) if "format" in f else None
            if fmt not in (_FORMAT, _FORMAT_WHITENED):
                raise ValueError(f"{os.fspath(path)!r} is not a BoxRegressors file ({_FORMAT})")
            weights, biases = f["weights"], f["biases"]
            if fmt == _FORMAT_WHITENED:
                t_inv = np.asarray(f["target_unwhitening"], np.float64)
                weights = np.einsum("dki,kij->dkj", np.asarray(weights, np.float64), t_inv)
                biases = np.einsum("ki,kij->kj", np.asarray(biases, np.float64), t_inv)
                biases += f["target_mean"]
                weights, biases = weights.astype(np.float32), biases.astype(np.float32)
            return cls(weights, biases, float(f["scale"]), tuple(f["counts"].tolist()))


jax.tree_util.register_dataclass(
    BoxRegressors,
    data_fields=["weights", "biases"],
    meta_fields=["scale", "counts"],
)


def _traced(*arrays: Any) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


_UNIT_BOX = np.array([0, 0, 1, 1], np.float32)


@jax.jit
def _deltas(reg: BoxRegressors, features: jax.Array, labels: jax.Array) -> jax.Array:
    d, k = reg.num_features, reg.num_classes
    idx = jnp.clip(labels.astype(jnp.int32) - 1, 0, k - 1)
    x = features.astype(jnp.float32) * reg.scale
    w = reg.weights.astype(jnp.float32).reshape(d, k * 4)
    b = reg.biases.astype(jnp.float32).reshape(k * 4)
    z = (jnp.matmul(x, w, precision=_HIGHEST) + b[None, :]).reshape(-1, k, 4)
    return jnp.take_along_axis(z, idx[:, None, None], axis=1)[:, 0]


@jax.jit
def _apply(
    reg: BoxRegressors, features: jax.Array, boxes: jax.Array, labels: jax.Array, size: jax.Array
) -> jax.Array:
    deltas = _deltas(reg, features, labels)
    return clip_boxes(decode_boxes(boxes.astype(jnp.float32), deltas), size)


# ---------------------------------------------------------------------------
# Streaming accumulation and the solve


@dataclasses.dataclass
class _Sums:
    shift: jax.Array  # (D,) c: the class's reference row
    n: int = 0
    s1: Any = None  # (D,) sum(x - c)
    s2: Any = None  # (D, D) sum (x - c)(x - c)^T
    sxy: Any = None  # (D, 4) sum (x - c) y^T
    sy: Any = None  # (4,) sum y


@functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3))  # updated in place
def _accumulate(s1, s2, sxy, sy, xc, y):
    return (
        s1 + jnp.sum(xc, axis=0),
        s2 + jnp.matmul(xc.T, xc, precision=_HIGHEST),
        sxy + jnp.matmul(xc.T, y, precision=_HIGHEST),
        sy + jnp.sum(y, axis=0),
    )


class RidgeAccumulator:
    """Sums for per-class ridge regression, fed one batch (e.g. image) at a time.

    Per class it keeps the count, ``sum y`` and, of the features shifted by a
    reference row (for accuracy), ``sum x``, ``sum x x^T`` and ``sum x y^T``:
    ``D^2`` numbers per class that has boxes, float64 when JAX's x64 is enabled,
    else float32 (12,800-d pool5: 655 MB per class in float32; ``classes`` trades
    passes for memory).

    Args:
      num_features: D.
      num_classes: K.
      feature_scale: features are multiplied by this before anything else.
      classes: accumulate only these classes (in ``1..K``; others are skipped);
        None: all.

    >>> acc = RidgeAccumulator(3, 2)
    >>> x = np.eye(3, dtype=np.float32)
    >>> boxes = np.float32([[0, 0, 10, 10]] * 3)
    >>> acc.add(x, boxes, boxes + 1, np.array([1, 1, 1]))
    >>> acc.counts.tolist()
    [3, 0]
    """

    def __init__(
        self,
        num_features: int,
        num_classes: int,
        *,
        feature_scale: float = 1.0,
        classes: Iterable[int] | None = None,
    ) -> None:
        self.num_features = int_at_least("num_features", num_features, 1)
        self.num_classes = int_at_least("num_classes", num_classes, 1)
        self.scale = number("feature_scale", feature_scale, low=0, strict=True)
        if classes is None:
            self.classes = frozenset(range(1, self.num_classes + 1))
        else:
            labels = sorted(classes)
            class_labels("classes", np.asarray(labels, np.int64), len(labels), self.num_classes)
            self.classes = frozenset(int(c) for c in labels)
        self.dtype = jax.dtypes.canonicalize_dtype(np.float64)  # float32 unless x64 is on
        self._sums: dict[int, _Sums] = {}

    @property
    def counts(self) -> np.ndarray:
        """int64 ``(K,)``: training boxes accumulated per class."""
        out = np.zeros(self.num_classes, np.int64)
        for k, s in self._sums.items():
            out[k - 1] = s.n
        return out

    def add(self, features: Any, proposals: Any, gt_boxes: Any, labels: Any) -> None:
        """Adds training boxes (already selected, e.g. by :func:`match_proposals`).

        Args:
          features: ``(N, D)`` their features (unscaled).
          proposals: ``(N, 4)`` the boxes (positive width and height).
          gt_boxes: ``(N, 4)`` each one's ground truth (the regression target).
          labels: ``(N,)`` the ground truths' classes, ints in ``1..K``.

        Raises:
          ValueError: shapes that do not fit, labels outside ``1..K``, non-finite
            features, empty or inverted boxes.
        """
        x = float_rows("features", features, self.num_features)
        n = x.shape[0]
        self._add(
            x,
            _boxes("proposals", proposals, n),
            _boxes("gt_boxes", gt_boxes, n),
            class_labels("labels", labels, n, self.num_classes),
        )

    def _add(self, x: np.ndarray, proposals: Any, gt_boxes: Any, labels: np.ndarray) -> None:
        """:meth:`add` of checked arguments."""
        n = x.shape[0]
        if n == 0:
            return
        rows = power_of_two(n)  # padded with unit boxes: one compilation per bucket
        y = np.asarray(
            encode_boxes(
                jnp.asarray(pad_rows(np.asarray(proposals, np.float32), rows, _UNIT_BOX)),
                jnp.asarray(pad_rows(np.asarray(gt_boxes, np.float32), rows, _UNIT_BOX)),
            )
        )[:n]
        x = x * np.float32(self.scale)
        for k in np.unique(labels).tolist():
            if k in self.classes:
                rows = labels == k
                self._add_class(int(k), x[rows], y[rows])

    def add_image(
        self,
        features: Any,
        proposals: Any,
        gt_boxes: Any,
        gt_labels: Any,
        *,
        min_iou: float = DEFAULT_MIN_IOU,
    ) -> int:
        """Selects an image's training boxes (:func:`match_proposals`) and adds them.

        Args:
          features: ``(R, D)`` features of all its proposals.
          proposals: ``(R, 4)``.
          gt_boxes: ``(G, 4)`` its ground truths (``G`` may be 0).
          gt_labels: ``(G,)`` their classes in ``1..K``.
          min_iou: see :func:`match_proposals`.

        Returns:
          The number of training boxes the image gave (all classes).
        """
        x = float_rows("features", features, self.num_features)
        proposals = _boxes("proposals", proposals, x.shape[0])
        gt_boxes = _boxes("gt_boxes", gt_boxes)
        gt_labels = class_labels("gt_labels", gt_labels, gt_boxes.shape[0], self.num_classes)
        index, matched, labels, _ = match_proposals(proposals, gt_boxes, gt_labels, min_iou=min_iou)
        if index.size:
            self._add(x[index], proposals[index], matched, labels)
        return int(index.size)

    def _add_class(self, k: int, x: np.ndarray, y: np.ndarray) -> None:
        s = self._sums.get(k)
        if s is None:
            d = self.num_features
            shift = np.mean(x, axis=0, dtype=np.float64).astype(self.dtype)
            s = _Sums(
                shift=jnp.asarray(shift),
                s1=jnp.zeros(d, self.dtype),
                s2=jnp.zeros((d, d), self.dtype),
                sxy=jnp.zeros((d, 4), self.dtype),
                sy=jnp.zeros(4, self.dtype),
            )
            self._sums[k] = s
        n = x.shape[0]
        rows = power_of_two(n)
        xc = pad_rows(x.astype(self.dtype) - np.asarray(s.shift), rows)
        yy = pad_rows(np.asarray(y, self.dtype), rows)
        s.s1, s.s2, s.sxy, s.sy = _accumulate(s.s1, s.s2, s.sxy, s.sy, xc, yy)
        s.n += n

    def solve(self, lam: float = DEFAULT_LAMBDA, *, regularize_bias: bool = False) -> BoxRegressors:
        """Solves each class's ridge regression.

        The bias is free by default: the features are centred (exactly, from the
        sums), leaving ``Xc^T Xc + lam I``, symmetric positive definite for
        ``lam > 0`` and no worse conditioned for the features' mean, solved by
        Cholesky in JAX (products at ``Precision.HIGHEST``: no TF32 on GPUs).
        SPP-net's and R-CNN's code append a column of ones to ``X`` instead,
        regularised like the weights, for targets centred on their per-class mean
        (``regularize_bias=True``: the bias is pulled towards that mean, not 0).
        Their code also whitens each class's targets: ridge regression with one
        ``lam`` for all outputs commutes with any invertible linear map of the
        targets, so that changes no prediction and is not done here.

        Args:
          lam: the ridge penalty (4000, SPP-net; 1000, R-CNN). ``lam = 0`` is
            least squares and needs at least ``D + 1`` well-spread boxes.
          regularize_bias: penalise the bias as SPP-net's code does (above).

        Returns:
          The :class:`BoxRegressors`; classes without boxes (and those outside
          ``classes``) get the identity regressor, which is logged.

        Raises:
          ValueError: bad settings; a class whose system is singular (``lam = 0``
            with too few boxes).
        """
        lam = number("lam", lam, low=0)
        identity = BoxRegressors.identity(self.num_features, self.num_classes, self.scale)
        weights = np.array(identity.weights)
        biases = np.array(identity.biases)
        empty = [k for k in range(1, self.num_classes + 1) if k not in self._sums]
        if empty:
            logger.info("box regression: no training boxes for class(es) %s: identity", empty)
        for k, s in sorted(self._sums.items()):
            n = jnp.asarray(s.n, self.dtype)
            w, b = (
                np.asarray(v, np.float32)
                for v in _ridge(
                    s.shift, s.s1, s.s2, s.sxy, s.sy, n, jnp.asarray(lam, self.dtype),
                    regularize_bias,
                )
            )  # fmt: skip
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise ValueError(
                    f"the ridge system of class {k} ({s.n} boxes, lam={lam}) is singular: "
                    f"use lam > 0"
                )
            weights[:, k - 1], biases[k - 1] = w, b
            logger.debug("box regression: class %d solved from %d boxes", k, s.n)
        return BoxRegressors(weights, biases, self.scale, tuple(self.counts.tolist()))


@functools.partial(jax.jit, static_argnums=7)
def _ridge(shift, s1, s2, sxy, sy, n, lam, regularize_bias):
    """Ridge weights ``(W (D, 4), b (4,))`` of one class from its sums."""
    d = shift.shape[0]
    y_mean = sy / n
    if regularize_bias:
        # The code's system: [X, 1]^T [X, 1] + lam I, on raw (unshifted) features,
        # for the targets centred on their mean (which sum to 0: the last row).
        sx = s1 + n * shift
        gram = s2 + jnp.outer(shift, s1) + jnp.outer(s1, shift) + n * jnp.outer(shift, shift)
        top = jnp.concatenate([gram, sx[:, None]], axis=1)
        bottom = jnp.concatenate([sx, n[None]])[None, :]
        a = jnp.concatenate([top, bottom], axis=0) + lam * jnp.eye(d + 1, dtype=shift.dtype)
        sxy_raw = sxy + jnp.outer(shift, sy)
        rhs = jnp.concatenate([sxy_raw - jnp.outer(sx, y_mean), (sy - n * y_mean)[None, :]], axis=0)
        beta = _cho_solve(a, rhs)
        return beta[:d], beta[d] + y_mean
    # A free bias: centre the features (exactly, from the shifted sums); then
    # W = (Xc^T Xc + lam I)^-1 Xc^T Yc and b = mean(y) - mean(x) W.
    x_mean = shift + s1 / n
    cxx = s2 - jnp.outer(s1, s1) / n
    cxy = sxy - jnp.outer(s1, y_mean)
    w = _cho_solve(cxx + lam * jnp.eye(d, dtype=shift.dtype), cxy)
    return w, y_mean - jnp.matmul(x_mean, w, precision=_HIGHEST)


def _cho_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
    factor = jax.scipy.linalg.cho_factor(a, lower=True)
    return jax.scipy.linalg.cho_solve(factor, rhs)


def fit_box_regressors(
    features: Any,
    proposals: Any,
    gt_boxes: Any,
    labels: Any,
    num_classes: int,
    *,
    lam: float = DEFAULT_LAMBDA,
    min_iou: float = DEFAULT_MIN_IOU,
    ious: Any = None,
    feature_scale: float = 1.0,
    regularize_bias: bool = False,
) -> BoxRegressors:
    """Fits the K regressors from one batch of matched boxes (see :class:`RidgeAccumulator`).

    Args:
      features: ``(N, D)`` the proposals' features (unscaled).
      proposals: ``(N, 4)`` proposals.
      gt_boxes: ``(N, 4)`` each proposal's best ground truth.
      labels: ``(N,)`` that ground truth's class, in ``1..K``.
      num_classes: K.
      lam, regularize_bias: see :meth:`RidgeAccumulator.solve`.
      min_iou: only rows with IoU ``> min_iou`` are used.
      ious: ``(N,)`` each row's IoU with its ground truth; None: computed
        (:func:`~spp_jax.detection.boxes.box_iou`'s float32 arithmetic).
      feature_scale: multiplies the features.

    Returns:
      The :class:`BoxRegressors`.
    """
    x = float_rows("features", features)
    n = x.shape[0]
    proposals = _boxes("proposals", proposals, n)
    gt_boxes = _boxes("gt_boxes", gt_boxes, n)
    min_iou = _iou_threshold(min_iou)
    if ious is None:
        rows = power_of_two(n)
        ious = np.asarray(
            _pair_iou(
                jnp.asarray(pad_rows(proposals, rows, _UNIT_BOX), jnp.float32),
                jnp.asarray(pad_rows(gt_boxes, rows, _UNIT_BOX), jnp.float32),
            )
        )[:n]
        keep = ious > np.float32(min_iou)
    else:
        ious = np.asarray(ious)
        if ious.shape != (n,):
            raise ValueError(f"ious must have shape ({n},), got {ious.shape}")
        keep = ious > min_iou
    acc = RidgeAccumulator(x.shape[1], num_classes, feature_scale=feature_scale)
    labels = class_labels("labels", labels, n, acc.num_classes)
    acc._add(x[keep], proposals[keep], gt_boxes[keep], labels[keep])
    return acc.solve(lam, regularize_bias=regularize_bias)
