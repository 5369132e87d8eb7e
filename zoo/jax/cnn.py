"""A small convolutional classifier in plain JAX: the CNN of the classic MNIST examples.

``conv 32 (3x3) -> ReLU -> avg pool 2x2 -> conv 64 (3x3) -> ReLU -> avg pool 2x2
-> flatten -> dense 256 -> ReLU -> dense num_classes``. Convolutions pad SAME,
pools are VALID with stride 2, so an ``H x W`` image gives an
``H//4 x W//4 x 64`` feature map. Images are NHWC and conv kernels HWIO; the
feature map is flattened in HWC order. This is the canonical layout.
"""

import jax
import jax.numpy as jnp

Params = dict[str, dict[str, jax.Array]]


def init(key: jax.Array, in_shape: tuple[int, int, int], num_classes: int = 10) -> Params:
    """LeCun-normal kernels and zero biases."""
    height, width, channels = in_shape
    k1, k2, k3, k4 = jax.random.split(key, 4)
    kernel_init = jax.nn.initializers.lecun_normal()

    def layer(k: jax.Array, shape: tuple[int, ...]) -> dict[str, jax.Array]:
        return {"kernel": kernel_init(k, shape, jnp.float32),
                "bias": jnp.zeros(shape[-1:], jnp.float32)}

    return {
        "conv1": layer(k1, (3, 3, channels, 32)),
        "conv2": layer(k2, (3, 3, 32, 64)),
        "dense1": layer(k3, ((height // 4) * (width // 4) * 64, 256)),
        "dense2": layer(k4, (256, num_classes)),
    }


def conv(x: jax.Array, layer: dict[str, jax.Array]) -> jax.Array:
    y = jax.lax.conv_general_dilated(
        x, layer["kernel"], window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + layer["bias"]


def avg_pool(x: jax.Array) -> jax.Array:
    window = (1, 2, 2, 1)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID") / 4


def apply(params: Params, x: jax.Array) -> jax.Array:
    """Logits ``(batch, num_classes)`` for images ``(batch, height, width, channels)``."""
    x = avg_pool(jax.nn.relu(conv(x, params["conv1"])))
    x = avg_pool(jax.nn.relu(conv(x, params["conv2"])))
    x = x.reshape((x.shape[0], -1))
    x = jax.nn.relu(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
    return x @ params["dense2"]["kernel"] + params["dense2"]["bias"]
