"""A small ResNet classifier with batch normalisation, in plain JAX.

``conv 3x3 -> BN -> ReLU``, then three stages of basic residual blocks with
``width``, ``2 * width`` and ``4 * width`` channels (the first block of the
second and third stages has stride 2), then global average pooling, dropout
and a dense head. A block is ``conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN`` plus
the shortcut, then ReLU; the shortcut is the input, or a 1x1 conv and BN where
the shape changes. Convolutions pad SAME and have no bias. Images are NHWC and
kernels HWIO. This is the canonical layout: parameters ``{"stem": {"kernel"},
"stem_bn": {"scale", "bias"}, "blocks_0": {"conv1", "bn1", "conv2", "bn2"
[, "proj", "proj_bn"]}, ..., "head": {"kernel", "bias"}}`` and a state with
the running ``{"mean", "var"}`` of every BN under the same names.

In train mode BN normalises with the batch mean and biased variance over
``(N, H, W)`` and updates the running statistics as ``momentum * old +
(1 - momentum) * batch``; in eval mode it normalises with the running ones.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Params = dict[str, dict]
State = dict[str, dict]


def conv_init(key: jax.Array, in_features: int, features: int, size: int = 3) -> dict[str, jax.Array]:
    """A LeCun-normal kernel and no bias."""
    kernel_init = jax.nn.initializers.lecun_normal()
    return {"kernel": kernel_init(key, (size, size, in_features, features), jnp.float32)}


def bn_init(features: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Scale 1 and bias 0; running mean 0 and variance 1."""
    params = {"scale": jnp.ones((features,), jnp.float32), "bias": jnp.zeros((features,), jnp.float32)}
    state = {"mean": jnp.zeros((features,), jnp.float32), "var": jnp.ones((features,), jnp.float32)}
    return params, state


def block_init(key: jax.Array, in_features: int, features: int, strides: int) -> tuple[Params, State]:
    k1, k2, k3 = jax.random.split(key, 3)
    params, state = {}, {}
    params["conv1"] = conv_init(k1, in_features, features)
    params["bn1"], state["bn1"] = bn_init(features)
    params["conv2"] = conv_init(k2, features, features)
    params["bn2"], state["bn2"] = bn_init(features)
    if strides != 1 or in_features != features:
        params["proj"] = conv_init(k3, in_features, features, size=1)
        params["proj_bn"], state["proj_bn"] = bn_init(features)
    return params, state


def init(
    key: jax.Array,
    in_channels: int,
    num_classes: int = 10,
    stage_sizes: Sequence[int] = (1, 1, 1),
    width: int = 16,
) -> tuple[Params, State]:
    keys = jax.random.split(key, sum(stage_sizes) + 2)
    params, state = {}, {}
    params["stem"] = conv_init(keys[0], in_channels, width)
    params["stem_bn"], state["stem_bn"] = bn_init(width)
    in_features, i = width, 0
    for stage, size in enumerate(stage_sizes):
        features = width * 2**stage
        for j in range(size):
            strides = 2 if stage > 0 and j == 0 else 1
            params[f"blocks_{i}"], state[f"blocks_{i}"] = block_init(keys[1 + i], in_features, features, strides)
            in_features, i = features, i + 1
    params["head"] = {
        "kernel": jax.nn.initializers.lecun_normal()(keys[-1], (in_features, num_classes), jnp.float32),
        "bias": jnp.zeros((num_classes,), jnp.float32),
    }
    return params, state


def conv(x: jax.Array, layer: dict[str, jax.Array], strides: int = 1) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, layer["kernel"], window_strides=(strides, strides), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def batch_norm(
    x: jax.Array,
    params: dict[str, jax.Array],
    state: dict[str, jax.Array],
    train: bool,
    momentum: float,
    epsilon: float = 1e-5,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """BN over ``(N, H, W)``; the batch variance is ``E[x^2] - E[x]^2``, clamped at 0. In float32 at least
    (bfloat16 activations are widened, and the result cast back); the running statistics stay float32."""
    dtype = x.dtype
    x = x.astype(jnp.promote_types(dtype, jnp.float32))
    if train:
        squares = jnp.square(x)
        mean, mean_of_squares = jnp.mean(x, axis=(0, 1, 2)), jnp.mean(squares, axis=(0, 1, 2))
        var = jnp.maximum(0.0, mean_of_squares - jnp.square(mean))
        state = {"mean": momentum * state["mean"] + (1 - momentum) * mean,
                 "var": momentum * state["var"] + (1 - momentum) * var}
    else:
        mean, var = state["mean"], state["var"]
    y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * params["scale"]) + params["bias"]
    return y.astype(dtype), state


def block_apply(
    params: Params, state: State, x: jax.Array, train: bool, momentum: float
) -> tuple[jax.Array, State]:
    # Only the first block of the second and third stages projects, and it is
    # also the one with stride 2.
    strides = 2 if "proj" in params else 1
    new_state = {}
    y, new_state["bn1"] = batch_norm(conv(x, params["conv1"], strides), params["bn1"], state["bn1"], train, momentum)
    y = jax.nn.relu(y)
    y, new_state["bn2"] = batch_norm(conv(y, params["conv2"]), params["bn2"], state["bn2"], train, momentum)
    if "proj" in params:
        shortcut, new_state["proj_bn"] = batch_norm(
            conv(x, params["proj"], strides), params["proj_bn"], state["proj_bn"], train, momentum)
    else:
        shortcut = x
    return jax.nn.relu(y + shortcut), new_state


def dropout(key: jax.Array, rate: float, x: jax.Array) -> jax.Array:
    """Zeroes each entry with probability ``rate`` and scales the others by ``1 / (1 - rate)``."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def apply(
    params: Params,
    state: State,
    x: jax.Array,
    key: jax.Array | None,
    train: bool,
    dropout_rate: float = 0.1,
    momentum: float = 0.9,
) -> tuple[jax.Array, State]:
    """Logits ``(batch, num_classes)`` for images ``(batch, height, width, channels)``, and the new state.

    Train mode draws the dropout mask from ``key``; eval mode needs no key and
    returns ``state`` unchanged.
    """
    new_state = {}
    x, new_state["stem_bn"] = batch_norm(conv(x, params["stem"]), params["stem_bn"], state["stem_bn"], train, momentum)
    x = jax.nn.relu(x)
    for i in range(sum(name.startswith("blocks_") for name in params)):
        x, new_state[f"blocks_{i}"] = block_apply(params[f"blocks_{i}"], state[f"blocks_{i}"], x, train, momentum)
    x = jnp.mean(x, axis=(1, 2))
    if train:
        x = dropout(key, dropout_rate, x)
    return x @ params["head"]["kernel"] + params["head"]["bias"], new_state
