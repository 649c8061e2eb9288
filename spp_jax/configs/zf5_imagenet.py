"""The paper's ZF-5 SPP net on ImageNet 2012, multi-size training (224/180).

Command (ImageNet must be prepared in DIR first; nothing is downloaded)::

    spp-jax train --config zf5_imagenet --workdir /runs/zf5 --set data_dir=DIR

Paper settings (section 3.1, 3.2): SGD lr 0.01, divided by 10 twice, 70 epochs,
sizes 224 and 180 alternating per epoch. Here the learning rate is 0.01 for the
first 50% of the steps, 0.001 until 80%, then 0.0001 (``lr_schedule="step"``,
``lr_boundaries=(0.5, 0.8)``, no warm-up). Batch size, momentum and weight decay are
not given in the paper; 256, 0.9 and 5e-4 are the usual choices. Days on 8
GPUs/TPU cores; on several hosts add ``--coordinator-address``,
``--num-processes`` and ``--process-id`` (or run under SLURM/TPU where JAX finds
them itself with ``--distributed``).
"""

import ml_collections

from spp_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.dataset = "imagenet2012"
    c.eval_split = "validation"
    c.shuffle_buffer = 50_000
    c.crop_mode = "paper"
    c.model.width = 1.0
    c.model.fc_dim = 4096
    c.model.dropout_rate = 0.5
    c.optimizer = "sgd"
    c.weight_decay = 5e-4
    c.model.base_size = 224
    c.model.center_input = False  # the paper: dataset mean subtracted only
    c.crop_size = 224
    c.train_sizes = (224, 180)
    c.batch_size = 256
    c.num_epochs = 70
    c.learning_rate = 0.01
    c.lr_schedule = "step"  # /10 at each of lr_boundaries (default's "cosine" ignores them)
    c.warmup_epochs = 0.0
    c.lr_boundaries = (0.5, 0.8)
    c.eval_batch_size = 256
    c.eval_every_epochs = 5
    c.eval_sizes = (180, 224, 256)
    c.checkpoint_every_steps = 2000
    return c
