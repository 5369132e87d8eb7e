"""An LSTM classifier that reads an image row by row, in Flax NNX.

Each image ``(height, width, channels)`` is a sequence of ``height`` rows of
``width * channels`` features. One LSTM layer, started from a zero carry, runs
over the rows, and its last hidden state goes to a dense head that returns one
logit per class.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class LSTM(nnx.Module):
    def __init__(
        self,
        in_features: int,
        num_classes: int = 10,
        hidden: int = 128,
        dtype: Any = None,  # computation dtype: bfloat16 for mixed precision
        param_dtype: Any = jnp.float32,  # the parameters' dtype: float64 for float64 runs
        *,
        rngs: nnx.Rngs,
    ) -> None:
        # nnx.LSTMCell has a Linear per gate for the input (ii, if_, ig, io;
        # no bias; if_ because `if` is a keyword) and one for the hidden state
        # (hi, hf, hg, ho; with the bias). nnx.RNN scans it over axis 1 of a
        # (batch, time, features) input. rngs=False: by default it keeps an
        # RNG stream for the carry's initialiser, state that is no nnx.Param.
        self.lstm = nnx.RNN(nnx.LSTMCell(in_features, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                            rngs=False)
        self.head = nnx.Linear(hidden, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], x.shape[1], -1))  # (batch, height, width * channels)
        # Without an RNG stream nnx.RNN cannot make its own carry: zeros, in
        # the parameters' dtype, in the cell's order (c, h).
        zeros = jnp.zeros((x.shape[0], self.lstm.cell.hidden_features), self.lstm.cell.param_dtype)
        x = self.lstm(x, initial_carry=(zeros, zeros))  # (batch, height, hidden): h after every row
        return self.head(x[:, -1])
