"""torchvision's AlexNet and VGG-16 in spp_jax: imported weights, exact logits, SPP features.

torchvision's classifiers end in ``AdaptiveAvgPool2d((6, 6))`` (AlexNet) or ``((7, 7))``
(VGG-16) after their last max pool (pool5): a one-level *average* spatial pyramid, with
PyTorch's adaptive bins, which are spp_jax's ``rule="adaptive"``. So an imported classifier
is an :class:`spp_jax.models.SPPNet`: the torchvision trunk (``features[:-1]``, arch
``"alexnet"`` or ``"vgg16"``), an SPP head with ``pool5``, ``spp_mode="avg"``, one level and
``channel_major=True`` (PyTorch's ``flatten(1)`` order, so fc6's weight needs no
permutation), then fc6, fc7, fc8. Its logits equal torchvision's ``model.eval()`` logits at
every input size the trunk accepts.

* :func:`from_torchvision` converts a state_dict (conv weights OIHW -> HWIO, linear
  ``(out, in)`` -> ``(in, out)``); :func:`load` reads one from a ``.pth`` file (needs torch)
  or a ``.safetensors`` file (needs the ``safetensors`` package: ``spp-jax[weights]``).
* :func:`spp_features` is the paper's use of a trunk: the SPP max pyramid replaces pool5 and
  pools the conv5 map, for images of any size and padded mixed-size batches.
* :func:`write_workdir` (``spp-jax import-weights``) writes an imported model as a
  classification workdir, which ``spp-jax extract`` reads.

The models take torchvision's input: RGB in ``[0, 1]``, normalised with
:data:`IMAGENET_MEAN` and :data:`IMAGENET_STD` (:func:`normalize`), ``(B, H, W, 3)``. Nothing
here downloads; on a machine with internet, ``torch.save(torchvision.models.alexnet(
weights="IMAGENET1K_V1").state_dict(), "alexnet.pth")`` writes a file :func:`load` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.geometry import normalize_levels
from spp_jax.models import TORCHVISION_ARCHS, ConvSpec, ConvTrunk, PoolSpec, SPPNet, layer_specs
from spp_jax.pooling import spatial_pyramid_pool

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCHVISION_ARCHS",
    "WeightsError",
    "expected_shapes",
    "from_torchvision",
    "load",
    "normalize",
    "spp_features",
    "write_workdir",
]

#: torchvision's ImageNet input normalisation (RGB in ``[0, 1]``): ``(x - mean) / std``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """A state_dict or weight file that does not fit the architecture asked for."""


@dataclasses.dataclass(frozen=True)
class _Classifier:
    pyramid: int  # side of the AdaptiveAvgPool2d
    pool5: tuple[int, int]  # (window, stride) of features[-1], the last MaxPool2d
    linears: tuple[int, int, int]  # indices of fc6, fc7, fc8 in model.classifier


_CLASSIFIERS = {
    "alexnet": _Classifier(6, (3, 2), (1, 4, 6)),
    "vgg16": _Classifier(7, (2, 2), (0, 3, 6)),
}
_CONV1_FEATURES = 64  # conv1's channels in both trunks at width 1


def _check_arch(arch: str) -> _Classifier:
    if arch not in _CLASSIFIERS:
        raise ValueError(
            f"unknown torchvision arch {arch!r}; accepted: {', '.join(map(repr, _CLASSIFIERS))}"
        )
    return _CLASSIFIERS[arch]


def _param_paths(
    arch: str, width: float, fc_dim: int, num_classes: int
) -> dict[str, tuple[tuple[str, str], tuple[int, ...]]]:
    """torchvision key -> ((spp_jax layer, param), torch shape), in torchvision's order."""
    head = _check_arch(arch)
    out: dict[str, tuple[tuple[str, str], tuple[int, ...]]] = {}
    index, channels, n_conv = 0, 3, 0
    # torchvision's features: each conv is followed by a ReLU module, each pool is one module.
    for spec in layer_specs(arch, width=width):
        if isinstance(spec, ConvSpec):
            n_conv += 1
            shape = (spec.features, channels, spec.kernel, spec.kernel)
            out[f"features.{index}.weight"] = ((f"conv{n_conv}", "kernel"), shape)
            out[f"features.{index}.bias"] = ((f"conv{n_conv}", "bias"), (spec.features,))
            channels = spec.features
            index += 2
        else:
            assert isinstance(spec, PoolSpec)
            index += 1
    dims = (channels * head.pyramid**2, fc_dim, fc_dim, num_classes)
    for i, (name, index) in enumerate(zip(("fc6", "fc7", "fc8"), head.linears, strict=True)):
        out[f"classifier.{index}.weight"] = ((name, "kernel"), (dims[i + 1], dims[i]))
        out[f"classifier.{index}.bias"] = ((name, "bias"), (dims[i + 1],))
    return out


def expected_shapes(
    arch: str, *, width: float = 1.0, fc_dim: int = 4096, num_classes: int = 1000
) -> dict[str, tuple[int, ...]]:
    """The state_dict keys and shapes of torchvision's ``arch``, in its order.

    Args:
      arch: ``"alexnet"`` or ``"vgg16"``.
      width: conv channel multiplier (:func:`spp_jax.models.layer_specs`); 1 is
        torchvision's model.
      fc_dim: width of fc6 and fc7 (``classifier`` hidden layers).
      num_classes: outputs of the last linear layer.

    >>> shapes = expected_shapes("alexnet")
    >>> shapes["features.3.weight"], shapes["classifier.1.weight"]
    ((192, 64, 5, 5), (4096, 9216))
    """
    return {k: shape for k, (_, shape) in _param_paths(arch, width, fc_dim, num_classes).items()}


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like as a float32 NumPy array."""
    if hasattr(value, "detach"):  # a torch.Tensor; float() also reads bfloat16
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _inferred_dims(arrays: Mapping[str, np.ndarray], head: _Classifier) -> tuple[int, int]:
    """(fc_dim, num_classes) from fc6's and fc8's weights where they are matrices."""

    def rows(index: int, default: int) -> int:
        w = arrays.get(f"classifier.{index}.weight")
        return int(w.shape[0]) if w is not None and w.ndim == 2 and w.shape[0] > 0 else default

    return rows(head.linears[0], 4096), rows(head.linears[2], 1000)


def from_torchvision(
    state_dict: Mapping[str, Any], arch: str, *, width: float = 1.0
) -> tuple[SPPNet, dict[str, Any]]:
    """torchvision's ``arch`` classifier as an :class:`~spp_jax.models.SPPNet` and its variables.

    ``model.apply(variables, x)`` with ``x`` ``(B, H, W, 3)`` (normalised as torchvision's,
    :func:`normalize`) equals ``torchvision_model.eval()(x.transpose(0, 3, 1, 2))`` to float
    rounding, at every input size the trunk accepts (AlexNet from 63 pixels a side, VGG-16
    from 32). The class count (fine-tuned models) and the fc width are read from the
    classifier's weights. Dropout sits after fc6's and fc7's ReLU, where VGG-16 has it;
    AlexNet has it before fc6 and fc7, which matters only with ``train=True``.

    Args:
      state_dict: torchvision key names (``features.0.weight`` ...) to torch tensors or
        arrays, e.g. ``model.state_dict()``.
      arch: ``"alexnet"`` or ``"vgg16"``.
      width: conv channel multiplier of the state_dict's model (1 for torchvision's).

    Returns:
      ``(model, {"params": params})``: float32 parameters ``conv1`` ... ``convN``, ``fc6``,
      ``fc7``, ``fc8``.

    Raises:
      ValueError: an unknown ``arch``.
      WeightsError: keys missing, extra, or of the wrong shape; the message names each,
        with the expected shape.
    """
    head = _check_arch(arch)
    if not isinstance(state_dict, Mapping):
        raise WeightsError(
            f"state_dict must be a mapping of torchvision key names to tensors, got "
            f"{type(state_dict).__name__}"
        )
    arrays = {str(k): _to_numpy(v) for k, v in state_dict.items()}
    fc_dim, num_classes = _inferred_dims(arrays, head)
    paths = _param_paths(arch, width, fc_dim, num_classes)
    problems = [
        f"missing {k} (expected shape {s})" for k, (_, s) in paths.items() if k not in arrays
    ]
    problems += [f"unexpected key {k}" for k in arrays if k not in paths]
    problems += [
        f"{k} has shape {arrays[k].shape}, expected {s}"
        for k, (_, s) in paths.items()
        if k in arrays and arrays[k].shape != s
    ]
    if problems:
        raise WeightsError(
            f"state_dict does not fit torchvision's {arch} (width {width}, fc {fc_dim}, "
            f"{num_classes} classes): " + "; ".join(problems)
        )
    params: dict[str, dict[str, jax.Array]] = {}
    for key, ((layer, name), _) in paths.items():
        a = arrays[key]
        if name == "kernel":
            a = a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T  # OIHW -> HWIO, (o, i) -> (i, o)
        params.setdefault(layer, {})[name] = jnp.asarray(np.ascontiguousarray(a))
    model = SPPNet(
        arch=arch,
        num_classes=num_classes,
        levels=(head.pyramid,),
        width=width,
        fc_dim=fc_dim,
        dropout_rate=0.5,
        spp_mode="avg",
        channel_major=True,
        pool5=head.pool5,
    )
    return model, {"params": params}


def load(path: str | os.PathLike, arch: str, *, width: float = 1.0) -> tuple[SPPNet, dict]:
    """:func:`from_torchvision` of a weight file.

    Args:
      path: a ``.pth``/``.pt`` file holding a torchvision state_dict (``torch.save(
        model.state_dict(), path)``; read with torch, ``weights_only=True``), or a
        ``.safetensors`` file with torchvision's key names (read with the ``safetensors``
        package, no torch).
      arch: ``"alexnet"`` or ``"vgg16"``.
      width: conv channel multiplier of the file's model (1 for torchvision's).

    Raises:
      FileNotFoundError: no file at ``path``.
      ImportError: the reader the file needs (torch or safetensors) is not installed.
      WeightsError: the file does not hold a state_dict that fits ``arch``.
    """
    _check_arch(arch)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file {path!r} does not exist")
    state_dict: Any
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise ImportError(
                f'reading {path!r} needs the safetensors package: pip install "spp-jax[weights]"'
            ) from None
        state_dict = load_file(path)
    elif path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError:
            raise ImportError(
                f"reading {path!r} (a PyTorch file) needs torch: pip install torch, or save the "
                "state_dict as .safetensors where torch is installed"
            ) from None
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(
            f"weight file {path!r}: unknown suffix; accepted: .pth or .pt (torch.save of a "
            "state_dict), .safetensors"
        )
    if not isinstance(state_dict, Mapping):
        raise WeightsError(
            f"{path!r} holds a {type(state_dict).__name__}, not a state_dict: save "
            "model.state_dict()"
        )
    return from_torchvision(state_dict, arch, width=width)


def normalize(images: Any) -> jax.Array:
    """RGB images in ``[0, 1]`` (``(..., 3)``) to torchvision's ImageNet input,
    ``(x - IMAGENET_MEAN) / IMAGENET_STD``, in the images' float dtype (float32 for ints).

    >>> [round(float(v), 3) for v in normalize(jnp.full((3,), 0.5))]
    [0.066, 0.196, 0.418]
    """
    x = jnp.asarray(images)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    if x.ndim < 1 or x.shape[-1] != 3:
        raise ValueError(f"images must be (..., 3) RGB, got shape {x.shape}")
    shape = (1,) * (x.ndim - 1) + (3,)
    mean = jnp.asarray(IMAGENET_MEAN, dtype).reshape(shape)
    std = jnp.asarray(IMAGENET_STD, dtype).reshape(shape)
    return (x.astype(dtype) - mean) / std


def _width_of(params: Mapping[str, Any], arch: str) -> float:
    conv1 = params.get("conv1") if isinstance(params, Mapping) else None
    kernel = conv1.get("kernel") if isinstance(conv1, Mapping) else None
    if kernel is None or len(kernel.shape) != 4:
        raise WeightsError(
            f"variables hold no params/conv1/kernel (HWIO) of a {arch} trunk: pass the "
            "variables from_torchvision or load returned"
        )
    return int(kernel.shape[-1]) / _CONV1_FEATURES


def spp_features(
    variables: Mapping[str, Any],
    x: Any,
    arch: str,
    levels: Any = (6, 3, 2, 1),
    valid_sizes: Any = None,
    *,
    channel_major: bool = True,
) -> jax.Array:
    """SPP-net features of an imported trunk: the max pyramid on the conv5 map.

    The trunk runs up to conv5 and its ReLU (torchvision's ``features[:-1]``); the spatial
    pyramid (:func:`spp_jax.spatial_pyramid_pool`, ``mode="max"``, adaptive bins) replaces
    pool5, as in the paper. jit-compiled: one compile per input shape (and options);
    ``valid_sizes`` changes never recompile.

    Args:
      variables: from :func:`from_torchvision` or :func:`load` (only the conv params are
        used).
      x: ``(B, H, W, 3)`` float images, normalised as torchvision's (:func:`normalize`).
      arch: ``"alexnet"`` or ``"vgg16"``.
      levels: pyramid levels (ints ``n`` or pairs ``(n_h, n_w)``).
      valid_sizes: optional ``(B, 2)`` ints, each image's true ``(h, w)`` in a padded batch:
        example ``i`` equals the features of ``x[i, :h_i, :w_i]`` alone, whatever the
        padding holds (:class:`spp_jax.models.ConvTrunk`).
      channel_major: flatten each level as ``(C, n_h, n_w)`` (PyTorch's
        ``torch.cat([adaptive_max_pool2d(f, n).flatten(1) for n in levels], 1)``); False
        gives spp_jax's ``(n_h, n_w, C)``.

    Returns:
      ``(B, C5 * sum(n_h * n_w))`` in ``x``'s dtype (``C5`` = 256 for AlexNet, 512 for
      VGG-16).

    Raises:
      ValueError: an unknown ``arch``, bad ``levels``, or an input too small for the trunk.
    """
    _check_arch(arch)
    lv = normalize_levels(levels)
    params = variables.get("params", variables) if isinstance(variables, Mapping) else None
    if params is None:
        raise WeightsError(f"variables must be a mapping, got {type(variables).__name__}")
    width = _width_of(params, arch)
    conv = {k: v for k, v in params.items() if k.startswith("conv")}
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, 3) images, got shape {x.shape}")
    if valid_sizes is not None:
        valid_sizes = jnp.asarray(valid_sizes)
    return _spp_features(conv, x, valid_sizes, arch, width, lv, bool(channel_major))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _spp_features(conv, x, valid_sizes, arch, width, levels, channel_major):
    fmap, sizes = ConvTrunk(arch, width).apply({"params": conv}, x, valid_sizes)
    return spatial_pyramid_pool(
        fmap, levels, mode="max", valid_sizes=sizes, channel_major=channel_major
    )


def write_workdir(model: SPPNet, variables: Mapping[str, Any], workdir: str | os.PathLike) -> str:
    """Writes an imported model as a classification workdir (``spp-jax import-weights``).

    ``config.json`` is :mod:`spp_jax.configs.zf5_imagenet` (ImageNet, SGD, 224 crops) with
    ``model`` set to ``model``'s fields (``center_input=False``); ``checkpoints/0`` holds
    the parameters, a zero optimizer state and step 0. :func:`spp_jax.workdirs.load_trained`
    reads it back as a trained run's, which is what ``spp-jax extract`` and ``eval`` read.
    spp_jax's input pipelines normalise pixels with torchvision's ImageNet mean and std
    (:data:`spp_jax.data.MEAN_RGB`, ``STDDEV_RGB``), the input the weights expect. Needs
    the ``train`` extra.

    Args:
      model: from :func:`from_torchvision` or :func:`load`.
      variables: its variables.
      workdir: a new folder (or an empty one).

    Returns:
      ``workdir`` as a string.

    Raises:
      spp_jax.workdirs.WorkdirError: ``workdir`` holds a workdir already, or cannot be
        written.
    """
    from spp_jax import train, workdirs
    from spp_jax.configs import get_config

    path = str(workdir)
    if workdirs.kind_of(path) is not None:
        raise workdirs.WorkdirError(
            f"workdir {path!r} holds a run already: give a new folder for the imported weights"
        )
    workdirs.check_output_dir(path, "workdir")
    config = get_config("zf5_imagenet")
    config.model.update(
        arch=model.arch,
        head=model.head,
        levels=tuple(model.levels),
        width=model.width,
        depth=model.depth,
        fc_dim=model.fc_dim,
        dropout_rate=model.dropout_rate,
        dtype=jnp.dtype(model.dtype).name,
        center_input=model.center_input,
        num_classes=model.num_classes,
        spp_mode=model.spp_mode,
        channel_major=model.channel_major,
        pool5=None if model.pool5 is None else tuple(model.pool5),
    )
    if train.create_model(config) != model:
        raise ValueError(f"the config cannot describe {model}: is it from from_torchvision?")
    tx = train.create_optimizer(config, train.learning_rate_schedule(config, 1))
    params = variables["params"]
    state = train.TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        dropout_key=jax.random.key_data(jax.random.key(config.seed)),
    )
    train.save_config(config, path)
    train.save_checkpoint(train.checkpoint_manager(path, config.keep_checkpoints), state)
    return path
