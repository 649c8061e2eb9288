"""Detection on PASCAL VOC 2007 from torchvision's ImageNet VGG-16 (imported).

Command::

    spp-jax import-weights --arch vgg16 --weights vgg16.pth --workdir /runs/vgg16
    spp-jax detect-train --config detection_voc07_vgg16 --workdir /runs/det_vgg16 \\
        --set backbone_workdir=/runs/vgg16 --set data_dir=/data/tfds

:mod:`~spp_jax.configs.detection_voc07` (SPP-net's pipeline on VOC 2007) with Fast
R-CNN's single scale for VGG-16 (Girshick 2015, section 5.2: the shorter side 600
pixels; VGG-16's conv5, 13 conv layers and 512 channels, costs about 8 times ZF-5's per
pixel); fine-tuning runs at that scale, and 5-scale testing at the paper's scales. The
windows are pooled into the backbone's own pyramid, one 7x7 max-pooled level in
PyTorch's channel-major order (``levels=None``:
:func:`spp_jax.detection.stages.window_pyramid`), which replaces VGG-16's pool5 as Fast
R-CNN's RoI pooling does. An imported AlexNet uses ``detection_voc07`` as it is (6x6).
Not run by this project (no VOC data or GPU here).
"""

import ml_collections

from spp_jax.configs import detection_voc07

KIND = "detection"


def get_config() -> ml_collections.ConfigDict:
    c = detection_voc07.get_config()
    c.single_scale = 600
    return c
