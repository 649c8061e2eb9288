"""Writes tests/data/torchvision_tiny.npz: width-reduced torchvision AlexNet and VGG-16
(torchvision's key names and layer kinds), inputs and their torch outputs.

tests/test_pretrained.py checks spp_jax.pretrained against it where torch is not installed.
Weights and inputs are rounded to float16 and stored so; torch computes in float32 on the
float16 values. Run from the repository root (needs torch and torchvision):
``python experiments/make_pretrained_fixture.py``.
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional

OUT = pathlib.Path(__file__).parents[1] / "tests" / "data" / "torchvision_tiny.npz"
FC_DIM, NUM_CLASSES = 16, 5
LEVELS = (6, 3, 2, 1)
# arch -> (width, input (B, H, W, 3)): the pool5 maps are 2 x 3 (AlexNet) and 2 x 1
# (VGG-16), smaller than the average pyramid's 6 x 6 / 7 x 7, so its bins overlap.
CASES = {"alexnet": (1 / 16, (1, 111, 143, 3)), "vgg16": (1 / 32, (1, 80, 48, 3))}


def tiny_alexnet(width: float) -> nn.Module:
    """torchvision's AlexNet with every conv's channels times ``width``."""
    c1, c2, c3, c4, c5 = (int(c * width) for c in (64, 192, 384, 256, 256))
    model = torchvision.models.AlexNet(num_classes=NUM_CLASSES)
    model.features = nn.Sequential(
        nn.Conv2d(3, c1, kernel_size=11, stride=4, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c1, c2, kernel_size=5, padding=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(c2, c3, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c3, c4, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c4, c5, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )
    model.classifier = nn.Sequential(
        nn.Dropout(),
        nn.Linear(c5 * 6 * 6, FC_DIM),
        nn.ReLU(inplace=True),
        nn.Dropout(),
        nn.Linear(FC_DIM, FC_DIM),
        nn.ReLU(inplace=True),
        nn.Linear(FC_DIM, NUM_CLASSES),
    )
    return model


def tiny_vgg16(width: float) -> nn.Module:
    """torchvision's VGG-16 (configuration "D") with every conv's channels times ``width``."""
    cfg = [v if v == "M" else int(v * width) for v in torchvision.models.vgg.cfgs["D"]]
    model = torchvision.models.vgg.VGG(torchvision.models.vgg.make_layers(cfg), NUM_CLASSES)
    model.classifier = nn.Sequential(
        nn.Linear(cfg[-2] * 7 * 7, FC_DIM),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(FC_DIM, FC_DIM),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(FC_DIM, NUM_CLASSES),
    )
    return model


def main() -> None:
    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for arch, (width, shape) in CASES.items():
        model = (tiny_alexnet if arch == "alexnet" else tiny_vgg16)(width).eval()
        state = {}
        for key, value in model.state_dict().items():
            fan_in = int(np.prod(value.shape[1:])) if value.ndim > 1 else 1
            scale = np.sqrt(2 / fan_in) if value.ndim > 1 else 0.1
            state[key] = (rng.standard_normal(tuple(value.shape)) * scale).astype(np.float16)
            out[f"{arch}/params/{key}"] = state[key]
        model.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in state.items()})
        x = rng.standard_normal(shape).astype(np.float16)
        xt = torch.from_numpy(x.astype(np.float32).transpose(0, 3, 1, 2))
        with torch.no_grad():
            logits = model(xt)
            conv5 = model.features[:-1](xt)
            pools = [functional.adaptive_max_pool2d(conv5, n).flatten(1) for n in LEVELS]
            spp = torch.cat(pools, 1)
        out[f"{arch}/x"] = x
        out[f"{arch}/width"] = np.float64(width)
        out[f"{arch}/logits"] = logits.numpy()
        out[f"{arch}/spp"] = spp.numpy()
    OUT.parent.mkdir(exist_ok=True)
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
