"""Flax NNX wrappers around :func:`spp_jax.spatial_pyramid_pool` and the RoI ops."""

from __future__ import annotations

import jax
from flax import nnx

from spp_jax.align import OutputSize, ps_roi_align, ps_roi_pool, roi_align
from spp_jax.geometry import LevelsLike, normalize_levels
from spp_jax.linen import _apply_roi_op, _check_align, _pool_roi, _pool_spp
from spp_jax.pooling import check_options
from spp_jax.roi import check_projection

__all__ = ["PSRoIAlign", "PSRoIPool", "RoIAlign", "RoIPyramidPooling", "SpatialPyramidPooling"]


class SpatialPyramidPooling(nnx.Module):
    """:class:`spp_jax.linen.SpatialPyramidPooling` as an NNX module (no state).

    Example:
      >>> import jax.numpy as jnp
      >>> layer = SpatialPyramidPooling(levels=(4, 2, 1))
      >>> layer(jnp.ones((2, 9, 11, 8))).shape  # 8 * (16 + 4 + 1)
      (2, 168)
    """

    def __init__(
        self,
        levels: LevelsLike = (6, 3, 2, 1),
        *,
        mode: str = "max",
        rule: str = "adaptive",
        data_format: str = "NHWC",
        channel_major: bool = False,
    ):
        check_options(mode, rule, data_format)
        self.levels = normalize_levels(levels)
        self.mode = mode
        self.rule = rule
        self.data_format = data_format
        self.channel_major = bool(channel_major)

    def __call__(self, x: jax.Array, valid_sizes: jax.Array | None = None) -> jax.Array:
        return _pool_spp(self, x, valid_sizes)


class RoIPyramidPooling(nnx.Module):
    """:class:`spp_jax.linen.RoIPyramidPooling` as an NNX module (no state)."""

    def __init__(
        self,
        levels: LevelsLike = (6, 3, 2, 1),
        *,
        spatial_scale: float = 1 / 16,
        projection: str = "sppnet",
        mode: str = "max",
        data_format: str = "NHWC",
        channel_major: bool = False,
    ):
        check_options(mode, "adaptive", data_format)
        check_projection(projection)
        self.levels = normalize_levels(levels)
        self.spatial_scale = float(spatial_scale)
        self.projection = projection
        self.mode = mode
        self.data_format = data_format
        self.channel_major = bool(channel_major)

    def __call__(self, features, boxes, box_indices=None, valid=None) -> jax.Array:
        return _pool_roi(self, features, boxes, box_indices, valid)


class RoIAlign(nnx.Module):
    """:class:`spp_jax.linen.RoIAlign` as an NNX module (no state).

    Example:
      >>> import jax.numpy as jnp
      >>> layer = RoIAlign(7, spatial_scale=1 / 16, sampling_ratio=2)
      >>> layer(jnp.ones((1, 20, 30, 8)), jnp.array([[0.0, 0.0, 64.0, 96.0]])).shape
      (1, 7, 7, 8)
    """

    def __init__(
        self,
        output_size: OutputSize,
        *,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = False,
        data_format: str = "NHWC",
    ):
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = bool(aligned)
        self.data_format = data_format
        self.output_size = output_size
        self.output_size = _check_align(self)

    def __call__(self, features, boxes, box_indices=None, valid=None) -> jax.Array:
        return _apply_roi_op(roi_align, self, features, boxes, box_indices, valid)


class PSRoIAlign(nnx.Module):
    """:class:`spp_jax.linen.PSRoIAlign` as an NNX module (no state)."""

    def __init__(
        self,
        output_size: OutputSize,
        *,
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        data_format: str = "NHWC",
    ):
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.data_format = data_format
        self.output_size = output_size
        self.output_size = _check_align(self)

    def __call__(self, features, boxes, box_indices=None, valid=None) -> jax.Array:
        return _apply_roi_op(ps_roi_align, self, features, boxes, box_indices, valid)


class PSRoIPool(nnx.Module):
    """:class:`spp_jax.linen.PSRoIPool` as an NNX module (no state)."""

    def __init__(
        self,
        output_size: OutputSize,
        *,
        spatial_scale: float = 1.0,
        data_format: str = "NHWC",
    ):
        self.spatial_scale = spatial_scale
        self.data_format = data_format
        self.output_size = output_size
        self.output_size = _check_align(self)

    def __call__(self, features, boxes, box_indices=None, valid=None) -> jax.Array:
        return _apply_roi_op(ps_roi_pool, self, features, boxes, box_indices, valid)
