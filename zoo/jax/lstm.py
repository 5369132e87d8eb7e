"""An LSTM classifier that reads an image row by row, in plain JAX.

Each image ``(height, width, channels)`` is a sequence of ``height`` rows of
``width * channels`` features. One LSTM layer, started from a zero carry, runs
over the rows, and its last hidden state goes to a dense head that returns one
logit per class. The cell, gate by gate in the order i, f, g, o:

    i = sigmoid(x @ W_ii + (h @ W_hi + b_hi))      (likewise f, g with tanh, o)
    c' = f * c + i * g
    h' = o * tanh(c')

Only the hidden-to-hidden kernels have a bias. This is the canonical layout:
``{"lstm": {"cell": {"ii", "if", "ig", "io": {"kernel"} (in, hidden),
"hi", "hf", "hg", "ho": {"kernel"} (hidden, hidden) and {"bias"} (hidden,)}},
"head": {"kernel", "bias"}}``.
"""

import jax
import jax.numpy as jnp

Params = dict[str, dict]

GATES = ("i", "f", "g", "o")


def init(key: jax.Array, in_features: int, num_classes: int = 10, hidden: int = 128) -> Params:
    """LeCun-normal input kernels, orthogonal recurrent kernels, zero biases; a LeCun-normal head."""
    keys = jax.random.split(key, 2 * len(GATES) + 1)
    kernel_init = jax.nn.initializers.lecun_normal()
    recurrent_init = jax.nn.initializers.orthogonal()
    cell = {}
    for gate, k_in, k_hidden in zip(GATES, keys[:4], keys[4:8]):
        cell[f"i{gate}"] = {"kernel": kernel_init(k_in, (in_features, hidden), jnp.float32)}
        cell[f"h{gate}"] = {"kernel": recurrent_init(k_hidden, (hidden, hidden), jnp.float32),
                            "bias": jnp.zeros((hidden,), jnp.float32)}
    head = {"kernel": kernel_init(keys[-1], (hidden, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
    return {"lstm": {"cell": cell}, "head": head}


def lstm_cell(
    cell: dict[str, dict[str, jax.Array]], carry: tuple[jax.Array, jax.Array], x: jax.Array
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One step: the new carry ``(c, h)`` and the output ``h``, for a batch of rows ``x``."""
    c, h = carry

    def gate(name: str) -> jax.Array:
        hidden = cell[f"h{name}"]
        return x @ cell[f"i{name}"]["kernel"] + (h @ hidden["kernel"] + hidden["bias"])

    i = jax.nn.sigmoid(gate("i"))
    f = jax.nn.sigmoid(gate("f"))
    g = jnp.tanh(gate("g"))
    o = jax.nn.sigmoid(gate("o"))
    c = f * c + i * g
    h = o * jnp.tanh(c)
    return (c, h), h


def apply(params: Params, x: jax.Array) -> jax.Array:
    """Logits ``(batch, num_classes)`` for images ``(batch, height, width, channels)``."""
    batch, height = x.shape[:2]
    # lax.scan runs over the leading axis: the rows, time-major.
    rows = x.reshape((batch, height, -1)).transpose(1, 0, 2)
    hidden = params["lstm"]["cell"]["hi"]["bias"].shape[0]
    zeros = jnp.zeros((batch, hidden), x.dtype)
    _, outputs = jax.lax.scan(lambda carry, row: lstm_cell(params["lstm"]["cell"], carry, row),
                              (zeros, zeros), rows)
    return outputs[-1] @ params["head"]["kernel"] + params["head"]["bias"]
