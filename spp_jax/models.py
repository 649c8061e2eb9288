"""The SPP-net classification networks (He et al., arXiv 1406.4729, Table 1) in Flax linen.

Four conv trunks, each followed by a spatial pyramid pooling head (``head="spp"``) or
by the paper's no-SPP baseline (``head="pool6"``). Every conv is followed by a ReLU;
"ceil" pools use Caffe's rounding (:func:`spp_jax.pooling.pool_output_size`), LRN is
:func:`local_response_norm`. Sizes are for a 224 x 224 input:

* ``"zf5"`` (ZF-5, total stride 16)::

    conv1 96x7x7 s2 pad 1, LRN, pool 3 s2 ceil   224 -> 110 -> 55
    conv2 256x5x5 s2 pad 1, LRN, pool 3 s2 ceil   55 -> 27 -> 13
    conv3 384x3x3, conv4 384x3x3, conv5 256x3x3 (pad 1)   13 -> 13

  (10 x 10 at a 180 input.)
* ``"convnet5"`` (Convnet*-5)::

    conv1 96x11x11 s4 pad 2, LRN                  224 -> 55
    conv2 256x5x5 pad 2, LRN, pool 3 s2 ceil      55 -> 27
    conv3 384x3x3 pad 1, pool 3 s2 ceil           27 -> 13
    conv4 384x3x3, conv5 256x3x3 (pad 1)          13 -> 13

* ``"overfeat5"`` / ``"overfeat7"`` (Overfeat-5/7, total stride 12)::

    conv1 96x7x7 s2 no pad, pool 3 s3 floor, LRN  224 -> 109 -> 36
    conv2 256x5x5 pad 2, pool 2 s2 floor          36 -> 18
    3 (overfeat5) or 5 (overfeat7) x 512x3x3 pad 1  18 -> 18

The paddings are the ones that give the paper's map sizes; they are pinned by tests.
Each architecture is a static tuple of layer specs (:func:`layer_specs`); the module
and the size arithmetic (:func:`feature_map_size`) both walk that tuple, so they
cannot disagree.

The network is built from parts: :class:`ConvTrunk` (images to the last conv map,
reusable on its own, e.g. for detection), a pooling head (:class:`SPPHead` or
:class:`Pool6Head`) and the classifier :class:`MLPHead` (fc6, fc7, fc8);
:class:`SPPNet` composes them with the parameter names of one flat tree.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spp_jax._cpu.conv import conv2d
from spp_jax.geometry import _check_positive_int, normalize_levels, output_dim
from spp_jax.linen import SpatialPyramidPooling
from spp_jax.pooling import _check_sizes, max_pool2d, pool_output_size

__all__ = [
    "ARCHS",
    "HEADS",
    "ConvSpec",
    "ConvTrunk",
    "LRNSpec",
    "MLPHead",
    "Pool6Head",
    "PoolSpec",
    "SPPHead",
    "SPPNet",
    "feature_map_size",
    "layer_specs",
    "local_response_norm",
    "pool6_window",
]

ARCHS = ("zf5", "convnet5", "overfeat5", "overfeat7")
HEADS = ("spp", "pool6")
POOL6_SIZE = 6


# --------------------------------------------------------------------------------------
# Layer specs: the one source of truth for the trunks.
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """A square conv followed by a ReLU: ``features`` maps, ``kernel`` x ``kernel``."""

    features: int
    kernel: int
    stride: int = 1
    pad: int = 0

    def out_size(self, n: Any) -> Any:
        """Output length of an axis of ``n`` cells (int or integer array):
        ``(n + 2 pad - kernel) // stride + 1``."""
        return (n + 2 * self.pad - self.kernel) // self.stride + 1


@dataclasses.dataclass(frozen=True)
class PoolSpec:
    """A square max pool; ``ceil=True`` is Caffe's ceil-mode rounding."""

    window: int
    stride: int
    ceil: bool = False

    def out_size(self, n: Any) -> Any:
        """Output length of an axis of ``n`` cells (int or integer array)."""
        return pool_output_size(n, self.window, self.stride, self.ceil)


@dataclasses.dataclass(frozen=True)
class LRNSpec:
    """Across-channel local response normalisation (:func:`local_response_norm`)."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 2.0

    def out_size(self, n: Any) -> Any:
        """LRN keeps the spatial size."""
        return n


LayerSpec = ConvSpec | PoolSpec | LRNSpec

# (stem, tail): the tail holds the 3x3 convs after conv2 (scaled by ``depth``) and
# the pools between them.
_C3 = 3  # kernel of the tail convs (all pad 1, stride 1: they keep the size)
# Overfeat-5 and -7 share conv1-conv2 (7x7 s2, pool 3 s3, LRN, 5x5, pool 2 s2: stride 12).
_OVERFEAT_STEM: tuple[LayerSpec, ...] = (
    ConvSpec(96, 7, 2, 0),
    PoolSpec(3, 3),
    LRNSpec(),
    ConvSpec(256, 5, 1, 2),
    PoolSpec(2, 2),
)
_ARCH_SPECS: dict[str, tuple[tuple[LayerSpec, ...], tuple[LayerSpec, ...]]] = {
    "zf5": (
        (
            ConvSpec(96, 7, 2, 1),
            LRNSpec(),
            PoolSpec(3, 2, ceil=True),
            ConvSpec(256, 5, 2, 1),
            LRNSpec(),
            PoolSpec(3, 2, ceil=True),
        ),
        (ConvSpec(384, _C3, 1, 1), ConvSpec(384, _C3, 1, 1), ConvSpec(256, _C3, 1, 1)),
    ),
    "convnet5": (
        (
            ConvSpec(96, 11, 4, 2),
            LRNSpec(),
            ConvSpec(256, 5, 1, 2),
            LRNSpec(),
            PoolSpec(3, 2, ceil=True),
        ),
        (
            ConvSpec(384, _C3, 1, 1),
            PoolSpec(3, 2, ceil=True),
            ConvSpec(384, _C3, 1, 1),
            ConvSpec(256, _C3, 1, 1),
        ),
    ),
    "overfeat5": (_OVERFEAT_STEM, (ConvSpec(512, _C3, 1, 1),) * 3),
    "overfeat7": (_OVERFEAT_STEM, (ConvSpec(512, _C3, 1, 1),) * 5),
}


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; accepted: {', '.join(map(repr, ARCHS))}")


def _check_scale(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


def _scale_tail(tail: tuple[LayerSpec, ...], depth: float) -> tuple[LayerSpec, ...]:
    convs = [s for s in tail if isinstance(s, ConvSpec)]
    pools_after: dict[int, list[LayerSpec]] = {}  # 1-based conv index -> specs after it
    j = 0
    for s in tail:
        if isinstance(s, ConvSpec):
            j += 1
        else:
            pools_after.setdefault(j, []).append(s)
    n = len(convs)
    m = max(1, _round_half_up(n * depth))
    out: list[LayerSpec] = []
    for i in range(1, m + 1):
        out.append(convs[-1] if i == m else convs[min(i, n - 1) - 1])
        for jj, specs in sorted(pools_after.items()):
            if min(jj, m) == i:
                out.extend(specs)
    return tuple(out)


def layer_specs(arch: str, *, width: float = 1.0, depth: float = 1.0) -> tuple[LayerSpec, ...]:
    """The trunk of ``arch`` as a tuple of layer specs, conv1 first.

    Args:
      arch: one of :data:`ARCHS`.
      width: multiplies every conv's channel count: ``max(1, round(c * width))``
        (halves round up).
      depth: scales the 3x3 convs after conv2 (``n`` = 3 for zf5, convnet5 and
        overfeat5, 5 for overfeat7) to ``m = max(1, round(n * depth))`` (halves
        round up). With the original convs ``c_1 .. c_n``, new conv ``i < m`` is
        ``c_min(i, n-1)`` and new conv ``m`` is ``c_n`` (so the last conv keeps the
        conv5 channel count: fewer layers drop from the middle, more repeat
        ``c_(n-1)``). A pool that followed ``c_j`` follows new conv ``min(j, m)``.
        The 3x3 convs keep the spatial size, so ``depth`` never changes map sizes.

    Returns:
      A tuple of :class:`ConvSpec`, :class:`PoolSpec` and :class:`LRNSpec`.

    >>> [s.features for s in layer_specs("zf5", width=0.5) if isinstance(s, ConvSpec)]
    [48, 128, 192, 192, 128]
    >>> [s.features for s in layer_specs("zf5", depth=0.34) if isinstance(s, ConvSpec)]
    [96, 256, 256]
    """
    _check_arch(arch)
    _check_scale("width", width)
    _check_scale("depth", depth)
    stem, tail = _ARCH_SPECS[arch]
    specs = stem + _scale_tail(tail, depth)
    if width != 1:
        specs = tuple(
            dataclasses.replace(s, features=max(1, _round_half_up(s.features * width)))
            if isinstance(s, ConvSpec)
            else s
            for s in specs
        )
    return specs


def _walk_sizes(specs: Sequence[LayerSpec], h: Any, w: Any) -> list[tuple[Any, Any]]:
    sizes = [(h, w)]
    for s in specs:
        h, w = s.out_size(h), s.out_size(w)
        sizes.append((h, w))
    return sizes


def feature_map_size(arch: str, h: Any, w: Any) -> tuple[Any, Any]:
    """Size ``(h5, w5)`` of the last conv map for an ``h x w`` input.

    Each layer spec's ``out_size`` in turn, on Python ints or elementwise on integer
    ``jnp`` arrays (e.g. the per-example ``valid_sizes`` columns). ``depth`` and
    ``width`` (:func:`layer_specs`) never change the size.

    Args:
      arch: one of :data:`ARCHS`.
      h: input height: an int or an integer array.
      w: input width: an int or an integer array.

    Returns:
      ``(h5, w5)``, ints or arrays like the inputs.

    Raises:
      ValueError: bad ``arch``, or (Python ints) an input so small that some layer's
        output would be empty.

    >>> feature_map_size("zf5", 224, 224), feature_map_size("zf5", 180, 180)
    ((13, 13), (10, 10))
    >>> feature_map_size("overfeat7", 224, 161)
    (18, 13)
    """
    specs = layer_specs(arch)
    sizes = _walk_sizes(specs, h, w)
    if isinstance(h, int) and isinstance(w, int):
        for i, (hh, ww) in enumerate(sizes):
            if hh < 1 or ww < 1:
                raise ValueError(
                    f"input {h}x{w} is too small for arch {arch!r}: layer {i} "
                    f"({specs[i - 1]}) gives an empty {hh}x{ww} map"
                )
    return sizes[-1]


def pool6_window(arch: str, base_size: int = 224) -> tuple[int, int]:
    """Fixed ``(window, stride)`` of the ``head="pool6"`` max pool.

    With ``m`` the conv5 side at a ``base_size`` square input: ``stride = m // 6``
    and ``window = m - 5 * stride``, so exactly 6 windows tile ``[0, m)`` with no
    gap (``window >= stride``). This is the paper's pool for its sizes (ZF-5 and
    Convnet*-5: 13 -> window 3 stride 2; Overfeat: 18 -> window 3 stride 3) and
    gives 6 for any ``m >= 6``, unlike the sliding rule ``ceil(m/6), floor(m/6)``.

    >>> pool6_window("zf5"), pool6_window("overfeat5"), pool6_window("zf5", 112)
    ((3, 2), (3, 3), (1, 1))

    Raises:
      ValueError: if the conv5 map at ``base_size`` is smaller than 6 x 6.
    """
    _check_positive_int("base_size", base_size)
    m, _ = feature_map_size(arch, base_size, base_size)
    if m < POOL6_SIZE:
        raise ValueError(
            f'head="pool6" needs a conv5 map of at least {POOL6_SIZE}x{POOL6_SIZE} at '
            f"base_size={base_size}; arch {arch!r} gives {m}x{m}"
        )
    stride = m // POOL6_SIZE
    return m - (POOL6_SIZE - 1) * stride, stride


def _pool6_accepted(arch: str, base_size: int) -> list[int]:
    """Input sides (per axis) whose conv5 map pools to 6 with the base_size pool."""
    win, stride = pool6_window(arch, base_size)
    good = []
    for n in range(1, 4 * base_size + 64):
        try:
            m, _ = feature_map_size(arch, n, n)
        except ValueError:
            continue
        if m >= win and pool_output_size(m, win, stride) == POOL6_SIZE:
            good.append(n)
    return good


# --------------------------------------------------------------------------------------
# Pure ops.
# --------------------------------------------------------------------------------------


def local_response_norm(
    x: jax.Array,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
) -> jax.Array:
    """AlexNet/Caffe across-channel local response normalisation (NHWC).

    ``y[..., c] = x[..., c] / (k + alpha / size * sum(x[..., j] ** 2)) ** beta`` with
    ``j`` over the ``size`` channels centred on ``c`` (``c - (size-1)//2`` to
    ``c + size//2``), clipped to the valid channels. Caffe divides ``alpha`` by
    ``size``; AlexNet's paper does not.

    Args:
      x: ``(..., C)``, channels last. Computed in float32 for 16-bit inputs.
      size: channels in the window (odd in practice).
      alpha: scale of the sum of squares (before dividing by ``size``).
      beta: exponent.
      k: additive constant.

    Returns:
      Same shape and dtype as ``x``.

    >>> import jax.numpy as jnp
    >>> y = local_response_norm(jnp.ones((1, 7)))
    >>> bool(jnp.allclose(y[0, 0], 2.0 ** -0.75, rtol=1e-4))
    True
    """
    xf = x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x
    lo = (size - 1) // 2
    pads = [(0, 0)] * (x.ndim - 1) + [(lo, size - 1 - lo)]
    sq = lax.reduce_window(
        xf * xf,
        np.array(0, xf.dtype),  # a concrete 0: reduce_window_sum, which has a VJP
        lax.add,
        (1,) * (x.ndim - 1) + (size,),
        (1,) * x.ndim,
        pads,
    )
    d = k + (alpha / size) * sq
    if beta == 0.75:  # every shipped net: d ** -0.75 as rsqrt, faster than pow on CPU
        r = lax.rsqrt(d)
        scale = r * jnp.sqrt(r)
    else:
        scale = d**-beta
    return (xf * scale).astype(x.dtype)


# He et al.'s initialisation for layers followed by ReLU: keeps the activations' scale
# through the 7 ReLU layers (the default LeCun init shrinks it ~2x per layer, and with no
# normalisation layers such a net sits at chance for many epochs).
_RELU_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class _Conv(nn.Module):
    """``nn.Conv``'s parameters (``kernel`` HWIO, ``bias``) and result, square kernel,
    symmetric padding, computed by :func:`spp_jax._cpu.conv.conv2d` (oneDNN on CPU where
    installed, else XLA's convolution in the formulation it runs fastest)."""

    spec: ConvSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        kernel = self.param(
            "kernel", _RELU_INIT, (s.kernel, s.kernel, x.shape[-1], s.features), jnp.float32
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (s.features,), jnp.float32)
        x, kernel, bias = x.astype(self.dtype), kernel.astype(self.dtype), bias.astype(self.dtype)
        return conv2d(x, kernel, s.stride, s.pad) + bias.reshape(1, 1, 1, -1)


def _mean_colour(x: jax.Array, sizes: jax.Array | None) -> jax.Array:
    """``(B, 1, 1, C)`` mean of each example over its valid region (``x`` zero outside),
    accumulated in float32."""
    total = jnp.sum(x, axis=(1, 2), keepdims=True, dtype=jnp.float32)
    if sizes is None:
        count = jnp.float32(x.shape[1] * x.shape[2])
    else:
        count = (sizes[:, 0] * sizes[:, 1]).astype(jnp.float32).reshape(-1, 1, 1, 1)
    return (total / count).astype(x.dtype)


def _mask(x: jax.Array, sizes: jax.Array | None) -> jax.Array:
    """Zeros ``x[i, h_i:, :]`` and ``x[i, :, w_i:]`` (sizes ``(B, 2)``)."""
    if sizes is None:
        return x
    _, h, w, _ = x.shape
    rows = lax.broadcasted_iota(jnp.int32, (1, h, 1, 1), 1) < sizes[:, 0, None, None, None]
    cols = lax.broadcasted_iota(jnp.int32, (1, 1, w, 1), 2) < sizes[:, 1, None, None, None]
    return jnp.where(rows & cols, x, jnp.zeros((), x.dtype))


def _check_images(x: jax.Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C), got shape {x.shape}")


# --------------------------------------------------------------------------------------
# The parts: conv trunk, pooling heads, classifier.
# --------------------------------------------------------------------------------------


class ConvTrunk(nn.Module):
    """The conv layers of an SPP-net: images to the last conv feature map.

    ``x`` ``(B, H, W, C_in)`` -> conv1 ... conv5 (:func:`layer_specs`: each conv followed
    by a ReLU, with the architecture's LRN and max pools) -> ``(B, h5, w5, C5)`` with
    ``(h5, w5) = feature_map_size(arch, H, W)`` and ``C5 = out_channels``. Any input
    from the architecture's minimum size up works. This is the part detection reuses:
    one conv map per image, then :func:`spp_jax.roi_pyramid_pool` per window.

    Padded batches: with ``valid_sizes`` (``(B, 2)`` ints, ``(h_i, w_i)`` in input pixels,
    clipped into ``[1, H] x [1, W]``) example ``i``'s map equals, on its valid region,
    the map of ``x[i, :h_i, :w_i]`` run alone, and is zero outside it. The input is zeroed
    outside the valid region; after every conv (+ReLU) and pool the valid size is
    recomputed with :func:`feature_map_size`'s formulas and the map zeroed outside it (so
    a conv's zero padding matches, and since activations are >= 0 after ReLU/LRN, a max
    pool over zeros matches ceil mode's ``-inf`` padding). Changing the sizes never
    recompiles.

    The last conv map is sown as ``intermediates/last_conv`` (``mutable=["intermediates"]``).
    Parameters: ``conv1`` ... ``convN`` (``kernel``, ``bias``), float32.

    ``center_input=True`` subtracts each example's mean colour (over its valid region)
    before conv1: for data whose images differ mainly by a random, label-free colour
    cast, as the built-in datasets (``docs/training.md``, "Why the loss sat at chance").

    Attributes:
      arch: ``"zf5"``, ``"convnet5"``, ``"overfeat5"`` or ``"overfeat7"``.
      width: conv channel multiplier (:func:`layer_specs`).
      depth: scale of the number of 3x3 convs after conv2 (:func:`layer_specs`).
      dtype: computation dtype (params are float32).
      center_input: subtract each example's mean colour before conv1.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> trunk = ConvTrunk(width=0.125)
      >>> x = jnp.ones((2, 180, 240, 3))
      >>> (fmap, sizes), _ = jax.eval_shape(trunk.init_with_output, jax.random.key(0), x)
      >>> fmap.shape, trunk.out_channels, sizes
      ((2, 10, 14, 32), 32, None)
    """

    arch: str = "zf5"
    width: float = 1.0
    depth: float = 1.0
    dtype: Any = jnp.float32
    center_input: bool = False

    def __post_init__(self) -> None:
        layer_specs(self.arch, width=self.width, depth=self.depth)  # checks all three
        super().__post_init__()

    @property
    def specs(self) -> tuple[LayerSpec, ...]:
        """The layer specs (:func:`layer_specs` with this width and depth)."""
        return layer_specs(self.arch, width=self.width, depth=self.depth)

    @property
    def out_channels(self) -> int:
        """``C5``: channels of the last conv map."""
        return next(s.features for s in reversed(self.specs) if isinstance(s, ConvSpec))

    @property
    def total_stride(self) -> int:
        """Input pixels per cell of the last conv map: the product of the conv and pool
        strides (16 for ZF-5 and Convnet*-5, 12 for Overfeat). Windows in pixels map to
        cells with it (:func:`spp_jax.roi_pyramid_pool`'s ``spatial_scale = 1 / stride``).
        """
        return math.prod(s.stride for s in self.specs if isinstance(s, ConvSpec | PoolSpec))

    @property
    def min_input_size(self) -> int:
        """The smallest input side whose last conv map is not empty (23 for ZF-5): an
        image resized for the trunk must be at least this on both sides.

        >>> ConvTrunk("zf5").min_input_size, ConvTrunk("overfeat7").min_input_size
        (23, 17)
        """
        return next(
            n
            for n in itertools.count(1)
            if all(min(hw) >= 1 for hw in _walk_sizes(self.specs, n, n))
        )

    @nn.compact
    def __call__(
        self, x: jax.Array, valid_sizes: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """The last conv map and each example's valid size in it.

        Args:
          x: ``(B, H, W, C_in)`` float images.
          valid_sizes: optional ``(B, 2)`` ints, each example's true ``(h, w)`` in input
            pixels (see the class docstring).

        Returns:
          ``(fmap, sizes)``: ``fmap`` ``(B, h5, w5, C5)`` in ``dtype``; ``sizes`` the
          ``(B, 2)`` int32 valid ``(h5_i, w5_i)`` of each example in ``fmap``, or None
          without ``valid_sizes``.

        Raises:
          ValueError: ``x`` is not 4-D, is too small for the architecture, or
            ``valid_sizes`` is not ``(B, 2)`` ints.
        """
        _check_images(x)
        b, h, w, _ = x.shape
        h5, w5 = feature_map_size(self.arch, h, w)  # raises for too-small inputs
        sizes = None if valid_sizes is None else _check_sizes(valid_sizes, b, h, w)
        x = _mask(x.astype(self.dtype), sizes)
        if self.center_input:
            x = _mask(x - _mean_colour(x, sizes), sizes)
        n_conv = 0
        for spec in self.specs:
            if isinstance(spec, ConvSpec):
                n_conv += 1
                x = _Conv(spec, self.dtype, name=f"conv{n_conv}")(x)
                x = nn.relu(x)
            elif isinstance(spec, PoolSpec):
                x = max_pool2d(x, spec.window, spec.stride, ceil=spec.ceil)
            else:
                x = local_response_norm(x, spec.size, spec.alpha, spec.beta, spec.k)
            if sizes is not None and not isinstance(spec, LRNSpec):
                sizes = jnp.clip(spec.out_size(sizes), 1, None)
                x = _mask(x, sizes)
        assert x.shape[1:3] == (h5, w5), (x.shape, h5, w5)
        self.sow("intermediates", "last_conv", x)
        return x, sizes


class SPPHead(nn.Module):
    """Spatial pyramid pooling of a conv map into one fixed-length vector per example.

    ``(B, h, w, C)`` -> ``(B, C * sum(n_h * n_w))`` whatever ``h, w``
    (:class:`spp_jax.linen.SpatialPyramidPooling`); no parameters.

    Attributes:
      levels: pyramid levels (ints ``n`` or pairs ``(n_h, n_w)``).
    """

    levels: tuple = (6, 3, 2, 1)

    def __post_init__(self) -> None:
        normalize_levels(self.levels)
        super().__post_init__()

    def output_dim(self, channels: int) -> int:
        """Length of the pooled vector for a ``channels``-channel map."""
        return output_dim(channels, self.levels)

    @nn.compact
    def __call__(self, x: jax.Array, valid_sizes: jax.Array | None = None) -> jax.Array:
        """Pools ``x`` (``(B, h, w, C)``), each example over its ``valid_sizes`` region."""
        return SpatialPyramidPooling(levels=self.levels)(x, valid_sizes=valid_sizes)


def _no_valid_sizes(valid_sizes: jax.Array | None) -> None:
    if valid_sizes is not None:
        raise ValueError(
            'valid_sizes needs head="spp" (pool6 has a fixed input size), got head="pool6"'
        )


class Pool6Head(nn.Module):
    """The paper's no-SPP baseline: a max pool of FIXED window and stride, flattened.

    ``(B, h, w, C)`` -> ``(B, 36 * C)``; only maps that this pool takes to exactly
    6 x 6 are accepted (fc6 after it has a fixed input size). :func:`pool6_window` gives
    the window and stride for an architecture and base input size; no parameters.

    Attributes:
      window: pool window (square).
      stride: pool stride.
    """

    window: int = 3
    stride: int = 2

    def __post_init__(self) -> None:
        _check_positive_int("window", self.window)
        _check_positive_int("stride", self.stride)
        super().__post_init__()

    def pooled_size(self, m: int) -> int:
        """Pooled length of an axis of ``m`` cells (0 if the window does not fit)."""
        return pool_output_size(m, self.window, self.stride) if m >= self.window else 0

    def output_dim(self, channels: int) -> int:
        """Length of the pooled vector for a ``channels``-channel map."""
        return POOL6_SIZE * POOL6_SIZE * channels

    @nn.compact
    def __call__(self, x: jax.Array, valid_sizes: jax.Array | None = None) -> jax.Array:
        """Pools ``x`` (``(B, h, w, C)``) to ``(B, 36 * C)``.

        Raises:
          ValueError: ``valid_sizes`` is given (a fixed-size head pools the whole map),
            or the map does not pool to 6 x 6.
        """
        _no_valid_sizes(valid_sizes)
        h5, w5 = x.shape[1:3]
        ph, pw = self.pooled_size(h5), self.pooled_size(w5)
        if (ph, pw) != (POOL6_SIZE, POOL6_SIZE):
            raise ValueError(
                f"Pool6Head(window={self.window}, stride={self.stride}) needs a map that pools "
                f"to {POOL6_SIZE}x{POOL6_SIZE}, got {h5}x{w5} -> {ph}x{pw}"
            )
        x = max_pool2d(x, self.window, self.stride)  # nn.max_pool's values and gradient
        return x.reshape(x.shape[0], -1)


class MLPHead(nn.Module):
    """The classifier on the pooled vector: fc6 -> fc7 -> fc8 logits.

    ``(B, D)`` -> fc6 (``fc_dim``, ReLU, dropout) -> fc7 (``fc_dim``, ReLU, dropout) ->
    fc8 -> ``(B, num_classes)`` float32 logits. Parameters ``fc6``, ``fc7``, ``fc8``
    (``kernel``, ``bias``), float32.

    Attributes:
      num_classes: logits per example.
      fc_dim: width of fc6 and fc7.
      dropout_rate: dropout after fc6 and fc7 (``train=True`` only; needs a ``"dropout"``
        rng).
      dtype: computation dtype.
    """

    num_classes: int = 1000
    fc_dim: int = 4096
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _check_positive_int("num_classes", self.num_classes)
        _check_positive_int("fc_dim", self.fc_dim)
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, hidden: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The logits; with ``hidden``, ``(logits, fc7)``: also fc7's activations
        ``(B, fc_dim)`` (after ReLU and dropout), for detection's SVMs."""
        for name in ("fc6", "fc7"):
            x = nn.Dense(
                self.fc_dim,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=_RELU_INIT,
                name=name,
            )(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(0.01),
            name="fc8",
        )(x)
        if hidden:
            return logits.astype(jnp.float32), x.astype(jnp.float32)
        return logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------
# The network.
# --------------------------------------------------------------------------------------


class SPPNet(nn.Module):
    """SPP-net classifier: :class:`ConvTrunk`, a pooling head, then :class:`MLPHead`.

    ``x`` ``(B, H, W, C_in)`` -> conv5 map ``(B, h5, w5, C5)`` (:func:`feature_map_size`)
    -> ``head`` -> fc6, fc7, fc8 -> float32 logits ``(B, num_classes)``. The heads:

    * ``"spp"`` (:class:`SPPHead`): ``C5 * sum(n_h * n_w)`` values (12,800 for ZF-5
      with ``(6, 3, 2, 1)``) whatever ``H, W``: any input from the minimum size up works.
    * ``"pool6"`` (:class:`Pool6Head`, the paper's no-SPP baseline): the pool of
      :func:`pool6_window` for ``base_size``, so only inputs whose conv5 map it takes
      to 6 x 6 are accepted; others raise a ``ValueError`` naming the accepted sides
      (ZF-5 at ``base_size=224``: 215 to 246). Set ``base_size`` for scaled-down images.

    The parts' parameters sit at the top level of the tree (``conv1`` ... ``convN``,
    ``fc6``, ``fc7``, ``fc8``), so :attr:`conv_trunk` takes the ``conv`` entries. The
    parameter count does not depend on the input size with either head.

    Padded batches (``head="spp"`` only): with ``valid_sizes`` example ``i`` gives the
    logits of the network run on ``x[i, :h_i, :w_i]`` alone, whatever the padding holds
    (:class:`ConvTrunk` says how); changing the sizes never recompiles.

    Attributes:
      arch: one of :data:`ARCHS`.
      num_classes: logits per example.
      head: ``"spp"`` or ``"pool6"``.
      levels: SPP pyramid levels (ints ``n`` or pairs ``(n_h, n_w)``).
      width: conv channel multiplier (:func:`layer_specs`).
      depth: scale of the number of 3x3 convs after conv2 (:func:`layer_specs`).
      fc_dim: width of fc6 and fc7.
      dropout_rate: dropout after fc6 and fc7 (:class:`MLPHead`).
      base_size: the square input side the ``"pool6"`` pool is sized for.
      dtype: computation dtype (params are float32).
      center_input: subtract each example's mean colour before conv1 (:class:`ConvTrunk`).

    The last conv map is sown as ``intermediates/last_conv`` (``mutable=["intermediates"]``).

    Example:
      Shapes only (``jax.eval_shape``: nothing is computed or allocated):

      >>> import jax, jax.numpy as jnp
      >>> net = SPPNet(width=0.125, fc_dim=16, num_classes=3, levels=(2, 1))
      >>> x = jnp.ones((2, 80, 64, 3))
      >>> logits, variables = jax.eval_shape(net.init_with_output, jax.random.key(0), x)
      >>> logits.shape, net.output_dim  # output_dim: 32 channels * (4 + 1) bins
      ((2, 3), 160)
      >>> sorted(variables["params"])
      ['conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7', 'fc8']

      Real use (a padded batch of two images of sizes 80x64 and 57x60)::

        variables = jax.jit(net.init)(jax.random.key(0), x)
        sizes = jnp.array([[80, 64], [57, 60]])
        logits = jax.jit(net.apply)(variables, x, valid_sizes=sizes)  # (2, 3)
        feats = net.apply(variables, x, method=SPPNet.features)  # (2, 160)
        train_logits = net.apply(variables, x, train=True, rngs={"dropout": key})
    """

    arch: str = "zf5"
    num_classes: int = 1000
    head: str = "spp"
    levels: tuple = (6, 3, 2, 1)
    width: float = 1.0
    depth: float = 1.0
    fc_dim: int = 4096
    dropout_rate: float = 0.5
    base_size: int = 224
    dtype: Any = jnp.float32
    center_input: bool = False

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; accepted: {', '.join(map(repr, HEADS))}")
        # Each part checks its own arguments. Building the parts here, unbound, makes a bad
        # value fail at construction rather than in setup, at the first call.
        _parts(self, parent=None)
        super().__post_init__()

    def setup(self) -> None:
        self.trunk, self.pool, self.classifier = _parts(self)
        # The trunk's and the classifier's parameters live in this module's scope
        # (conv1 ..., fc6 ...): one flat tree, whose conv entries a ConvTrunk takes.
        nn.share_scope(self, self.trunk)
        nn.share_scope(self, self.classifier)

    @property
    def conv_trunk(self) -> ConvTrunk:
        """An unbound :class:`ConvTrunk` with this network's conv layers; it takes
        ``{k: v for k, v in params.items() if k.startswith("conv")}``."""
        return _parts(self, parent=None)[0]

    @property
    def specs(self) -> tuple[LayerSpec, ...]:
        """The trunk's layer specs (:func:`layer_specs` with this width and depth)."""
        return self.conv_trunk.specs

    @property
    def output_dim(self) -> int:
        """Length of the vector fed to fc6 (:meth:`features`)."""
        trunk, pool, _ = _parts(self, parent=None)
        return pool.output_dim(trunk.out_channels)

    def __call__(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        valid_sizes: jax.Array | None = None,
        return_features: bool = False,
    ) -> jax.Array:
        """Logits (or, with ``return_features``, the fc6 input).

        Args:
          x: ``(B, H, W, C_in)`` float images.
          train: enables dropout (needs a ``"dropout"`` rng).
          valid_sizes: optional ``(B, 2)`` ints, each example's true ``(h, w)`` in
            input pixels (``head="spp"`` only; see the class docstring).
          return_features: return the ``(B, output_dim)`` pooled vector before fc6.

        Returns:
          ``(B, num_classes)`` float32 logits, or ``(B, output_dim)`` features in
          ``dtype``.
        """
        features = self.features(x, train=train, valid_sizes=valid_sizes)
        if return_features:
            return features
        return cast(jax.Array, self.classifier(features, train=train))  # hidden=False

    def features(
        self,
        x: jax.Array,
        *,
        train: bool = False,
        valid_sizes: jax.Array | None = None,
    ) -> jax.Array:
        """The ``(B, output_dim)`` vector fed to fc6 (SPP or pool6 output).

        Call as ``net.apply(variables, x, method=SPPNet.features)``; the variables
        may come from a full ``init`` (fc params are ignored). ``train`` is accepted
        for symmetry with ``__call__``: nothing before fc6 depends on it.
        """
        del train
        self._check_head_input(x, valid_sizes)
        fmap, sizes = self.trunk(x, valid_sizes)
        return self.pool(fmap, sizes)

    def _check_head_input(self, x: jax.Array, valid_sizes: jax.Array | None) -> None:
        """The pool6 head's limits in terms of the INPUT, before any compute."""
        if self.head != "pool6":
            return
        _no_valid_sizes(valid_sizes)
        _check_images(x)
        _, h, w, _ = x.shape
        h5, w5 = feature_map_size(self.arch, h, w)
        win, stride = pool6_window(self.arch, self.base_size)
        ph, pw = (Pool6Head(win, stride, parent=None).pooled_size(m) for m in (h5, w5))
        if (ph, pw) != (POOL6_SIZE, POOL6_SIZE):
            ok = _pool6_accepted(self.arch, self.base_size)
            accepted = f"{ok[0]}..{ok[-1]}" if ok == list(range(ok[0], ok[-1] + 1)) else ok
            raise ValueError(
                f'head="pool6" needs a {POOL6_SIZE}x{POOL6_SIZE} pooled map (fc6 has a fixed '
                f"input size), but input {h}x{w} gives conv5 {h5}x{w5} -> {ph}x{pw} with the "
                f"window {win} stride {stride} sized for base_size={self.base_size}; accepted "
                f"input sides: {accepted} (e.g. {self.base_size}x{self.base_size}). Use "
                f'head="spp" for other sizes, or set base_size.'
            )


def _parts(net: SPPNet, **parent: Any) -> tuple[ConvTrunk, SPPHead | Pool6Head, MLPHead]:
    """The trunk, pooling head and classifier of ``net``; ``parent=None`` builds them
    unbound (outside ``setup``, where they would otherwise attach to the module being
    built)."""
    trunk = ConvTrunk(net.arch, net.width, net.depth, net.dtype, net.center_input, **parent)
    pool: SPPHead | Pool6Head
    if net.head == "spp":
        pool = SPPHead(net.levels, **parent)
    else:
        pool = Pool6Head(*pool6_window(net.arch, net.base_size), **parent)
    classifier = MLPHead(net.num_classes, net.fc_dim, net.dropout_rate, net.dtype, **parent)
    return trunk, pool, classifier
