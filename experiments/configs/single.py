"""``default`` with single-size training (112 crops only), the paper's "SPP single-size".

Command::

    spp-jax train --config single --workdir /tmp/spp_single

About 11 minutes on 2 CPU cores (measured once here; epochs vary 23-41 s).
"""

from experiments.configs import default


def get_config():
    c = default.get_config()
    c.size_schedule = "single"
    c.train_sizes = (112,)
    return c
