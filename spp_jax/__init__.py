"""spp_jax: Spatial Pyramid Pooling (He et al., SPP-net, arXiv 1406.4729) for JAX.

The core (:func:`spatial_pyramid_pool`, :func:`pyramid_bins`, :func:`output_dim`)
imports no Flax. Imported on first use: the Flax wrappers :mod:`spp_jax.linen` and
:mod:`spp_jax.nnx`, the paper's networks :mod:`spp_jax.models`, torchvision's AlexNet
and VGG-16 weights :mod:`spp_jax.pretrained`, and (with the
``train`` extra) the input pipeline :mod:`spp_jax.data`, the training loop
:mod:`spp_jax.train` with its configs :mod:`spp_jax.configs` and metric files
:mod:`spp_jax.metrics`, feature extraction :mod:`spp_jax.extract` and the
built-in dataset :mod:`spp_jax.datasets`.
"""

from __future__ import annotations

import importlib
from typing import Any

from spp_jax.align import ps_roi_align, ps_roi_pool, roi_align
from spp_jax.geometry import LevelBins, axis_bins, output_dim, pyramid_bins
from spp_jax.pooling import max_pool2d, pool_output_size, spatial_pyramid_pool
from spp_jax.roi import (
    multiscale_roi_pyramid_pool,
    project_boxes,
    roi_pyramid_pool,
    select_scales,
)

__version__ = "0.1.0"

# Imported on first use (Flax and TensorFlow only when a module that needs them is asked for).
_LAZY_SUBMODULES = (
    "configs",
    "data",
    "datasets",
    "detection",
    "extract",
    "linen",
    "metrics",
    "models",
    "nnx",
    "pretrained",
    "train",
)

__all__ = [
    "LevelBins",
    "axis_bins",
    "max_pool2d",
    "multiscale_roi_pyramid_pool",
    "output_dim",
    "pool_output_size",
    "project_boxes",
    "ps_roi_align",
    "ps_roi_pool",
    "pyramid_bins",
    "roi_align",
    "roi_pyramid_pool",
    "select_scales",
    "spatial_pyramid_pool",
    *_LAZY_SUBMODULES,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"spp_jax.{name}")
    raise AttributeError(f"module 'spp_jax' has no attribute {name!r}")
