"""Built-in TFDS datasets; importing this package registers them with TFDS.

Imports TensorFlow Datasets, so :mod:`spp_jax` never imports it eagerly.

* ``spp_shapes`` (:class:`SppShapes`): synthetic shapes at varied scales on
  images of varied size and aspect ratio, generated offline (classification).
* ``spp_scenes`` (:class:`SppScenes`): cluttered scenes of 1-6 ``spp_shapes``
  objects with occlusion and truncation, boxes and difficult flags in TFDS
  ``voc``'s format, generated offline (detection).
"""

from spp_jax.datasets.spp_scenes import SppScenes
from spp_jax.datasets.spp_shapes import SppShapes

__all__ = ["SppScenes", "SppShapes"]
