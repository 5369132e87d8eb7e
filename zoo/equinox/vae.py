"""A class-conditional variational autoencoder in Equinox.

The encoder sees the flattened image and its one-hot label and gives the mean
and log-variance of a Gaussian latent; the decoder sees a latent and the
one-hot label and gives Bernoulli logits for every pixel. The sizes are those
of the classic MNIST VAE examples (20 latents, 500 hidden units). Acts on a single example:
``jax.vmap`` it over a batch, with one key per example.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


class Encoder(eqx.Module):
    fc1: eqx.nn.Linear
    fc2_mean: eqx.nn.Linear
    fc2_logvar: eqx.nn.Linear

    def __init__(self, in_features: int, hidden: int, latents: int, *, key: jax.Array) -> None:
        k1, k2, k3 = jax.random.split(key, 3)
        self.fc1 = eqx.nn.Linear(in_features, hidden, key=k1)
        self.fc2_mean = eqx.nn.Linear(hidden, latents, key=k2)
        self.fc2_logvar = eqx.nn.Linear(hidden, latents, key=k3)

    def __call__(
        self, x: Float[Array, " num_pixels"], y: Float[Array, " num_classes"]
    ) -> tuple[Float[Array, " latents"], Float[Array, " latents"]]:
        h = jax.nn.relu(self.fc1(jnp.concatenate([x, y], axis=-1)))
        return self.fc2_mean(h), self.fc2_logvar(h)


class Decoder(eqx.Module):
    fc1: eqx.nn.Linear
    fc2: eqx.nn.Linear

    def __init__(self, in_features: int, hidden: int, num_pixels: int, *, key: jax.Array) -> None:
        k1, k2 = jax.random.split(key)
        self.fc1 = eqx.nn.Linear(in_features, hidden, key=k1)
        self.fc2 = eqx.nn.Linear(hidden, num_pixels, key=k2)

    def __call__(self, z: Float[Array, " latents"], y: Float[Array, " num_classes"]) -> Float[Array, " num_pixels"]:
        h = jax.nn.relu(self.fc1(jnp.concatenate([z, y], axis=-1)))
        return self.fc2(h)


def reparameterize(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    std = jnp.exp(0.5 * logvar)
    eps = jax.random.normal(key, logvar.shape, logvar.dtype)
    return mean + eps * std


class VAE(eqx.Module):
    num_classes: int
    encoder: Encoder
    decoder: Decoder

    def __init__(
        self,
        num_pixels: int,
        num_classes: int = 10,
        latents: int = 20,
        hidden: int = 500,
        *,
        key: jax.Array,
    ) -> None:
        k1, k2 = jax.random.split(key)
        self.num_classes = num_classes
        self.encoder = Encoder(num_pixels + num_classes, hidden, latents, key=k1)
        self.decoder = Decoder(latents + num_classes, hidden, num_pixels, key=k2)

    def __call__(
        self, x: Float[Array, "height width channels"], label: Int[Array, ""], *, key: jax.Array
    ) -> tuple[Float[Array, " num_pixels"], Float[Array, " latents"], Float[Array, " latents"]]:
        y = jax.nn.one_hot(label, self.num_classes, dtype=x.dtype)
        mean, logvar = self.encoder(x.ravel(), y)
        z = reparameterize(key, mean, logvar)
        return self.decoder(z, y), mean, logvar

    def generate(self, z: Float[Array, " latents"], label: Int[Array, ""]) -> Float[Array, " num_pixels"]:
        y = jax.nn.one_hot(label, self.num_classes, dtype=z.dtype)
        return jax.nn.sigmoid(self.decoder(z, y))
