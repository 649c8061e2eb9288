"""Flax linen wrappers around :func:`spp_jax.spatial_pyramid_pool`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from spp_jax.geometry import normalize_levels
from spp_jax.pooling import check_options, spatial_pyramid_pool
from spp_jax.roi import check_projection, roi_pyramid_pool

__all__ = ["RoIPyramidPooling", "SpatialPyramidPooling"]


class SpatialPyramidPooling(nn.Module):
    """Spatial pyramid pooling layer (no parameters).

    Maps ``(B, H, W, C)`` (or ``(B, C, H, W)`` with ``data_format="NCHW"``) of any
    ``H, W`` to ``(B, C * sum(n_h * n_w))``. See :func:`spp_jax.spatial_pyramid_pool`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = SpatialPyramidPooling(levels=(4, 2, 1))
      >>> layer.apply({}, jnp.ones((2, 9, 11, 8))).shape  # 8 * (16 + 4 + 1)
      (2, 168)
    """

    levels: tuple = (6, 3, 2, 1)
    mode: str = "max"
    rule: str = "adaptive"
    data_format: str = "NHWC"
    channel_major: bool = False

    def __post_init__(self):
        # Fail at construction, naming the bad value, rather than at first call.
        object.__setattr__(self, "levels", normalize_levels(self.levels))
        check_options(self.mode, self.rule, self.data_format)
        super().__post_init__()

    def __call__(self, x: jax.Array, valid_sizes: jax.Array | None = None) -> jax.Array:
        return _pool_spp(self, x, valid_sizes)


class RoIPyramidPooling(nn.Module):
    """Window (RoI) pyramid pooling layer (no parameters).

    Called as ``layer(features, boxes, box_indices=None, valid=None)`` ->
    ``(R, C * sum(n_h * n_w))``. See :func:`spp_jax.roi_pyramid_pool`.
    """

    levels: tuple = (6, 3, 2, 1)
    spatial_scale: float = 1 / 16
    projection: str = "sppnet"
    mode: str = "max"
    data_format: str = "NHWC"
    channel_major: bool = False

    def __post_init__(self):
        object.__setattr__(self, "levels", normalize_levels(self.levels))
        check_options(self.mode, "adaptive", self.data_format)
        check_projection(self.projection)
        super().__post_init__()

    def __call__(self, features, boxes, box_indices=None, valid=None) -> jax.Array:
        return _pool_roi(self, features, boxes, box_indices, valid)


def _pool_spp(layer: Any, x: jax.Array, valid_sizes: jax.Array | None) -> jax.Array:
    """:func:`spatial_pyramid_pool` with the options of a layer of this module or of
    :mod:`spp_jax.nnx`."""
    return spatial_pyramid_pool(
        x,
        layer.levels,
        mode=layer.mode,
        rule=layer.rule,
        data_format=layer.data_format,
        valid_sizes=valid_sizes,
        channel_major=layer.channel_major,
    )


def _pool_roi(layer: Any, features, boxes, box_indices, valid) -> jax.Array:
    """:func:`roi_pyramid_pool` with the options of a layer of this module or of
    :mod:`spp_jax.nnx`."""
    return roi_pyramid_pool(
        features,
        boxes,
        box_indices,
        levels=layer.levels,
        spatial_scale=layer.spatial_scale,
        projection=layer.projection,
        mode=layer.mode,
        data_format=layer.data_format,
        valid=valid,
        channel_major=layer.channel_major,
    )
