"""zoo: the same neural networks written once per JAX style.

Each sub-package holds one self-contained file per model:

- ``zoo.jax``: plain JAX, ``init``/``apply`` functions over a params dict. Its
  parameter tree is the canonical layout every other style converts to.
- ``zoo.flax``: Flax Linen (``flax.linen``).
- ``zoo.nnx``: Flax NNX (``flax.nnx``).
- ``zoo.haiku``: Haiku (``dm-haiku``).
- ``zoo.equinox``: Equinox.

A model file imports only ``jax``, ``numpy`` and its own framework, so it can be
copied into another project as it is. The models are declared in
``shared.registry``; the parity tests beside this file prove that the versions
are the same network.
"""
