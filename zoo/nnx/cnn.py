"""A small convolutional classifier in Flax NNX: the CNN of Flax's MNIST example.

``conv 32 (3x3) -> ReLU -> avg pool 2x2 -> conv 64 (3x3) -> ReLU -> avg pool 2x2
-> flatten -> dense 256 -> ReLU -> dense num_classes``.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class CNN(nnx.Module):
    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int = 10,
        dtype: Any = None,  # computation dtype: bfloat16 for mixed precision
        param_dtype: Any = jnp.float32,  # the parameters' dtype: float64 for float64 runs
        *,
        rngs: nnx.Rngs,
    ) -> None:
        height, width, channels = in_shape
        # Images are NHWC and kernels HWIO; nnx.Conv pads SAME by default.
        self.conv1 = nnx.Conv(channels, 32, kernel_size=(3, 3), padding="SAME",
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), padding="SAME",
                              dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense1 = nnx.Linear((height // 4) * (width // 4) * 64, 256,
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense2 = nnx.Linear(256, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.avg_pool(nnx.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nnx.avg_pool(nnx.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nnx.relu(self.dense1(x))
        return self.dense2(x)
