"""Feature-pyramid RoIAlign: each box pooled from the pyramid level that suits its size.

:func:`multiscale_roi_align` equals ``torchvision.ops.MultiScaleRoIAlign``: a map's
scale is inferred from its size and the largest image (:func:`fpn_scales`), each box is
assigned a level by Eq. 1 of the FPN paper (:func:`fpn_levels`: a box of side
``canonical_scale`` goes to ``canonical_level``, one twice as large one level up), and
:func:`spp_jax.roi_align` (``aligned=False``) pools it from that level's map.

Shapes stay static: every box is pooled at every level, masked to its own (``valid``),
and the levels are summed, so the op composes with ``jit``, ``vmap`` and ``grad`` and new
boxes never recompile. The cost is that of :func:`~spp_jax.roi_align` on each map: for
the forward, whose reads grow with the samples, about one pooling of all boxes per level;
for derivatives, which grow with the map's area, about 4/3 of the finest map's cost for
a pyramid that halves at each level.

>>> import jax.numpy as jnp
>>> maps = [jnp.ones((1, 16, 16, 5)), jnp.ones((1, 8, 8, 5)), jnp.ones((1, 4, 4, 5))]
>>> fpn_scales([(16, 16), (8, 8), (4, 4)], [(128, 128)])
(0.125, 0.0625, 0.03125)
>>> boxes = jnp.array([[0.0, 0.0, 40.0, 40.0], [0.0, 0.0, 500.0, 500.0]])
>>> fpn_levels(boxes, 3, 5).tolist()
[0, 2]
>>> multiscale_roi_align(maps, boxes, None, [(128, 128)], output_size=3,
...                      sampling_ratio=2).shape
(2, 3, 3, 5)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax.align import OutputSize, roi_align
from spp_jax.detection.boxes import box_area
from spp_jax.pooling import as_nhwc, check_options
from spp_jax.roi import _check_boxes, _per_window

__all__ = ["fpn_levels", "fpn_scales", "multiscale_roi_align"]


def _int_pair(value: Any, name: str) -> tuple[int, int]:
    pair = tuple(value) if isinstance(value, Sequence | np.ndarray) else (value,)
    if len(pair) != 2 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1 for v in pair
    ):
        raise ValueError(f"{name} must be a pair (h, w) of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def _exponent(approx_scale: float) -> int:
    """``round(log2(approx_scale))`` as torchvision's ``_infer_scale`` rounds it: the
    logarithm of the float32 ratio, halves to even."""
    return int(np.round(np.log2(np.float32(approx_scale))))


def fpn_scales(
    map_sizes: Sequence[Sequence[int]], image_sizes: Sequence[Sequence[int]]
) -> tuple[float, ...]:
    """Each map's stride as a scale ``2 ** -k``, inferred as torchvision infers it.

    ``torchvision.ops.MultiScaleRoIAlign``'s ``_infer_scale``: the map's height over the
    largest image height, rounded to a power of two in log space (halves to even). The
    width is not used (torchvision computes its scale too and keeps the height's).

    Args:
      map_sizes: ``(h, w)`` of each feature map, finest first.
      image_sizes: ``(h, w)`` of each image (before the network); only the largest
        height and width count, as in torchvision.

    Returns:
      One scale per map (feature cells per image pixel), each a power of two.
    """
    maps = [_int_pair(s, "each of map_sizes") for s in map_sizes]
    images = [_int_pair(s, "each of image_sizes") for s in image_sizes]
    if not maps or not images:
        raise ValueError(
            f"fpn_scales needs at least one map and one image size, got {len(maps)} map "
            f"sizes and {len(images)} image sizes"
        )
    max_h = max(h for h, _ in images)
    return tuple(2.0 ** _exponent(h / max_h) for h, _ in maps)


def fpn_levels(
    boxes: jax.Array,
    k_min: int,
    k_max: int,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
) -> jax.Array:
    """Each box's pyramid level by Eq. 1 of the FPN paper, as an index into the maps.

    ``torchvision.ops.poolers.LevelMapper``: ``k = floor(canonical_level +
    log2(sqrt(area) / canonical_scale) + eps)`` in float32, clamped to
    ``[k_min, k_max]``, minus ``k_min``. A box with zero area goes to ``k_min``; one with a
    negative area (one side inverted) gets ``-1``, no level: torchvision's mapper turns
    its NaN into an index that matches no map, so such a box pools to zeros there too.

    The float32 formula is evaluated as written, so a box within a few roundings of a
    level boundary may land on the other side of it than in torchvision, whose CPU
    ``sqrt`` and ``log2`` are not correctly rounded (nor the same as on its GPUs);
    ``eps`` keeps boxes of side exactly ``canonical_scale * 2 ** j`` clear of that.

    Args:
      boxes: ``(R, 4)`` ``(x1, y1, x2, y2)`` in image pixels.
      k_min, k_max: the finest and the coarsest level (``-log2`` of their maps' scales).
      canonical_scale: the box side that maps to ``canonical_level`` (224: ImageNet).
      canonical_level: that box's level (4: ResNet's conv4).
      eps: added before the floor so that exact powers of two stay on their level.

    Returns:
      ``(R,)`` int32 in ``[0, k_max - k_min]``, or ``-1`` (negative area).
    """
    for name, v in (("k_min", k_min), ("k_max", k_max), ("canonical_level", canonical_level)):
        if not isinstance(v, int | np.integer) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int, got {v!r}")
    if k_min > k_max:
        raise ValueError(
            f"k_min must be <= k_max (levels run from the finest map to the coarsest), "
            f"got k_min={k_min}, k_max={k_max}"
        )
    if not (isinstance(canonical_scale, int | float | np.number) and canonical_scale > 0):
        raise ValueError(f"canonical_scale must be a positive number, got {canonical_scale!r}")
    boxes = lax.stop_gradient(_check_boxes(boxes))  # levels are piecewise constant
    s = jnp.sqrt(box_area(boxes))
    # s / canonical_scale divided for real: XLA would multiply by the rounded reciprocal
    ratio = s / lax.optimization_barrier(jnp.full_like(s, canonical_scale))
    level = jnp.floor(canonical_level + jnp.log2(ratio) + jnp.float32(eps))
    index = jnp.clip(level, k_min, k_max).astype(jnp.int32) - k_min
    return jnp.where(jnp.isnan(level), -1, index)


def multiscale_roi_align(
    features: Sequence[jax.Array],
    boxes: jax.Array,
    box_indices: jax.Array | None,
    image_sizes: Sequence[Sequence[int]],
    *,
    output_size: OutputSize,
    sampling_ratio: int,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    valid: jax.Array | None = None,
    data_format: str = "NHWC",
) -> jax.Array:
    """RoIAlign from a feature pyramid, each box from its own level.

    Equal to ``torchvision.ops.MultiScaleRoIAlign(names, output_size, sampling_ratio,
    canonical_scale=..., canonical_level=...)(maps, boxes_per_image, image_sizes)``: the
    maps' scales from :func:`fpn_scales`, the levels ``k_min = -log2(scales[0])`` to
    ``k_max = -log2(scales[-1])``, each box's level from :func:`fpn_levels` (with
    torchvision's ``eps = 1e-6``), and :func:`spp_jax.roi_align` with ``aligned=False``
    on that level's map. With one map every box is pooled from it (no level mapping),
    as in torchvision. A box with a negative area (one side inverted) gives zeros when
    there are several maps (torchvision's mapper gives it no level).

    Args:
      features: the pyramid's maps, finest first, each ``(B, H_l, W_l, C)`` (or
        ``(B, C, H_l, W_l)`` with ``data_format="NCHW"``), same ``B`` and ``C``.
      boxes: ``(R, 4)`` float ``(x1, y1, x2, y2)`` in image pixels (all images'
        boxes together; torchvision's per-image list concatenated).
      box_indices: ``(R,)`` int, each box's image (None: all 0).
      image_sizes: ``(h, w)`` of each image before the network, Python ints (static;
        they set the scales). Only the largest height counts, as in torchvision.
      output_size: ``oh`` (square) or ``(oh, ow)``.
      sampling_ratio: samples per bin side; ``<= 0``: adaptive, per box.
      canonical_scale, canonical_level: Eq. 1's ``224`` and ``k0 = 4``.
      valid: optional ``(R,)`` bool; False rows are padding: zeros, no gradient.
      data_format: ``"NHWC"`` or ``"NCHW"``.

    Returns:
      ``(R, oh, ow, C)`` (NHWC) or ``(R, C, oh, ow)`` (NCHW), in the first map's dtype.
    """
    check_options("avg", "adaptive", data_format)
    maps = list(features) if isinstance(features, Sequence) else None
    if not maps:
        raise ValueError(
            f"features must be a non-empty list of feature maps (finest first), got {features!r}"
        )
    nhwc = [as_nhwc(m, f"features[{i}]", data_format) for i, m in enumerate(maps)]
    if len({(x.shape[0], x.shape[3]) for x in nhwc}) != 1:
        raise ValueError(
            "every feature map must have the same batch size and channels, got "
            f"{[tuple(m.shape) for m in maps]} (data_format={data_format!r})"
        )
    scales = fpn_scales([x.shape[1:3] for x in nhwc], image_sizes)
    pool = functools.partial(
        roi_align,
        box_indices=box_indices,
        output_size=output_size,
        sampling_ratio=sampling_ratio,
        aligned=False,
        data_format=data_format,
    )
    if len(maps) == 1:
        return pool(maps[0], boxes, spatial_scale=scales[0], valid=valid)
    k_min, k_max = (round(-math.log2(scales[i])) for i in (0, -1))
    if k_min > k_max:
        raise ValueError(
            f"features must run from the finest map to the coarsest; their scales are {scales}"
        )
    level = fpn_levels(boxes, k_min, k_max, canonical_scale, canonical_level)
    live = jnp.ones(level.shape, bool)
    if valid is not None:
        live = jnp.asarray(_per_window(valid, "valid", level.shape[0]))
        if live.dtype != bool:
            raise TypeError(f"valid must be a bool array, got dtype {live.dtype}")
    pooled = [
        pool(m, boxes, spatial_scale=scale, valid=(level == i) & live).astype(maps[0].dtype)
        for i, (m, scale) in enumerate(zip(maps, scales, strict=True))
    ]
    return functools.reduce(jnp.add, pooled)  # each box is non-zero at one level only
