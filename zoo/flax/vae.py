"""A class-conditional variational autoencoder in Flax Linen.

The encoder sees the flattened image and its one-hot label and gives the mean
and log-variance of a Gaussian latent; the decoder sees a latent and the
one-hot label and gives Bernoulli logits for every pixel. The sizes follow
Flax's VAE example (20 latents, 500 hidden units).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Encoder(nn.Module):
    hidden: int
    latents: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.fc1 = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc2_mean = nn.Dense(self.latents, dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc2_logvar = nn.Dense(self.latents, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = nn.relu(self.fc1(jnp.concatenate([x, y], axis=-1)))
        return self.fc2_mean(h), self.fc2_logvar(h)


class Decoder(nn.Module):
    hidden: int
    num_pixels: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.fc1 = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc2 = nn.Dense(self.num_pixels, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, z: jax.Array, y: jax.Array) -> jax.Array:
        h = nn.relu(self.fc1(jnp.concatenate([z, y], axis=-1)))
        return self.fc2(h)


def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    std = jnp.exp(0.5 * logvar)
    eps = jax.random.normal(rng, logvar.shape, logvar.dtype)
    return mean + eps * std


class VAE(nn.Module):
    num_pixels: int
    num_classes: int = 10
    latents: int = 20
    hidden: int = 500
    dtype: Any = None  # computation dtype: bfloat16 for mixed precision
    param_dtype: Any = jnp.float32  # the parameters' dtype: float64 for float64 runs

    def setup(self) -> None:
        self.encoder = Encoder(self.hidden, self.latents, dtype=self.dtype, param_dtype=self.param_dtype)
        self.decoder = Decoder(self.hidden, self.num_pixels, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(
        self, x: jax.Array, labels: jax.Array, z_rng: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        y = jax.nn.one_hot(labels, self.num_classes, dtype=x.dtype)
        mean, logvar = self.encoder(x.reshape((x.shape[0], -1)), y)
        z = reparameterize(z_rng, mean, logvar)
        return self.decoder(z, y), mean, logvar

    def generate(self, z: jax.Array, labels: jax.Array) -> jax.Array:
        y = jax.nn.one_hot(labels, self.num_classes, dtype=z.dtype)
        return nn.sigmoid(self.decoder(z, y))
