"""A small convolutional classifier in Equinox: the CNN of the classic MNIST examples.

``conv 32 (3x3) -> ReLU -> avg pool 2x2 -> conv 64 (3x3) -> ReLU -> avg pool 2x2
-> flatten -> dense 256 -> ReLU -> dense num_classes``. Acts on a single CHW
example, ``in_shape`` being ``(channels, height, width)``: ``jax.vmap`` it over a
batch.
"""

import equinox as eqx
import jax
from jaxtyping import Array, Float


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
        channels, height, width = in_shape
        k1, k2, k3, k4 = jax.random.split(key, 4)
        # Images are CHW and kernels OIHW, and Conv2d does not pad unless asked.
        self.conv1 = eqx.nn.Conv2d(channels, 32, kernel_size=3, padding="SAME", key=k1)
        self.conv2 = eqx.nn.Conv2d(32, 64, kernel_size=3, padding="SAME", key=k2)
        self.dense1 = eqx.nn.Linear((height // 4) * (width // 4) * 64, 256, key=k3)
        self.dense2 = eqx.nn.Linear(256, num_classes, key=k4)
        self.pool = eqx.nn.AvgPool2d(kernel_size=2, stride=2)

    def __call__(self, x: Float[Array, "channels height width"]) -> Float[Array, " num_classes"]:
        x = self.pool(jax.nn.relu(self.conv1(x)))
        x = self.pool(jax.nn.relu(self.conv2(x)))
        x = x.ravel()  # in CHW order
        x = jax.nn.relu(self.dense1(x))
        return self.dense2(x)
