"""spp_jax: Spatial Pyramid Pooling (He et al., SPP-net, arXiv 1406.4729) for JAX.

The core (:func:`spatial_pyramid_pool`, :func:`pyramid_bins`, :func:`output_dim`)
imports no Flax. The Flax wrappers live in :mod:`spp_jax.linen` and
:mod:`spp_jax.nnx`, imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from spp_jax.geometry import LevelBins, axis_bins, output_dim, pyramid_bins
from spp_jax.pooling import spatial_pyramid_pool
from spp_jax.roi import (
    multiscale_roi_pyramid_pool,
    project_boxes,
    roi_pyramid_pool,
    select_scales,
)

__version__ = "0.1.0"

__all__ = [
    "LevelBins",
    "axis_bins",
    "linen",
    "multiscale_roi_pyramid_pool",
    "nnx",
    "output_dim",
    "project_boxes",
    "pyramid_bins",
    "roi_pyramid_pool",
    "select_scales",
    "spatial_pyramid_pool",
]

_LAZY_SUBMODULES = ("linen", "nnx")


def __getattr__(name: str) -> Any:
    # Flax is imported only when a Flax wrapper is asked for.
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"spp_jax.{name}")
    raise AttributeError(f"module 'spp_jax' has no attribute {name!r}")
