"""The CPU backend: compiled kernels that replace XLA's CPU code where they are faster.

Everything in :mod:`spp_jax` outside this package is portable JAX. Three ops have a
second implementation here, used only when a computation is lowered for the CPU:

* max pyramid pooling (:func:`spp_jax.spatial_pyramid_pool`,
  :func:`spp_jax.roi_pyramid_pool`) and the trunks' :func:`spp_jax.pooling.max_pool2d`:
  one window-max kernel, ``csrc/window_max.cc`` (:mod:`.native`, which also builds,
  caches and loads every kernel library);
* the conv trunks' convolutions (:func:`.conv.conv2d`): oneDNN, ``csrc/onednn_conv.cc``
  (:mod:`.conv`), where the ``cpu`` extra installs it;
* :mod:`.tune`: the one-time measurement, per machine and build, of each kernel
  against the pure-JAX or XLA code it replaces; each op family takes the faster.

A process whose default backend is a GPU or TPU compiles nothing and probes for
nothing unless it lowers a computation for the CPU. What runs where, the
environment variables and the fallbacks: ``docs/install.md``.
"""
