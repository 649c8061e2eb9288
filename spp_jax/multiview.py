"""Multi-view testing on the feature map (SPP-net, He et al. 2014, section 3.1.2).

At test time SPP-net computes the conv5 map ONCE per image (and once for its mirror
image), maps each test view (a square window on the image) onto that map, pools the
window with spatial pyramid pooling and runs fc6-fc8 on the pooled vector; the
softmax scores of the views are averaged. The baseline it replaces crops the same
views from the image and runs the WHOLE network on each crop.

Views (:func:`view_boxes`), for an ``h x w`` image and ``s x s`` views:

* ``views=1``: the centre view;
* ``views=10`` (the standard 10-view test): centre and the 4 corners, each also
  flipped horizontally;
* ``views=18`` (the paper's 18 views per scale, ILSVRC 2014 entry): centre, 4
  corners and the centres of the 4 edges, each also flipped.

A flipped view is the mirror of the window's crop; on the feature map it is the
mirrored window on the conv5 map of the mirrored image, so both maps are computed
once per image and every view is a pooling window on one of them.

Window -> conv5 cells (``mapping``):

* ``"aligned"`` (the default): the view's ``s x s`` crop alone would give a conv5 map
  of ``m x m`` cells (``m = feature_map_size(arch, s, s)``). Every layer is
  shift-equivariant with the total stride ``S`` (16 for ZF-5, 12 for Overfeat), so
  a crop whose corner ``(x1, y1)`` lies on multiples of ``S`` has, away from its
  border, exactly the cells ``[x1 / S, x1 / S + m)`` x ``[y1 / S, y1 / S + m)`` of
  the whole image's map (checked in ``tests/test_multiview.py``). The window is
  those ``m x m`` cells, its corner rounded to the nearest cell (halves up) and
  shifted to stay inside the image's map. The whole image as a view is the whole
  map, i.e. exactly the network's full-image prediction.
* ``"paper"``: the paper's Appendix projection of the window's corners,
  ``floor(x1 / S) + 1`` and ``ceil(x2 / S) - 1``
  (:func:`spp_jax.roi.project_boxes`, ``projection="sppnet"``), calibrated for the
  paddings of the paper's Caffe networks. On this repository's trunks (ZF-5's conv5
  cell ``j`` is centred on pixel ``16 (j + 1)``) its windows start about one cell
  later than the crop's cells, and the whole image misses the map's first row and
  column.

Either way the window is pooled by :func:`spp_jax.roi_pyramid_pool`
(``projection="sppnet"``, the model's ``levels``) with the SPP head's bins, so the
pooled vector of a whole-map window equals the SPP head's output.

Where the two paths differ: a crop run alone sees zero padding at its border where
the feature map has the image around the view (the conv5 cells within about two
cells of the crop's border differ), its ceil-mode pools stop at the crop, and with
``center_input=True`` the crop is centred on its own mean colour rather than the
image's. The paper reports the two 10-view tests within 0.1 % (top-5 error) of
each other on ImageNet.

Test size (:func:`view_size_for`): like the full-image evaluation, the image's
short side is resized to ``size`` (the long side capped at ``max_aspect * size``);
the views have side ``round(size / resize_ratio)``, the training crop's share of the
image: at ``size = round(crop_size * resize_ratio)`` (128 for the default config,
256 in the paper) the views are ``crop_size`` squares, as the paper's 224 views
of 256 images.

Every jitted function compiles once per (padded image shape, number of views):
image sizes inside a padded bucket (``valid_sizes``) and view positions are traced.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax.models import MLPHead, SPPNet, feature_map_size
from spp_jax.roi import roi_pyramid_pool

log = logging.getLogger("spp_jax.multiview")

__all__ = [
    "MAPPINGS",
    "VIEW_COUNTS",
    "batch_view_boxes",
    "check_views",
    "evaluate_batches",
    "evaluate_multiview",
    "feature_map_view_probs",
    "has_flipped_views",
    "multiview_scores",
    "view_boxes",
    "view_size_for",
    "whole_net_view_probs",
]

#: Accepted numbers of views: the centre alone, the standard 10-view test, the
#: paper's 18 views per scale.
VIEW_COUNTS = (1, 10, 18)
#: How a view window maps onto conv5 cells (module docstring).
MAPPINGS = ("aligned", "paper")
METHODS = ("feature_map", "whole_net")

Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------------------
# View geometry: plain Python on static ints.
# --------------------------------------------------------------------------------------


def check_views(views: Any) -> None:
    """Raises a ValueError naming ``views`` unless it is one of :data:`VIEW_COUNTS`."""
    if isinstance(views, bool) or views not in VIEW_COUNTS:
        raise ValueError(
            f"views must be one of {', '.join(map(str, VIEW_COUNTS))} (the centre view; "
            f"centre + 4 corners, each also flipped; centre + 4 corners + 4 edge centres, "
            f"each also flipped), got {views!r}"
        )


def _check_mapping(mapping: str) -> None:
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown mapping {mapping!r}; accepted: {', '.join(map(repr, MAPPINGS))}")


def _check_head(head: str, where: str = "") -> None:
    """Raises a ValueError unless ``head`` is ``"spp"`` (``where``: whose head it is)."""
    if head != "spp":
        raise ValueError(
            f'multi-view testing on the feature map needs head="spp" (its pyramid pools a '
            f"window of any size), got head={head!r}{where}"
        )


def has_flipped_views(views: int) -> bool:
    """Whether ``views`` includes the mirrored views (10 and 18 do, 1 does not)."""
    check_views(views)
    return views > 1


def view_boxes(h: int, w: int, view_size: int, views: int = 10) -> tuple[Box, ...]:
    """The unflipped view windows of an ``h x w`` image, as pixel boxes.

    Each box is ``(x1, y1, x2, y2)`` with ``x2 = x1 + view_size`` and
    ``y2 = y1 + view_size``: the crop ``image[y1:y2, x1:x2]``. Centred positions use
    ``(w - view_size) // 2`` (and the same for rows), as the centre crop of
    :func:`spp_jax.data.eval_batches`. Order:

    - 0: centre;
    - 1-4: the top-left, top-right, bottom-left and bottom-right corners (10 and 18
      views);
    - 5-8: the top, bottom, left and right edge centres (18 views).

    ``views`` counts the flipped views too (10 = these 5 windows and their 5
    mirrors, 18 = 9 + 9; :func:`has_flipped_views`): the mirror of window ``k`` is view
    ``len(boxes) + k`` of the jitted functions. Windows may coincide (e.g. when
    ``view_size == min(h, w)``); they are kept, so every image has the same number
    of views.

    Args:
      h: image height in pixels.
      w: image width in pixels.
      view_size: side of the square views, at most ``min(h, w)``.
      views: 1, 10 or 18 (:data:`VIEW_COUNTS`).

    Returns:
      A tuple of 1, 5 or 9 boxes (ints).

    Raises:
      ValueError: ``views`` is not accepted, or ``view_size`` is not a positive int
        at most ``min(h, w)``.

    >>> view_boxes(4, 6, 2, 10)
    ((2, 1, 4, 3), (0, 0, 2, 2), (4, 0, 6, 2), (0, 2, 2, 4), (4, 2, 6, 4))
    >>> view_boxes(4, 6, 2, 18)[5:]
    ((2, 0, 4, 2), (2, 2, 4, 4), (0, 1, 2, 3), (4, 1, 6, 3))
    """
    check_views(views)
    for name, v in (("h", h), ("w", w), ("view_size", view_size)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if view_size > min(h, w):
        raise ValueError(f"view_size {view_size} does not fit in a {h}x{w} image")
    return _view_boxes(int(h), int(w), int(view_size), int(views))


@functools.lru_cache(maxsize=4096)
def _view_boxes(h: int, w: int, s: int, views: int) -> tuple[Box, ...]:
    """:func:`view_boxes` on checked ints."""
    right, bottom = w - s, h - s
    cx, cy = right // 2, bottom // 2
    corners = [(cx, cy)]
    if views >= 10:
        corners += [(0, 0), (right, 0), (0, bottom), (right, bottom)]
    if views >= 18:
        corners += [(cx, 0), (cx, bottom), (0, cy), (right, cy)]
    return tuple((x, y, x + s, y + s) for x, y in corners)


def batch_view_boxes(
    valid_sizes: np.ndarray, view_size: int, views: int = 10, mask: np.ndarray | None = None
) -> np.ndarray:
    """:func:`view_boxes` of every image of a batch: int32 ``(B, P, 4)``.

    Args:
      valid_sizes: ``(B, 2)`` ints, each image's ``(h, w)``.
      view_size: side of the views.
      views: 1, 10 or 18.
      mask: optional ``(B,)``; rows with ``mask == 0`` (batch filler) get the
        top-left window, whatever their size.

    >>> batch_view_boxes(np.array([[4, 6]]), 2, 1).tolist()
    [[[2, 1, 4, 3]]]
    """
    sizes = np.asarray(valid_sizes).reshape(-1, 2)
    p = len(view_boxes(view_size, view_size, view_size, views))
    out = np.tile(np.asarray([0, 0, view_size, view_size], np.int32), (len(sizes), p, 1))
    for i, (h, w) in enumerate(sizes.tolist()):
        if mask is None or mask[i]:
            out[i] = view_boxes(int(h), int(w), view_size, views)
    return out


def view_size_for(size: int, resize_ratio: float) -> int:
    """Side of the views at test size ``size`` (the image's short side).

    ``min(size, round(size / resize_ratio))``: the training crop's share of the
    short side (training cuts ``crop_size`` squares from images whose short side
    is ``crop_size * resize_ratio``).

    >>> view_size_for(256, 256 / 224), view_size_for(128, 256 / 224)
    (224, 112)
    """
    if not resize_ratio > 0:
        raise ValueError(f"resize_ratio must be positive, got {resize_ratio!r}")
    return min(int(size), round(size / resize_ratio))


# --------------------------------------------------------------------------------------
# The jitted paths.
# --------------------------------------------------------------------------------------


def _full_sizes(images: jax.Array, valid_sizes: jax.Array | None) -> jax.Array:
    b, h, w, _ = images.shape
    if valid_sizes is None:
        return jnp.tile(jnp.asarray([[h, w]], jnp.int32), (b, 1))
    return jnp.clip(jnp.asarray(valid_sizes, jnp.int32), 1, jnp.asarray([[h, w]], jnp.int32))


def _mirror(images: jax.Array, sizes: jax.Array) -> jax.Array:
    """Each image mirrored left-right within its valid width (padding stays right)."""
    w = images.shape[2]
    cols = jnp.arange(w, dtype=jnp.int32)

    def one(image, width):
        src = jnp.where(cols < width, width - 1 - cols, cols)
        return jnp.take(image, src, axis=1)

    return jax.vmap(one)(images, sizes[:, 1])


def _mirror_boxes(boxes: jax.Array, widths: jax.Array) -> jax.Array:
    """``(B, P, 4)`` boxes mirrored in images of widths ``(B,)``."""
    wd = widths[:, None]
    x1, y1, x2, y2 = (boxes[..., i] for i in range(4))
    return jnp.stack([wd - x2, y1, wd - x1, y2], axis=-1)


def _aligned_cells(
    boxes: jax.Array, map_sizes: jax.Array, m: tuple[int, int], stride: int
) -> jax.Array:
    """Inclusive conv5 cells ``(x1', y1', x2', y2')`` of ``(R, 4)`` pixel views by the
    ``"aligned"`` mapping (module docstring) on maps whose valid sizes are ``(R, 2)``."""
    h5, w5 = map_sizes[:, 0], map_sizes[:, 1]
    mh, mw = m
    left = (2 * boxes[:, 0] + stride) // (2 * stride)  # nearest cell, halves up
    top = (2 * boxes[:, 1] + stride) // (2 * stride)
    left = jnp.clip(left, 0, jnp.maximum(w5 - mw, 0))
    top = jnp.clip(top, 0, jnp.maximum(h5 - mh, 0))
    right = jnp.minimum(left + mw - 1, w5 - 1)
    bottom = jnp.minimum(top + mh - 1, h5 - 1)
    return jnp.stack([left, top, right, bottom], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "view_size", "flip", "mapping"))
def feature_map_view_probs(
    model: SPPNet,
    params: Any,
    images: jax.Array,
    boxes: jax.Array,
    valid_sizes: jax.Array | None = None,
    *,
    view_size: int,
    flip: bool,
    mapping: str = "aligned",
) -> jax.Array:
    """Softmax of every view, pooled from conv5 computed once per image (and mirror).

    Runs ``model``'s conv trunk on the images (and, with ``flip``, on their
    mirrors: one batch of ``2B``), maps every view window onto its image's conv5
    map (``mapping``, module docstring), pools it with
    :func:`spp_jax.roi_pyramid_pool` (``projection="sppnet"``, ``model.levels``)
    and runs fc6-fc8 on the pooled vectors.

    Args:
      model: a ``head="spp"`` :class:`spp_jax.models.SPPNet` (static).
      params: its parameters (``conv*`` and ``fc6``, ``fc7``, ``fc8``).
      images: ``(B, H, W, C)`` float, zero-padded to a bucket.
      boxes: ``(B, P, 4)`` int view windows ``(x1, y1, x1 + view_size,
        y1 + view_size)`` inside each image (:func:`batch_view_boxes`).
      valid_sizes: optional ``(B, 2)`` ints, each image's ``(h, w)`` (default the
        whole ``H x W``).
      view_size: side of the views (static).
      flip: add the mirrored views (static).
      mapping: ``"aligned"`` or ``"paper"`` (static).

    Returns:
      float32 ``(B, V, num_classes)`` probabilities, ``V = P`` or ``2P`` with
      flip: the ``P`` windows, then their mirrors.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> net = SPPNet(width=0.125, fc_dim=16, num_classes=3, depth=0.34, levels=(2, 1))
      >>> x = jnp.ones((1, 80, 96, 3))
      >>> params = net.init(jax.random.key(0), x)["params"]
      >>> boxes = batch_view_boxes(np.array([[80, 96]]), 64, 10)
      >>> feature_map_view_probs(net, params, x, boxes, view_size=64, flip=True).shape
      (1, 10, 3)
    """
    _check_head(model.head)
    _check_mapping(mapping)
    b = images.shape[0]
    p = boxes.shape[1]
    sizes = _full_sizes(images, valid_sizes)
    boxes = jnp.asarray(boxes, jnp.int32)
    x, all_sizes, all_boxes = images, sizes, boxes
    if flip:
        x = jnp.concatenate([images, _mirror(images, sizes)])
        all_sizes = jnp.concatenate([sizes, sizes])
        all_boxes = jnp.concatenate([boxes, _mirror_boxes(boxes, sizes[:, 1])])
    conv = {k: v for k, v in params.items() if k.startswith("conv")}
    fc = {k: params[k] for k in ("fc6", "fc7", "fc8")}
    fmap, map_sizes = cast(
        tuple[jax.Array, jax.Array], model.conv_trunk.apply({"params": conv}, x, all_sizes)
    )
    n_maps = x.shape[0]
    stride = model.conv_trunk.total_stride
    windows = all_boxes.reshape(-1, 4)
    if mapping == "aligned":
        m = feature_map_size(model.arch, view_size, view_size)
        windows = _aligned_cells(windows, jnp.repeat(map_sizes, p, axis=0), m, stride)
    pooled = roi_pyramid_pool(
        fmap,
        windows,
        jnp.repeat(jnp.arange(n_maps, dtype=jnp.int32), p),
        levels=model.levels,
        spatial_scale=1 / stride,
        projection="sppnet",
        valid_sizes=map_sizes,
        projected=mapping == "aligned",
    )
    head = MLPHead(model.num_classes, model.fc_dim, model.dropout_rate, model.dtype)
    logits = head.apply({"params": fc}, pooled)
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1).reshape(n_maps, p, -1)
    if flip:
        probs = jnp.concatenate([probs[:b], probs[b:]], axis=1)
    return probs


@functools.partial(jax.jit, static_argnames=("model", "view_size", "flip"))
def whole_net_view_probs(
    model: SPPNet,
    params: Any,
    images: jax.Array,
    boxes: jax.Array,
    *,
    view_size: int,
    flip: bool,
) -> jax.Array:
    """Softmax of every view, each view's crop run through the whole network.

    The baseline of :func:`feature_map_view_probs`: the same ``(B, P)`` windows
    cropped from the images (and, with ``flip``, mirrored), all ``B * V`` crops
    of ``view_size x view_size`` batched through ``model.apply``. Each crop is its
    own example: it gives what the network gives on that crop alone.

    Args:
      model: a :class:`spp_jax.models.SPPNet` (static).
      params: its parameters.
      images: ``(B, H, W, C)`` float.
      boxes: ``(B, P, 4)`` int windows inside each image's valid region.
      view_size: side of the views (static).
      flip: add the mirrored crops (static).

    Returns:
      float32 ``(B, V, num_classes)``, views ordered as in
      :func:`feature_map_view_probs`.
    """
    b, _, _, c = images.shape
    s = view_size
    boxes = jnp.asarray(boxes, jnp.int32)

    def crop(image, box):
        return lax.dynamic_slice(image, (box[1], box[0], jnp.int32(0)), (s, s, c))

    crops = jax.vmap(jax.vmap(crop, in_axes=(None, 0)))(images, boxes)  # (B, P, s, s, C)
    if flip:
        crops = jnp.concatenate([crops, crops[:, :, :, ::-1]], axis=1)
    logits = model.apply({"params": params}, crops.reshape(-1, s, s, c))
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1).reshape(b, crops.shape[1], -1)


def multiview_scores(
    model: SPPNet,
    params: Any,
    images: Any,
    valid_sizes: Any = None,
    *,
    view_size: int,
    views: int = 10,
    method: str = "feature_map",
    mapping: str = "aligned",
    per_view: bool = False,
) -> jax.Array:
    """Multi-view softmax scores of a batch of images, averaged over the views.

    Host wrapper: the view windows come from :func:`view_boxes` on each image's
    (concrete) size, then :func:`feature_map_view_probs` or
    :func:`whole_net_view_probs` runs.

    Args:
      model: a ``head="spp"`` :class:`spp_jax.models.SPPNet`.
      params: its parameters.
      images: ``(B, H, W, C)`` float, zero-padded if ``valid_sizes`` is given.
      valid_sizes: optional ``(B, 2)`` ints (NumPy or concrete arrays).
      view_size: side of the square views, at most each image's short side.
      views: 1, 10 or 18 (:data:`VIEW_COUNTS`).
      method: ``"feature_map"`` (conv5 once per image) or ``"whole_net"`` (one
        forward pass per view crop).
      mapping: ``"aligned"`` or ``"paper"`` (feature map only).
      per_view: return ``(B, V, K)`` per-view probabilities instead of the mean.

    Returns:
      float32 ``(B, num_classes)`` mean probabilities (or ``(B, V, K)``).

    Raises:
      ValueError: ``views``, ``method`` or ``mapping`` not accepted, a head other
        than ``"spp"``, or a view larger than an image.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> net = SPPNet(width=0.125, fc_dim=16, num_classes=3, depth=0.34, levels=(2, 1))
      >>> x = jnp.ones((2, 80, 96, 3))
      >>> params = net.init(jax.random.key(0), x)["params"]
      >>> multiview_scores(net, params, x, view_size=64, views=10).shape
      (2, 3)
    """
    _check_head(model.head)
    check_views(views)
    _check_mapping(mapping)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(map(repr, METHODS))}")
    b, h, w, _ = images.shape
    sizes = np.tile([[h, w]], (b, 1)) if valid_sizes is None else np.asarray(valid_sizes)
    boxes = batch_view_boxes(sizes, view_size, views)
    if method == "feature_map":
        probs = feature_map_view_probs(
            model,
            params,
            images,
            boxes,
            None if valid_sizes is None else sizes.astype(np.int32),
            view_size=view_size,
            flip=has_flipped_views(views),
            mapping=mapping,
        )
    else:
        probs = whole_net_view_probs(
            model, params, images, boxes, view_size=view_size, flip=has_flipped_views(views)
        )
    return probs if per_view else jnp.mean(probs, axis=1)


# --------------------------------------------------------------------------------------
# Evaluation.
# --------------------------------------------------------------------------------------


def _topk_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    k = min(k, probs.shape[-1])
    top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return np.any(top == labels[:, None], axis=-1)


@dataclasses.dataclass
class _PathStats:
    """Running sums of one path of :func:`evaluate_batches`."""

    top1: int = 0
    top5: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    shapes: set[tuple[int, ...]] = dataclasses.field(default_factory=set)

    def timed(self, run: Callable[[], jax.Array], shape: tuple[int, ...]) -> np.ndarray:
        """``run()``, timed into ``seconds``; the first call per batch ``shape`` runs it
        once before, untimed but for ``compile_seconds``."""
        if shape not in self.shapes:
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            self.compile_seconds += time.perf_counter() - t0
            self.shapes.add(shape)
        t0 = time.perf_counter()
        probs = jax.block_until_ready(run())
        self.seconds += time.perf_counter() - t0
        return np.asarray(probs)

    def count_hits(self, mean_probs: np.ndarray, labels: np.ndarray) -> None:
        self.top1 += int(_topk_hits(mean_probs, labels, 1).sum())
        self.top5 += int(_topk_hits(mean_probs, labels, 5).sum())

    def summary(self, count: int) -> dict[str, Any]:
        """The path's entry of :func:`evaluate_batches`'s result over ``count`` images."""
        return {
            "top1": self.top1 / count,
            "top5": self.top5 / count,
            "seconds_per_image": self.seconds / count,
            "compile_seconds": self.compile_seconds,
            "programs": len(self.shapes),
        }


def _batch_views(
    batch: dict[str, np.ndarray], view_size: int, views: int, mask: np.ndarray
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A batch's images, view windows (:func:`batch_view_boxes`) and valid sizes."""
    images = jnp.asarray(batch["image"])
    b, h, w, _ = images.shape
    sizes = np.asarray(batch.get("valid_sizes", np.tile([[h, w]], (b, 1))), np.int32)
    boxes = jnp.asarray(batch_view_boxes(sizes, view_size, views, mask))
    return images, boxes, jnp.asarray(sizes)


def evaluate_batches(
    model: SPPNet,
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    *,
    view_size: int,
    views: int = 10,
    compare_whole_net: bool = False,
    mapping: str = "aligned",
    limit: int | None = None,
) -> dict[str, Any]:
    """Multi-view accuracy and time per image over batches of padded images.

    Args:
      model: a ``head="spp"`` :class:`spp_jax.models.SPPNet`.
      params: its parameters.
      batches: dicts of NumPy arrays as :func:`spp_jax.data.eval_batches` yields in
        ``"full"`` mode: ``image (B, H, W, C)``, ``label (B,)``, ``mask (B,)`` and
        optionally ``valid_sizes (B, 2)``.
      view_size: side of the views (:func:`view_size_for`).
      views: 1, 10 or 18.
      compare_whole_net: also run :func:`whole_net_view_probs` on the same views.
      mapping: the feature map's window mapping.
      limit: stop after this many images (``mask`` 1 rows).

    Returns:
      ``{"views", "view_size", "count", "feature_map": {...}}`` and, when
      comparing, ``"whole_net": {...}``, ``"agreement"`` (fraction of images whose
      top-1 class is the same both ways) and ``"max_abs_diff"`` (largest difference
      of an averaged probability). Each path: ``top1``, ``top5``,
      ``seconds_per_image`` (the jitted computation only, after a first untimed
      call per batch shape), ``compile_seconds`` (those first calls) and
      ``programs`` (batch shapes compiled).

    Raises:
      ValueError: as :func:`multiview_scores`.
    """
    _check_head(model.head)
    check_views(views)
    _check_mapping(mapping)
    flip = has_flipped_views(views)
    paths = ["feature_map"] + (["whole_net"] if compare_whole_net else [])
    stats = {name: _PathStats() for name in paths}
    count, agree, max_diff = 0, 0, 0.0

    def run(name, images, boxes, sizes):
        if name == "feature_map":
            return feature_map_view_probs(
                model, params, images, boxes, sizes, view_size=view_size, flip=flip, mapping=mapping
            )
        return whole_net_view_probs(model, params, images, boxes, view_size=view_size, flip=flip)

    for batch in batches:
        mask = np.asarray(batch["mask"]) > 0
        if limit is not None:
            mask &= np.cumsum(mask) <= limit - count
        if not mask.any():
            if limit is not None and count >= limit:
                break
            continue
        images, boxes, sizes = _batch_views(batch, view_size, views, mask)
        labels = np.asarray(batch["label"])[mask]
        means = {}
        for name in paths:
            probs = stats[name].timed(
                functools.partial(run, name, images, boxes, sizes), images.shape
            )
            means[name] = probs.mean(axis=1)[mask]
            stats[name].count_hits(means[name], labels)
        count += int(mask.sum())
        if compare_whole_net:
            fm, wn = means["feature_map"], means["whole_net"]
            agree += int((fm.argmax(-1) == wn.argmax(-1)).sum())
            max_diff = max(max_diff, float(np.abs(fm - wn).max()))
        if limit is not None and count >= limit:
            break

    n = max(count, 1)
    out: dict[str, Any] = {"views": views, "view_size": view_size, "count": count}
    for name in paths:
        out[name] = stats[name].summary(n)
    if compare_whole_net:
        out["agreement"] = agree / n
        out["max_abs_diff"] = max_diff
    return out


def evaluate_multiview(
    workdir: str,
    sizes: Sequence[int] | None = None,
    *,
    views: int = 10,
    compare_whole_net: bool = False,
    mapping: str = "aligned",
    limit: int | None = None,
    batch_size: int = 16,
) -> dict[str, dict[str, Any]]:
    """``spp-jax eval --views N``: multi-view accuracy of a workdir's latest checkpoint.

    The images of the config's eval split are prepared as for the full-image
    evaluation (:func:`spp_jax.data.eval_batches`, ``mode="full"``: short side
    ``size``, aspect kept, padded to aspect buckets), the views have side
    :func:`view_size_for` ``(size, config.resize_ratio)``, and
    :func:`evaluate_batches` scores them on the feature map (and, with
    ``compare_whole_net``, crop by crop through the whole network).

    Args:
      workdir: a training workdir (``config.json``, ``checkpoints/``).
      sizes: test sizes (short sides); default ``round(crop_size * resize_ratio)``,
        where the views are ``crop_size`` squares (the paper: 256 and 224).
      views: 1, 10 or 18.
      compare_whole_net: also run the whole-network baseline.
      mapping: ``"aligned"`` or ``"paper"``.
      limit: at most this many images per size (the first the pipeline yields).
      batch_size: images per batch.

    Returns:
      ``{str(size): evaluate_batches(...) result}``.

    Raises:
      ValueError: ``views`` not accepted or the model's head is not ``"spp"``.
      FileNotFoundError: not a training workdir, or no checkpoint.
    """
    from spp_jax import data as data_lib
    from spp_jax import train, workdirs

    check_views(views)
    _check_mapping(mapping)
    _check_head(workdirs.read_config(workdir).model.head, f" in {workdir}")
    trained = workdirs.load_trained(workdir)
    config, model = trained.config, trained.model
    if sizes is None:
        sizes = (round(config.crop_size * config.resize_ratio),)
    builder, info = train.load_dataset(config)
    params = jax.device_put(trained.params)
    out: dict[str, dict[str, Any]] = {}
    for size in sizes:
        vs = view_size_for(size, config.resize_ratio)
        batches = data_lib.eval_batches(
            builder,
            info,
            split=config.eval_split,
            mode="full",
            size=size,
            local_batch_size=batch_size,
            resize_ratio=config.resize_ratio,
            max_aspect=config.max_aspect,
            bucket_steps=config.full_image_bucket_steps,
        )
        out[str(size)] = evaluate_batches(
            model,
            params,
            batches,
            view_size=vs,
            views=views,
            compare_whole_net=compare_whole_net,
            mapping=mapping,
            limit=limit,
        )
    log.info(
        "%d-view test accuracy (top-1) at step %d:\n%s", views, trained.step, format_table(out)
    )
    return out


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A text table of :func:`evaluate_multiview` results.

    >>> r = {"128": {"view_size": 112, "count": 2,
    ...              "feature_map": {"top1": 0.5, "seconds_per_image": 0.001}}}
    >>> print(format_table(r))
      size  view  images  feature map  s/image  whole net  s/image
       128   112       2       0.5000   0.0010        n/a      n/a
    """
    lines = ["  size  view  images  feature map  s/image  whole net  s/image"]
    for size, r in results.items():
        fm = r["feature_map"]
        wn = r.get("whole_net")
        whole = f"{wn['top1']:9.4f}  {wn['seconds_per_image']:7.4f}" if wn else "      n/a      n/a"
        lines.append(
            f"  {size:>4}  {r['view_size']:>4}  {r['count']:>6}  {fm['top1']:11.4f}  "
            f"{fm['seconds_per_image']:7.4f}  {whole}"
        )
    return "\n".join(lines)


#: Exported names of the previous version: what replaces each, and what it still gives.
_PREVIOUS_NAMES = {
    "evaluate_workdir": ("evaluate_multiview", evaluate_multiview),
    "flips": ("has_flipped_views", has_flipped_views),
    "total_stride": ("model.conv_trunk.total_stride", lambda model: model.conv_trunk.total_stride),
}


def __getattr__(name: str) -> Any:
    # The previous version's exported names keep working, with a DeprecationWarning.
    if name not in _PREVIOUS_NAMES:
        raise AttributeError(f"module 'spp_jax.multiview' has no attribute {name!r}")
    now, value = _PREVIOUS_NAMES[name]
    warnings.warn(f"spp_jax.multiview.{name} is now {now}", DeprecationWarning, stacklevel=2)
    return value
