"""Built-in TFDS datasets; importing this package registers them with TFDS.

Imports TensorFlow Datasets, so :mod:`spp_jax` never imports it eagerly.

* ``spp_shapes`` (:class:`SppShapes`): synthetic shapes at varied scales on
  images of varied size and aspect ratio, generated offline.
"""

from spp_jax.datasets.spp_shapes import SppShapes

__all__ = ["SppShapes"]
