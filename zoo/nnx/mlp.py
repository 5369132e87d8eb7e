"""A multi-layer perceptron classifier in Flax NNX.

Flattens each image, applies ``Linear -> ReLU`` for every hidden size, and ends
with a ``Linear`` layer that returns one logit per class.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int] = (128, 128),
        num_classes: int = 10,
        dtype: Any = None,  # computation dtype: bfloat16 for mixed precision
        param_dtype: Any = jnp.float32,  # the parameters' dtype: float64 for float64 runs
        *,
        rngs: nnx.Rngs,
    ) -> None:
        sizes = [in_features, *hidden_sizes, num_classes]
        # A list of submodules must be wrapped in nnx.List to be part of the state.
        self.layers = nnx.List(
            nnx.Linear(n_in, n_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for n_in, n_out in zip(sizes[:-1], sizes[1:])
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)
