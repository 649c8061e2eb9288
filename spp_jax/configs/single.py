"""``default`` with single-size training (112 crops only), the paper's "SPP single-size".

Command::

    spp-jax train --config single --workdir /tmp/spp_single

About as long as ``default`` on 2 CPU cores.
Optimiser and learning-rate schedule as in ``default`` (AdamW, 0.001, warm-up, cosine).
"""

import ml_collections

from spp_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.size_schedule = "single"
    c.train_sizes = (112,)
    return c
