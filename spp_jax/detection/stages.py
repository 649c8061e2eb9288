"""The stages of ``spp-jax detect-train`` that train the detector, and the data they read.

Each stage (:func:`~spp_jax.detection.pipeline.detect_train` runs them in order) writes
``WORKDIR/stages/<name>.json`` when done, with its seconds, so a rerun skips it
(:func:`stage_done`); fine-tuning also resumes from its last saved step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import workdirs
from spp_jax._io import atomic_write_bytes, atomic_write_json
from spp_jax.detection import bbox_regression, evaluation, features, finetune, proposals, svm, voc
from spp_jax.detection.boxes import box_iou
from spp_jax.detection.detector import Detector
from spp_jax.models import ConvTrunk, MLPHead

log = logging.getLogger("spp_jax")


# --------------------------------------------------------------------------------------
# Stage bookkeeping.
# --------------------------------------------------------------------------------------


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` to ``path`` as indented JSON with sorted keys (NumPy scalars as
    floats), atomically: a stage's record, a run's ``config.json``."""
    atomic_write_json(path, obj, indent=1, sort_keys=True, default=float)


def stage_done(workdir: str, name: str) -> dict | None:
    """What stage ``name`` recorded when it finished, or None."""
    path = os.path.join(workdir, "stages", f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def finish_stage(workdir: str, name: str, seconds: float, **info: Any) -> None:
    """Records stage ``name`` as done (``WORKDIR/stages/<name>.json``): its ``seconds``
    and ``info``."""
    os.makedirs(os.path.join(workdir, "stages"), exist_ok=True)
    write_json(os.path.join(workdir, "stages", f"{name}.json"), {"seconds": seconds, **info})
    log.info("stage %s done in %.1f s", name, seconds)


@contextlib.contextmanager
def timed(name: str) -> Iterator[dict]:
    """``with timed(name) as t:`` logs ``stage NAME ...``; ``t["seconds"]`` holds the
    block's seconds after it."""
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


def evaluate(dets: Sequence[dict], split: Split, k: int, metric: str = "voc07") -> dict:
    """:func:`~spp_jax.detection.evaluation.evaluate_detections` of ``dets`` (one dict
    per image of ``split``) against ``split``'s ground truth, ``k`` classes."""
    gts = [
        {"boxes": b, "labels": lab, "difficult": d}
        for b, lab, d in zip(split.boxes, split.labels, split.difficult, strict=True)
    ]
    return evaluation.evaluate_detections(dets, gts, num_classes=k, metric=metric)


def split_maps(
    det: Detector, split: Split, scales: Sequence[int], *, flip: bool = False
) -> list[list[features.ScaledMap]]:
    """The conv5 maps of ``split``'s images: per scale, per image (mirrored images
    appended after the originals if ``flip``)."""
    from tqdm import tqdm

    out = []
    for s in scales:
        maps = [det.conv5(im, s) for im in tqdm(split.images, desc=f"conv5 at {s}", leave=False)]
        if flip:
            maps += [det.conv5(im, s, flip=True) for im in split.images]
        out.append(maps)
    return out


# --------------------------------------------------------------------------------------
# The backbone and the detector built on it.
# --------------------------------------------------------------------------------------


def backbone_config(config) -> Any:
    """The classification config the backbone trains with: ``config.backbone_config``
    updated by the run's ``seed``, then ``backbone_overrides`` (which may set another
    seed), and the run's ``data_dir``. One seed thus draws both the backbone and the
    fine-tuning, so runs over seeds measure the whole pipeline's spread."""
    from spp_jax import configs

    backbone = configs.get_config(config.backbone_config)
    backbone.seed = config.seed
    backbone.update(config.backbone_overrides.to_dict())
    if config.data_dir is not None:
        backbone.data_dir = config.data_dir
    return backbone


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

        with timed("backbone") as t:
            final = train.train_and_evaluate(backbone_config(config), path)
        finish_stage(workdir, "backbone", t["seconds"], final=final.get("final", {}))
    return path


def load_backbone(path: str) -> tuple[ConvTrunk, Any, dict, Any]:
    """``(trunk, trunk_params, fc_params {"fc6", "fc7"}, classification config)`` of
    the backbone workdir ``path`` (:func:`spp_jax.workdirs.load_trained`)."""
    backbone = workdirs.load_trained(path)
    params = jax.device_get(backbone.params)
    trunk_params = {k: v for k, v in params.items() if k.startswith("conv")}
    fc = {k: params[k] for k in ("fc6", "fc7")}
    return backbone.model.conv_trunk, trunk_params, fc, backbone.config


def window_pyramid(config, backbone, channels: int, fc6_inputs: int) -> tuple[tuple, bool]:
    """``(levels, channel_major)`` of the window pooling that feeds the backbone's fc6.

    Windows are always max-pooled from conv5 (the paper's window pyramid). The levels
    are ``config.levels``, or, if it is None, the backbone head's: its SPP levels
    (``(6, 3, 2, 1)`` for the built-in nets; ``(6,)`` or ``(7,)`` for an imported
    torchvision AlexNet or VGG-16, whose pool5 and average pyramid the one-level max
    pooling of each window replaces, as in Fast R-CNN), or ``(6,)`` for the no-SPP
    ``pool6`` head. The flatten order is the backbone head's.

    Args:
      config: the detection config.
      backbone: the backbone's classification config.
      channels: the trunk's conv5 channels.
      fc6_inputs: the rows of the backbone's fc6 kernel.

    Raises:
      ValueError: the levels pool a vector of another length than fc6 takes.
    """
    from spp_jax.geometry import normalize_levels

    model = backbone.model
    if config.levels is not None:
        levels = config.levels
    elif model.head == "spp":
        levels = model.levels
    else:
        levels = (6,)
    levels = normalize_levels(levels)
    width = channels * sum(h * w for h, w in levels)
    if width != fc6_inputs:
        raise ValueError(
            f"levels={tuple(levels)} pool {width} values per window from the backbone's "
            f"{channels} conv5 channels, but its fc6 takes {fc6_inputs}: set levels=None "
            f"(the backbone's own) or levels whose bins times {channels} make {fc6_inputs}"
        )
    return tuple(levels), bool(model.get("channel_major", False))


def _initial_head(config, k: int, fc: dict, fc_dim: int) -> tuple[MLPHead, Any]:
    head = MLPHead(k + 1, fc_dim, config.finetune.dropout_rate)
    init = head.init(jax.random.key(config.seed), jnp.zeros((1, fc["fc6"]["kernel"].shape[0])))
    params = dict(jax.device_get(init["params"]))
    params.update({name: fc[name] for name in ("fc6", "fc7")})  # fc8 new: N(0, 0.01)
    return head, params


def build_detector(config, workdir: str) -> tuple[Detector, Any]:
    """The detector with the backbone's trunk and fc6/fc7 (fc8 new), and the
    pre-trained head params (for the "no fine-tuning" row)."""
    k = voc.num_classes(config.dataset, config.data_dir)
    trunk, trunk_params, fc, backbone = load_backbone(stage_backbone(config, workdir))
    head, params = _initial_head(config, k, fc, backbone.model.fc_dim)
    levels, channel_major = window_pyramid(
        config, backbone, trunk.out_channels, fc["fc6"]["kernel"].shape[0]
    )
    det = Detector(
        trunk, trunk_params, head, params, k, config, levels=levels, channel_major=channel_major
    )
    return det, params


# --------------------------------------------------------------------------------------
# Proposals.
# --------------------------------------------------------------------------------------


def _proposal_cache(config, workdir: str, *, as_stored: bool = False):
    """The run's :class:`~spp_jax.detection.proposals.ProposalCache`
    (``WORKDIR/proposals`` or ``config.proposals.cache_dir``): with the settings it
    holds if ``as_stored`` and it exists, else with the config's selective search
    settings (an existing cache with other settings is a ``ValueError``)."""
    p = config.proposals
    cache_dir = p.cache_dir or os.path.join(workdir, "proposals")
    if as_stored and os.path.exists(os.path.join(cache_dir, "params.json")):
        return proposals.ProposalCache.open(cache_dir)
    return proposals.ProposalCache(
        cache_dir,
        mode=p.mode,
        max_boxes=p.max_boxes,
        min_size=p.min_size,
        seed=config.seed,
        max_side=p.get("max_side"),
    )


def stage_proposals(config, workdir: str, splits: dict[str, Split]) -> dict[str, list[np.ndarray]]:
    """Selective search of every image of ``splits`` (cached); their proposals, per
    split and image."""
    cache = _proposal_cache(config, workdir)
    if stage_done(workdir, "proposals") is None:
        with timed("proposals") as t:
            pairs = [
                (i, im) for s in splits.values() for i, im in zip(s.ids, s.images, strict=True)
            ]
            stats = cache.compute(pairs, num_workers=config.proposals.num_workers, total=len(pairs))
        finish_stage(
            workdir,
            "proposals",
            t["seconds"],
            images=len(pairs),
            seconds_per_image=stats.seconds_per_image,
        )
    return {name: [cache.get(i) for i in s.ids] for name, s in splits.items()}


def workdir_proposals(config, workdir: str, split: Split) -> list[np.ndarray]:
    """The proposals of ``split``'s images from the run's cache (``WORKDIR/proposals``
    or ``config.proposals.cache_dir``, with the settings it holds), computed (and
    cached) for those missing."""
    cache = _proposal_cache(config, workdir, as_stored=True)
    missing = [(i, im) for i, im in zip(split.ids, split.images, strict=True) if i not in cache]
    if missing:
        log.info("selective search of %d images not in %s", len(missing), cache.cache_dir)
        cache.compute(missing, num_workers=config.proposals.num_workers, progress=False)
    return [cache.get(i) for i in split.ids]


# --------------------------------------------------------------------------------------
# Fine-tuning.
# --------------------------------------------------------------------------------------


def _finetune_optimizer(ft) -> Any:
    """:func:`spp_jax.train.create_optimizer` with fine-tuning's settings
    (``config.finetune``): the rate divided by 10 at each of ``lr_boundaries``,
    fractions of ``steps``."""
    import optax

    from spp_jax import train

    bounds = {int(f * ft.steps): 0.1 for f in ft.lr_boundaries}
    schedule = optax.piecewise_constant_schedule(ft.learning_rate, bounds)
    return train.create_optimizer(ft, lambda step: schedule(jnp.asarray(step, jnp.float32)))


def _head_state(det: Detector, tx: Any, seed: int, ckpt: str) -> tuple[finetune.HeadState, dict]:
    """Fine-tuning's state and its best validation record ``{"map", "step"}``: from the
    checkpoint ``ckpt`` if one was saved, else fresh (the detector's head)."""
    import flax.serialization

    state = finetune.HeadState(
        det.head_params, tx.init(det.head_params), jnp.asarray(0, jnp.int32),
        jax.random.key_data(jax.random.key(seed)),
    )  # fmt: skip
    best = {"map": -1.0, "step": 0}
    if os.path.exists(ckpt):
        with open(ckpt, "rb") as f:
            restored = flax.serialization.msgpack_restore(f.read())
        state = flax.serialization.from_state_dict(state, restored["state"])
        best = restored["best"]
        log.info("fine-tuning resumes at step %d", int(state.step))
    return state._replace(key=jax.random.wrap_key_data(jnp.asarray(state.key))), best


def _save_head_state(ckpt: str, state: finetune.HeadState, best: dict) -> None:
    """Writes the checkpoint :func:`_head_state` resumes from."""
    import flax.serialization

    plain = state._replace(key=jax.random.key_data(state.key))
    blob = flax.serialization.msgpack_serialize(
        {"state": flax.serialization.to_state_dict(plain), "best": best}
    )
    atomic_write_bytes(ckpt, blob)


def _window_scales(
    det: Detector, sizes: Sequence[tuple[int, int]], scales: Sequence[int], image, boxes
) -> np.ndarray:
    """Each window's test-time scale (:meth:`Detector.window_scales`): ``image`` the index
    of its image (of sizes ``sizes``), ``boxes`` with context."""
    out = np.zeros(len(boxes), np.int32)
    for i in np.unique(image):
        here = image == i
        out[here] = det.window_scales(boxes[here], sizes[i], scales)
    return out


def _validation_map(det: Detector, params: Any, split: Split, props, maps) -> float:
    """VOC07 mAP of the head ``params`` on ``split``: softmax scores, one scale."""
    dets = det.detect_all(
        split.images, props, maps=maps[:1], scorer="softmax", regress=False, params=params
    )
    return float(evaluate(dets, split, det.num_classes)["map"])


def _finetune(config, path: str, det: Detector, data, props, val_maps, train_maps) -> dict:
    """Runs (or resumes) the fine-tuning steps in ``path``; returns the best validation
    record ``{"map", "step"}``, whose head params are ``path/best.msgpack``."""
    import flax.serialization
    from tqdm import tqdm

    ft, train = config.finetune, data["train"]
    scales = det.scales(5 if ft.scales == "all" else 1)
    if train_maps is None or len(train_maps) != len(scales):
        train_maps = split_maps(det, train, scales, flip=ft.flip)
    stacks = [finetune.stack_maps(m) for m in train_maps]
    sampler = finetune.WindowSampler(
        props["train"], train.boxes, train.labels, train.sizes, ft.fg_iou, *ft.bg_iou
    )
    log.info(
        "fine-tuning on %d foreground and %d background windows of %d images, %d scales",
        len(sampler.foreground), len(sampler.background), len(train), len(scales),
    )  # fmt: skip
    tx = _finetune_optimizer(ft)
    step_fn = finetune.make_step(
        det.head,
        tx,
        levels=det.levels,
        stride=det.stride,
        channel_major=det.channel_major,
        mode=det.pooler.mode,
    )
    ckpt = os.path.join(path, "state.msgpack")
    state, best = _head_state(det, tx, config.seed, ckpt)
    scale_of = functools.partial(_window_scales, det, train.sizes, scales)
    start = int(state.step)
    for step in tqdm(range(start, ft.steps), desc="fine-tuning", initial=start, total=ft.steps):
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
                best_path = os.path.join(path, "best.msgpack")
                atomic_write_bytes(best_path, flax.serialization.to_bytes(state.params))
            _save_head_state(ckpt, state, best)
            log.info(
                "fine-tune step %d: loss %.3f, window accuracy %.3f, validation mAP %.4f",
                done, float(m["loss"]), float(m["accuracy"]), val,
            )  # fmt: skip
    return best


def stage_finetune(
    config, workdir: str, det: Detector, data, props, val_maps, train_maps=None
) -> Any:
    """Fine-tunes fc6, fc7 and fc8; returns the best head params (validation mAP).

    ``train_maps``: the training split's maps at the fine-tuning scales (mirrored
    images appended if ``finetune.flip``), if already computed."""

    path = os.path.join(workdir, "finetune")
    if stage_done(workdir, "finetune") is None:
        os.makedirs(path, exist_ok=True)
        t0 = time.perf_counter()
        best = _finetune(config, path, det, data, props, val_maps, train_maps)
        steps = config.finetune.steps
        finish_stage(workdir, "finetune", time.perf_counter() - t0, best=best, steps=steps)
    return finetuned_head(workdir, det.head_params)


def finetuned_head_path(workdir: str) -> str:
    """Where fine-tuning keeps the head params of its best validation step."""
    return os.path.join(workdir, "finetune", "best.msgpack")


def finetuned_head(workdir: str, template: Any) -> Any | None:
    """The fine-tuned head params of the run in ``workdir`` (:func:`finetuned_head_path`),
    in the structure of ``template``; None if it has none."""
    import flax.serialization

    path = finetuned_head_path(workdir)
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return flax.serialization.from_bytes(template, f.read())


# --------------------------------------------------------------------------------------
# SVMs and box regression.
# --------------------------------------------------------------------------------------


def _pool(det: Detector, maps, split: Split, i: int, boxes: np.ndarray) -> np.ndarray:
    """Pooled conv5 features of ``boxes`` in ``split``'s image ``i`` (``maps``: its
    maps per scale, per image)."""
    return det.pool([m[i] for m in maps], det.scales(len(maps)), boxes, split.sizes[i])


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
    k = det.num_classes

    def fc7(i, boxes):
        return det.head_outputs(_pool(det, maps, train, i, boxes), head_params)[1]

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

    settings = config.svm.to_dict()  # HardNegativeMiner's settings and feature_norm
    scale = svm.feature_scale(positives[0], settings.pop("feature_norm"))
    svms = svm.train_svms(positives, negatives(), k, feature_scale=scale, **settings)
    svms.save(path)
    finish_stage(workdir, name, time.perf_counter() - t0)
    return svms


def stage_bbox(config, workdir: str, det: Detector, train, props, maps):
    """Per-class ridge box regressors on pooled conv5 features of the train split."""
    path = os.path.join(workdir, "bbox.npz")
    if stage_done(workdir, "bbox") is not None:
        return bbox_regression.BoxRegressors.load(path)
    t0 = time.perf_counter()
    pooled_of = functools.partial(_pool, det, maps, train)
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
    finish_stage(workdir, "bbox", time.perf_counter() - t0, counts=np.asarray(acc.counts).tolist())
    return regressors
