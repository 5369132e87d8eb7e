"""A multi-layer perceptron classifier in Equinox.

Flattens the image, applies ``Linear -> ReLU`` for every hidden size, and ends
with a ``Linear`` layer that returns one logit per class. Like every Equinox
layer it acts on a single example: ``jax.vmap`` it over a batch.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
from jaxtyping import Array, Float


class MLP(eqx.Module):
    layers: list[eqx.nn.Linear]

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int] = (128, 128),
        num_classes: int = 10,
        *,
        key: jax.Array,
    ) -> None:
        sizes = [in_features, *hidden_sizes, num_classes]
        keys = jax.random.split(key, len(sizes) - 1)
        # eqx.nn.Linear stores its weight as (out, in), and draws weight and
        # bias uniformly in +-1/sqrt(in).
        self.layers = [
            eqx.nn.Linear(n_in, n_out, key=k)
            for k, n_in, n_out in zip(keys, sizes[:-1], sizes[1:])
        ]

    def __call__(self, x: Float[Array, "height width channels"]) -> Float[Array, " num_classes"]:
        x = x.ravel()
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)
