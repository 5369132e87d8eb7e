"""A multi-layer perceptron classifier in plain JAX.

Flattens each image, applies ``Dense -> ReLU`` for every hidden size, and ends
with a ``Dense`` layer that returns one logit per class. The parameters are a
plain dict, ``{"layers_0": {"kernel", "bias"}, ...}`` with kernels laid out
``(in, out)``: this is the canonical layout every other style converts to.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Params = dict[str, dict[str, jax.Array]]


def init(
    key: jax.Array,
    in_features: int,
    hidden_sizes: Sequence[int] = (128, 128),
    num_classes: int = 10,
) -> Params:
    """LeCun-normal kernels and zero biases."""
    sizes = [in_features, *hidden_sizes, num_classes]
    keys = jax.random.split(key, len(sizes) - 1)
    kernel_init = jax.nn.initializers.lecun_normal()
    return {
        f"layers_{i}": {
            "kernel": kernel_init(k, (n_in, n_out), jnp.float32),
            "bias": jnp.zeros((n_out,), jnp.float32),
        }
        for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


def apply(params: Params, x: jax.Array) -> jax.Array:
    """Logits ``(batch, num_classes)`` for images ``(batch, ...)``."""
    x = x.reshape((x.shape[0], -1))
    for i in range(len(params)):
        layer = params[f"layers_{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x
