"""SPP-net's object detector end to end: the stages of ``spp-jax detect-train``.

Stages (each writes ``WORKDIR/stages/<name>.json`` when done, with its seconds, so
a rerun skips it; fine-tuning also resumes from its last saved step):

1. ``backbone``: a classifier trained with :func:`spp_jax.train.train_and_evaluate`
   (config ``backbone_config``) unless ``backbone_workdir`` names one; its conv
   layers are the detector's, frozen, and its fc6/fc7 initialise fine-tuning.
2. ``proposals``: selective search (OpenCV, fast mode) of every image, cached.
3. conv5 maps of every image at every scale (:mod:`~spp_jax.detection.features`),
   recomputed in memory on each run (seconds), never stored per window.
4. ``finetune``: fc6, fc7 and a new (K+1)-way fc8 on windows pooled from the maps
   (:mod:`~spp_jax.detection.finetune`); the step with the best validation mAP
   (softmax scores, one scale) is kept.
5. ``svm`` (fine-tuned fc7) and ``svm_pretrained`` (the backbone's fc7, for the
   "no fine-tuning" row): linear SVMs with hard-negative mining
   (:mod:`~spp_jax.detection.svm`).
6. ``bbox``: per-class ridge box regression on pooled conv5 features.
7. ``eval``: the test split at one and five scales, with each scorer.

Labels: dataset classes are ``0 .. K-1``; fc8's class ``k + 1`` and SVM ``k`` are
dataset class ``k`` (fc8's 0 is the background).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import resource
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import configs, workdirs
from spp_jax._io import atomic_write_bytes, atomic_write_json
from spp_jax._padding import pad_rows, round_up
from spp_jax.detection import bbox_regression, evaluation, features, finetune, svm
from spp_jax.detection.boxes import box_iou
from spp_jax.detection.suppression import multiclass_nms
from spp_jax.models import ConvTrunk, MLPHead

log = logging.getLogger("spp_jax")

WINDOW_BUCKET = 512  # windows per image are padded to a multiple (one fc compile each)


# --------------------------------------------------------------------------------------
# Stage bookkeeping.
# --------------------------------------------------------------------------------------


def _atomic_json(path: str, obj: Any) -> None:
    atomic_write_json(path, obj, indent=1, sort_keys=True, default=float)


def stage_done(workdir: str, name: str) -> dict | None:
    """What stage ``name`` recorded when it finished, or None."""
    path = os.path.join(workdir, "stages", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _finish(workdir: str, name: str, seconds: float, **info: Any) -> None:
    os.makedirs(os.path.join(workdir, "stages"), exist_ok=True)
    _atomic_json(os.path.join(workdir, "stages", f"{name}.json"), {"seconds": seconds, **info})
    log.info("stage %s done in %.1f s", name, seconds)


@contextlib.contextmanager
def _timed(name: str) -> Iterator[dict]:
    out = {"seconds": 0.0}
    t0 = time.perf_counter()
    log.info("stage %s ...", name)
    yield out
    out["seconds"] = time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# Data.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Split:
    """A split in memory: ids, uint8 RGB images and their ground truth."""

    ids: list[str]
    images: list[np.ndarray]
    boxes: list[np.ndarray]  # (m, 4) float32 pixels
    labels: list[np.ndarray]  # (m,) int32 in [0, K)
    difficult: list[np.ndarray]  # (m,) bool

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [im.shape[:2] for im in self.images]

    def __len__(self) -> int:
        return len(self.ids)


def load_split(dataset: str, split: str, data_dir: str | None = None) -> Split:
    """Reads a TFDS VOC-format split (``spp_scenes``, ``voc/2007``) into memory."""
    from spp_jax.detection import proposals, voc

    out = Split([], [], [], [], [])
    for ex in voc.tfds_examples(dataset, split, data_dir=data_dir):
        image = proposals.to_rgb8(ex["image"], voc.image_id(ex))
        gt = voc.example_boxes(ex, image.shape[:2])
        out.ids.append(voc.image_id(ex))
        out.images.append(image)
        out.boxes.append(gt["boxes"])
        out.labels.append(gt["labels"])
        out.difficult.append(gt["difficult"])
    log.info("read %s/%s: %d images", dataset, split, len(out))
    return out


def num_classes_of(dataset: str, data_dir: str | None = None) -> int:
    from spp_jax.detection import voc

    builder = voc._builder(dataset, data_dir)
    return int(builder.info.features["objects"]["label"].num_classes)


# --------------------------------------------------------------------------------------
# The detector's parts.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Detector:
    """Everything inference needs: the frozen trunk, the head, SVMs, box regressors."""

    trunk: ConvTrunk
    trunk_params: Any
    head: MLPHead
    head_params: Any
    num_classes: int
    config: Any
    svms: svm.SVMs | None = None
    regressors: bbox_regression.BoxRegressors | None = None
    svd: Any = None  # truncated-SVD factors of fc6/fc7 (see `compress`), or None

    def __post_init__(self) -> None:
        c = self.config
        self.extractor = features.Conv5Extractor(
            self.trunk, self.trunk_params, bucket=c.image_bucket, max_side=c.max_side
        )
        self.stride = self.trunk.total_stride
        self.pooler = features.WindowPooler(c.levels, self.stride)
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
        idx = features.assign_scales(
            boxes,
            image_size,
            scales,
            target=self.config.window_target,
            rule=self.config.window_rule,
        )
        return self.pooler.pool_multiscale(maps, boxes, idx)

    def head_outputs(self, pooled: np.ndarray, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """``(logits (R, K+1), fc7 (R, fc_dim))``, the rows padded to a bucket for jit."""
        r = len(pooled)
        padded = pad_rows(np.asarray(pooled, np.float32), round_up(r, WINDOW_BUCKET))
        params = self.head_params if params is None else params
        if self.svd is not None and params is self.head_params:
            logits, fc7 = finetune.svd_head_outputs(self.svd, jnp.asarray(padded))
        else:
            logits, fc7 = finetune.head_outputs(self.head, params, jnp.asarray(padded))
        return np.asarray(logits)[:r], np.asarray(fc7)[:r]

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
    ) -> dict[str, np.ndarray]:
        """Detections of one image: ``boxes (n, 4)``, ``scores (n,)``, ``labels (n,)``
        (dataset classes), per-class NMS, at most ``test.max_per_image``.

        ``maps``: its conv5 maps at the scales of ``num_scales`` if already computed.
        ``timings``: accumulates seconds per stage (``conv``, ``pool_fc``, ``score``,
        ``nms``, ``bbox``).
        """
        c = self.config
        scorer = scorer or c.test.scorer
        if scorer not in ("svm", "softmax"):
            raise ValueError(f"unknown scorer {scorer!r}; accepted: 'svm', 'softmax'")
        if scorer == "svm" and self.svms is None:
            raise ValueError('scorer="svm" needs trained SVMs (stage svm)')
        clock = _Clock(timings)
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
            logits, fc7 = self.head_outputs(pooled)
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


@jax.jit
def _svm_scores(svms: svm.SVMs, fc7: jax.Array) -> jax.Array:
    return svms.scores(fc7)


@jax.jit
def _softmax_classes(logits: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits, axis=-1)[:, 1:]


def _padded(fn, x: np.ndarray) -> np.ndarray:
    """``fn(x)`` with the rows padded to a multiple of :data:`WINDOW_BUCKET` (one
    compile per bucket, not per window count)."""
    padded = pad_rows(np.asarray(x, np.float32), round_up(len(x), WINDOW_BUCKET))
    return np.asarray(fn(jnp.asarray(padded)))[: len(x)]


class _Clock:
    """``with clock(name):`` adds the block's seconds to ``timings[name]``."""

    def __init__(self, timings: dict[str, float] | None):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        if self.timings is not None:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


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


# --------------------------------------------------------------------------------------
# Stages.
# --------------------------------------------------------------------------------------


def backbone_config(config) -> Any:
    from spp_jax import configs

    cls = configs.get_config(config.backbone_config)
    cls.update(config.backbone_overrides.to_dict())
    if config.data_dir is not None:
        cls.data_dir = config.data_dir
    return cls


def stage_backbone(config, workdir: str) -> str:
    """The backbone's workdir, trained here first if the config names none."""
    if config.backbone_workdir:
        return config.backbone_workdir
    if not config.train_backbone:
        raise ValueError(
            "this config trains no backbone (train_backbone=False): pass "
            "--set backbone_workdir=DIR, the workdir of a `spp-jax train` run"
        )
    path = os.path.join(workdir, "backbone")
    if stage_done(workdir, "backbone") is None:
        from spp_jax import train

        with _timed("backbone") as t:
            final = train.train_and_evaluate(backbone_config(config), path)
        _finish(workdir, "backbone", t["seconds"], final=final.get("final", {}))
    return path


def load_backbone(path: str) -> tuple[ConvTrunk, Any, dict, Any]:
    """``(trunk, trunk_params, fc_params {"fc6", "fc7"}, classification config)`` of
    the backbone workdir ``path`` (:func:`spp_jax.workdirs.load_trained`)."""
    backbone = workdirs.load_trained(path)
    params = jax.device_get(backbone.params)
    trunk_params = {k: v for k, v in params.items() if k.startswith("conv")}
    fc = {k: params[k] for k in ("fc6", "fc7")}
    return backbone.model.conv_trunk, trunk_params, fc, backbone.config


def stage_proposals(config, workdir: str, splits: dict[str, Split]) -> dict[str, list[np.ndarray]]:
    from spp_jax.detection.proposals import ProposalCache

    p = config.proposals
    cache = ProposalCache(
        p.cache_dir or os.path.join(workdir, "proposals"),
        mode=p.mode,
        max_boxes=p.max_boxes,
        min_size=p.min_size,
        seed=config.seed,
        max_side=p.get("max_side"),
    )
    if stage_done(workdir, "proposals") is None:
        with _timed("proposals") as t:
            pairs = [
                (i, im) for s in splits.values() for i, im in zip(s.ids, s.images, strict=True)
            ]
            stats = cache.compute(pairs, num_workers=p.num_workers, total=len(pairs))
        _finish(
            workdir,
            "proposals",
            t["seconds"],
            images=len(pairs),
            seconds_per_image=stats.seconds_per_image,
        )
    return {name: [cache.get(i) for i in s.ids] for name, s in splits.items()}


def _split_maps(
    det: Detector, split: Split, scales: Sequence[int], *, flip: bool = False
) -> list[list[features.ScaledMap]]:
    """Per scale, per image (mirrored images appended after the originals if ``flip``)."""
    from tqdm import tqdm

    out = []
    for s in scales:
        maps = [det.conv5(im, s) for im in tqdm(split.images, desc=f"conv5 at {s}", leave=False)]
        if flip:
            maps += [det.conv5(im, s, flip=True) for im in split.images]
        out.append(maps)
    return out


def _validation_map(det: Detector, params: Any, split: Split, props, maps) -> float:
    dets = []
    for i in range(len(split)):
        pooled = det.pool([maps[0][i]], det.scales(1), props[i], split.sizes[i])
        logits, _ = det.head_outputs(pooled, params)
        scores = _padded(_softmax_classes, logits)
        out = per_class_nms(
            props[i], scores, 0.0, det.config.test.nms_iou, det.config.test.max_per_image
        )
        out.pop("index")
        dets.append(out)
    return float(evaluate(dets, split, det.num_classes)["map"])


def stage_finetune(
    config, workdir: str, det: Detector, data, props, val_maps, train_maps=None
) -> Any:
    """Fine-tunes fc6, fc7 and fc8; returns the best head params (validation mAP).

    ``train_maps``: the training split's maps at the fine-tuning scales (mirrored
    images appended if ``finetune.flip``), if already computed."""
    import flax.serialization
    import optax
    from tqdm import tqdm

    from spp_jax.train import _standard_promotion

    ft = config.finetune
    path = os.path.join(workdir, "finetune")
    best_path = os.path.join(path, "best.msgpack")
    if stage_done(workdir, "finetune") is not None:
        with open(best_path, "rb") as f:
            return flax.serialization.from_bytes(det.head_params, f.read())
    os.makedirs(path, exist_ok=True)
    train = data["train"]
    t0 = time.perf_counter()
    scales = det.scales(5 if ft.scales == "all" else 1)
    if train_maps is None or len(train_maps) != len(scales):
        train_maps = _split_maps(det, train, scales, flip=ft.flip)
    stacks = [finetune.stack_maps(m) for m in train_maps]
    sampler = finetune.WindowSampler(
        props["train"], train.boxes, train.labels, train.sizes, ft.fg_iou, *ft.bg_iou
    )
    log.info(
        "fine-tuning on %d foreground and %d background windows of %d images, %d scales",
        len(sampler.foreground), len(sampler.background), len(train), len(scales),
    )  # fmt: skip
    bounds = {int(f * ft.steps): 0.1 for f in ft.lr_boundaries}
    schedule = optax.piecewise_constant_schedule(ft.learning_rate, bounds)
    kernels = lambda p: jax.tree_util.tree_map_with_path(lambda q, _: q[-1].key == "kernel", p)
    lr = lambda s: schedule(jnp.asarray(s, jnp.float32))
    if ft.optimizer == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(ft.weight_decay, mask=kernels),
            optax.sgd(lr, momentum=ft.momentum),
        )
    elif ft.optimizer == "adamw":
        tx = optax.adamw(lr, weight_decay=ft.weight_decay, mask=kernels)
    else:
        raise ValueError(f"finetune.optimizer {ft.optimizer!r} not accepted; use 'sgd' or 'adamw'")
    tx = _standard_promotion(tx)
    step_fn = finetune.make_step(det.head, tx, levels=config.levels, stride=det.stride)
    ckpt = os.path.join(path, "state.msgpack")
    state = finetune.HeadState(
        det.head_params, tx.init(det.head_params), jnp.asarray(0, jnp.int32),
        jax.random.key_data(jax.random.key(config.seed)),
    )  # fmt: skip
    best = {"map": -1.0, "step": 0}
    if os.path.exists(ckpt):
        with open(ckpt, "rb") as f:
            restored = flax.serialization.msgpack_restore(f.read())
        state = flax.serialization.from_state_dict(state, restored["state"])
        best = restored["best"]
        log.info("fine-tuning resumes at step %d", int(state.step))
    state = state._replace(key=jax.random.wrap_key_data(jnp.asarray(state.key)))

    def scale_of(image, boxes):  # boxes: with context
        out = np.zeros(len(boxes), np.int32)
        for i in np.unique(image):
            here = image == i
            out[here] = features.assign_scales(
                boxes[here],
                train.sizes[i],
                scales,
                target=config.window_target,
                rule=config.window_rule,
            )
        return out

    def save(state, best):
        plain = state._replace(key=jax.random.key_data(state.key))
        blob = flax.serialization.msgpack_serialize(
            {"state": flax.serialization.to_state_dict(plain), "best": best}
        )
        atomic_write_bytes(ckpt, blob)

    start = int(state.step)
    bar = tqdm(range(start, ft.steps), desc="fine-tuning", initial=start, total=ft.steps)
    for step in bar:
        rng = np.random.default_rng([config.seed, step])
        batch = sampler.sample(
            rng, ft.batch_size, ft.fg_fraction, num_scales=len(scales), scale_of=scale_of,
            random_scale=ft.random_scale and len(scales) > 1, flip=ft.flip,
            context=config.window_context,
        )  # fmt: skip
        state, m = step_fn(state, stacks, {k: jnp.asarray(v) for k, v in batch.items()})
        done = step + 1
        if done % ft.eval_every == 0 or done == ft.steps:
            m = jax.device_get(m)
            val = _validation_map(det, state.params, data["val"], props["val"], val_maps)
            if val > best["map"]:
                best = {"map": val, "step": done}
                atomic_write_bytes(best_path, flax.serialization.to_bytes(state.params))
            save(state, best)
            log.info(
                "fine-tune step %d: loss %.3f, window accuracy %.3f, validation mAP %.4f",
                done, float(m["loss"]), float(m["accuracy"]), val,
            )  # fmt: skip
    _finish(workdir, "finetune", time.perf_counter() - t0, best=best, steps=ft.steps)
    with open(best_path, "rb") as f:
        return flax.serialization.from_bytes(det.head_params, f.read())


def _overlaps(boxes: np.ndarray, gt: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """``(R, K)``: each window's max IoU with the ground truths of each class."""
    out = np.zeros((len(boxes), k), np.float32)
    if len(gt) and len(boxes):
        iou = np.asarray(box_iou(jnp.asarray(boxes), jnp.asarray(gt)))
        for c in np.unique(labels):
            out[:, c] = iou[:, labels == c].max(1)
    return out


def stage_svm(config, workdir: str, det: Detector, name: str, head_params, train, props, maps):
    """SVMs on fc7 of ``head_params`` with hard-negative mining over the train split."""
    path = os.path.join(workdir, f"{name}.npz")
    if stage_done(workdir, name) is not None:
        return svm.SVMs.load(path)
    t0 = time.perf_counter()
    k, scales = det.num_classes, det.scales(len(maps))
    per_image = lambda i: [m[i] for m in maps]

    def fc7(i, boxes):
        pooled = det.pool(per_image(i), scales, boxes, train.sizes[i])
        return det.head_outputs(pooled, head_params)[1]

    pos_feats, pos_labels = [], []
    for i in range(len(train)):
        keep = ~train.difficult[i]
        if keep.any():
            pos_feats.append(fc7(i, train.boxes[i][keep]))
            pos_labels.append(train.labels[i][keep] + 1)
    if not pos_feats:
        raise ValueError(
            f"stage {name}: the training split has no ground-truth boxes (other than "
            "difficult ones): nothing to train the SVMs on"
        )
    positives = (np.concatenate(pos_feats), np.concatenate(pos_labels))

    def negatives():
        for i in range(len(train)):
            boxes = props[i]
            yield train.ids[i], fc7(i, boxes), _overlaps(boxes, train.boxes[i], train.labels[i], k)

    s = config.svm
    scale = svm.feature_scale(positives[0], s.feature_norm)
    svms = svm.train_svms(
        positives, negatives(), k, C=s.C, pos_weight=s.pos_weight, bias_feature=s.bias_feature,
        neg_iou=s.neg_iou, hard_thresh=s.hard_thresh, evict_thresh=s.evict_thresh,
        retrain_every=s.retrain_every, feature_scale=scale, tol=s.tol,
    )  # fmt: skip
    svms.save(path)
    _finish(workdir, name, time.perf_counter() - t0)
    return svms


def stage_bbox(config, workdir: str, det: Detector, train, props, maps):
    path = os.path.join(workdir, "bbox.npz")
    if stage_done(workdir, "bbox") is not None:
        return bbox_regression.BoxRegressors.load(path)
    t0 = time.perf_counter()
    scales = det.scales(len(maps))
    pooled_of = lambda i, b: det.pool([m[i] for m in maps], scales, b, train.sizes[i])
    sample = np.concatenate([pooled_of(i, props[i][:50]) for i in range(min(20, len(train)))])
    scale = svm.feature_scale(sample, config.svm.feature_norm)
    acc = bbox_regression.RidgeAccumulator(sample.shape[1], det.num_classes, feature_scale=scale)
    for i in range(len(train)):
        match = bbox_regression.match_proposals(
            props[i], train.boxes[i], train.labels[i] + 1, min_iou=config.bbox.min_iou
        )
        index = np.asarray(match[0])
        if len(index):
            acc.add(pooled_of(i, props[i][index]), props[i][index], match[1], match[2])
    regressors = acc.solve(config.bbox.lam)
    regressors.save(path)
    _finish(workdir, "bbox", time.perf_counter() - t0, counts=np.asarray(acc.counts).tolist())
    return regressors


def evaluate(dets: Sequence[dict], split: Split, k: int, metric: str = "voc07") -> dict:
    gts = [
        {"boxes": b, "labels": lab, "difficult": d}
        for b, lab, d in zip(split.boxes, split.labels, split.difficult, strict=True)
    ]
    return evaluation.evaluate_detections(dets, gts, num_classes=k, metric=metric)


# --------------------------------------------------------------------------------------
# The whole run.
# --------------------------------------------------------------------------------------

VARIANTS = {  # name: (head, scorer, box regression)
    "fc7 + SVM, no fine-tuning": ("pretrained", "svm", False),
    "ft fc7 + SVM": ("finetuned", "svm", False),
    "ft fc7 + SVM + bbox": ("finetuned", "svm", True),
    "ft softmax": ("finetuned", "softmax", False),
}
MAIN_VARIANT = "ft fc7 + SVM + bbox"


def _initial_head(config, k: int, fc: dict, fc_dim: int) -> tuple[MLPHead, Any]:
    head = MLPHead(k + 1, fc_dim, config.finetune.dropout_rate)
    init = head.init(jax.random.key(config.seed), jnp.zeros((1, fc["fc6"]["kernel"].shape[0])))
    params = dict(jax.device_get(init["params"]))
    params.update({name: fc[name] for name in ("fc6", "fc7")})  # fc8 new: N(0, 0.01)
    return head, params


def build_detector(config, workdir: str) -> tuple[Detector, Any]:
    """The detector with the backbone's trunk and fc6/fc7 (fc8 new), and the
    pre-trained head params (for the "no fine-tuning" row)."""
    k = num_classes_of(config.dataset, config.data_dir)
    trunk, trunk_params, fc, cls = load_backbone(stage_backbone(config, workdir))
    head, params = _initial_head(config, k, fc, cls.model.fc_dim)
    return Detector(trunk, trunk_params, head, params, k, config), params


def _stages_before_eval(config) -> list[str]:
    names = ["proposals", "svm_pretrained", "svm"]
    if not config.backbone_workdir:
        names.append("backbone")
    if config.finetune.enabled:
        names.append("finetune")
    if config.bbox.enabled:
        names.append("bbox")
    return names


def detect_train(config, workdir: str) -> dict:
    """Runs (or resumes) every stage and the test evaluation; returns the metrics
    (also the last line of ``WORKDIR/metrics.jsonl``)."""
    configs.check(config, "detection")
    workdirs.check_run_dir(workdir, "detection")
    done = stage_done(workdir, "eval")
    if done is not None and all(stage_done(workdir, n) for n in _stages_before_eval(config)):
        # A finished run: the metrics it wrote, nothing recomputed.
        log.info("%s is a finished run (stages/eval.json); nothing to do", workdir)
        return done["metrics"]
    _atomic_json(os.path.join(workdir, "config.json"), config.to_dict())
    t0 = time.perf_counter()
    det, pretrained = build_detector(config, workdir)
    names = {"train": config.train_split, "val": config.val_split, "test": config.test_split}
    data = {k: load_split(config.dataset, v, config.data_dir) for k, v in names.items()}
    props = stage_proposals(config, workdir, data)
    scales5 = det.scales(5)
    with _timed("conv5 maps of the training split") as t:
        train_maps = _split_maps(det, data["train"], scales5, flip=config.finetune.flip)
        val_maps = _split_maps(det, data["val"], det.scales(1))
    log.info(
        "conv5 maps of %d + %d images in %.1f s", len(data["train"]), len(data["val"]), t["seconds"]
    )
    n = len(data["train"])
    train_unflipped = [m[:n] for m in train_maps]
    if config.finetune.enabled:
        ft_maps = train_maps if config.finetune.scales == "all" else None
        det.head_params = stage_finetune(config, workdir, det, data, props, val_maps, ft_maps)
    heads = {"pretrained": pretrained, "finetuned": det.head_params}
    train = (data["train"], props["train"], train_unflipped)
    svms = {
        "pretrained": stage_svm(config, workdir, det, "svm_pretrained", pretrained, *train),
        "finetuned": stage_svm(config, workdir, det, "svm", det.head_params, *train),
    }
    if config.bbox.enabled:
        det.regressors = stage_bbox(
            config, workdir, det, data["train"], props["train"], train_unflipped
        )
    del train_maps, train_unflipped, train
    metrics = stage_eval(config, workdir, det, heads, svms, data["test"], props["test"])
    metrics["seconds_total"] = time.perf_counter() - t0
    metrics["proposals_seconds_per_image"] = (stage_done(workdir, "proposals") or {}).get(
        "seconds_per_image"
    )
    # Peak resident memory of this process (Linux reports KiB).
    metrics["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log.info("peak memory %.2f GiB", metrics["peak_memory_gib"])
    write_metrics(workdir, metrics)
    _finish(workdir, "eval", metrics["seconds_total"], metrics=metrics)
    return metrics


def stage_eval(config, workdir, det: Detector, heads, svms, test: Split, props) -> dict:
    """Every variant at 1 and 5 scales on the test split; per-stage seconds per image."""
    table, main = {}, None
    main_name = MAIN_VARIANT if det.regressors is not None else "ft fc7 + SVM"
    for n in config.test.scales:
        with _timed(f"conv5 of the test split at {n} scale(s)") as t:
            maps = _split_maps(det, test, det.scales(n))
        conv_s = t["seconds"] / len(test)
        variants = [(name, *v, None) for name, v in VARIANTS.items()]
        if config.test.svd_rank:
            rank = config.test.svd_rank
            variants.append(
                (f"{main_name}, fc6/fc7 SVD rank {rank}", "finetuned", "svm", True, rank)
            )
        for name, head_kind, scorer, regress, rank in variants:
            if regress and det.regressors is None:
                continue
            det_v = dataclasses.replace(det, head_params=heads[head_kind], svms=svms.get(head_kind))
            det_v.extractor, det_v.pooler, det_v.stride = det.extractor, det.pooler, det.stride
            det_v.compress(rank)
            clock: dict[str, float] = {}
            dets = [
                det_v.detect(
                    test.images[i], props[i], num_scales=n, scorer=scorer, regress=regress,
                    maps=[m[i] for m in maps], timings=clock,
                )
                for i in range(len(test))
            ]  # fmt: skip
            res07 = evaluate(dets, test, det.num_classes, "voc07")
            res_area = evaluate(dets, test, det.num_classes, "area")
            row = {
                "map_voc07": float(res07["map"]),
                "map_area": float(res_area["map"]),
                "ap_voc07": [float(a) for a in res07["ap"]],
                "seconds_per_image": {
                    "conv": conv_s,
                    **{k: v / len(test) for k, v in clock.items()},
                },
            }
            table[f"{name}, {n} scale{'s' if n > 1 else ''}"] = row
            log.info("test %s, %d scale(s): mAP %.4f (VOC07), %.4f (area)",
                     name, n, row["map_voc07"], row["map_area"])  # fmt: skip
            if n == config.test.scales[0] and name == main_name:
                main = (name, n, res07, res_area, dets)
    assert main is not None
    name, n, res07, res_area, dets = main
    from spp_jax.detection import report

    report.write_eval(workdir, table, res07, test, dets, det.config.test.draw_images)
    return {
        "map_voc07": float(res07["map"]),
        "map_area": float(res_area["map"]),
        "ap_voc07": [float(a) for a in res07["ap"]],
        "ap_area": [float(a) for a in res_area["ap"]],
        "main": f"{name}, {n} scale(s)",
        "table": table,
    }


def write_metrics(workdir: str, metrics: dict) -> None:
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(metrics, default=float) + "\n")


# --------------------------------------------------------------------------------------
# A finished workdir.
# --------------------------------------------------------------------------------------


def load_run_config(workdir: str) -> Any:
    """The detection config a run saved (``WORKDIR/config.json``), defaults filled in
    (:func:`spp_jax.workdirs.read_config`). A file without ``proposals.max_side`` reads
    as ``None``: such a run's proposals were searched on full-size images."""
    config = workdirs.read_config(workdir, "detection")
    with open(os.path.join(workdir, "config.json")) as f:
        if "max_side" not in json.load(f).get("proposals", {}):
            config.proposals.max_side = None
    return config


def load_detector(workdir: str, *, scorer: str | None = None) -> Detector:
    """The trained detector of a ``detect-train`` workdir: backbone trunk, fine-tuned
    head (if fine-tuning ran), SVMs and box regressors (those that exist).

    Raises:
      FileNotFoundError: the workdir lacks a stage the detector needs.
    """
    import flax.serialization

    config = load_run_config(workdir)
    if scorer is not None:
        config.test.scorer = scorer
    det, _ = build_detector(config, workdir)
    best = os.path.join(workdir, "finetune", "best.msgpack")
    if os.path.exists(best):
        with open(best, "rb") as f:
            det.head_params = flax.serialization.from_bytes(det.head_params, f.read())
    name = "svm" if os.path.exists(best) else "svm_pretrained"
    if os.path.exists(os.path.join(workdir, f"{name}.npz")):
        det.svms = svm.SVMs.load(os.path.join(workdir, f"{name}.npz"))
    elif config.test.scorer == "svm":
        raise FileNotFoundError(f"{workdir}/{name}.npz not found: run detect-train to the end")
    if os.path.exists(os.path.join(workdir, "bbox.npz")):
        det.regressors = bbox_regression.BoxRegressors.load(os.path.join(workdir, "bbox.npz"))
    return det


SPLIT_ROLES = ("train", "validation", "test")


def workdir_proposals(config, workdir: str, split: Split) -> list[np.ndarray]:
    """The proposals of ``split``'s images from the run's cache (``WORKDIR/proposals``
    or ``config.proposals.cache_dir``), computed (and cached) for those missing."""
    from spp_jax.detection.proposals import ProposalCache

    p = config.proposals
    cache_dir = p.cache_dir or os.path.join(workdir, "proposals")
    if os.path.exists(os.path.join(cache_dir, "params.json")):
        cache = ProposalCache.open(cache_dir)
    else:
        cache = ProposalCache(
            cache_dir,
            mode=p.mode,
            max_boxes=p.max_boxes,
            min_size=p.min_size,
            seed=config.seed,
            max_side=p.get("max_side"),
        )
    missing = [(i, im) for i, im in zip(split.ids, split.images, strict=True) if i not in cache]
    if missing:
        log.info("selective search of %d images not in %s", len(missing), cache_dir)
        cache.compute(missing, num_workers=p.num_workers, progress=False)
    return [cache.get(i) for i in split.ids]


def evaluate_workdir(
    workdir: str,
    *,
    scales: int = 1,
    split: str = "test",
    scorer: str | None = None,
    regress: bool = True,
) -> dict:
    """``spp-jax detect-eval``: the detector of a ``detect-train`` workdir
    (:func:`load_detector`) on one split, VOC07 and area AP.

    Args:
      workdir: a finished (at least through the SVMs) ``detect-train`` workdir.
      scales: 1: the single scale; another number: every scale of the config.
      split: ``"test"``, ``"validation"`` or ``"train"``: the run's split of that
        role (``config.test_split`` ...); another name is a TFDS split of the
        run's dataset.
      scorer: ``"svm"`` or ``"softmax"`` (default: the config's ``test.scorer``).
      regress: apply box regression (if the run trained it).

    Returns:
      ``map_voc07``, ``map_area``, ``ap_voc07``, ``ap_area`` (per class; NaN for a
      class without ground truth in the split), ``name`` (the variant), ``table``
      (``{name: row}`` as in :func:`stage_eval`, for :func:`report.ap_table`),
      ``split`` (the TFDS split), ``num_images``, ``scales`` (pixels) and
      ``report``: the markdown written, ``WORKDIR/eval/<split>_<n>scale(s).md``.

    Raises:
      FileNotFoundError: not a ``detect-train`` workdir, or it lacks a stage.
      ValueError: a bad ``scales`` or ``scorer``; an empty split.
    """
    from spp_jax.detection import report

    if isinstance(scales, bool) or not isinstance(scales, int) or scales < 1:
        raise ValueError(f"scales={scales!r}; expected 1 (single scale) or 5 (every scale)")
    config = load_run_config(workdir)
    det = load_detector(workdir, scorer=scorer)
    scorer = scorer or config.test.scorer
    roles = {"train": config.train_split, "validation": config.val_split}
    name = {**roles, "val": config.val_split, "test": config.test_split}.get(split, split)
    data = load_split(config.dataset, name, config.data_dir)
    if not len(data):
        raise ValueError(f"split {name!r} of {config.dataset!r} has no images")
    props = workdir_proposals(config, workdir, data)
    pixels = det.scales(scales)
    clock: dict[str, float] = {}
    dets = [
        det.detect(im, p, num_scales=scales, scorer=scorer, regress=regress, timings=clock)
        for im, p in zip(data.images, props, strict=True)
    ]
    res07 = evaluate(dets, data, det.num_classes, "voc07")
    res_area = evaluate(dets, data, det.num_classes, "area")
    finetuned = os.path.exists(os.path.join(workdir, "finetune", "best.msgpack"))
    variant = ("ft " if finetuned else "") + ("fc7 + SVM" if scorer == "svm" else "softmax")
    if regress and det.regressors is not None:
        variant += " + bbox"
    n = len(pixels)
    variant += f", {n} scale{'s' if n > 1 else ''}"
    row = {
        "map_voc07": float(res07["map"]),
        "map_area": float(res_area["map"]),
        "ap_voc07": [float(a) for a in res07["ap"]],
        "seconds_per_image": {k: v / len(data) for k, v in clock.items()},
    }
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}_{n}scale{'s' if n > 1 else ''}.md")
    with open(path, "w") as f:
        f.write(f"Average precision (%) on {config.dataset} {name} ({len(data)} images)\n\n")
        f.write(report.ap_table({variant: row}, det.num_classes))
        f.write("\nSeconds per image\n\n")
        f.write(report.timing_table({variant: row}))
    return {
        **{k: row[k] for k in ("map_voc07", "map_area", "ap_voc07")},
        "ap_area": [float(a) for a in res_area["ap"]],
        "name": variant,
        "table": {variant: row},
        "split": name,
        "num_images": len(data),
        "scales": pixels,
        "report": path,
    }
