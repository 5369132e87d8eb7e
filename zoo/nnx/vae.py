"""A class-conditional variational autoencoder in Flax NNX.

The encoder sees the flattened image and its one-hot label and gives the mean
and log-variance of a Gaussian latent; the decoder sees a latent and the
one-hot label and gives Bernoulli logits for every pixel. The sizes follow
Flax's VAE example (20 latents, 500 hidden units).
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class Encoder(nnx.Module):
    def __init__(self, in_features: int, hidden: int, latents: int, dtype: Any = None,
                 param_dtype: Any = jnp.float32, *, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(in_features, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2_mean = nnx.Linear(hidden, latents, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2_logvar = nnx.Linear(hidden, latents, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nnx.relu(self.fc1(jnp.concatenate([x, y], axis=-1)))
        return self.fc2_mean(h), self.fc2_logvar(h)


class Decoder(nnx.Module):
    def __init__(self, in_features: int, hidden: int, num_pixels: int, dtype: Any = None,
                 param_dtype: Any = jnp.float32, *, rngs: nnx.Rngs) -> None:
        self.fc1 = nnx.Linear(in_features, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, num_pixels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, z: jax.Array, y: jax.Array) -> jax.Array:
        h = nnx.relu(self.fc1(jnp.concatenate([z, y], axis=-1)))
        return self.fc2(h)


def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    std = jnp.exp(0.5 * logvar)
    eps = jax.random.normal(rng, logvar.shape, logvar.dtype)
    return mean + eps * std


class VAE(nnx.Module):
    def __init__(
        self,
        num_pixels: int,
        num_classes: int = 10,
        latents: int = 20,
        hidden: int = 500,
        dtype: Any = None,  # computation dtype: bfloat16 for mixed precision
        param_dtype: Any = jnp.float32,  # the parameters' dtype: float64 for float64 runs
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.num_classes = num_classes
        self.encoder = Encoder(num_pixels + num_classes, hidden, latents, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)
        self.decoder = Decoder(latents + num_classes, hidden, num_pixels, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

    def __call__(
        self, x: jax.Array, labels: jax.Array, rngs: nnx.Rngs
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        y = jax.nn.one_hot(labels, self.num_classes, dtype=x.dtype)
        mean, logvar = self.encoder(x.reshape((x.shape[0], -1)), y)
        z = reparameterize(rngs.noise(), mean, logvar)
        return self.decoder(z, y), mean, logvar

    def generate(self, z: jax.Array, labels: jax.Array) -> jax.Array:
        y = jax.nn.one_hot(labels, self.num_classes, dtype=z.dtype)
        return nnx.sigmoid(self.decoder(z, y))
