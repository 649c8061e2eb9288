"""PyTorch twins of spp_jax's SPP-net classifiers, with the weights of a Flax init.

The twin of an :class:`spp_jax.models.SPPNet` has the same layers, walked from the
same layer specs (``net.specs``, :func:`spp_jax.models.layer_specs`):

* each conv a ``torch.nn.Conv2d`` with the spec's kernel, stride and (symmetric)
  padding, then ``ReLU``;
* LRN as ``torch.nn.LocalResponseNorm(size, alpha, beta, k)``: PyTorch, like Caffe and
  :func:`spp_jax.models.local_response_norm`, divides ``alpha`` by ``size``; its window
  for channel ``c`` is ``c - size // 2 .. c + (size - 1) // 2``, spp_jax's
  ``c - (size - 1) // 2 .. c + size // 2``: the same for the odd sizes used (5);
* max pools as ``torch.nn.MaxPool2d(window, stride, ceil_mode=spec.ceil)``: PyTorch's
  ceil mode (no padding) is Caffe's, ``ceil((n - k) / s) + 1`` less one if the last
  window starts outside the input, which is :meth:`PoolSpec.out_size`;
  :func:`check_twin` checks every layer's output size against the specs;
* the SPP head: ``adaptive_max_pool2d`` per level (the adaptive bin rule is spp_jax's
  default), each level flattened in spp_jax's default order (``channel_major=False``:
  ``(n_h, n_w, C)``, i.e. channels-last), the levels concatenated in the given order;
* the pool6 head: ``MaxPool2d`` with :func:`spp_jax.models.pool6_window`, flattened
  channels-last as well;
* fc6, fc7 (``Linear``, ReLU, ``Dropout``) and fc8.

Weights: conv kernels HWIO -> OIHW, dense kernels ``(in, out)`` -> ``(out, in)``; the
flatten order above is the order of fc6's input rows, so fc6 is copied as it is.
The twin runs in ``channels_last`` memory format, PyTorch's fast layout on CPU and
the one whose flattening is free here.

Example::

    net = SPPNet(width=0.125, fc_dim=32, num_classes=5)
    params = net.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    twin = torch_twin(net, params)
    check_twin(net, params, twin, np.random.rand(2, 64, 64, 3).astype(np.float32))
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.functional import adaptive_max_pool2d

from spp_jax.geometry import normalize_levels
from spp_jax.models import ConvSpec, LRNSpec, PoolSpec, SPPNet, pool6_window

__all__ = [
    "LOGITS_RTOL",
    "TorchSPP",
    "check_trunk",
    "check_twin",
    "copy_weights",
    "jax_param_count",
    "to_torch_images",
    "torch_trunk",
    "torch_twin",
]

# Largest accepted max|out_jax - out_torch| / max|out_torch|. Both compute in float32 and
# sum each conv's products in their own order: measured 0.7-3.4e-6 on the benchmark's
# networks (about sqrt(K) float32 roundings for a K-term sum, K up to 4,608), while a
# layer that differs (flatten order, LRN's alpha / size, a pool's rounding) gives 1e-4
# or more.
LOGITS_RTOL = 1e-5


class TorchSPP(nn.Module):
    """Spatial pyramid pooling, flattened as spp_jax's default (``(n_h, n_w, C)``)."""

    def __init__(self, levels: Any) -> None:
        super().__init__()
        self.levels = normalize_levels(levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [adaptive_max_pool2d(x, lv).permute(0, 2, 3, 1).flatten(1) for lv in self.levels],
            1,
        )


class _Pool6(nn.Module):
    """Fixed max pool, flattened channels-last (spp_jax's ``Pool6Head``)."""

    def __init__(self, window: int, stride: int) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(window, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).permute(0, 2, 3, 1).flatten(1)


def torch_trunk(specs: Any, in_channels: int = 3) -> nn.Sequential:
    """The conv trunk of ``specs`` (:func:`spp_jax.models.layer_specs`) as a Sequential.

    Layers are named ``conv1``, ``relu1``, ``lrn1``, ``pool1``, ...: the conv names are
    those of spp_jax's parameter tree. One torch module per spec except convs, which
    are followed by their ReLU.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c = in_channels
    n_conv = n_lrn = n_pool = 0
    for s in specs:
        if isinstance(s, ConvSpec):
            n_conv += 1
            layers[f"conv{n_conv}"] = nn.Conv2d(c, s.features, s.kernel, s.stride, s.pad)
            layers[f"relu{n_conv}"] = nn.ReLU(inplace=True)
            c = s.features
        elif isinstance(s, PoolSpec):
            n_pool += 1
            layers[f"pool{n_pool}"] = nn.MaxPool2d(s.window, s.stride, ceil_mode=s.ceil)
        elif isinstance(s, LRNSpec):
            n_lrn += 1
            layers[f"lrn{n_lrn}"] = nn.LocalResponseNorm(s.size, s.alpha, s.beta, s.k)
        else:
            raise TypeError(f"unknown layer spec {s!r}")
    return nn.Sequential(layers)


def torch_twin(net: SPPNet, params: Any | None = None, in_channels: int = 3) -> nn.Module:
    """The PyTorch twin of ``net`` (channels_last, train mode), weights from ``params``.

    Args:
      net: the :class:`spp_jax.models.SPPNet` (any arch, head, width, depth, levels).
      params: its Flax ``params`` tree (``conv1`` ... ``convN``, ``fc6``, ``fc7``,
        ``fc8``); None leaves PyTorch's own init.
      in_channels: image channels.

    Returns:
      ``nn.Sequential(trunk, head, classifier)`` taking NCHW (channels_last) images.
    """
    trunk = torch_trunk(net.specs, in_channels)
    c5 = next(s.features for s in reversed(net.specs) if isinstance(s, ConvSpec))
    if net.head == "spp":
        head: nn.Module = TorchSPP(net.levels)
        dim = c5 * sum(nh * nw for nh, nw in normalize_levels(net.levels))
    else:
        head = _Pool6(*pool6_window(net.arch, net.base_size))
        dim = 36 * c5
    if dim != net.output_dim:
        raise AssertionError(f"twin's fc6 input {dim} != spp_jax's output_dim {net.output_dim}")
    classifier = nn.Sequential(
        OrderedDict(
            fc6=nn.Linear(dim, net.fc_dim),
            relu6=nn.ReLU(inplace=True),
            drop6=nn.Dropout(net.dropout_rate),
            fc7=nn.Linear(net.fc_dim, net.fc_dim),
            relu7=nn.ReLU(inplace=True),
            drop7=nn.Dropout(net.dropout_rate),
            fc8=nn.Linear(net.fc_dim, net.num_classes),
        )
    )
    twin = nn.Sequential(OrderedDict(trunk=trunk, head=head, classifier=classifier))
    if params is not None:
        copy_weights(twin, params)
    return twin.to(memory_format=torch.channels_last)


def _named_layers(twin: nn.Module) -> dict[str, nn.Module]:
    return {
        name.rsplit(".", 1)[-1]: m
        for name, m in twin.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    }


def copy_weights(twin: nn.Module, params: Any) -> None:
    """Copies a Flax params tree into ``twin`` (a :func:`torch_twin` or :func:`torch_trunk`).

    Conv kernels HWIO -> OIHW, dense kernels ``(in, out)`` -> ``(out, in)``. Every layer of
    the twin must have its namesake in ``params`` with the same shape (else AssertionError);
    entries of ``params`` the twin lacks (fc layers, for a trunk) are ignored.
    """
    layers = _named_layers(twin)
    for name, m in layers.items():
        if name not in params:
            raise AssertionError(f"layer {name!r} of the twin has no parameters in {list(params)}")
        kernel = np.asarray(params[name]["kernel"], np.float32)
        bias = np.array(params[name]["bias"], np.float32)
        # Conv HWIO -> OIHW, dense (in, out) -> (out, in).
        kernel = kernel.transpose(3, 2, 0, 1) if isinstance(m, nn.Conv2d) else kernel.T
        if tuple(kernel.shape) != tuple(m.weight.shape) or bias.shape != tuple(m.bias.shape):
            raise AssertionError(
                f"{name}: spp_jax kernel {params[name]['kernel'].shape} / bias {bias.shape} "
                f"do not fit the twin's {tuple(m.weight.shape)} / {tuple(m.bias.shape)}"
            )
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel)))
            m.bias.copy_(torch.from_numpy(bias))


def jax_param_count(params: Any) -> int:
    import jax

    return int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))


def to_torch_images(x: np.ndarray) -> torch.Tensor:
    """NHWC NumPy images -> an NCHW tensor in channels_last memory (no copy of values)."""
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def check_twin(
    net: SPPNet,
    params: Any,
    twin: nn.Module,
    x: np.ndarray,
    rtol: float = LOGITS_RTOL,
) -> dict:
    """Checks ``twin`` against ``net``: parameter count, map sizes, logits (eval mode).

    Args:
      net: the spp_jax network.
      params: its params tree (the weights ``twin`` was given).
      twin: :func:`torch_twin` of ``net``.
      x: ``(B, H, W, C)`` float32 images.
      rtol: bound on ``max|diff| / max|logits|``.

    Returns:
      ``{"params": count, "max_abs_diff": ..., "rel_diff": ...}``.

    Raises:
      AssertionError: any mismatch, naming it.
    """
    return _check(net, params, twin, twin.trunk, x, rtol, lambda out: out)


def check_trunk(
    trunk: Any,
    params: Any,
    twin: nn.Sequential,
    x: np.ndarray,
    rtol: float = LOGITS_RTOL,
) -> dict:
    """:func:`check_twin` for a :class:`spp_jax.models.ConvTrunk` and its
    :func:`torch_trunk`: the last conv maps are compared (NHWC)."""
    return _check(trunk, params, twin, twin, x, rtol, lambda out: out[0])


def _check(net, params, twin, trunk, x, rtol, first) -> dict:
    import jax

    n_jax = jax_param_count(params)
    n_torch = sum(p.numel() for p in twin.parameters())
    if n_jax != n_torch:
        raise AssertionError(f"parameter count: spp_jax {n_jax:,} != torch {n_torch:,}")
    _check_sizes(net.specs, trunk, x)
    got_jax = np.asarray(first(jax.jit(net.apply)({"params": params}, x)))
    was_training = twin.training
    twin.eval()
    with torch.inference_mode():
        got_torch = twin(to_torch_images(x))
        if got_torch.ndim == 4:
            got_torch = got_torch.permute(0, 2, 3, 1)  # NCHW -> NHWC
        got_torch = got_torch.numpy()
    twin.train(was_training)
    if got_jax.shape != got_torch.shape:
        raise AssertionError(f"output shape: spp_jax {got_jax.shape} != torch {got_torch.shape}")
    diff = float(np.max(np.abs(got_jax - got_torch)))
    scale = float(np.max(np.abs(got_torch)))
    rel = diff / scale if scale > 0 else diff
    if not np.isfinite(rel) or rel > rtol:
        raise AssertionError(
            f"outputs differ: max |diff| {diff:.3g}, relative {rel:.3g} > {rtol:g} "
            f"(max |output| {scale:.3g})"
        )
    return {"params": n_jax, "max_abs_diff": diff, "rel_diff": rel}


def _check_sizes(specs: Any, trunk: nn.Sequential, x: np.ndarray) -> None:
    """Every layer's output (h, w) in ``trunk`` equals the specs' ``out_size``."""
    h, w = x.shape[1:3]
    t = to_torch_images(x[:1])
    layers = iter(trunk)
    with torch.inference_mode():
        for i, s in enumerate(specs):
            m = next(layers)
            t = m(t)
            if isinstance(s, ConvSpec):
                t = next(layers)(t)  # its ReLU
            h, w = s.out_size(h), s.out_size(w)
            if tuple(t.shape[2:]) != (h, w):
                raise AssertionError(
                    f"layer {i} ({s}): torch gives {tuple(t.shape[2:])}, spp_jax {(h, w)} "
                    f"for a {x.shape[1]}x{x.shape[2]} input"
                )
