"""Flax linen wrappers around :func:`spp_jax.spatial_pyramid_pool` and the RoI ops."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from spp_jax.align import (
    OutputSize,
    _check_sampling_ratio,
    _output_size,
    ps_roi_align,
    ps_roi_pool,
    roi_align,
)
from spp_jax.geometry import normalize_levels
from spp_jax.pooling import check_options, spatial_pyramid_pool
from spp_jax.roi import _check_spatial_scale, check_projection, roi_pyramid_pool

__all__ = ["PSRoIAlign", "PSRoIPool", "RoIAlign", "RoIPyramidPooling", "SpatialPyramidPooling"]


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


class RoIAlign(nn.Module):
    """RoIAlign layer (no parameters).

    Called as ``layer(features, boxes, box_indices=None, valid=None)`` ->
    ``(R, oh, ow, C)`` (NHWC). See :func:`spp_jax.roi_align`.

    Example:
      >>> import jax.numpy as jnp
      >>> layer = RoIAlign(output_size=7, spatial_scale=1 / 16, sampling_ratio=2)
      >>> layer.apply({}, jnp.ones((1, 20, 30, 8)), jnp.array([[0.0, 0.0, 64.0, 96.0]])).shape
      (1, 7, 7, 8)
    """

    output_size: OutputSize
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    aligned: bool = False
    data_format: str = "NHWC"

    def __post_init__(self):
        object.__setattr__(self, "output_size", _check_align(self))
        super().__post_init__()

    def __call__(self, features, boxes, box_indices=None, valid=None) -> jax.Array:
        return _apply_roi_op(roi_align, self, features, boxes, box_indices, valid)


class PSRoIAlign(nn.Module):
    """Position-sensitive RoIAlign layer (no parameters).

    Called as ``layer(features, boxes, box_indices=None, valid=None)`` ->
    ``(R, oh, ow, C // (oh * ow))`` (NHWC). See :func:`spp_jax.ps_roi_align`.
    """

    output_size: OutputSize
    spatial_scale: float = 1.0
    sampling_ratio: int = -1
    data_format: str = "NHWC"

    def __post_init__(self):
        object.__setattr__(self, "output_size", _check_align(self))
        super().__post_init__()

    def __call__(self, features, boxes, box_indices=None, valid=None) -> jax.Array:
        return _apply_roi_op(ps_roi_align, self, features, boxes, box_indices, valid)


class PSRoIPool(nn.Module):
    """Position-sensitive RoI pooling layer (no parameters).

    Called as ``layer(features, boxes, box_indices=None, valid=None)`` ->
    ``(R, oh, ow, C // (oh * ow))`` (NHWC). See :func:`spp_jax.ps_roi_pool`.
    """

    output_size: OutputSize
    spatial_scale: float = 1.0
    data_format: str = "NHWC"

    def __post_init__(self):
        object.__setattr__(self, "output_size", _check_align(self))
        super().__post_init__()

    def __call__(self, features, boxes, box_indices=None, valid=None) -> jax.Array:
        return _apply_roi_op(ps_roi_pool, self, features, boxes, box_indices, valid)


def _check_align(layer: Any) -> tuple[int, int]:
    """Checks a RoI layer's options (of this module or of :mod:`spp_jax.nnx`), raising
    naming a bad one at construction rather than at first call, and returns its
    ``output_size`` as a pair (hashable)."""
    check_options("avg", "adaptive", layer.data_format)
    _check_spatial_scale(layer.spatial_scale)
    if hasattr(layer, "sampling_ratio"):
        _check_sampling_ratio(layer.sampling_ratio)
    return _output_size(layer.output_size)


_ROI_OPTIONS = ("output_size", "spatial_scale", "sampling_ratio", "aligned", "data_format")


def _apply_roi_op(op: Any, layer: Any, features, boxes, box_indices, valid) -> jax.Array:
    """``op`` (:func:`roi_align`, :func:`ps_roi_align` or :func:`ps_roi_pool`) with the
    options a layer of this module or of :mod:`spp_jax.nnx` holds."""
    options = {k: getattr(layer, k) for k in _ROI_OPTIONS if hasattr(layer, k)}
    return op(features, boxes, box_indices, valid=valid, **options)


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
