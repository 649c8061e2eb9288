"""Linear SVMs, one per class, trained with hard-negative mining (SPP-net / R-CNN).

The rules are R-CNN's ``rcnn_train.m``, which SPP-net's ``spp_train.m`` copies
(``docs/detection-reference.md`` section 5): fc7 features times one number,
:func:`feature_scale`; a class's positives are its ground-truth boxes, its
negatives the proposals with IoU ``< neg_iou`` (0.3) to all of them; one pass of
hard-negative mining over the training images (:class:`HardNegativeMiner`);
liblinear as the solver (:func:`fit_linear_svm`, which minimises
:func:`svm_objective`).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> pos = rng.normal(1.0, 0.3, (8, 4)).astype(np.float32)
>>> images = [(f"im{i}", rng.normal(-1.0, 0.3, (30, 4)).astype(np.float32),
...            np.zeros((30, 1), np.float32)) for i in range(3)]
>>> svms = train_svms((pos, np.ones(8, np.int32)), images, num_classes=1, progress=False)
>>> svms.weights.shape, svms.biases.shape
((4, 1), (1,))
>>> bool((svms.scores(pos) > 0).all()), svms.stats[0].retrains
(True, 2)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax._io import atomic_write_npz
from spp_jax.detection._checks import class_labels, float_rows, int_at_least, number

__all__ = [
    "ClassStats",
    "HardNegativeMiner",
    "SVMs",
    "feature_scale",
    "fit_linear_svm",
    "svm_objective",
    "train_svms",
]

logger = logging.getLogger(__name__)

DEFAULT_TARGET_NORM = 20.0
"""R-CNN / SPP-net: features are scaled to this mean L2 norm."""

_FORMAT = "spp_jax.detection.svm/1"

Solver = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, float]]
"""``solver(X_pos (P, D), X_neg (N, D)) -> (w (D,), b)``: trains one class."""


# ---------------------------------------------------------------------------
# Feature scale, objective, solver


def feature_scale(
    features: Any,
    target_norm: float = DEFAULT_TARGET_NORM,
    *,
    sample_size: int | None = None,
    seed: int = 0,
) -> float:
    """``target_norm / (mean L2 norm of the rows)``: R-CNN's feature scale.

    Multiplying the features by this number makes their mean norm
    ``target_norm`` (20 in R-CNN and SPP-net, whose ``C = 0.001`` assumes it).

    Args:
      features: ``(N, D)`` features, e.g. fc7 of a sample of training boxes.
      target_norm: the mean norm wanted.
      sample_size: if given and ``N`` is larger, the mean is taken over this
        many rows drawn without replacement (deterministic for a ``seed``).
      seed: the seed of that draw.

    Returns:
      The scale, a Python float.

    Raises:
      ValueError: not 2-D, no rows, non-finite values, or a mean norm of 0.

    >>> feature_scale(np.array([[3.0, 4.0], [0.0, 5.0]]))
    4.0
    """
    target_norm = number("target_norm", target_norm, low=0, strict=True)
    arr = np.asarray(features)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"features must have shape (N, D) with N >= 1, got {arr.shape}")
    if sample_size is not None:
        sample_size = int_at_least("sample_size", sample_size, 1)
        if arr.shape[0] > sample_size:
            rows = np.random.default_rng(seed).choice(arr.shape[0], sample_size, replace=False)
            arr = arr[np.sort(rows)]
    mean = float(np.mean(np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))))
    if not (math.isfinite(mean) and mean > 0):
        raise ValueError(f"features must be finite with a mean L2 norm > 0, got mean norm {mean}")
    return target_norm / mean


def svm_objective(
    w: Any,
    b: float,
    X: Any,
    y: Any,
    C: float,
    pos_weight: float,
    bias_feature: float,
) -> float:
    """The primal objective that liblinear ``-s 3 -c C -w1 pos_weight -B B`` minimises.

    liblinear appends a constant feature ``B`` (``bias_feature``) to every
    ``x_i`` and learns ``w~ = [w, w_B]`` with the bias as an ordinary, regularised
    weight: it minimises ``0.5 * ||w~||^2 + sum_i C_i * max(0, 1 - y_i w~ . [x_i, B])``
    with ``C_i = C * pos_weight`` for ``y_i = +1`` and ``C`` for ``y_i = -1``.
    With the intercept ``b = B * w_B`` (scikit-learn's ``intercept_scaling``)
    this is, in float64::

        0.5 * (||w||^2 + (b / B)^2) + C * sum_i weight_i * max(0, 1 - y_i (w . x_i + b))

    with ``weight_i = pos_weight`` for positives and 1 for negatives.

    Args:
      w: ``(D,)`` weights.
      b: the intercept.
      X: ``(N, D)`` features (already scaled).
      y: ``(N,)`` labels, +1 or -1.
      C: the cost of a unit of hinge loss.
      pos_weight: the positives' extra factor on ``C`` (liblinear ``-w1``).
      bias_feature: ``B``.

    Returns:
      The objective, a Python float.

    >>> svm_objective([1.0, 0.0], 0.5, [[1.0, 0.0], [0.0, 1.0]], [1, -1], 0.1, 2.0, 10.0)
    0.65125
    """
    w = np.asarray(w, np.float64)
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    if w.ndim != 1 or X.ndim != 2 or X.shape[1] != w.shape[0] or y.shape != (X.shape[0],):
        raise ValueError(
            f"need w (D,), X (N, D), y (N,); got w {w.shape}, X {X.shape}, y {y.shape}"
        )
    if not np.isin(y, (-1, 1)).all():
        raise ValueError(f"y must hold only +1 and -1, got values {np.unique(y).tolist()}")
    b = float(b)
    margins = y * (X @ w + b)
    hinge = np.maximum(0.0, 1.0 - margins)
    weights = np.where(y > 0, float(pos_weight), 1.0)
    reg = 0.5 * (float(w @ w) + (b / float(bias_feature)) ** 2)
    return reg + float(C) * float(np.sum(weights * hinge))


def fit_linear_svm(
    X_pos: Any,
    X_neg: Any,
    *,
    C: float = 0.001,
    pos_weight: float = 2.0,
    bias_feature: float = 10.0,
    tol: float = 1e-5,
    max_iter: int = 10_000,
    random_state: int = 0,
) -> tuple[np.ndarray, float]:
    """Trains one linear SVM with liblinear (scikit-learn's ``LinearSVC``).

    ``LinearSVC(loss="hinge", dual=True, C=C, class_weight={1: pos_weight, -1: 1},
    fit_intercept=True, intercept_scaling=bias_feature)`` is liblinear's
    ``-s 3 -c C -w1 pos_weight -B bias_feature``: it minimises
    :func:`svm_objective`. The dual coordinate descent visits the samples in an
    order drawn from ``random_state``, so a fit is deterministic.

    Args:
      X_pos: ``(P, D)`` positives (scaled features), ``P >= 1``.
      X_neg: ``(N, D)`` negatives, ``N >= 1``.
      C, pos_weight, bias_feature: see :func:`svm_objective`.
      tol: liblinear's ``-e``, a bound on the dual's projected gradient. Its
        command line's 0.1 (R-CNN's) and scikit-learn's 1e-4 stop sooner; 1e-5
        costs little more and gets the objective within about 1e-4 relative of
        the optimum also for larger ``C`` (1e-8 at ``C = 0.001`` on features of
        norm 20).
      max_iter: at most this many passes; reaching it logs a warning.
      random_state: the seed of the visiting order.

    Returns:
      ``(w, b)``: float64 ``(D,)`` weights and the intercept (a float); the
      score of ``x`` is ``w . x + b``, positive for the positive class.

    Raises:
      ValueError: empty or mismatched inputs, non-finite values, bad settings.
    """
    from sklearn.svm import LinearSVC  # the "detect" extra

    X_pos = float_rows("X_pos", X_pos)
    X_neg = float_rows("X_neg", X_neg, X_pos.shape[1])
    if X_pos.shape[0] == 0 or X_neg.shape[0] == 0:
        raise ValueError(
            f"need at least one positive and one negative, got {X_pos.shape[0]} positives "
            f"and {X_neg.shape[0]} negatives"
        )
    C = number("C", C, low=0, strict=True)
    pos_weight = number("pos_weight", pos_weight, low=0, strict=True)
    bias_feature = number("bias_feature", bias_feature, low=0, strict=True)
    tol = number("tol", tol, low=0, strict=True)
    max_iter = int_at_least("max_iter", max_iter, 1)
    X = np.concatenate([X_pos, X_neg]).astype(np.float64)
    y = np.concatenate([np.ones(len(X_pos), np.int64), -np.ones(len(X_neg), np.int64)])
    model = LinearSVC(
        penalty="l2",
        loss="hinge",
        dual=True,
        C=C,
        class_weight={1: pos_weight, -1: 1.0},
        fit_intercept=True,
        intercept_scaling=bias_feature,
        tol=tol,
        max_iter=max_iter,
        random_state=random_state,
    )
    with warnings.catch_warnings():
        # Reported below, once, with the numbers.
        warnings.filterwarnings("ignore", message=".*failed to converge.*")
        model.fit(X, y)
    if list(model.classes_) != [-1, 1]:  # pragma: no cover - scikit-learn's contract
        raise RuntimeError(f"unexpected LinearSVC classes {model.classes_}")
    n_iter = int(np.max(model.n_iter_))
    if n_iter >= max_iter:
        logger.warning(
            "liblinear stopped at max_iter=%d before reaching tol=%g (%d positives, %d negatives)",
            max_iter,
            tol,
            len(X_pos),
            len(X_neg),
        )
    return np.asarray(model.coef_[0], np.float64), float(model.intercept_[0])


# ---------------------------------------------------------------------------
# The trained SVMs


@dataclasses.dataclass(frozen=True)
class ClassStats:
    """One class's training record.

    Attributes:
      label: the class (1..K).
      positives: its positives (ground-truth boxes).
      negatives: negatives in its cache at the end (after the last eviction).
      mined: negatives added to its cache over the pass.
      evicted: negatives dropped as easy.
      retrains: trainings.
      objective: :func:`svm_objective` of the final model on the data it was
        trained on (before that training's eviction).
    """

    label: int
    positives: int
    negatives: int
    mined: int
    evicted: int
    retrains: int
    objective: float


_STAT_FIELDS = tuple(f.name for f in dataclasses.fields(ClassStats))


@dataclasses.dataclass(frozen=True, eq=False)
class SVMs:
    """K linear SVMs: ``scores = (features * scale) @ weights + biases``.

    A pytree (``weights`` and ``biases`` are its leaves; ``scale`` and ``stats``
    static), so it can be passed to a jitted function as well as closed over.

    Attributes:
      weights: ``(D, K)`` float32, column ``k - 1`` for class ``k``.
      biases: ``(K,)`` float32.
      scale: the feature scale (a Python float).
      stats: one :class:`ClassStats` per class, or ``()``.

    >>> svms = SVMs(np.eye(2, dtype=np.float32), np.array([0.0, 1.0], np.float32), 2.0)
    >>> jax.jit(SVMs.scores)(svms, jnp.array([[1.0, 0.0]])).tolist()
    [[2.0, 1.0]]
    """

    weights: Any
    biases: Any
    scale: float
    stats: tuple[ClassStats, ...] = ()

    def __post_init__(self) -> None:
        # Checked only for arrays: JAX rebuilds pytrees with other leaves too.
        if hasattr(self.weights, "shape") and hasattr(self.biases, "shape"):
            w_shape, b_shape = tuple(self.weights.shape), tuple(self.biases.shape)
            if len(w_shape) != 2 or b_shape != (w_shape[1],):
                raise ValueError(
                    f"weights must be (D, K) and biases (K,), got {w_shape} and {b_shape}"
                )
            if self.stats and len(self.stats) != w_shape[1]:
                raise ValueError(
                    f"stats must have one entry per class ({w_shape[1]}), got {len(self.stats)}"
                )
        object.__setattr__(self, "scale", number("scale", self.scale, low=0, strict=True))
        object.__setattr__(self, "stats", tuple(self.stats))

    @property
    def num_classes(self) -> int:
        return int(np.shape(self.weights)[1])

    @property
    def num_features(self) -> int:
        return int(np.shape(self.weights)[0])

    def scores(self, features: Any) -> jax.Array:
        """The K scores of each row: float32 ``(R, K)``, pure ``jnp`` (jit-able).

        Args:
          features: ``(R, D)`` unscaled features (any float dtype; computed in
            float32).

        Raises:
          ValueError: a shape other than ``(R, D)``.
        """
        shape = np.shape(features)
        if len(shape) != 2 or shape[1] != self.num_features:
            raise ValueError(
                f"features must have shape (R, {self.num_features}), got {tuple(shape)}"
            )
        x = jnp.asarray(features).astype(jnp.float32)
        w = jnp.asarray(self.weights).astype(jnp.float32)
        b = jnp.asarray(self.biases).astype(jnp.float32)
        return (x * self.scale) @ w + b[None, :]

    def save(self, path: str | os.PathLike) -> None:
        """Writes an ``.npz`` atomically (a temporary file, then ``os.replace``)."""
        arrays: dict[str, np.ndarray] = {
            "format": np.array(_FORMAT),
            "weights": np.asarray(self.weights, np.float32),
            "biases": np.asarray(self.biases, np.float32),
            "scale": np.array(self.scale, np.float64),
        }
        if self.stats:
            for name in _STAT_FIELDS:
                arrays[f"stats_{name}"] = np.array([getattr(s, name) for s in self.stats])
        atomic_write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SVMs:
        """Reads what :meth:`save` wrote.

        Raises:
          ValueError: not a file written by :meth:`save`.
        """
        with np.load(path, allow_pickle=False) as f:
            if "format" not in f or str(f["format"]) != _FORMAT:
                raise ValueError(f"{os.fspath(path)!r} is not an SVMs file ({_FORMAT})")
            stats: tuple[ClassStats, ...] = ()
            if "stats_label" in f:
                cols = [f[f"stats_{n}"] for n in _STAT_FIELDS]  # ints, then the objective
                stats = tuple(
                    ClassStats(*(col[i].item() for col in cols)) for i in range(len(cols[0]))
                )
            return cls(f["weights"], f["biases"], float(f["scale"]), stats)


jax.tree_util.register_dataclass(
    SVMs, data_fields=["weights", "biases"], meta_fields=["scale", "stats"]
)


# ---------------------------------------------------------------------------
# Hard-negative mining


@dataclasses.dataclass
class _Cache:
    positives: np.ndarray  # (P, D) scaled float32
    blocks: list[np.ndarray] = dataclasses.field(default_factory=list)  # scaled rows
    key_blocks: list[np.ndarray] = dataclasses.field(default_factory=list)  # int64 keys
    keys: set[int] = dataclasses.field(default_factory=set)
    size: int = 0
    num_added: int = 0  # since the last training
    trained: bool = False
    trained_on_last_image: bool = False
    retrains: int = 0
    mined: int = 0
    evicted: int = 0
    objective: float = math.nan

    def consolidate(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.blocks) != 1:
            self.blocks = [np.concatenate(self.blocks)]
            self.key_blocks = [np.concatenate(self.key_blocks)]
        return self.blocks[0], self.key_blocks[0]


class HardNegativeMiner:
    """Trains the K SVMs from a stream of images, one image at a time.

    Call :meth:`add_image` once per training image (any order), then :meth:`finish`;
    :func:`train_svms` does this for an iterable. The mining is R-CNN's
    (``docs/detection-reference.md`` section 5), per class: an image's negatives join
    the class's cache (all of them before its first training, then those that score
    ``> hard_thresh`` and are not cached yet, keyed ``(image id, row)``: a repeated
    ``image_id`` is the same image); the class is retrained after more than
    ``retrain_every`` new ones and at :meth:`finish`, each training dropping those
    that score ``< evict_thresh``. Scores are float32, compared with the thresholds
    rounded to float32 (a score equal to ``float32(-1.0001)`` is not hard, one equal
    to ``float32(-1.2)`` is kept).

    R-CNN trains "the first time" after its first image only, so a class without
    negatives there (its untrained model scores 0, so it then takes every negative)
    waits for 2,000 of them; here each class trains after its own first image with
    negatives. A class without positives is an error at once, one that never had a
    negative at the end (R-CNN does not check). A class's cache holds its mined rows
    (scaled float32) and their keys, never a whole image's features; each training
    copies it to float64 (liblinear's input).

    Args:
      positives: ``(P, D)`` features of the ground-truth boxes (unscaled).
      positive_labels: ``(P,)`` ints, their classes in ``1..num_classes``. Every
        class needs at least one positive.
      num_classes: K.
      C, pos_weight, bias_feature: liblinear's ``-c``, ``-w1``, ``-B``.
      neg_iou: a proposal is a negative of class ``k`` if its IoU with every
        ground truth of class ``k`` is ``< neg_iou``.
      hard_thresh, evict_thresh, retrain_every: R-CNN's -1.0001, -1.2 and
        2,000 (the rule above).
      feature_scale: the features' scale; None: :func:`feature_scale` of the
        positives and the first image's features together.
      tol, max_iter, random_state: see :func:`fit_linear_svm`.
      solver: replaces :func:`fit_linear_svm` (then ``C``, ``pos_weight``,
        ``bias_feature`` only enter the reported objective): called as
        ``solver(X_pos, X_neg)`` on scaled float32 rows, returns ``(w, b)``.
      progress: log each training at INFO (else DEBUG).

    Raises:
      ValueError: bad shapes or settings; labels outside ``1..num_classes``; a
        class without positives (named).
    """

    def __init__(
        self,
        positives: Any,
        positive_labels: Any,
        num_classes: int,
        *,
        C: float = 0.001,
        pos_weight: float = 2.0,
        bias_feature: float = 10.0,
        neg_iou: float = 0.3,
        hard_thresh: float = -1.0001,
        evict_thresh: float = -1.2,
        retrain_every: int = 2000,
        feature_scale: float | None = None,
        tol: float = 1e-5,
        max_iter: int = 10_000,
        random_state: int = 0,
        solver: Solver | None = None,
        progress: bool = True,
    ) -> None:
        self.num_classes = int_at_least("num_classes", num_classes, 1)
        pos = float_rows("positives", positives)
        if pos.shape[0] == 0 or pos.shape[1] == 0:
            raise ValueError(f"positives must have shape (P, D) with P, D >= 1, got {pos.shape}")
        labels = class_labels("positive_labels", positive_labels, pos.shape[0], self.num_classes)
        counts = np.bincount(labels, minlength=self.num_classes + 1)[1:]
        missing = (np.flatnonzero(counts == 0) + 1).tolist()
        if missing:
            raise ValueError(
                f"class(es) {missing} have no positives (ground-truth boxes); every class in "
                f"1..{self.num_classes} needs at least one to train its SVM"
            )
        self.C = number("C", C, low=0, strict=True)
        self.pos_weight = number("pos_weight", pos_weight, low=0, strict=True)
        self.bias_feature = number("bias_feature", bias_feature, low=0, strict=True)
        self.neg_iou = number("neg_iou", neg_iou, low=0, strict=True)
        if self.neg_iou > 1:
            raise ValueError(f"neg_iou must be in (0, 1], got {neg_iou!r}")
        self.hard_thresh = number("hard_thresh", hard_thresh)
        self.evict_thresh = number("evict_thresh", evict_thresh)
        self.retrain_every = int_at_least("retrain_every", retrain_every, 0)
        if feature_scale is not None:
            feature_scale = number("feature_scale", feature_scale, low=0, strict=True)
        self._scale = feature_scale
        if solver is None:
            solver = functools.partial(
                fit_linear_svm,
                C=self.C,
                pos_weight=self.pos_weight,
                bias_feature=self.bias_feature,
                tol=tol,
                max_iter=max_iter,
                random_state=random_state,
            )
        self._solver = solver
        self._log_level = logging.INFO if progress else logging.DEBUG
        self._positives: np.ndarray | None = pos
        self._labels = labels
        self.num_features = pos.shape[1]
        self.weights = np.zeros((self.num_features, self.num_classes), np.float32)
        self.biases = np.zeros(self.num_classes, np.float32)
        self._caches: list[_Cache] = []
        self._images: dict[Any, tuple[int, int]] = {}  # image id -> (index, rows)
        self._result: SVMs | None = None

    @property
    def scale(self) -> float | None:
        """The feature scale (None until the first image when not given)."""
        return self._scale

    @property
    def num_images(self) -> int:
        """Distinct images seen."""
        return len(self._images)

    def cache_keys(self, label: int) -> list[tuple[Any, int]]:
        """Class ``label``'s cached negatives as ``(image_id, row)``, in cache order."""
        k = self._class_index(label)
        if not self._caches or not self._caches[k].size:
            return []
        ids = {index: image_id for image_id, (index, _) in self._images.items()}
        _, keys = self._caches[k].consolidate()
        return [(ids[int(key) >> 32], int(key) & 0xFFFFFFFF) for key in keys]

    def _class_index(self, label: int) -> int:
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise TypeError(f"label must be an int in 1..{self.num_classes}, got {label!r}")
        if not 1 <= label <= self.num_classes:
            raise ValueError(f"label must be in 1..{self.num_classes}, got {label}")
        return int(label) - 1

    def _start(self, first_features: np.ndarray) -> None:
        pos = self._positives
        assert pos is not None
        if self._scale is None:
            self._scale = feature_scale(np.concatenate([pos, first_features]))
        scaled = pos * np.float32(self._scale)
        self._caches = [_Cache(scaled[self._labels == k + 1]) for k in range(self.num_classes)]
        self._positives = None

    def add_image(self, image_id: str | int, features: Any, overlaps: Any) -> None:
        """Mines one image's negatives for every class, retraining where due.

        Args:
          image_id: the image's id (str or int), unique per image.
          features: ``(R, D)`` features of its proposals (unscaled); ``R`` may be 0.
          overlaps: ``(R, K)``: ``overlaps[r, k - 1]`` is the highest IoU of
            proposal ``r`` with the ground truths of class ``k`` (0 where the
            image has none), in ``[0, 1]``.

        Raises:
          ValueError: bad shapes or values; a repeated ``image_id`` with another
            number of rows.
          RuntimeError: after :meth:`finish`.
        """
        if self._result is not None:
            raise RuntimeError("add_image after finish(): start a new HardNegativeMiner")
        if isinstance(image_id, bool) or not isinstance(image_id, str | numbers.Integral):
            raise TypeError(f"image_id must be a str or an int, got {image_id!r}")
        feats = float_rows(f"features of image {image_id!r}", features, self.num_features)
        ov = np.asarray(overlaps)
        rows = feats.shape[0]
        if ov.shape != (rows, self.num_classes):
            raise ValueError(
                f"overlaps of image {image_id!r} must have shape (R, K) = "
                f"({rows}, {self.num_classes}), got {ov.shape}"
            )
        ov = ov.astype(np.float64)
        if rows and not ((ov >= 0) & (ov <= 1)).all():
            r, k = np.argwhere(~((ov >= 0) & (ov <= 1)))[0]
            raise ValueError(
                f"overlaps of image {image_id!r} must be IoUs in [0, 1]; overlaps[{r}, {k}] "
                f"is {ov[r, k]}"
            )
        seen = image_id in self._images
        if seen:
            index, old_rows = self._images[image_id]
            if old_rows != rows:
                raise ValueError(
                    f"image {image_id!r} came before with {old_rows} rows, now {rows}: image ids "
                    f"must be unique per image"
                )
        else:
            index = len(self._images)
            self._images[image_id] = (index, rows)
        if not self._caches:
            self._start(feats)
        x = feats * np.float32(self._scale)
        negative = ov < self.neg_iou
        scores = None
        if any(c.trained for c in self._caches):
            scores = x @ self.weights + self.biases[None, :]
        hard = np.float32(self.hard_thresh)
        for k, cache in enumerate(self._caches):
            take = negative[:, k]
            if cache.trained:
                assert scores is not None
                take = take & (scores[:, k] > hard)
            picked = np.flatnonzero(take)
            keys = (np.int64(index) << 32) | picked.astype(np.int64)
            if seen and picked.size:
                new = np.array([int(key) not in cache.keys for key in keys], bool)
                picked, keys = picked[new], keys[new]
            if picked.size:
                cache.blocks.append(x[picked])
                cache.key_blocks.append(keys)
                cache.keys.update(keys.tolist())
                cache.size += picked.size
                cache.num_added += picked.size
                cache.mined += picked.size
            due = not cache.trained or cache.num_added > self.retrain_every
            cache.trained_on_last_image = bool(due and cache.size)
            if cache.trained_on_last_image:
                self._train(k)

    def _train(self, k: int) -> None:
        cache = self._caches[k]
        X_neg, keys = cache.consolidate()
        w, b = self._solver(cache.positives, X_neg)
        w = np.asarray(w, np.float32).reshape(-1)
        if w.shape != (self.num_features,) or not (np.isfinite(w).all() and math.isfinite(b)):
            raise RuntimeError(
                f"the solver returned w of shape {w.shape} (want ({self.num_features},)) or "
                f"non-finite values for class {k + 1}"
            )
        self.weights[:, k] = w
        self.biases[k] = np.float32(b)
        cache.trained = True
        cache.num_added = 0
        cache.retrains += 1
        cache.objective = svm_objective(
            w,
            float(self.biases[k]),
            np.concatenate([cache.positives, X_neg]),
            np.repeat(np.array([1, -1], np.int8), [len(cache.positives), len(X_neg)]),
            self.C,
            self.pos_weight,
            self.bias_feature,
        )
        z_neg = X_neg @ w + np.float32(b)
        easy = z_neg < np.float32(self.evict_thresh)
        n_easy = int(easy.sum())
        if n_easy:
            cache.keys.difference_update(keys[easy].tolist())
            cache.blocks = [X_neg[~easy]]
            cache.key_blocks = [keys[~easy]]
            cache.size -= n_easy
            cache.evicted += n_easy
        logger.log(
            self._log_level,
            "SVM class %d: training %d (after %d images): %d positives, %d negatives, "
            "objective %.4f; %d easy negatives evicted, %d kept",
            k + 1,
            cache.retrains,
            len(self._images),
            len(cache.positives),
            len(X_neg),
            cache.objective,
            n_easy,
            cache.size,
        )

    def finish(self) -> SVMs:
        """Trains the classes the last image did not retrain; returns the SVMs.

        Raises:
          ValueError: no image was added, or a class never had a negative (named).
        """
        if self._result is not None:
            return self._result
        if not self._caches:
            raise ValueError("no images were added: need at least one image with negatives")
        never = [k + 1 for k, c in enumerate(self._caches) if not c.size and not c.trained]
        if never:
            raise ValueError(
                f"class(es) {never} never had a negative (a proposal with IoU < {self.neg_iou} "
                f"to all their ground truths) in {len(self._images)} images; cannot train "
                f"their SVMs"
            )
        for k, cache in enumerate(self._caches):
            if not cache.trained_on_last_image and cache.size:
                self._train(k)
        stats = tuple(
            ClassStats(
                label=k + 1,
                positives=len(c.positives),
                negatives=c.size,
                mined=c.mined,
                evicted=c.evicted,
                retrains=c.retrains,
                objective=c.objective,
            )
            for k, c in enumerate(self._caches)
        )
        for s in stats:
            logger.log(
                self._log_level,
                "SVM class %d: %d positives, %d negatives cached (%d mined, %d evicted), "
                "%d trainings, objective %.4f",
                *dataclasses.astuple(s),
            )
        assert self._scale is not None
        self._result = SVMs(self.weights.copy(), self.biases.copy(), self._scale, stats)
        return self._result


def train_svms(
    positives: tuple[Any, Any],
    negative_images: Iterable[tuple[str | int, Any, Any]],
    num_classes: int,
    **settings: Any,
) -> SVMs:
    """Trains one SVM per class with one pass of hard-negative mining.

    A :class:`HardNegativeMiner` fed every image of ``negative_images``, in order.

    Args:
      positives: ``(features (P, D), labels (P,))``: the ground-truth boxes'
        features (unscaled) and classes in ``1..num_classes``.
      negative_images: ``(image_id, features (R, D), overlaps (R, K))`` per
        training image, read one at a time (see
        :meth:`HardNegativeMiner.add_image`).
      num_classes: K.
      **settings: keyword arguments of :class:`HardNegativeMiner` (the mining
        thresholds, the solver and its settings, ``progress``), with its defaults.

    Returns:
      The :class:`SVMs`, with per-class :class:`ClassStats`.

    Raises:
      ValueError: see :class:`HardNegativeMiner`.
      TypeError: a keyword that :class:`HardNegativeMiner` does not take.
    """
    if not (isinstance(positives, tuple | list) and len(positives) == 2):
        raise TypeError("positives must be a pair (features (P, D), labels (P,))")
    miner = HardNegativeMiner(positives[0], positives[1], num_classes, **settings)
    for item in negative_images:
        if not (isinstance(item, tuple | list) and len(item) == 3):
            raise TypeError(
                "negative_images must yield (image_id, features (R, D), overlaps (R, K)) triples"
            )
        miner.add_image(*item)
    return miner.finish()
