"""A small ResNet classifier with batch normalisation, in Haiku.

``conv 3x3 -> BN -> ReLU``, then three stages of basic residual blocks with
``width``, ``2 * width`` and ``4 * width`` channels (the first block of the
second and third stages has stride 2), then global average pooling, dropout
and a dense head. A block is ``conv 3x3 -> BN -> ReLU -> conv 3x3 -> BN`` plus
the shortcut, then ReLU; the shortcut is the input, or a 1x1 conv and BN where
the shape changes. Use it inside ``hk.transform_with_state`` and init it with
``is_training=True``: the running averages come into being on their first
update, and until the first training step they hold the init batch's
statistics.
"""

from collections.abc import Sequence

import haiku as hk
import jax
import jax.numpy as jnp


class ResidualBlock(hk.Module):
    def __init__(
        self,
        in_features: int,
        features: int,
        strides: int = 1,
        momentum: float = 0.9,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        bn_config = {"create_scale": True, "create_offset": True, "decay_rate": momentum, "eps": 1e-5}
        self.conv1 = hk.Conv2D(features, kernel_shape=3, stride=strides, padding="SAME", with_bias=False,
                               name="conv1")
        self.bn1 = hk.BatchNorm(**bn_config, name="bn1")
        self.conv2 = hk.Conv2D(features, kernel_shape=3, padding="SAME", with_bias=False, name="conv2")
        self.bn2 = hk.BatchNorm(**bn_config, name="bn2")
        if strides != 1 or in_features != features:
            self.proj = hk.Conv2D(features, kernel_shape=1, stride=strides, padding="SAME", with_bias=False,
                                  name="proj")
            self.proj_bn = hk.BatchNorm(**bn_config, name="proj_bn")
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x), is_training))
        y = self.bn2(self.conv2(y), is_training)
        if self.proj is not None:
            shortcut = self.proj_bn(self.proj(x), is_training)
        else:
            shortcut = x
        return jax.nn.relu(y + shortcut)


class ResNet(hk.Module):
    def __init__(
        self,
        num_classes: int = 10,
        stage_sizes: Sequence[int] = (1, 1, 1),
        width: int = 16,
        dropout_rate: float = 0.1,
        momentum: float = 0.9,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        # Images are NHWC and kernels HWIO. hk.BatchNorm keeps its scale,
        # offset and statistics with shape (1, 1, 1, C), and its running
        # averages are zero-debiased: they start at 0, and eval mode divides
        # them by 1 - momentum ** count.
        self.stem = hk.Conv2D(width, kernel_shape=3, padding="SAME", with_bias=False, name="stem")
        self.stem_bn = hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=momentum, eps=1e-5,
                                    name="stem_bn")
        blocks = []
        in_features = width
        for stage, size in enumerate(stage_sizes):
            features = width * 2**stage
            for j in range(size):
                strides = 2 if stage > 0 and j == 0 else 1
                blocks.append(ResidualBlock(in_features, features, strides, momentum, name=f"blocks_{len(blocks)}"))
                in_features = features
        self.blocks = blocks
        self.dropout_rate = dropout_rate  # hk.dropout is a function, not a module
        self.head = hk.Linear(num_classes, name="head")

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem(x), is_training))
        for block in self.blocks:
            x = block(x, is_training)
        x = jnp.mean(x, axis=(1, 2))
        if is_training:
            x = hk.dropout(hk.next_rng_key(), self.dropout_rate, x)
        return self.head(x)
