"""A random-number generator whose every draw is the middle of its range, for runs without randomness.

Each framework derives its layers' keys from a step's key in its own way
(Linen folds in the module path, NNX counts calls on a stream, Haiku walks a
key sequence, Equinox splits one key per example), so from the same key the
styles draw different dropout masks and noise. To compare what they compute
apart from that, ``zoo compare`` and the parity tests also train from keys of
:data:`MIDPOINT`, a JAX PRNG implementation (``jax.extend.random``) whose
random bits are all ``1 << (width - 1)``: every uniform draw is exactly 0.5,
whichever key a framework derives, so every style draws the same numbers.

- ``jax.random.uniform``: 0.5;
- ``jax.random.bernoulli(key, p)``: ``0.5 < p``, so dropout at a rate below
  1/2 keeps every unit (and scales it by ``1 / (1 - rate)``), and drops every
  unit at a rate above;
- ``jax.random.normal``: 7.47e-8, the normal quantile of the uniform draw
  nearest to 0.5 on ``(-1, 1)``: the VAE's noise is (all but) zero.

Splitting and folding in give the same key back, so derivations cost nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.random import define_prng_impl

_UNSIGNED = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}


def _midpoint_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    return jnp.full(shape, 1 << (bit_width - 1), _UNSIGNED[bit_width])


MIDPOINT = define_prng_impl(
    key_shape=(1,),
    seed=lambda seed: jnp.zeros((1,), jnp.uint32),
    split=lambda key, shape: jnp.zeros((*shape, 1), jnp.uint32),
    random_bits=_midpoint_bits,
    fold_in=lambda key, data: key,
    name="zoo_midpoint",
    tag="mid",
)


def midpoint_key(seed: int = 0) -> jax.Array:
    """A key of :data:`MIDPOINT` (the seed changes nothing: every draw is the midpoint)."""
    return jax.random.key(seed, impl=MIDPOINT)
