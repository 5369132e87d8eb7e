"""A multi-layer perceptron classifier in Haiku.

Flattens each image, applies ``Linear -> ReLU`` for every hidden size, and ends
with a ``Linear`` layer that returns one logit per class. Use it inside
``hk.transform``.
"""

from collections.abc import Sequence

import haiku as hk
import jax


class MLP(hk.Module):
    def __init__(
        self,
        hidden_sizes: Sequence[int] = (128, 128),
        num_classes: int = 10,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        # Haiku infers each layer's input size on first call. Its default
        # weight init is a truncated normal with stddev 1/sqrt(fan_in), cut at
        # two standard deviations, so the real spread is about 0.88/sqrt(fan_in).
        self.layers = [
            hk.Linear(size, name=f"layers_{i}")
            for i, size in enumerate((*hidden_sizes, num_classes))
        ]

    def __call__(self, x: jax.Array) -> jax.Array:
        x = hk.Flatten()(x)
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)
