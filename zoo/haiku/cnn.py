"""A small convolutional classifier in Haiku: the CNN of the classic MNIST examples.

``conv 32 (3x3) -> ReLU -> avg pool 2x2 -> conv 64 (3x3) -> ReLU -> avg pool 2x2
-> flatten -> dense 256 -> ReLU -> dense num_classes``. Use it inside
``hk.transform``.
"""

import haiku as hk
import jax


class CNN(hk.Module):
    def __init__(self, num_classes: int = 10, name: str | None = None) -> None:
        super().__init__(name=name)
        # Images are NHWC and kernels HWIO; hk.Conv2D pads SAME by default.
        self.conv1 = hk.Conv2D(32, kernel_shape=3, padding="SAME", name="conv1")
        self.conv2 = hk.Conv2D(64, kernel_shape=3, padding="SAME", name="conv2")
        self.dense1 = hk.Linear(256, name="dense1")
        self.dense2 = hk.Linear(num_classes, name="dense2")

    def __call__(self, x: jax.Array) -> jax.Array:
        # hk.avg_pool takes the window of one example, (height, width, channels), and has no default
        # padding.
        x = hk.avg_pool(jax.nn.relu(self.conv1(x)), window_shape=(2, 2, 1), strides=(2, 2, 1), padding="VALID")
        x = hk.avg_pool(jax.nn.relu(self.conv2(x)), window_shape=(2, 2, 1), strides=(2, 2, 1), padding="VALID")
        x = hk.Flatten()(x)
        x = jax.nn.relu(self.dense1(x))
        return self.dense2(x)
