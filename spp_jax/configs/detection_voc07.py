"""Detection on PASCAL VOC 2007: SPP-net's setting (paper section 4, Tables 9-10).

Command::

    spp-jax detect-train --config detection_voc07 --workdir /runs/det_voc07 \\
        --set backbone_workdir=/runs/zf5_imagenet --set data_dir=/data/tfds

Needs VOC 2007 prepared for TFDS (``voc/2007``, from the official tarballs:
:func:`spp_jax.detection.voc.prepare_voc2007`) and an ImageNet classifier as
``backbone_workdir``: a full-width ZF-5 trained with ``spp-jax train --config
zf5_imagenet`` (days of ImageNet; this config never trains one), or torchvision's
AlexNet imported with ``spp-jax import-weights --arch alexnet`` (``docs/pretrained.md``;
its windows are pooled 6x6 to fit its fc6, :func:`spp_jax.detection.stages.window_pyramid`;
VGG-16: :mod:`~spp_jax.configs.detection_voc07_vgg16`). Then it runs the paper's pipeline: selective
search on 9,963 images (CPU-hours, cached; use many workers), conv5 at the paper's five
scales {480, 576, 688, 864, 1200} (1 scale: 688), fine-tuning fc6/fc7/fc8 (21-way) for
250,000 windows' worth of steps at the code's learning rates 1e-3 -> 1e-4 -> 1e-5, SVMs
and box regression with the paper's constants, evaluation on the 4,952 test images.

Hardware: one GPU (or a TPU host) with 16 GB for the conv5 maps of a batch of scales,
and host memory for the fine-tuning stacks: the training maps at five scales are
about 5,011 images x 5 scales x ~60 x 80 cells x 256 channels x 4 bytes = 120 GB with
``finetune.scales="all"`` and mirroring, so this config fine-tunes at the single
scale without mirroring (~12 GB); expect about a day on one GPU in total, most of it
in the SVMs' pass over the training images and the test evaluation at five scales.
Not run by this project (no VOC data or GPU here); the built-in ``detection`` config
is the one measured.
"""

import ml_collections

from spp_jax.configs import detection

KIND = "detection"


def get_config() -> ml_collections.ConfigDict:
    c = detection.get_config()
    c.dataset = "voc/2007"
    c.train_split = "train"
    c.val_split = "validation"
    c.test_split = "test"
    c.backbone_workdir = None  # required: a zf5_imagenet classification workdir
    c.train_backbone = False
    c.backbone_config = "zf5_imagenet"
    c.backbone_overrides = ml_collections.ConfigDict()  # the built-in data's; not for this one
    c.proposals.min_size = 20.0  # R-CNN's selective search drops boxes narrower than 20 px
    c.scales = (480, 576, 688, 864, 1200)
    c.single_scale = 688
    c.window_target = 224
    c.max_side = 2000
    c.finetune.steps = 250_000 // 128 * 8  # ~16 passes over 250k windows' worth of batches
    c.finetune.scales = "single"
    c.finetune.flip = False
    c.finetune.learning_rate = 1e-3
    c.finetune.eval_every = 2000
    c.test.draw_images = 10
    return c
