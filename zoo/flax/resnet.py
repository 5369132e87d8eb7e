"""A small ResNet classifier with batch normalisation, in Flax Linen.

``conv 3x3 -> BN -> ReLU``, then three stages of basic residual blocks with
``width``, ``2 * width`` and ``4 * width`` channels (the first block of the
second and third stages has stride 2), then global average pooling, dropout
and a dense head. A block is ``conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN`` plus
the shortcut, then ReLU; the shortcut is the input, or a 1x1 conv and BN where
the shape changes. The running statistics live in the ``batch_stats``
collection: in train mode apply with ``mutable=["batch_stats"]`` and
``rngs={"dropout": key}``.
"""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class ResidualBlock(nn.Module):
    in_features: int
    features: int
    strides: int = 1
    momentum: float = 0.9
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        conv = partial(nn.Conv, padding="SAME", use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = partial(nn.BatchNorm, momentum=self.momentum, epsilon=1e-5, dtype=self.dtype,
                       param_dtype=self.param_dtype)
        self.conv1 = conv(self.features, kernel_size=(3, 3), strides=self.strides)
        self.bn1 = norm()
        self.conv2 = conv(self.features, kernel_size=(3, 3))
        self.bn2 = norm()
        if self.strides != 1 or self.in_features != self.features:
            self.proj = conv(self.features, kernel_size=(1, 1), strides=self.strides)
            self.proj_bn = norm()
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = self.bn2(self.conv2(y), use_running_average=not train)
        if self.proj is not None:
            shortcut = self.proj_bn(self.proj(x), use_running_average=not train)
        else:
            shortcut = x
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    num_classes: int = 10
    stage_sizes: Sequence[int] = (1, 1, 1)
    width: int = 16
    dropout_rate: float = 0.1
    momentum: float = 0.9
    dtype: Any = None  # computation dtype: bfloat16 for mixed precision
    param_dtype: Any = jnp.float32  # the parameters' dtype: float64 for float64 runs

    def setup(self) -> None:
        # Images are NHWC and kernels HWIO.
        self.stem = nn.Conv(self.width, kernel_size=(3, 3), padding="SAME", use_bias=False,
                            dtype=self.dtype, param_dtype=self.param_dtype)
        self.stem_bn = nn.BatchNorm(momentum=self.momentum, epsilon=1e-5,
                                    dtype=self.dtype, param_dtype=self.param_dtype)
        blocks = []
        in_features = self.width
        for stage, size in enumerate(self.stage_sizes):
            features = self.width * 2**stage
            for j in range(size):
                strides = 2 if stage > 0 and j == 0 else 1
                blocks.append(ResidualBlock(in_features, features, strides, self.momentum,
                                            dtype=self.dtype, param_dtype=self.param_dtype))
                in_features = features
        # Linen names the submodules of a list attribute blocks_0, blocks_1, ...
        self.blocks = blocks
        self.dropout = nn.Dropout(self.dropout_rate)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        for block in self.blocks:
            x = block(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = self.dropout(x, deterministic=not train)
        return self.head(x)
