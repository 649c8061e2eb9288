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

What runs where:

* **GPU and TPU** run the portable code. A process whose default backend is a GPU
  or TPU compiles nothing, probes for no compiler or oneDNN and warns about
  nothing, unless it lowers a computation for the CPU.
* **CPU** builds a kernel with the system's C++ compiler the first time an op needs
  it (through the XLA FFI, cached under ``$SPP_JAX_CACHE_DIR``) and uses it where
  it measured at least as fast. Without a compiler (or oneDNN) the CPU runs the
  portable code, with one warning (one log line for oneDNN).

``SPP_JAX_CPU_KERNELS`` (``auto``, ``0``/``off``, ``1``/``on``) switches every kernel;
``SPP_JAX_ONEDNN`` the convolutions alone; ``SPP_JAX_CPU_MARCH`` sets the target the
kernels are compiled for; ``SPP_JAX_ONEDNN_ROOT`` names a oneDNN install. Both
implementations of each op give the same values and derivatives (tested against the
same references), under every JAX transformation.
"""
