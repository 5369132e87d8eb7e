"""A class-conditional variational autoencoder in Haiku.

The encoder sees the flattened image and its one-hot label and gives the mean
and log-variance of a Gaussian latent; the decoder sees a latent and the
one-hot label and gives Bernoulli logits for every pixel. The sizes are those
of the classic MNIST VAE examples (20 latents, 500 hidden units). Use it inside
``hk.transform``.
"""

import haiku as hk
import jax
import jax.numpy as jnp


class Encoder(hk.Module):
    def __init__(self, hidden: int, latents: int, name: str | None = None) -> None:
        super().__init__(name=name)
        self.fc1 = hk.Linear(hidden, name="fc1")
        self.fc2_mean = hk.Linear(latents, name="fc2_mean")
        self.fc2_logvar = hk.Linear(latents, name="fc2_logvar")

    def __call__(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jax.nn.relu(self.fc1(jnp.concatenate([x, y], axis=-1)))
        return self.fc2_mean(h), self.fc2_logvar(h)


class Decoder(hk.Module):
    def __init__(self, hidden: int, num_pixels: int, name: str | None = None) -> None:
        super().__init__(name=name)
        self.fc1 = hk.Linear(hidden, name="fc1")
        self.fc2 = hk.Linear(num_pixels, name="fc2")

    def __call__(self, z: jax.Array, y: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.fc1(jnp.concatenate([z, y], axis=-1)))
        return self.fc2(h)


def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    std = jnp.exp(0.5 * logvar)
    eps = jax.random.normal(rng, logvar.shape, logvar.dtype)
    return mean + eps * std


class VAE(hk.Module):
    def __init__(
        self,
        num_pixels: int,
        num_classes: int = 10,
        latents: int = 20,
        hidden: int = 500,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.num_classes = num_classes
        self.encoder = Encoder(hidden, latents, name="encoder")
        self.decoder = Decoder(hidden, num_pixels, name="decoder")

    def __call__(self, x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        y = jax.nn.one_hot(labels, self.num_classes, dtype=x.dtype)
        mean, logvar = self.encoder(hk.Flatten()(x), y)
        z = reparameterize(hk.next_rng_key(), mean, logvar)
        return self.decoder(z, y), mean, logvar

    def generate(self, z: jax.Array, labels: jax.Array) -> jax.Array:
        y = jax.nn.one_hot(labels, self.num_classes, dtype=z.dtype)
        return jax.nn.sigmoid(self.decoder(z, y))
