"""Tiny: seconds-long smoke run on ``spp_shapes/tiny`` (used by the tests).

Command::

    spp-jax train --config tiny --workdir /tmp/spp_tiny

Seconds on 2 CPU cores, mostly compiling. Not for results.

Plain SGD (momentum 0.9, weight decay 1e-4 on kernels), learning rate 0.01 with
cosine decay to 0 and no warm-up, 2 epochs of 5 steps (batch 8) at sizes 48 and 40.
"""

import ml_collections

from spp_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.dataset = "spp_shapes/tiny"
    c.model.width = 0.125
    c.model.fc_dim = 32
    c.model.dropout_rate = 0.0
    c.model.base_size = 48
    c.crop_size = 48
    c.train_sizes = (48, 40)
    c.batch_size = 8
    c.num_epochs = 2
    # Plain SGD: comparisons of runs on different device layouts (tests) stay tight; Adam
    # divides by sqrt(v) and so magnifies last-bit differences of near-zero gradients.
    c.optimizer = "sgd"
    c.learning_rate = 0.01
    c.warmup_epochs = 0.0
    c.eval_batch_size = 8
    c.eval_every_epochs = 1
    c.eval_sizes = (40, 48)
    c.full_image_bucket_steps = 1
    return c
