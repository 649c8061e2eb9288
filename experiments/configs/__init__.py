"""Training configs: each module has ``get_config()`` returning an ``ml_collections.ConfigDict``.

Run one with ``spp-jax train --config NAME --workdir DIR [--set key=value ...]``.
"""
