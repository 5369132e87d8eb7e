"""An LSTM classifier that reads an image row by row, in Flax Linen.

Each image ``(height, width, channels)`` is a sequence of ``height`` rows of
``width * channels`` features. One LSTM layer, started from a zero carry, runs
over the rows, and its last hidden state goes to a dense head that returns one
logit per class.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class LSTM(nn.Module):
    num_classes: int = 10
    hidden: int = 128
    dtype: Any = None  # computation dtype: bfloat16 for mixed precision
    param_dtype: Any = jnp.float32  # the parameters' dtype: float64 for float64 runs

    def setup(self) -> None:
        # nn.LSTMCell has a Dense per gate for the input (ii, if, ig, io; no
        # bias) and one for the hidden state (hi, hf, hg, ho; with the bias).
        # nn.RNN scans it over axis 1 of a (batch, time, features) input,
        # starting from the cell's initialize_carry: zeros, (c, h).
        self.lstm = nn.RNN(nn.LSTMCell(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype))
        self.head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], x.shape[1], -1))  # (batch, height, width * channels)
        x = self.lstm(x)  # (batch, height, hidden): h after every row
        return self.head(x[:, -1])
