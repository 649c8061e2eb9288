"""The no-SPP baseline of ``default``: the last pool fixed to a 6x6 output, single size.

Command::

    spp-jax train --config nospp --workdir /tmp/spp_nospp

About as long as ``default`` on 2 CPU cores. A fixed-size head cannot take
other sizes, so it trains on 112 crops only and is evaluated by centre crop at 112
only; compare with ``default`` (and ``single``) for the paper's Table 2 trend.
Optimiser and learning-rate schedule as in ``default`` (AdamW, 0.001, warm-up, cosine).
"""

import ml_collections

from spp_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
    c = default.get_config()
    c.model.head = "pool6"
    c.size_schedule = "single"
    c.train_sizes = (112,)
    c.eval_sizes = (112,)
    c.eval_full_image = False
    return c
