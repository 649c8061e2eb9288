"""The SPP-net detector applied to one image: conv5 maps at one or five scales, windows
pooled from them, the fc head, SVM or softmax scores, per-class NMS and box regression
(:meth:`Detector.detect`).

Labels: dataset classes are ``0 .. K-1``; fc8's class ``k + 1`` and SVM ``k`` are
dataset class ``k`` (fc8's 0 is the background).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax._padding import pad_rows, round_up
from spp_jax.detection import bbox_regression, features, finetune, svm
from spp_jax.detection._checks import choice
from spp_jax.detection.suppression import multiclass_nms
from spp_jax.models import ConvTrunk, MLPHead

WINDOW_BUCKET = 512  # windows per image are padded to a multiple (one fc compile each)


@dataclasses.dataclass
class Detector:
    """Everything inference needs: the frozen trunk, the head, SVMs, box regressors.

    Windows are pooled from conv5 (``config.window_pool``: max-pooled bins, or RoIAlign
    as an ablation) into ``levels`` (None: ``config.levels``), each
    level flattened as ``(C, n_h, n_w)`` if ``channel_major`` (the order of an imported
    torchvision fc6), else ``(n_h, n_w, C)``: the vector the head's fc6 takes
    (:func:`spp_jax.detection.stages.window_pyramid` picks both for a backbone).
    """

    trunk: ConvTrunk
    trunk_params: Any
    head: MLPHead
    head_params: Any
    num_classes: int
    config: Any
    svms: svm.SVMs | None = None
    regressors: bbox_regression.BoxRegressors | None = None
    svd: Any = None  # truncated-SVD factors of fc6/fc7 (see `compress`), or None
    levels: Any = None
    channel_major: bool = False

    def __post_init__(self) -> None:
        c = self.config
        self.extractor = features.Conv5Extractor(
            self.trunk, self.trunk_params, bucket=c.image_bucket, max_side=c.max_side
        )
        self.stride = self.trunk.total_stride
        self.pooler = features.WindowPooler(
            c.levels if self.levels is None else self.levels,
            self.stride,
            channel_major=self.channel_major,
            mode=c.get("window_pool", "max"),  # a run saved before the key pools "max"
        )
        self.levels = self.pooler.levels
        self.min_input = self.trunk.min_input_size

    def scales(self, n: int) -> tuple[int, ...]:
        """The 1-scale or 5-scale setting."""
        return (self.config.single_scale,) if n == 1 else tuple(self.config.scales)

    def check_size(self, image_size: tuple[int, int], scales: Sequence[int]) -> None:
        """Raises ValueError if an image of ``image_size`` resized to one of ``scales``
        (shorter side ``s``, longer side capped at ``max_side``) is smaller than the
        trunk's minimum input (:attr:`ConvTrunk.min_input_size`): an image with an extreme aspect
        ratio. An image smaller than a conv5 cell is no problem: it is upscaled."""
        for s in scales:
            h, w = features.resized_size((image_size[0], image_size[1]), s, self.config.max_side)
            if min(h, w) < self.min_input:
                raise ValueError(
                    f"image {image_size[0]}x{image_size[1]} resized to {h}x{w} at scale {s} "
                    f"(longer side capped at max_side={self.config.max_side}) is smaller than "
                    f"the trunk's minimum input {self.min_input}x{self.min_input}: its aspect "
                    "ratio is too extreme (raise max_side, or crop it)"
                )

    def conv5(self, image: np.ndarray, scale: int, *, flip: bool = False) -> features.ScaledMap:
        """The conv5 map of ``image`` at ``scale``: uint8 ``(H, W, 3)``; grayscale and
        RGBA are converted (:func:`~spp_jax.detection.proposals.to_rgb8`).

        Raises:
          ValueError: the resized image is smaller than the trunk's minimum input
            (:meth:`check_size`).
        """
        from spp_jax.detection.proposals import to_rgb8

        self.check_size(image.shape[:2], (scale,))
        return self.extractor(to_rgb8(image), scale, flip=flip)

    def maps(self, image: np.ndarray, scales: Sequence[int]) -> list[features.ScaledMap]:
        return [self.conv5(image, s) for s in scales]

    def pool(
        self,
        maps: Sequence[features.ScaledMap],
        scales: Sequence[int],
        boxes: np.ndarray,
        image_size: tuple[int, int],
    ) -> np.ndarray:
        """Pooled conv5 features ``(R, D)``, each window (with ``window_context``) at
        its own scale."""
        boxes = features.with_context(boxes, self.config.window_context)
        return self.pooler.pool_multiscale(
            maps, boxes, self.window_scales(boxes, image_size, scales)
        )

    def window_scales(
        self, boxes: np.ndarray, image_size: tuple[int, int], scales: Sequence[int]
    ) -> np.ndarray:
        """Each window's scale (index into ``scales``) by the config's ``window_target``
        and ``window_rule`` (:func:`~spp_jax.detection.features.assign_scales`)."""
        c = self.config
        return features.assign_scales(
            boxes, image_size, scales, target=c.window_target, rule=c.window_rule
        )

    def head_outputs(self, pooled: np.ndarray, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(logits (R, K+1), fc7 (R, fc_dim))``, the rows padded to a bucket for jit."""
        params = self.head_params if params is None else params
        if self.svd is not None and params is self.head_params:
            return _padded(functools.partial(finetune.svd_head_outputs, self.svd), pooled)
        return _padded(functools.partial(finetune.head_outputs, self.head, params), pooled)

    def compress(self, rank: int | None) -> None:
        """Replaces fc6 and fc7 by their rank-``rank`` truncated SVDs at test time
        (two thin matmuls each; None: back to the full layers). See
        :func:`spp_jax.detection.finetune.truncated_svd`."""
        self.svd = None if rank is None else finetune.truncated_svd(self.head_params, rank)

    def detect(
        self,
        image: np.ndarray,
        proposals: np.ndarray,
        *,
        num_scales: int = 1,
        scorer: str | None = None,
        regress: bool = True,
        maps: Sequence[features.ScaledMap] | None = None,
        timings: dict[str, float] | None = None,
        params: Any = None,
    ) -> dict[str, np.ndarray]:
        """Detections of one image: ``boxes (n, 4)``, ``scores (n,)``, ``labels (n,)``
        (dataset classes), per-class NMS, at most ``test.max_per_image``.

        ``maps``: its conv5 maps at the scales of ``num_scales`` if already computed.
        ``timings``: accumulates seconds per stage (``conv``, ``pool_fc``, ``score``,
        ``nms``, ``bbox``). ``params``: head parameters to score with instead of the
        detector's own (:meth:`head_outputs`), as fine-tuning's validation does.
        """
        c = self.config
        scorer = scorer or c.test.scorer
        choice("scorer", scorer, ("svm", "softmax"))
        if scorer == "svm" and self.svms is None:
            raise ValueError('scorer="svm" needs trained SVMs (stage svm)')
        clock = functools.partial(_timed, timings)
        size = image.shape[:2]
        proposals = np.asarray(proposals, np.float32).reshape(-1, 4)
        if len(proposals) == 0:
            return _no_detections()
        scales = self.scales(num_scales)
        if maps is None:
            with clock("conv"):
                maps = self.maps(image, scales)
        with clock("pool_fc"):
            pooled = self.pool(maps, scales, proposals, size)
            logits, fc7 = self.head_outputs(pooled, params)
        with clock("score"):
            if scorer == "svm":
                scores = _padded(functools.partial(_svm_scores, self.svms), fc7)
                thresh = c.test.score_thresh
            else:
                scores = _padded(_softmax_classes, logits)
                thresh = 0.0
        with clock("nms"):
            out = per_class_nms(proposals, scores, thresh, c.test.nms_iou, c.test.max_per_image)
        if regress and self.regressors is not None and len(out["boxes"]):
            with clock("bbox"):
                out["boxes"] = np.asarray(
                    self.regressors.apply(
                        jnp.asarray(pooled[out["index"]]),
                        jnp.asarray(out["boxes"]),
                        jnp.asarray(out["labels"] + 1),
                        size,
                    )
                )
        out.pop("index")
        return out

    def detect_all(
        self,
        images: Sequence[np.ndarray],
        proposals: Sequence[np.ndarray],
        *,
        maps: Sequence[Sequence[features.ScaledMap]] | None = None,
        **kwargs: Any,
    ) -> list[dict[str, np.ndarray]]:
        """:meth:`detect` of each image with its proposals (``kwargs``: its other
        arguments); ``maps``: their conv5 maps per scale, per image, if already computed
        (:func:`~spp_jax.detection.stages.split_maps`)."""
        return [
            self.detect(image, props, maps=None if maps is None else [m[i] for m in maps], **kwargs)
            for i, (image, props) in enumerate(zip(images, proposals, strict=True))
        ]


@jax.jit
def _svm_scores(svms: svm.SVMs, fc7: jax.Array) -> jax.Array:
    return svms.scores(fc7)


@jax.jit
def _softmax_classes(logits: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits, axis=-1)[:, 1:]


def _padded(fn, x: np.ndarray) -> Any:
    """``fn(x)`` (each output, as NumPy) with the rows padded to a multiple of
    :data:`WINDOW_BUCKET` (one compile per bucket, not per window count)."""
    padded = pad_rows(np.asarray(x, np.float32), round_up(len(x), WINDOW_BUCKET))
    return jax.tree.map(lambda y: np.asarray(y)[: len(x)], fn(jnp.asarray(padded)))


@contextlib.contextmanager
def _timed(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Adds the block's seconds to ``timings[name]`` (if ``timings`` is not None)."""
    t0 = time.perf_counter()
    yield
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


def _no_detections() -> dict[str, np.ndarray]:
    return {
        "boxes": np.zeros((0, 4), np.float32),
        "scores": np.zeros((0,), np.float32),
        "labels": np.zeros((0,), np.int32),
    }


def per_class_nms(
    boxes: np.ndarray, scores: np.ndarray, thresh: float, iou: float, max_per_image: int
) -> dict[str, np.ndarray]:
    """Per class: scores above ``thresh``, greedy NMS at ``iou``; then the best
    ``max_per_image`` over all classes (:func:`~spp_jax.detection.suppression.multiclass_nms`).

    Args:
      boxes: ``(R, 4)`` proposals.
      scores: ``(R, K)`` float32 class scores.
      thresh: scores ``<= thresh`` take no part.
      iou: the NMS IoU threshold.
      max_per_image: the most detections returned.

    Returns:
      ``boxes``, ``scores``, ``labels`` (class columns) and the proposal ``index``
      of each detection, by decreasing score.
    """
    r = scores.shape[0]
    rb = round_up(r, 256)  # padded: one compilation per 256 proposals
    padded = pad_rows(np.asarray(boxes, np.float32), rb)
    above = np.where(scores > thresh, scores, np.nan).astype(np.float32)
    s = pad_rows(above, rb, np.nan)
    keep, classes, count = multiclass_nms(
        jnp.asarray(padded), jnp.asarray(s), iou, max_output=max_per_image
    )
    idx, labels = np.asarray(keep)[: int(count)], np.asarray(classes)[: int(count)]
    return {
        "boxes": boxes[idx].astype(np.float32),
        "scores": scores[idx, labels].astype(np.float32),
        "labels": labels,
        "index": idx,
    }
