"""Detection features: conv5 once per image and scale, every window pooled from it.

SPP-net's detection (paper section 4) runs the conv layers once per image (per
scale), :class:`Conv5Extractor`, and pools each window's fixed-length pyramid
vector from that map, :class:`WindowPooler` (:func:`pool_windows`: max-pooled bins,
:func:`spp_jax.roi_pyramid_pool` with ``projection="sppnet"``, the paper's Appendix;
or, as an ablation, RoIAlign at each level's size), at the scale
:func:`assign_scales` picks. Nothing here holds more than one image's windows:
fine-tuning, the SVMs and box regression pool what they need from the cached maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax._padding import pad_rows, round_up
from spp_jax.align import roi_align
from spp_jax.geometry import LevelsLike, normalize_levels
from spp_jax.models import ConvTrunk
from spp_jax.roi import roi_pyramid_pool, select_scales

#: Each window's scale index: :func:`spp_jax.select_scales` under its detection name.
assign_scales = select_scales

#: How a window becomes its pyramid vector (the detection config's ``window_pool``).
WINDOW_POOLS = ("max", "align")
#: Bilinear samples per bin side for ``window_pool="align"`` (Mask R-CNN's).
ALIGN_SAMPLING_RATIO = 2


def pad_maps(fmap: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(h, w, C)`` -> ``(height, width, C)`` float32, padded by repeating the last row
    and column: what :func:`pool_windows` expects beyond a map's valid region (max
    pooling never reads it; RoIAlign's last half cell does)."""
    h, w = fmap.shape[:2]
    pad = ((0, height - h), (0, width - w), (0, 0))
    return np.pad(np.asarray(fmap, np.float32), pad, mode="edge")


def pool_windows(
    fmaps: jax.Array,
    boxes: jax.Array,
    box_indices: jax.Array | None = None,
    *,
    levels: LevelsLike,
    stride: int,
    valid_sizes: jax.Array,
    valid: jax.Array | None = None,
    channel_major: bool = False,
    mode: str = "max",
) -> jax.Array:
    """Each window's pyramid vector from its map: ``(R, C * sum(n_h * n_w))``.

    ``mode="max"``: SPP-net's max-pooled bins (:func:`spp_jax.roi_pyramid_pool`, the
    paper's projection onto the map's valid region). ``mode="align"``: each level as
    :func:`spp_jax.roi_align` of that level's size (``aligned=True``,
    :data:`ALIGN_SAMPLING_RATIO` samples per bin side, the average of bilinear samples
    rather than the maximum of whole cells), the window first clipped to the map's
    valid region; samples in its last half cell read the padding, so the maps must be
    padded by repeating their edge (:func:`pad_maps`), which makes the result that of
    the unpadded map (torchvision reads the edge cell there). Either way each level is
    flattened ``(n_h, n_w, C)``, or ``(C, n_h, n_w)`` with ``channel_major``, and the
    levels are concatenated: the same vector layout, so one fc6 takes both.

    Args:
      fmaps: ``(B, H, W, C)`` conv5 maps, padded beyond ``valid_sizes`` by
        :func:`pad_maps`.
      boxes: float ``(R, 4)`` ``(x1, y1, x2, y2)`` in the resized image's pixels.
      box_indices: ``(R,)`` int, each window's map (default all 0).
      levels: the pyramid.
      stride: the trunk's total stride (pixels per conv5 cell).
      valid_sizes: int ``(B, 2)``, each map's valid ``(h, w)`` in cells.
      valid: optional ``(R,)`` bool; False rows are padding: zeros.
      channel_major: flatten each level channel-first (PyTorch's order).
      mode: one of :data:`WINDOW_POOLS`.

    Example:
      >>> import jax.numpy as jnp
      >>> fmap = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 4, 2)
      >>> boxes = jnp.array([[0.0, 0.0, 63.0, 47.0]])
      >>> sizes = jnp.array([[3, 4], [3, 4]])
      >>> pool_windows(fmap, boxes, levels=(2, 1), stride=16, valid_sizes=sizes).shape
      (1, 10)
      >>> pool_windows(fmap, boxes, levels=(2, 1), stride=16, valid_sizes=sizes,
      ...              mode="align").shape
      (1, 10)
    """
    levels = normalize_levels(levels)
    if mode == "max":
        return roi_pyramid_pool(
            fmaps,
            boxes,
            box_indices,
            levels=levels,
            spatial_scale=1 / float(stride),
            projection="sppnet",
            valid=valid,
            valid_sizes=valid_sizes,
            channel_major=channel_major,
        )
    if mode != "align":
        raise ValueError(f"window pooling mode must be one of {WINDOW_POOLS}, got {mode!r}")
    idx = jnp.zeros(boxes.shape[0], jnp.int32) if box_indices is None else box_indices
    h, w = (jnp.asarray(valid_sizes, jnp.float32)[idx] * stride).T
    upper = jnp.stack([w, h, w, h], axis=-1)
    clipped = jnp.clip(boxes, 0.0, upper)
    per_level = []
    for n_h, n_w in levels:
        pooled = roi_align(
            fmaps,
            clipped,
            idx,
            output_size=(n_h, n_w),
            spatial_scale=1 / float(stride),
            sampling_ratio=ALIGN_SAMPLING_RATIO,
            aligned=True,
            valid=valid,
        )
        if channel_major:
            pooled = pooled.transpose(0, 3, 1, 2)
        per_level.append(pooled.reshape(boxes.shape[0], -1))
    return jnp.concatenate(per_level, axis=-1)


def resized_size(
    image_size: tuple[int, int], scale: int, max_side: int | None = None
) -> tuple[int, int]:
    """``(h, w)`` of an image resized so its shorter side is ``scale`` (rounded), the
    longer side at most ``max_side`` (then the shorter side is below ``scale``).

    >>> resized_size((375, 500), 688), resized_size((375, 500), 1200, max_side=1000)
    ((688, 917), (750, 1000))
    """
    h, w = image_size
    if min(h, w) < 1:
        raise ValueError(f"image size must be positive, got {image_size!r}")
    if not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be a positive int (the shorter side), got {scale!r}")
    f = scale / min(h, w)
    if max_side is not None and max(h, w) * f > max_side:
        f = max_side / max(h, w)
    return max(1, round(h * f)), max(1, round(w * f))


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> float32 ``(h, w, 3)``, normalised as the classifier's input
    (:data:`spp_jax.data.MEAN_RGB`, :data:`~spp_jax.data.STDDEV_RGB`).

    OpenCV: bilinear (half-pixel centres, as ``tf.image.resize``) when enlarging, pixel
    area averaging when shrinking (the antialiasing of the training pipeline's TF
    resize), much faster per image than TensorFlow eager.
    """
    import cv2

    from spp_jax.data import MEAN_RGB, STDDEV_RGB

    h, w = size
    shrink = h < image.shape[0] or w < image.shape[1]
    x = cv2.resize(
        np.ascontiguousarray(image),
        (w, h),
        interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR,
    ).astype(np.float32)
    return (x - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STDDEV_RGB, np.float32)


def with_context(boxes: np.ndarray, factor: float) -> np.ndarray:
    """Each window enlarged ``factor`` times about its centre (1: unchanged). Parts
    outside the image are clamped away when the window is projected onto the map.

    >>> with_context(np.array([[10.0, 20.0, 30.0, 60.0]]), 2.0).tolist()
    [[0.0, 0.0, 40.0, 80.0]]
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    if factor == 1:
        return boxes
    if not factor > 0:
        raise ValueError(f"window context factor must be positive, got {factor!r}")
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ScaledMap:
    """The conv5 map of one image at one scale.

    Attributes:
      fmap: float32 ``(h5, w5, C)``, the valid region only.
      factor: ``(fy, fx)``: resized pixels per original pixel (a window's
        coordinates at this scale are ``y * fy``, ``x * fx``).
      size: ``(h, w)`` of the resized image.
    """

    fmap: np.ndarray
    factor: tuple[float, float]
    size: tuple[int, int]


class Conv5Extractor:
    """conv5 of an image at a scale: resize, normalise, run the trunk (jitted per
    ``bucket``-rounded size: a padded image's map equals the unpadded one's on its
    valid region).

    Args:
      trunk: the backbone's :class:`~spp_jax.models.ConvTrunk`.
      params: its parameters (``conv1`` ... ``convN``).
      bucket: padded sizes are multiples of this (one compile per padded size).
      max_side: the cap on the resized image's longer side (documented memory cap).

    Example:
      >>> import jax, numpy as np
      >>> from spp_jax.models import ConvTrunk
      >>> trunk = ConvTrunk(width=0.125)
      >>> params = trunk.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))["params"]
      >>> m = Conv5Extractor(trunk, params, bucket=32)(np.zeros((50, 70, 3), np.uint8), 96)
      >>> m.size, m.fmap.shape
      ((96, 134), (5, 7, 32))
    """

    def __init__(self, trunk: ConvTrunk, params: Any, *, bucket: int = 64, max_side: int = 2000):
        self.trunk, self.params, self.bucket, self.max_side = trunk, params, bucket, max_side

        @jax.jit
        def run(params, x, sizes):
            return trunk.apply({"params": params}, x, sizes)

        self._run = run

    def __call__(self, image: np.ndarray, scale: int, *, flip: bool = False) -> ScaledMap:
        """``image``: uint8 ``(H, W, 3)``; ``flip``: mirror it left-right first."""
        h0, w0 = image.shape[:2]
        h, w = resized_size((h0, w0), scale, self.max_side)
        x = resize(image[:, ::-1] if flip else image, (h, w))
        hb, wb = round_up(h, self.bucket), round_up(w, self.bucket)
        padded = np.zeros((1, hb, wb, 3), np.float32)
        padded[0, :h, :w] = x
        fmap, sizes = self._run(self.params, padded, np.asarray([[h, w]], np.int32))
        h5, w5 = (int(v) for v in np.asarray(sizes)[0])
        return ScaledMap(np.asarray(fmap)[0, :h5, :w5], (h / h0, w / w0), (h, w))


class WindowPooler:
    """Pools windows from one image's maps: ``(R, C * sum(n_h * n_w))`` float32.

    Args:
      levels: the pyramid, e.g. ``(6, 3, 2, 1)``.
      stride: the trunk's total stride (:attr:`~spp_jax.models.ConvTrunk.total_stride`).
      map_bucket: maps are zero-padded to multiples of this (cells).
      window_bucket: window counts are padded to multiples of this.
      channel_major: flatten each level as ``(C, n_h, n_w)`` (PyTorch's order, which
        an imported torchvision fc6 expects) rather than ``(n_h, n_w, C)``.
      mode: ``"max"`` (SPP-net's bins) or ``"align"`` (RoIAlign per level):
        :func:`pool_windows`.
    """

    def __init__(
        self,
        levels: LevelsLike = (6, 3, 2, 1),
        stride: int = 16,
        *,
        map_bucket: int = 8,
        window_bucket: int = 256,
        channel_major: bool = False,
        mode: str = "max",
    ):
        if mode not in WINDOW_POOLS:
            raise ValueError(f"window pooling mode must be one of {WINDOW_POOLS}, got {mode!r}")
        self.levels = normalize_levels(levels)
        self.stride, self.map_bucket, self.window_bucket = stride, map_bucket, window_bucket
        self.channel_major, self.mode = bool(channel_major), mode

        @jax.jit
        def pool(fmap, boxes, valid, hw):
            # The map is padded to a bucket; the windows are projected onto its valid
            # region (hw, traced: no recompile per size).
            return pool_windows(
                fmap[None],
                boxes,
                levels=self.levels,
                stride=stride,
                valid=valid,
                valid_sizes=hw[None],
                channel_major=self.channel_major,
                mode=mode,
            )

        self._pool = pool

    def output_dim(self, channels: int) -> int:
        return channels * sum(h * w for h, w in self.levels)

    def pool(self, scaled: ScaledMap, boxes: np.ndarray) -> np.ndarray:
        """Pools ``boxes`` (original-image pixels) from one scale's map."""
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        r = len(boxes)
        h5, w5, c = scaled.fmap.shape
        if r == 0:
            return np.zeros((0, self.output_dim(c)), np.float32)
        fy, fx = scaled.factor
        at_scale = boxes * np.asarray([fx, fy, fx, fy], np.float32)
        rb = round_up(r, self.window_bucket)
        padded_boxes = pad_rows(at_scale, rb)
        valid = np.arange(rb) < r
        hb, wb = round_up(h5, self.map_bucket), round_up(w5, self.map_bucket)
        fmap = pad_maps(scaled.fmap, hb, wb)
        out = self._pool(fmap, padded_boxes, valid, np.asarray([h5, w5], np.int32))
        return np.asarray(out)[:r]

    def pool_multiscale(
        self, maps: Sequence[ScaledMap], boxes: np.ndarray, scale_index: np.ndarray
    ) -> np.ndarray:
        """Pools each window from the map of its own scale (``scale_index``).

        The windows are grouped by scale on the host, so each is pooled once (the
        traced :func:`spp_jax.multiscale_roi_pyramid_pool` pools every window at
        every scale and masks, which costs a factor of the number of scales here).
        """
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        scale_index = np.asarray(scale_index).reshape(-1)
        c = maps[0].fmap.shape[-1]
        out = np.zeros((len(boxes), self.output_dim(c)), np.float32)
        for k, scaled in enumerate(maps):
            here = np.flatnonzero(scale_index == k)
            if len(here):
                out[here] = self.pool(scaled, boxes[here])
        return out
