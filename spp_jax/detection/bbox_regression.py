"""Bounding-box regression: per-class ridge regression on pooled conv5 features.

The rules (``docs/detection-reference.md`` section 6; SPP-net's
``spp_train_bbox_regressor.m`` / ``spp_predict_bbox_regressor.m``, adapted from
R-CNN's):

* Training boxes: proposals whose IoU with their best ground truth (of any
  class; ties: the first) is ``> min_iou`` (0.5, SPP-net's code; R-CNN uses
  0.6). That ground truth's class picks the regressor, its box the target.
* Targets: :func:`~spp_jax.detection.boxes.encode_boxes` with weights
  ``(1, 1, 1, 1)``: ``((gx - px) / pw, (gy - py) / ph, log(gw / pw), log(gh / ph))``.
* Targets are whitened per class as the SPP-net code does: centred on their
  mean ``mu`` and decorrelated by ``T = S^(-1/2)`` computed as
  ``V diag(1 / sqrt(d + 0.001)) V^T`` from the eigendecomposition ``S = V diag(d) V^T``
  of their covariance (``whiten="zca"``; ``"std"`` divides each target by
  ``sqrt(var + 0.001)`` instead, ``"none"`` does neither). Predictions are
  un-whitened: ``deltas = z T^-1 + mu``.
* Ridge regression, one per class, for the 4 whitened targets at once:
  ``min ||X W + 1 b^T - Z||^2 + lam ||W||^2`` with ``lam`` 4000 (SPP-net's
  code; R-CNN 1000) on features times ``feature_scale`` (SPP-net scales pool5
  like the SVMs' features: ``20 / mean norm``; its ``lam`` assumes that, see
  :func:`spp_jax.detection.svm.feature_scale`).
* The bias ``b`` is NOT regularised (``regularize_bias=False``). SPP-net's and
  R-CNN's code add a column of ones to ``X`` and regularise it like the
  weights (``regularize_bias=True`` reproduces that exactly); with centred
  targets the difference is small.

Exact facts worth knowing: ridge regression with one ``lam`` for all outputs
commutes with any invertible linear map of the targets, so the whitening ``T``
changes no prediction (only rounding), and with an unregularised bias neither
does the centring. Both are kept for fidelity with the code; with
``regularize_bias=True`` the centring matters (a bias is pulled towards ``mu``,
not 0).

Streaming: :class:`RidgeAccumulator` keeps per class only sums (``X^T X`` of
the features shifted by a per-class reference row, for accuracy, ``X^T Y``,
``sum X``, ``sum Y``, ``Y^T Y``, the count), so a pipeline feeds it one image at
a time and memory is ``D^2`` numbers per class that has boxes (float64 when
JAX's x64 is enabled, else float32; ``classes=`` restricts an accumulator to
some classes, to trade passes for memory when ``D`` is large: 12,800-d pool5
takes 655 MB per class in float32). The solve centres the features (exactly,
from the sums), so the free bias leaves the system ``Xc^T Xc + lam I``:
symmetric positive definite for ``lam > 0``, with a condition number
``(largest eigenvalue + lam) / lam`` that the features' mean does not inflate;
it is solved by Cholesky in JAX (matrix products at ``Precision.HIGHEST``, so
GPUs do not round them to TF32).

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
import math
import numbers
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np

from spp_jax._io import atomic_open
from spp_jax._padding import pad_rows, power_of_two
from spp_jax.detection.boxes import (
    box_iou,
    check_boxes,
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
WHITEN_EPS = 0.001
"""Added to the target variances before the inverse square root (SPP-net's code)."""
WHITENINGS = ("zca", "std", "none")

_FORMAT = "spp_jax.detection.bbox_regression/1"
_HIGHEST = jax.lax.Precision.HIGHEST

Whitening = Literal["zca", "std", "none"]


# ---------------------------------------------------------------------------
# Checks


def _int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value}")
    return int(value)


def _number(name: str, value: Any, low: float, *, strict: bool) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < low or (strict and v == low):
        raise ValueError(
            f"{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}"
        )
    return v


def _iou_threshold(value: Any) -> float:
    v = _number("min_iou", value, 0.0, strict=False)
    if v >= 1:
        raise ValueError(
            f"min_iou must be in [0, 1) (a box is used when its IoU is > min_iou), got {value!r}"
        )
    return v


def _features(name: str, x: Any, d: int | None) -> np.ndarray:
    arr = np.asarray(x)
    want = f"(N, {d})" if d is not None else "(N, D)"
    if arr.ndim != 2 or (d is not None and arr.shape[1] != d):
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
    arr = np.asarray(arr, np.float32)
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        raise ValueError(f"{name} must be finite (as float32); row {int(bad[0])} is not")
    return arr


def _labels(name: str, labels: Any, n: int, k: int) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be ints in 1..{k}, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 1) | (arr > k))
    if bad.size:
        raise ValueError(
            f"{name} must be classes in 1..{k} (0, background, has no regressor); entry "
            f"{int(bad[0])} is {int(arr[bad[0]])}"
        )
    return arr.astype(np.int64)


def _boxes(name: str, boxes: Any, n: int | None = None) -> np.ndarray:
    arr = np.asarray(boxes)
    if arr.ndim != 2 or arr.shape[1] != 4 or (n is not None and arr.shape[0] != n):
        want = f"({n}, 4)" if n is not None else "(N, 4)"
        raise ValueError(f"{name} must have shape {want} holding (x1, y1, x2, y2), got {arr.shape}")
    return arr


def _acc_dtype() -> Any:
    """float64 when JAX's x64 is enabled, else float32."""
    return jax.dtypes.canonicalize_dtype(np.float64)


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

    For a row ``x`` of class ``k`` (index ``k - 1`` below):
    ``z = (x * scale) @ weights[:, k-1] + biases[k-1]`` (whitened targets), then
    ``deltas = z @ target_unwhitening[k-1] + target_mean[k-1]``.

    Attributes:
      weights: ``(D, K, 4)`` float32.
      biases: ``(K, 4)`` float32.
      target_mean: ``(K, 4)`` float32, ``mu``.
      target_whitening: ``(K, 4, 4)`` float32, ``T`` (targets ``(y - mu) @ T``).
      target_unwhitening: ``(K, 4, 4)`` float32, ``T^-1``.
      scale: the feature scale.
      counts: the training boxes per class (``()`` if unknown). A class with none
        has the identity regressor (zero deltas).
    """

    weights: Any
    biases: Any
    target_mean: Any
    target_whitening: Any
    target_unwhitening: Any
    scale: float = 1.0
    counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _number("scale", self.scale, 0.0, strict=True))
        object.__setattr__(self, "counts", tuple(int(c) for c in self.counts))
        arrays = (
            self.weights,
            self.biases,
            self.target_mean,
            self.target_whitening,
            self.target_unwhitening,
        )
        if all(hasattr(a, "shape") for a in arrays):  # JAX rebuilds pytrees with other leaves
            d, k = tuple(self.weights.shape[:2]) if self.weights.ndim == 3 else (-1, -1)
            want = ((d, k, 4), (k, 4), (k, 4), (k, 4, 4), (k, 4, 4))
            got = tuple(tuple(a.shape) for a in arrays)
            if d < 0 or got != want:
                raise ValueError(
                    "BoxRegressors needs weights (D, K, 4), biases (K, 4), target_mean (K, 4), "
                    f"target_whitening and target_unwhitening (K, 4, 4); got {got}"
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
        d = _int_at_least("num_features", num_features, 1)
        k = _int_at_least("num_classes", num_classes, 1)
        eye = np.broadcast_to(np.eye(4, dtype=np.float32), (k, 4, 4)).copy()
        zeros = np.zeros((k, 4), np.float32)
        return cls(
            np.zeros((d, k, 4), np.float32), zeros, zeros.copy(), eye, eye.copy(), scale, (0,) * k
        )

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
        size = image_size if hasattr(image_size, "shape") else np.asarray(image_size)
        if np.shape(size) != (2,):
            raise ValueError(f"image_size must be (H, W), got shape {np.shape(size)}")
        if _traced(x, labels, boxes, size):
            return _apply(self, x, boxes, labels, size)
        boxes = np.asarray(check_boxes(boxes, "boxes"))
        hw = np.asarray(size, np.float64)
        if not (np.isfinite(hw).all() and (hw >= 0).all()):
            raise ValueError(f"image_size (H, W) must be finite and >= 0, got {hw.tolist()}")
        rows = power_of_two(n)
        out = _apply(
            self,
            pad_rows(x, rows),
            pad_rows(boxes, rows, _UNIT_BOX),
            pad_rows(labels, rows, 1),
            hw.astype(np.float32),
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
            labels = _labels("labels", labels, shape[0], k).astype(np.int32)
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
            "target_mean": np.asarray(self.target_mean, np.float32),
            "target_whitening": np.asarray(self.target_whitening, np.float32),
            "target_unwhitening": np.asarray(self.target_unwhitening, np.float32),
            "scale": np.array(self.scale, np.float64),
            "counts": np.array(self.counts, np.int64),
        }
        with atomic_open(path, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | os.PathLike) -> BoxRegressors:
        """Reads what :meth:`save` wrote.

        Raises:
          ValueError: not a file written by :meth:`save`.
        """
        with np.load(path, allow_pickle=False) as f:
            if "format" not in f or str(f["format"]) != _FORMAT:
                raise ValueError(f"{os.fspath(path)!r} is not a BoxRegressors file ({_FORMAT})")
            return cls(
                f["weights"],
                f["biases"],
                f["target_mean"],
                f["target_whitening"],
                f["target_unwhitening"],
                float(f["scale"]),
                tuple(f["counts"].tolist()),
            )


jax.tree_util.register_dataclass(
    BoxRegressors,
    data_fields=["weights", "biases", "target_mean", "target_whitening", "target_unwhitening"],
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
    z = jnp.take_along_axis(z, idx[:, None, None], axis=1)[:, 0]
    t_inv = reg.target_unwhitening.astype(jnp.float32)[idx]
    mu = reg.target_mean.astype(jnp.float32)[idx]
    return jnp.einsum("ri,rij->rj", z, t_inv, precision=_HIGHEST) + mu


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
    syy: Any = None  # (4, 4) sum y y^T


@functools.partial(jax.jit, donate_argnums=(0, 1, 2, 3, 4))  # updated in place
def _accumulate(s1, s2, sxy, sy, syy, xc, y):
    return (
        s1 + jnp.sum(xc, axis=0),
        s2 + jnp.matmul(xc.T, xc, precision=_HIGHEST),
        sxy + jnp.matmul(xc.T, y, precision=_HIGHEST),
        sy + jnp.sum(y, axis=0),
        syy + jnp.matmul(y.T, y, precision=_HIGHEST),
    )


class RidgeAccumulator:
    """Sums for per-class ridge regression, fed one batch (e.g. image) at a time.

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
        self.num_features = _int_at_least("num_features", num_features, 1)
        self.num_classes = _int_at_least("num_classes", num_classes, 1)
        self.scale = _number("feature_scale", feature_scale, 0.0, strict=True)
        if classes is None:
            self.classes = frozenset(range(1, self.num_classes + 1))
        else:
            cls = sorted(classes)
            _labels("classes", np.asarray(cls, np.int64), len(cls), self.num_classes)
            self.classes = frozenset(int(c) for c in cls)
        self.dtype = _acc_dtype()
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
        x = _features("features", features, self.num_features)
        n = x.shape[0]
        proposals = _boxes("proposals", proposals, n)
        gt_boxes = _boxes("gt_boxes", gt_boxes, n)
        labels = _labels("labels", labels, n, self.num_classes)
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
        x = _features("features", features, self.num_features)
        proposals = _boxes("proposals", proposals, x.shape[0])
        gt_boxes = _boxes("gt_boxes", gt_boxes)
        gt_labels = _labels("gt_labels", gt_labels, gt_boxes.shape[0], self.num_classes)
        index, matched, labels, _ = match_proposals(proposals, gt_boxes, gt_labels, min_iou=min_iou)
        if index.size:
            self.add(x[index], proposals[index], matched, labels)
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
                syy=jnp.zeros((4, 4), self.dtype),
            )
            self._sums[k] = s
        n = x.shape[0]
        rows = power_of_two(n)
        xc = pad_rows(x.astype(self.dtype) - np.asarray(s.shift), rows)
        yy = pad_rows(np.asarray(y, self.dtype), rows)
        s.s1, s.s2, s.sxy, s.sy, s.syy = _accumulate(s.s1, s.s2, s.sxy, s.sy, s.syy, xc, yy)
        s.n += n

    def solve(
        self,
        lam: float = DEFAULT_LAMBDA,
        *,
        regularize_bias: bool = False,
        whiten: Whitening = "zca",
    ) -> BoxRegressors:
        """Solves each class's ridge regression.

        Args:
          lam: the ridge penalty (4000, SPP-net; 1000, R-CNN). ``lam = 0`` is
            least squares and needs at least ``D + 1`` well-spread boxes.
          regularize_bias: penalise the bias like the weights (SPP-net's and
            R-CNN's code) instead of leaving it free.
          whiten: ``"zca"`` (SPP-net's code), ``"std"`` or ``"none"``; see the
            module docstring.

        Returns:
          The :class:`BoxRegressors`; classes without boxes (and those outside
          ``classes``) get the identity regressor, which is logged.

        Raises:
          ValueError: bad settings; a class whose system is singular (``lam = 0``
            with too few boxes).
        """
        lam = _number("lam", lam, 0.0, strict=False)
        if whiten not in WHITENINGS:
            raise ValueError(f"unknown whiten {whiten!r}; accepted are {WHITENINGS}")
        identity = BoxRegressors.identity(self.num_features, self.num_classes, self.scale)
        weights = np.array(identity.weights)
        biases = np.array(identity.biases)
        mean = np.array(identity.target_mean)
        t = np.array(identity.target_whitening)
        t_inv = np.array(identity.target_unwhitening)
        empty = [k for k in range(1, self.num_classes + 1) if k not in self._sums]
        if empty:
            logger.info("box regression: no training boxes for class(es) %s: identity", empty)
        for k, s in sorted(self._sums.items()):
            mu, tk, tk_inv = _whitening(np.asarray(s.sy), np.asarray(s.syy), s.n, whiten)
            w, b = (
                np.asarray(v, np.float32)
                for v in _ridge(
                    s.shift,
                    s.s1,
                    s.s2,
                    s.sxy,
                    s.sy,
                    jnp.asarray(s.n, self.dtype),
                    jnp.asarray(lam, self.dtype),
                    jnp.asarray(mu, self.dtype),
                    jnp.asarray(tk, self.dtype),
                    regularize_bias,
                )
            )
            if not (np.isfinite(w).all() and np.isfinite(b).all()):
                raise ValueError(
                    f"the ridge system of class {k} ({s.n} boxes, lam={lam}) is singular: "
                    f"use lam > 0"
                )
            weights[:, k - 1], biases[k - 1], mean[k - 1] = w, b, mu
            t[k - 1], t_inv[k - 1] = tk, tk_inv
            logger.debug("box regression: class %d solved from %d boxes", k, s.n)
        return BoxRegressors(
            weights, biases, mean, t, t_inv, self.scale, tuple(self.counts.tolist())
        )


def _whitening(
    sy: np.ndarray, syy: np.ndarray, n: int, whiten: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(mu, T, T^-1)`` of a class's targets from their sums (4 x 4, NumPy float64)."""
    y_mean = np.asarray(sy, np.float64) / n
    cov = np.asarray(syy, np.float64) / n - np.outer(y_mean, y_mean)
    if whiten == "zca":  # SPP-net's code: V diag(1 / sqrt(d + eps)) V^T
        evals, v = np.linalg.eigh((cov + cov.T) / 2)
        evals = np.maximum(evals, 0) + WHITEN_EPS
        return y_mean, (v / np.sqrt(evals)) @ v.T, (v * np.sqrt(evals)) @ v.T
    if whiten == "std":
        sd = np.sqrt(np.maximum(np.diagonal(cov), 0) + WHITEN_EPS)
        return y_mean, np.diag(1 / sd), np.diag(sd)
    return np.zeros(4), np.eye(4), np.eye(4)


@functools.partial(jax.jit, static_argnums=9)
def _ridge(shift, s1, s2, sxy, sy, n, lam, mu, t, regularize_bias):
    """Whitened ridge weights ``(W (D, 4), b (4,))`` of one class from its sums."""
    d = shift.shape[0]
    y_mean = sy / n
    if regularize_bias:
        # The code's system: [X, 1]^T [X, 1] + lam I, on raw (unshifted) features.
        sx = s1 + n * shift
        gram = s2 + jnp.outer(shift, s1) + jnp.outer(s1, shift) + n * jnp.outer(shift, shift)
        top = jnp.concatenate([gram, sx[:, None]], axis=1)
        bottom = jnp.concatenate([sx, n[None]])[None, :]
        a = jnp.concatenate([top, bottom], axis=0) + lam * jnp.eye(d + 1, dtype=shift.dtype)
        sxy_raw = sxy + jnp.outer(shift, sy)
        rhs = jnp.concatenate([sxy_raw - jnp.outer(sx, mu), (sy - n * mu)[None, :]], axis=0)
        beta = _cho_solve(a, jnp.matmul(rhs, t, precision=_HIGHEST))
        return beta[:d], beta[d]
    # A free bias: centre the features (exactly, from the shifted sums); then
    # W = (Xc^T Xc + lam I)^-1 Xc^T Zc and b = mean(z) - mean(x) W.
    x_mean = shift + s1 / n
    cxx = s2 - jnp.outer(s1, s1) / n
    cxy = sxy - jnp.outer(s1, y_mean)
    w = _cho_solve(
        cxx + lam * jnp.eye(d, dtype=shift.dtype), jnp.matmul(cxy, t, precision=_HIGHEST)
    )
    b = jnp.matmul(y_mean - mu, t, precision=_HIGHEST) - jnp.matmul(x_mean, w, precision=_HIGHEST)
    return w, b


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
    whiten: Whitening = "zca",
) -> BoxRegressors:
    """Fits the K regressors from one batch of matched boxes (see :class:`RidgeAccumulator`).

    Args:
      features: ``(N, D)`` the proposals' features (unscaled).
      proposals: ``(N, 4)`` proposals.
      gt_boxes: ``(N, 4)`` each proposal's best ground truth.
      labels: ``(N,)`` that ground truth's class, in ``1..K``.
      num_classes: K.
      lam, regularize_bias, whiten: see :meth:`RidgeAccumulator.solve`.
      min_iou: only rows with IoU ``> min_iou`` are used.
      ious: ``(N,)`` each row's IoU with its ground truth; None: computed
        (:func:`~spp_jax.detection.boxes.box_iou`'s float32 arithmetic).
      feature_scale: multiplies the features.

    Returns:
      The :class:`BoxRegressors`.
    """
    x = _features("features", features, None)
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
    labels = _labels("labels", labels, n, acc.num_classes)
    acc.add(x[keep], proposals[keep], gt_boxes[keep], labels[keep])
    return acc.solve(lam, regularize_bias=regularize_bias, whiten=whiten)
