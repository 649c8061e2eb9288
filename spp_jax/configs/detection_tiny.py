"""Detection, tiny: the whole ``detect-train`` pipeline in well under a minute on
``spp_scenes/tiny`` (6 train, 4 validation, 4 test images), for the tests. Not for
results.

Command::

    spp-jax detect-train --config detection_tiny --workdir /tmp/spp_det_tiny
"""

import ml_collections

from spp_jax.configs import detection

KIND = "detection"


def get_config() -> ml_collections.ConfigDict:
    c = detection.get_config()
    c.dataset = "spp_scenes/tiny"
    c.backbone_config = "tiny"
    c.backbone_overrides = ml_collections.ConfigDict()  # tiny's own epochs
    c.proposals.max_boxes = 200
    c.proposals.num_workers = 0
    c.scales = (96, 112, 128)
    c.single_scale = 112
    c.window_target = 48
    c.finetune.steps = 4
    c.finetune.batch_size = 16
    c.finetune.eval_every = 2
    c.svm.retrain_every = 50
    c.test.scales = (1, 3)
    c.test.draw_images = 2
    c.test.svd_rank = 8  # the tiny head's fc layers are 32 wide
    return c
