"""SPP-net's object detector end to end: ``spp-jax detect-train`` and what its workdir gives.

:func:`detect_train` runs (or resumes) the training stages of
:mod:`~spp_jax.detection.stages` in order (backbone, proposals, conv5 maps,
fine-tuning, SVMs, box regression: ``docs/detection.md`` says what each does), then
the test evaluation (:func:`stage_eval`). :func:`load_detector` and
:func:`evaluate_detector_workdir` read a finished run's workdir. The detector itself
is :mod:`~spp_jax.detection.detector`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import time
from collections.abc import Sequence
from typing import Any

from spp_jax import configs, workdirs
from spp_jax.detection import bbox_regression, stages, svm
from spp_jax.detection.detector import Detector

log = logging.getLogger("spp_jax")

VARIANTS = {  # name: (head, scorer, box regression)
    "fc7 + SVM, no fine-tuning": ("pretrained", "svm", False),
    "ft fc7 + SVM": ("finetuned", "svm", False),
    "ft fc7 + SVM + bbox": ("finetuned", "svm", True),
    "ft softmax": ("finetuned", "softmax", False),
}
MAIN_VARIANT = "ft fc7 + SVM + bbox"


# --------------------------------------------------------------------------------------
# The whole run.
# --------------------------------------------------------------------------------------


def _split_names(config) -> dict[str, str]:
    """The dataset split of each role (``"validation"`` is ``"val"``)."""
    names = {"train": config.train_split, "val": config.val_split, "test": config.test_split}
    return {**names, "validation": config.val_split}


def _stages_before_eval(config) -> list[str]:
    """The stages a finished run of ``config`` has recorded before ``eval``."""
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
    done = stages.stage_done(workdir, "eval")
    if done is not None and all(stages.stage_done(workdir, n) for n in _stages_before_eval(config)):
        # A finished run: the metrics it wrote, nothing recomputed.
        log.info("%s is a finished run (stages/eval.json); nothing to do", workdir)
        return done["metrics"]
    stages.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    t0 = time.perf_counter()
    det, pretrained = stages.build_detector(config, workdir)
    names = _split_names(config)
    data = {
        k: stages.load_split(config.dataset, names[k], config.data_dir)
        for k in ("train", "val", "test")
    }
    props = stages.stage_proposals(config, workdir, data)
    scales5 = det.scales(5)
    with stages.timed("conv5 maps of the training split") as t:
        train_maps = stages.split_maps(det, data["train"], scales5, flip=config.finetune.flip)
        val_maps = stages.split_maps(det, data["val"], det.scales(1))
    log.info(
        "conv5 maps of %d + %d images in %.1f s", len(data["train"]), len(data["val"]), t["seconds"]
    )
    n = len(data["train"])
    train_unflipped = [m[:n] for m in train_maps]
    if config.finetune.enabled:
        ft_maps = train_maps if config.finetune.scales == "all" else None
        det.head_params = stages.stage_finetune(
            config, workdir, det, data, props, val_maps, ft_maps
        )
    heads = {"pretrained": pretrained, "finetuned": det.head_params}
    train = (data["train"], props["train"], train_unflipped)
    svms = {
        "pretrained": stages.stage_svm(config, workdir, det, "svm_pretrained", pretrained, *train),
        "finetuned": stages.stage_svm(config, workdir, det, "svm", det.head_params, *train),
    }
    if config.bbox.enabled:
        det.regressors = stages.stage_bbox(
            config, workdir, det, data["train"], props["train"], train_unflipped
        )
    del train_maps, train_unflipped, train
    metrics = stage_eval(config, workdir, det, heads, svms, data["test"], props["test"])
    metrics["seconds_total"] = time.perf_counter() - t0
    metrics["proposals_seconds_per_image"] = (stages.stage_done(workdir, "proposals") or {}).get(
        "seconds_per_image"
    )
    # Peak resident memory of this process (Linux reports KiB).
    metrics["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    log.info("peak memory %.2f GiB", metrics["peak_memory_gib"])
    write_metrics(workdir, metrics)
    stages.finish_stage(workdir, "eval", metrics["seconds_total"], metrics=metrics)
    return metrics


def _variants(config, main_name: str) -> list[tuple]:
    """The test rows: ``(name, head, scorer, box regression, SVD rank or None)``."""
    variants = [(name, *v, None) for name, v in VARIANTS.items()]
    if config.test.svd_rank:
        rank = config.test.svd_rank
        variants.append((f"{main_name}, fc6/fc7 SVD rank {rank}", "finetuned", "svm", True, rank))
    return variants


def _row_name(variant: str, n: int) -> str:
    """A table row's name: the variant and its number of scales."""
    return f"{variant}, {n} scale{'s' if n > 1 else ''}"


def _ap_row(
    dets: Sequence[dict], split: stages.Split, k: int, seconds: dict[str, float]
) -> tuple[dict, dict, dict]:
    """The AP of detections ``dets`` of ``split``'s images, ``k`` classes.

    Returns:
      ``(row, aps, voc07)``: the AP table's row (:func:`~spp_jax.detection.report.ap_table`:
      ``map_voc07``, ``map_area``, ``ap_voc07``, and ``seconds_per_image``, each of
      ``seconds`` over the split's size); ``aps``: ``map_voc07``, ``map_area``,
      ``ap_voc07`` and ``ap_area``; ``voc07``: the VOC07 result
      (:func:`~spp_jax.detection.evaluation.evaluate_detections`).
    """
    res07 = stages.evaluate(dets, split, k, "voc07")
    res_area = stages.evaluate(dets, split, k, "area")
    aps = {
        "map_voc07": float(res07["map"]),
        "map_area": float(res_area["map"]),
        "ap_voc07": [float(a) for a in res07["ap"]],
        "ap_area": [float(a) for a in res_area["ap"]],
    }
    row = {key: aps[key] for key in ("map_voc07", "map_area", "ap_voc07")}
    row["seconds_per_image"] = {key: v / len(split) for key, v in seconds.items()}
    return row, aps, res07


def stage_eval(config, workdir, det: Detector, heads, svms, test: stages.Split, props) -> dict:
    """Every variant at 1 and 5 scales on the test split; per-stage seconds per image."""
    from spp_jax.detection import report

    table, main = {}, None
    main_name = MAIN_VARIANT if det.regressors is not None else "ft fc7 + SVM"
    for n in config.test.scales:
        with stages.timed(f"conv5 of the test split at {n} scale(s)") as t:
            maps = stages.split_maps(det, test, det.scales(n))
        for name, head_kind, scorer, regress, rank in _variants(config, main_name):
            if regress and det.regressors is None:
                continue
            det_v = dataclasses.replace(det, head_params=heads[head_kind], svms=svms.get(head_kind))
            det_v.extractor, det_v.pooler, det_v.stride = det.extractor, det.pooler, det.stride
            det_v.compress(rank)
            clock: dict[str, float] = {}
            dets = det_v.detect_all(
                test.images, props, maps=maps, num_scales=n, scorer=scorer, regress=regress,
                timings=clock,
            )  # fmt: skip
            seconds = {"conv": t["seconds"], **clock}
            row, aps, res07 = _ap_row(dets, test, det.num_classes, seconds)
            table[_row_name(name, n)] = row
            log.info("test %s, %d scale(s): mAP %.4f (VOC07), %.4f (area)",
                     name, n, row["map_voc07"], row["map_area"])  # fmt: skip
            if n == config.test.scales[0] and name == main_name:
                main = (name, n, aps, res07, dets)
    assert main is not None
    name, n, aps, res07, dets = main
    report.write_eval(workdir, table, res07, test, dets, det.config.test.draw_images)
    return {**aps, "main": f"{name}, {n} scale(s)", "table": table}


def write_metrics(workdir: str, metrics: dict) -> None:
    """Appends ``metrics`` as a line of ``WORKDIR/metrics.jsonl``."""
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

    config = load_run_config(workdir)
    if scorer is not None:
        config.test.scorer = scorer
    det, _ = stages.build_detector(config, workdir)
    finetuned = stages.finetuned_head(workdir, det.head_params)
    if finetuned is not None:
        det.head_params = finetuned
    name = "svm" if finetuned is not None else "svm_pretrained"
    if os.path.exists(os.path.join(workdir, f"{name}.npz")):
        det.svms = svm.SVMs.load(os.path.join(workdir, f"{name}.npz"))
    elif config.test.scorer == "svm":
        raise FileNotFoundError(f"{workdir}/{name}.npz not found: run detect-train to the end")
    if os.path.exists(os.path.join(workdir, "bbox.npz")):
        det.regressors = bbox_regression.BoxRegressors.load(os.path.join(workdir, "bbox.npz"))
    return det


def evaluate_detector_workdir(
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
    name = _split_names(config).get(split, split)
    data = stages.load_split(config.dataset, name, config.data_dir)
    if not len(data):
        raise ValueError(f"split {name!r} of {config.dataset!r} has no images")
    props = stages.workdir_proposals(config, workdir, data)
    pixels = det.scales(scales)
    clock: dict[str, float] = {}
    dets = det.detect_all(
        data.images, props, num_scales=scales, scorer=scorer, regress=regress, timings=clock
    )
    row, aps, _ = _ap_row(dets, data, det.num_classes, clock)
    finetuned = os.path.exists(stages.finetuned_head_path(workdir))
    variant = ("ft " if finetuned else "") + ("fc7 + SVM" if scorer == "svm" else "softmax")
    if regress and det.regressors is not None:
        variant += " + bbox"
    n = len(pixels)
    variant = _row_name(variant, n)
    out = os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}_{n}scale{'s' if n > 1 else ''}.md")
    what = f"on {config.dataset} {name} ({len(data)} images)"
    report.write_tables(path, what, {variant: row}, det.num_classes)
    return {
        **aps,
        "name": variant,
        "table": {variant: row},
        "split": name,
        "num_images": len(data),
        "scales": pixels,
        "report": path,
    }
