"""Fine-tuning fc6, fc7 and a new (K+1)-way fc8 on windows pooled from cached conv5 maps.

SPP-net fine-tunes only the fully connected layers, the conv layers frozen
(paper section 4; ``docs/detection-reference.md`` section 4): batches of 128
windows, 25 % foreground, drawn across all training images (:class:`WindowSampler`).
Here every image's conv5 maps (per scale, optionally of the mirrored image too)
stay in memory as one zero-padded :class:`MapStack` per scale, and each step
(:func:`make_step`) pools its 128 windows from them inside the jitted step
(:func:`pool_stacks`), so no pooled window is ever stored (the official code cached
every window's pooled features: gigabytes).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax.detection.boxes import box_iou
from spp_jax.detection.features import ScaledMap, pad_maps, pool_windows, with_context
from spp_jax.geometry import LevelsLike
from spp_jax.models import MLPHead


class MapStack(NamedTuple):
    """The conv5 maps of many images at one scale, zero-padded to one shape.

    Attributes:
      maps: float32 ``(N, Hb, Wb, C)``, each padded beyond its size by repeating its edge.
      sizes: int32 ``(N, 2)``, each map's valid ``(h5, w5)``.
      factors: float32 ``(N, 2)``, ``(fy, fx)`` resized pixels per original pixel.
    """

    maps: jax.Array
    sizes: jax.Array
    factors: jax.Array


def stack_maps(scaled: Sequence[ScaledMap]) -> MapStack:
    """Stacks one scale's maps of many images, each padded to the largest by
    :func:`~spp_jax.detection.features.pad_maps`."""
    if not scaled:
        raise ValueError("stack_maps needs at least one map")
    hb = max(m.fmap.shape[0] for m in scaled)
    wb = max(m.fmap.shape[1] for m in scaled)
    maps = np.stack([pad_maps(m.fmap, hb, wb) for m in scaled])
    sizes = np.asarray([m.fmap.shape[:2] for m in scaled], np.int32)
    factors = np.asarray([m.factor for m in scaled], np.float32)
    return MapStack(jnp.asarray(maps), jnp.asarray(sizes), jnp.asarray(factors))


def pool_stacks(
    stacks: Sequence[MapStack],
    boxes: jax.Array,
    image_index: jax.Array,
    scale_index: jax.Array,
    *,
    levels: LevelsLike,
    stride: int,
    valid: jax.Array | None = None,
    channel_major: bool = False,
    mode: str = "max",
) -> jax.Array:
    """Pools each window from its image's map at its scale.

    Each window is scaled by its image's factors and pooled
    (:func:`~spp_jax.detection.features.pool_windows`) from that scale's stack, its
    other scales masked out, so the shapes are static inside the jitted step; with
    ``mode="max"``, :func:`spp_jax.multiscale_roi_pyramid_pool` on the stacks.

    Args:
      stacks: one :class:`MapStack` per scale (the same images in each).
      boxes: float32 ``(R, 4)`` in original-image pixels.
      image_index: int32 ``(R,)``, the window's image (row of the stacks).
      scale_index: int32 ``(R,)``, the window's scale.
      levels: the pyramid.
      stride: the trunk's total stride.
      valid: optional bool ``(R,)``; False rows give zeros.
      channel_major: each level flattened as ``(C, n_h, n_w)`` (PyTorch's order).
      mode: ``"max"`` (SPP-net's bins) or ``"align"`` (RoIAlign per level).

    Returns:
      float32 ``(R, C * sum(n_h * n_w))``, laid out as the detector's
      :class:`~spp_jax.detection.features.WindowPooler` with the same arguments.
    """
    pooled = []
    for k, st in enumerate(stacks):
        f = st.factors[image_index]
        at_scale = boxes * f[:, jnp.asarray([1, 0, 1, 0])]  # (fx, fy, fx, fy)
        here = scale_index == k
        if valid is not None:
            here = here & valid
        pooled.append(
            pool_windows(
                st.maps,
                at_scale,
                image_index,
                levels=levels,
                stride=stride,
                valid_sizes=st.sizes,
                valid=here,
                channel_major=channel_major,
                mode=mode,
            )
        )
    return functools.reduce(jnp.add, pooled)  # each window is non-zero at one scale only


@dataclasses.dataclass
class WindowSampler:
    """The training windows of a split and seeded batches of them.

    Foreground: ground-truth boxes and proposals whose max IoU with a ground truth is
    at least ``fg_iou``, labelled with that ground truth's class + 1; background:
    proposals with max IoU in ``[bg_iou_low, bg_iou_high)``, label 0.

    Args:
      proposals: per image, float32 ``(n_i, 4)``.
      gt_boxes: per image, ``(m_i, 4)``.
      gt_labels: per image, ``(m_i,)`` ints in ``[0, K)``.
      image_sizes: per image, ``(H, W)``.
    """

    proposals: Sequence[np.ndarray]
    gt_boxes: Sequence[np.ndarray]
    gt_labels: Sequence[np.ndarray]
    image_sizes: Sequence[tuple[int, int]]
    fg_iou: float = 0.5
    bg_iou_low: float = 0.1
    bg_iou_high: float = 0.5

    def __post_init__(self) -> None:
        n = len(self.proposals)
        if not (len(self.gt_boxes) == len(self.gt_labels) == len(self.image_sizes) == n):
            raise ValueError(
                "proposals, gt_boxes, gt_labels and image_sizes need one entry per image"
            )
        fg: list[np.ndarray] = []
        bg: list[np.ndarray] = []
        for i in range(n):
            gt = np.asarray(self.gt_boxes[i], np.float32).reshape(-1, 4)
            labels = np.asarray(self.gt_labels[i], np.int32).reshape(-1)
            props = np.asarray(self.proposals[i], np.float32).reshape(-1, 4)
            boxes = np.concatenate([gt, props])
            if len(gt):
                iou = np.asarray(box_iou(jnp.asarray(boxes), jnp.asarray(gt)))
                best, arg = iou.max(1), iou.argmax(1)
            else:
                best, arg = np.zeros(len(boxes), np.float32), np.zeros(len(boxes), np.int64)
            is_fg = best >= self.fg_iou
            is_bg = (best >= self.bg_iou_low) & (best < self.bg_iou_high)
            for mask, label in ((is_fg, labels[arg] + 1 if len(gt) else None), (is_bg, None)):
                idx = np.flatnonzero(mask)
                rows = np.empty((len(idx), 6), np.float32)
                rows[:, 0] = i
                rows[:, 1:5] = boxes[idx]
                rows[:, 5] = 0 if label is None else label[idx]
                (fg if label is not None else bg).append(rows)
        self.foreground = np.concatenate(fg) if fg else np.zeros((0, 6), np.float32)
        self.background = np.concatenate(bg) if bg else np.zeros((0, 6), np.float32)
        if len(self.foreground) == 0 or len(self.background) == 0:
            raise ValueError(
                f"no training windows: {len(self.foreground)} foreground (IoU >= {self.fg_iou}) "
                f"and {len(self.background)} background (IoU in [{self.bg_iou_low}, "
                f"{self.bg_iou_high})); check the ground truth and proposals"
            )

    def sample(
        self,
        rng: np.random.Generator,
        batch_size: int = 128,
        fg_fraction: float = 0.25,
        *,
        num_scales: int = 1,
        scale_of: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        random_scale: bool = False,
        flip: bool = False,
        context: float = 1.0,
    ) -> dict[str, np.ndarray]:
        """A batch: ``boxes (B, 4)``, ``image (B,)``, ``scale (B,)``, ``label (B,)``.

        ``scale_of(image_index, boxes)`` gives each window's scale (the test-time
        rule) unless ``random_scale``; with ``flip`` half the windows (at random) are
        mirrored: their image index is ``i + N`` (the stacks hold the mirrored
        images after the originals) and the box is mirrored.
        """
        n_fg = min(round(batch_size * fg_fraction), len(self.foreground))
        fg = self.foreground[rng.integers(0, len(self.foreground), n_fg)]
        bg = self.background[rng.integers(0, len(self.background), batch_size - n_fg)]
        rows = np.concatenate([fg, bg])
        image = rows[:, 0].astype(np.int32)
        boxes = with_context(rows[:, 1:5], context)
        if random_scale:
            scale = rng.integers(0, num_scales, len(rows)).astype(np.int32)
        elif scale_of is not None:
            scale = scale_of(image, boxes).astype(np.int32)
        else:
            scale = np.zeros(len(rows), np.int32)
        if flip:
            mirror = rng.random(len(rows)) < 0.5
            widths = np.asarray([self.image_sizes[i][1] for i in image], np.float32)
            x1 = np.where(mirror, widths - boxes[:, 2], boxes[:, 0])
            x2 = np.where(mirror, widths - boxes[:, 0], boxes[:, 2])
            boxes[:, 0], boxes[:, 2] = x1, x2
            image = np.where(mirror, image + len(self.image_sizes), image).astype(np.int32)
        return {
            "boxes": boxes,
            "image": image,
            "scale": scale,
            "label": rows[:, 5].astype(np.int32),
        }


class HeadState(NamedTuple):
    """The fine-tuning state: head parameters, optimiser state, step, dropout key."""

    params: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


def make_step(
    head: MLPHead,
    tx: optax.GradientTransformation,
    *,
    levels: LevelsLike,
    stride: int,
    channel_major: bool = False,
    mode: str = "max",
) -> Callable[[HeadState, Sequence[MapStack], dict[str, jax.Array]], tuple[HeadState, dict]]:
    """The jitted fine-tuning step: pool the batch's windows (:func:`pool_stacks` with
    ``levels``, ``stride``, ``channel_major`` and ``mode``), softmax loss, update."""
    from spp_jax.train import cross_entropy

    @functools.partial(jax.jit, donate_argnums=(0,))
    def step(state: HeadState, stacks, batch):
        feats = pool_stacks(
            stacks,
            batch["boxes"],
            batch["image"],
            batch["scale"],
            levels=levels,
            stride=stride,
            channel_major=channel_major,
            mode=mode,
        )
        key = jax.random.fold_in(state.key, state.step)

        def loss_fn(params):
            logits = head.apply({"params": params}, feats, train=True, rngs={"dropout": key})
            mask = jnp.ones(logits.shape[0], jnp.float32)
            return cross_entropy(logits, batch["label"], mask), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        new = HeadState(params, opt_state, state.step + 1, state.key)
        return new, {"loss": loss, "accuracy": accuracy}

    return step


@functools.partial(jax.jit, static_argnames=("head",))
def head_outputs(head: MLPHead, params: Any, feats: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(logits (R, K+1), fc7 (R, fc_dim))`` of pooled windows (eval mode)."""
    out = head.apply({"params": params}, feats, hidden=True)
    return cast(tuple[jax.Array, jax.Array], out)


def truncated_svd(params: Any, rank: int) -> dict[str, Any]:
    """Rank-``rank`` factors of fc6's and fc7's kernels (Fast R-CNN's test-time
    trick, beyond the paper): ``W (D, F) ~ (U_k * s_k) @ V_k^T``, so ``x @ W`` costs
    ``k * (D + F)`` instead of ``D * F`` multiply-adds per window. fc8 is kept whole.

    Returns:
      ``{"fc6": (A (D, k), B (k, F), b), "fc7": (...), "fc8": (W, b)}`` float32.
    """
    out: dict[str, Any] = {}
    for name in ("fc6", "fc7"):
        w = np.asarray(params[name]["kernel"], np.float64)
        if not 1 <= rank <= min(w.shape):
            raise ValueError(f"svd rank must be in [1, {min(w.shape)}] for {name}, got {rank!r}")
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        a = (u[:, :rank] * s[:rank]).astype(np.float32)
        out[name] = (jnp.asarray(a), jnp.asarray(vt[:rank].astype(np.float32)),
                     jnp.asarray(params[name]["bias"]))  # fmt: skip
    out["fc8"] = (jnp.asarray(params["fc8"]["kernel"]), jnp.asarray(params["fc8"]["bias"]))
    return out


@jax.jit
def svd_head_outputs(factors: dict[str, Any], feats: jax.Array) -> tuple[jax.Array, jax.Array]:
    """:func:`head_outputs` with fc6/fc7 as :func:`truncated_svd` factors (eval mode)."""
    x = feats
    for name in ("fc6", "fc7"):
        a, b, bias = factors[name]
        x = jax.nn.relu((x @ a) @ b + bias[None, :])
    w, bias = factors["fc8"]
    return x @ w + bias[None, :], x
