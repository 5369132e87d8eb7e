"""A multi-layer perceptron classifier in Flax Linen.

Flattens each image, applies ``Dense -> ReLU`` for every hidden size, and ends
with a ``Dense`` layer that returns one logit per class.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    hidden_sizes: Sequence[int] = (128, 128)
    num_classes: int = 10
    dtype: Any = None  # computation dtype: bfloat16 for mixed precision
    param_dtype: Any = jnp.float32  # the parameters' dtype: float64 for float64 runs

    def setup(self) -> None:
        # Linen infers each layer's input size on first call, and names the
        # submodules of a list attribute ``layers_0``, ``layers_1``, ...
        self.layers = [
            nn.Dense(size, dtype=self.dtype, param_dtype=self.param_dtype)
            for size in (*self.hidden_sizes, self.num_classes)
        ]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)
