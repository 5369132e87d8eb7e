"""An LSTM classifier that reads an image row by row, in Equinox.

The image ``(height, width, channels)`` is a sequence of ``height`` rows of
``width * channels`` features. One LSTM layer, started from a zero carry, runs
over the rows, and its last hidden state goes to a dense head that returns one
logit per class. Acts on a single example: ``jax.vmap`` it over a batch.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class LSTM(eqx.Module):
    lstm: eqx.nn.LSTMCell
    head: eqx.nn.Linear

    def __init__(
        self,
        in_features: int,
        num_classes: int = 10,
        hidden: int = 128,
        *,
        key: jax.Array,
    ) -> None:
        k1, k2 = jax.random.split(key)
        # eqx.nn.LSTMCell holds weight_ih (4 * hidden, in), weight_hh
        # (4 * hidden, hidden) and one bias (4 * hidden,), gates in the order
        # i, f, g, o, all drawn uniformly in +-1/sqrt(hidden). It is one step:
        # the scan over the rows is ours.
        self.lstm = eqx.nn.LSTMCell(in_features, hidden, key=k1)
        self.head = eqx.nn.Linear(hidden, num_classes, key=k2)

    def __call__(self, x: Float[Array, "height width channels"]) -> Float[Array, " num_classes"]:
        x = x.reshape((x.shape[0], -1))  # (height, width * channels)
        # The carry is (h, c).
        zeros = jnp.zeros((self.lstm.hidden_size,), x.dtype)
        (h, _), _ = jax.lax.scan(lambda carry, row: (self.lstm(row, carry), None), (zeros, zeros), x)
        return self.head(h)
