"""SPP-net detection on an imported torchvision trunk (``spp-jax import-weights``).

The windows feed the imported fc6 the vector it was trained on: one max-pooled level of
its classifier's size (6x6 AlexNet, 7x7 VGG-16) in PyTorch's channel-major order
(:func:`spp_jax.detection.stages.window_pyramid`). The trunks are the width-reduced
fixtures of tests/test_pretrained.py (random weights of the right kinds and key names).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from spp_jax import pretrained
from spp_jax.detection import features, stages
from spp_jax.models import TORCHVISION_ARCHS
from tests.test_pretrained import FIXTURE


def _imported(arch: str):
    """``(model, variables)`` of the fixture's ``arch``."""
    data = np.load(FIXTURE)
    prefix = f"{arch}/params/"
    state = {k[len(prefix) :]: data[k] for k in data.files if k.startswith(prefix)}
    return pretrained.from_torchvision(state, arch, width=float(data[f"{arch}/width"]))


def _backbone(**model) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"model": model})


@pytest.mark.parametrize("arch", TORCHVISION_ARCHS)
def test_window_pyramid_of_an_imported_trunk_fits_its_fc6(arch):
    model, variables = _imported(arch)
    fc6 = variables["params"]["fc6"]["kernel"].shape[0]
    backbone = _backbone(
        head=model.head, levels=tuple(model.levels), channel_major=model.channel_major
    )
    config = ml_collections.ConfigDict({"levels": None})
    levels, channel_major = stages.window_pyramid(
        config, backbone, model.conv_trunk.out_channels, fc6
    )
    n = {"alexnet": 6, "vgg16": 7}[arch]
    assert levels == ((n, n),) and channel_major is True
    assert model.conv_trunk.out_channels * n * n == fc6


def test_window_pyramid_rules_and_errors():
    config = ml_collections.ConfigDict({"levels": None})
    spp = _backbone(head="spp", levels=(6, 3, 2, 1))  # an older config: no channel_major
    pyramid = ((6, 6), (3, 3), (2, 2), (1, 1))
    assert stages.window_pyramid(config, spp, 8, 8 * 50) == (pyramid, False)
    pool6 = _backbone(head="pool6", levels=(6, 3, 2, 1), channel_major=False)
    assert stages.window_pyramid(config, pool6, 8, 8 * 36) == (((6, 6),), False)
    config.levels = (4, 2, 1)
    with pytest.raises(ValueError, match=r"levels=\(\(4, 4\), .*\) pool 168 .* takes 400"):
        stages.window_pyramid(config, spp, 8, 8 * 50)


def test_window_pooler_channel_major_is_pytorch_flatten_order():
    rng = np.random.default_rng(0)
    fmap = rng.standard_normal((9, 11, 5)).astype(np.float32)
    scaled = features.ScaledMap(fmap, (1.0, 1.0), (144, 176))
    boxes = np.asarray([[0, 0, 175, 143], [20, 10, 90, 120], [50, 40, 60, 48]], np.float32)
    levels = (3, 2, 1)
    hwc = features.WindowPooler(levels, 16).pool(scaled, boxes)
    chw = features.WindowPooler(levels, 16, channel_major=True).pool(scaled, boxes)
    start = 0
    for n in levels:
        width = n * n * 5
        level = hwc[:, start : start + width].reshape(-1, n, n, 5)
        want = level.transpose(0, 3, 1, 2).reshape(len(boxes), -1)
        np.testing.assert_array_equal(chw[:, start : start + width], want)
        start += width


def test_detect_train_on_an_imported_alexnet(tmp_path):
    """``import-weights`` then ``detect-train --set backbone_workdir=DIR`` end to end on
    spp_scenes/tiny: no backbone training, the imported fc6/fc7 start fine-tuning."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("cv2")
    pytest.importorskip("sklearn")
    pytest.importorskip("orbax.checkpoint")
    from spp_jax import cli

    model, variables = _imported("alexnet")
    backbone = pretrained.write_workdir(model, variables, tmp_path / "alexnet")
    workdir = str(tmp_path / "det")
    sets = [
        f"backbone_workdir={backbone}",
        "train_backbone=False",
        "proposals.max_boxes=100",
        "finetune.steps=2",
        "test.scales=(1,)",
        "test.draw_images=0",
        "test.svd_rank=0",
    ]
    argv = ["detect-train", "--config", "detection_tiny", "--workdir", workdir]
    assert cli.main([*argv, *[a for s in sets for a in ("--set", s)]]) == 0

    assert not os.path.exists(os.path.join(workdir, "stages", "backbone.json"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = json.loads(f.read().splitlines()[-1])
    assert 0.0 <= metrics["map_voc07"] <= 1.0

    config = cli.load_config("detection_tiny", sets, kind="detection")
    det, pretrained_head = stages.build_detector(config, workdir)
    assert det.levels == ((6, 6),) and det.channel_major
    for name in ("fc6", "fc7"):
        jax.tree.map(
            np.testing.assert_array_equal, pretrained_head[name], variables["params"][name]
        )
    image = np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    scaled = det.conv5(image, 112)
    pooled = det.pool([scaled], (112,), np.asarray([[5, 5, 90, 80]], np.float32), (100, 130))
    assert pooled.shape == (1, variables["params"]["fc6"]["kernel"].shape[0])
