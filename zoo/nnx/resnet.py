"""A small ResNet classifier with batch normalisation, in Flax NNX.

``conv 3x3 -> BN -> ReLU``, then three stages of basic residual blocks with
``width``, ``2 * width`` and ``4 * width`` channels (the first block of the
second and third stages has stride 2), then global average pooling, dropout
and a dense head. A block is ``conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN`` plus
the shortcut, then ReLU; the shortcut is the input, or a 1x1 conv and BN where
the shape changes. The running statistics are ``nnx.BatchStat`` variables:
switch modes with ``model.train()`` and ``model.eval()``, and give the dropout
key as ``model(x, rngs=nnx.Rngs(dropout=key))`` in train mode.
"""

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class ResidualBlock(nnx.Module):
    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int = 1,
        momentum: float = 0.9,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        conv = partial(nnx.Conv, padding="SAME", use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = partial(nnx.BatchNorm, momentum=momentum, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)
        self.conv1 = conv(in_features, features, kernel_size=(3, 3), strides=strides)
        self.bn1 = norm(features)
        self.conv2 = conv(features, features, kernel_size=(3, 3))
        self.bn2 = norm(features)
        if strides != 1 or in_features != features:
            self.proj = conv(in_features, features, kernel_size=(1, 1), strides=strides)
            self.proj_bn = norm(features)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.proj is not None:
            shortcut = self.proj_bn(self.proj(x))
        else:
            shortcut = x
        return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int = 10,
        stage_sizes: Sequence[int] = (1, 1, 1),
        width: int = 16,
        dropout_rate: float = 0.1,
        momentum: float = 0.9,
        dtype: Any = None,  # computation dtype: bfloat16 for mixed precision
        param_dtype: Any = jnp.float32,  # the parameters' dtype: float64 for float64 runs
        *,
        rngs: nnx.Rngs,
    ) -> None:
        # Images are NHWC and kernels HWIO.
        self.stem = nnx.Conv(in_channels, width, kernel_size=(3, 3), padding="SAME", use_bias=False,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, momentum=momentum, epsilon=1e-5,
                                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        blocks = []
        in_features = width
        for stage, size in enumerate(stage_sizes):
            features = width * 2**stage
            for j in range(size):
                strides = 2 if stage > 0 and j == 0 else 1
                blocks.append(ResidualBlock(in_features, features, strides, momentum,
                                            dtype=dtype, param_dtype=param_dtype, rngs=rngs))
                in_features = features
        # A list of submodules must be wrapped in nnx.List to be part of the state.
        self.blocks = nnx.List(blocks)
        self.dropout = nnx.Dropout(dropout_rate)
        self.head = nnx.Linear(in_features, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = jnp.mean(x, axis=(1, 2))
        x = self.dropout(x, rngs=rngs)
        return self.head(x)
