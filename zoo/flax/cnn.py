"""A small convolutional classifier in Flax Linen: the CNN of Flax's MNIST example.

``conv 32 (3x3) -> ReLU -> avg pool 2x2 -> conv 64 (3x3) -> ReLU -> avg pool 2x2
-> flatten -> dense 256 -> ReLU -> dense num_classes``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
    num_classes: int = 10
    dtype: Any = None  # computation dtype: bfloat16 for mixed precision
    param_dtype: Any = jnp.float32  # the parameters' dtype: float64 for float64 runs

    def setup(self) -> None:
        # Images are NHWC and kernels HWIO; nn.Conv pads SAME by default.
        self.conv1 = nn.Conv(32, kernel_size=(3, 3), padding="SAME",
                             dtype=self.dtype, param_dtype=self.param_dtype)
        self.conv2 = nn.Conv(64, kernel_size=(3, 3), padding="SAME",
                             dtype=self.dtype, param_dtype=self.param_dtype)
        self.dense1 = nn.Dense(256, dtype=self.dtype, param_dtype=self.param_dtype)
        self.dense2 = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.avg_pool(nn.relu(self.conv1(x)), window_shape=(2, 2), strides=(2, 2))
        x = nn.avg_pool(nn.relu(self.conv2(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(self.dense1(x))
        return self.dense2(x)
