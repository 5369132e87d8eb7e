"""An LSTM classifier that reads an image row by row, in Haiku.

Each image ``(height, width, channels)`` is a sequence of ``height`` rows of
``width * channels`` features. One LSTM layer, started from a zero carry, runs
over the rows, and its last hidden state goes to a dense head that returns one
logit per class. Use it inside ``hk.transform``.
"""

import haiku as hk
import jax


class LSTM(hk.Module):
    def __init__(self, num_classes: int = 10, hidden: int = 128, name: str | None = None) -> None:
        super().__init__(name=name)
        # hk.LSTM has one Linear over concat([x, h]) to 4 * hidden, bias
        # included, with the gates in the order i, g, f, o (not i, f, g, o),
        # and adds 1 to the forget gate's pre-activation inside the cell:
        # sigmoid(f + 1). Its state is LSTMState(hidden, cell).
        self.lstm = hk.LSTM(hidden, name="lstm")
        self.head = hk.Linear(num_classes, name="head")

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], x.shape[1], -1))  # (batch, height, width * channels)
        # initial_state is float32 zeros whatever the input: cast, or in a
        # bfloat16 run concat([x, h]) would promote x and compute in float32.
        state = jax.tree.map(lambda s: s.astype(x.dtype), self.lstm.initial_state(x.shape[0]))
        # hk.dynamic_unroll is time-major by default: time_major=False for
        # (batch, time, features).
        x, _ = hk.dynamic_unroll(self.lstm, x, state, time_major=False)
        return self.head(x[:, -1])
