"""SPP-net object detection: boxes, NMS, VOC evaluation, proposals, data.

Boxes are ``(x1, y1, x2, y2)`` floats in continuous pixel edges (no "+1";
``docs/detection-reference.md`` section 1). ``import spp_jax.detection`` needs
neither TensorFlow nor OpenCV: the modules that do (proposals, VOC input) import
them on first use.

Modules: :mod:`~spp_jax.detection.boxes` (IoU, clipping, R-CNN box coding),
:mod:`~spp_jax.detection.box_ops` (torchvision's box formats, GIoU, DIoU, CIoU and their
losses, ``remove_small_boxes``, ``masks_to_boxes``),
:mod:`~spp_jax.detection.fpn` (torchvision's ``MultiScaleRoIAlign``: RoIAlign from a
feature pyramid, FPN level mapping),
:mod:`~spp_jax.detection.suppression` (jit-able ``nms``, ``batched_nms``
and ``multiclass_nms``),
:mod:`~spp_jax.detection.evaluation` (the VOC devkit's AP and mAP),
:mod:`~spp_jax.detection.proposals` (selective search, cached per dataset split),
:mod:`~spp_jax.detection.voc` (VOC 2007 input), :mod:`~spp_jax.detection.features` (conv5 once
per image and scale, windows pooled from it), :mod:`~spp_jax.detection.svm` (linear SVMs with
hard-negative mining, liblinear), :mod:`~spp_jax.detection.bbox_regression` (per-class ridge
box regression).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "box_iou": "boxes",
    "clip_boxes": "boxes",
    "decode_boxes": "boxes",
    "encode_boxes": "boxes",
    "box_convert": "box_ops",
    "complete_box_iou": "box_ops",
    "complete_box_iou_loss": "box_ops",
    "distance_box_iou": "box_ops",
    "distance_box_iou_loss": "box_ops",
    "generalized_box_iou": "box_ops",
    "generalized_box_iou_loss": "box_ops",
    "masks_to_boxes": "box_ops",
    "remove_small_boxes": "box_ops",
    "fpn_levels": "fpn",
    "fpn_scales": "fpn",
    "multiscale_roi_align": "fpn",
    "batched_nms": "suppression",
    "multiclass_nms": "suppression",
    "nms": "suppression",
    "evaluate_detections": "evaluation",
    "voc_ap": "evaluation",
    "selective_search": "proposals",
    "ClassStats": "svm",
    "HardNegativeMiner": "svm",
    "SVMs": "svm",
    "feature_scale": "svm",
    "fit_linear_svm": "svm",
    "svm_objective": "svm",
    "train_svms": "svm",
    "BoxRegressors": "bbox_regression",
    "RidgeAccumulator": "bbox_regression",
    "fit_box_regressors": "bbox_regression",
    "match_proposals": "bbox_regression",
    "Conv5Extractor": "features",
    "WindowPooler": "features",
    "assign_scales": "features",
}
_SUBMODULES = (
    "bbox_regression",
    "box_ops",
    "boxes",
    "evaluation",
    "features",
    "fpn",
    "proposals",
    "suppression",
    "svm",
    "voc",
)

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    # Submodules load on first use, so OpenCV and TensorFlow stay out until needed.
    if name in _SUBMODULES:
        return importlib.import_module(f"spp_jax.detection.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"spp_jax.detection.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'spp_jax.detection' has no attribute {name!r}")
