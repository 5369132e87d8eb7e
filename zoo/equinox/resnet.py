"""A small ResNet classifier with batch normalisation, in Equinox.

``conv 3x3 -> BN -> ReLU``, then three stages of basic residual blocks with
``width``, ``2 * width`` and ``4 * width`` channels (the first block of the
second and third stages has stride 2), then global average pooling, dropout
and a dense head. A block is ``conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN`` plus
the shortcut, then ReLU; the shortcut is the input, or a 1x1 conv and BN where
the shape changes. Acts on a single CHW example and threads an
``eqx.nn.State``: build it with ``eqx.nn.make_with_state``, run it under
``jax.vmap(..., axis_name="batch")`` and select eval mode with
``eqx.nn.inference_mode``.
"""

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class ResidualBlock(eqx.Module):
    conv1: eqx.nn.Conv2d
    bn1: eqx.nn.BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: eqx.nn.BatchNorm
    proj: eqx.nn.Conv2d | None
    proj_bn: eqx.nn.BatchNorm | None

    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int = 1,
        momentum: float = 0.9,
        *,
        key: jax.Array,
    ) -> None:
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(in_features, features, kernel_size=3, stride=strides, padding="SAME",
                                   use_bias=False, key=k1)
        self.bn1 = eqx.nn.BatchNorm(features, axis_name="batch", mode="batch", momentum=momentum, eps=1e-5)
        self.conv2 = eqx.nn.Conv2d(features, features, kernel_size=3, padding="SAME", use_bias=False, key=k2)
        self.bn2 = eqx.nn.BatchNorm(features, axis_name="batch", mode="batch", momentum=momentum, eps=1e-5)
        if strides != 1 or in_features != features:
            self.proj = eqx.nn.Conv2d(in_features, features, kernel_size=1, stride=strides, padding="SAME",
                                      use_bias=False, key=k3)
            self.proj_bn = eqx.nn.BatchNorm(features, axis_name="batch", mode="batch", momentum=momentum, eps=1e-5)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(
        self, x: Float[Array, "channels height width"], state: eqx.nn.State
    ) -> tuple[Float[Array, "features out_height out_width"], eqx.nn.State]:
        y, state = self.bn1(self.conv1(x), state)
        y = jax.nn.relu(y)
        y, state = self.bn2(self.conv2(y), state)
        if self.proj is not None:
            shortcut, state = self.proj_bn(self.proj(x), state)
        else:
            shortcut = x
        return jax.nn.relu(y + shortcut), state


class ResNet(eqx.Module):
    stem: eqx.nn.Conv2d
    stem_bn: eqx.nn.BatchNorm
    blocks: list[ResidualBlock]
    dropout: eqx.nn.Dropout
    head: eqx.nn.Linear

    def __init__(
        self,
        in_channels: int,
        num_classes: int = 10,
        stage_sizes: Sequence[int] = (1, 1, 1),
        width: int = 16,
        dropout_rate: float = 0.1,
        momentum: float = 0.9,
        *,
        key: jax.Array,
    ) -> None:
        keys = jax.random.split(key, sum(stage_sizes) + 2)
        # Images are CHW and kernels OIHW, and Conv2d does not pad unless
        # asked. BatchNorm in mode "batch" averages over the vmapped axis
        # "batch" and keeps zero-debiased running statistics: hidden mean 0 and
        # variance 1, both divided by 1 - momentum ** count in eval mode.
        self.stem = eqx.nn.Conv2d(in_channels, width, kernel_size=3, padding="SAME", use_bias=False, key=keys[0])
        self.stem_bn = eqx.nn.BatchNorm(width, axis_name="batch", mode="batch", momentum=momentum, eps=1e-5)
        blocks = []
        in_features = width
        for stage, size in enumerate(stage_sizes):
            features = width * 2**stage
            for j in range(size):
                strides = 2 if stage > 0 and j == 0 else 1
                blocks.append(ResidualBlock(in_features, features, strides, momentum, key=keys[1 + len(blocks)]))
                in_features = features
        self.blocks = blocks
        self.dropout = eqx.nn.Dropout(dropout_rate)
        self.head = eqx.nn.Linear(in_features, num_classes, key=keys[-1])

    def __call__(
        self, x: Float[Array, "channels height width"], state: eqx.nn.State, *, key: jax.Array | None = None
    ) -> tuple[Float[Array, " num_classes"], eqx.nn.State]:
        x, state = self.stem_bn(self.stem(x), state)
        x = jax.nn.relu(x)
        for block in self.blocks:
            x, state = block(x, state)
        x = jnp.mean(x, axis=(1, 2))
        x = self.dropout(x, key=key)
        return self.head(x), state
