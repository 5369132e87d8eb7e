"""A small convolutional classifier in Equinox: the CNN of Flax's MNIST example.

``conv 32 (3x3) -> ReLU -> avg pool 2x2 -> conv 64 (3x3) -> ReLU -> avg pool 2x2
-> flatten -> dense 256 -> ReLU -> dense num_classes``. Acts on a single
example: ``jax.vmap`` it over a batch.
"""

import equinox as eqx
import jax


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    dense1: eqx.nn.Linear
    dense2: eqx.nn.Linear
    pool: eqx.nn.AvgPool2d

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int = 10,
        *,
        key: jax.Array,
    ) -> None:
        height, width, channels = in_shape
        k1, k2, k3, k4 = jax.random.split(key, 4)
        # Equinox images are CHW and kernels OIHW, and Conv2d does not pad
        # unless asked: padding="SAME" matches the other styles.
        self.conv1 = eqx.nn.Conv2d(channels, 32, kernel_size=3, padding="SAME", key=k1)
        self.conv2 = eqx.nn.Conv2d(32, 64, kernel_size=3, padding="SAME", key=k2)
        self.dense1 = eqx.nn.Linear((height // 4) * (width // 4) * 64, 256, key=k3)
        self.dense2 = eqx.nn.Linear(256, num_classes, key=k4)
        self.pool = eqx.nn.AvgPool2d(kernel_size=2, stride=2)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.pool(jax.nn.relu(self.conv1(x)))
        x = self.pool(jax.nn.relu(self.conv2(x)))
        # Flattening CHW orders the features differently from the HWC of the
        # other styles, so dense1's rows are a permutation of theirs.
        x = x.ravel()
        x = jax.nn.relu(self.dense1(x))
        return self.dense2(x)
