"""SPP-net object detection: boxes, NMS, VOC evaluation, proposals, data.

Boxes are ``(x1, y1, x2, y2)`` floats in continuous pixel edges (no "+1";
``docs/detection-reference.md`` section 1). ``import spp_jax.detection`` needs
neither TensorFlow nor OpenCV: the modules that do (proposals, VOC input) import
them on first use.

``docs/layout.md`` says what each module holds; the package exports their main
functions lazily (``from spp_jax.detection import box_iou, nms, train_svms``).
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
