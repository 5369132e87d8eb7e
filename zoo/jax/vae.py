"""A class-conditional variational autoencoder in plain JAX.

The encoder sees the flattened image and its one-hot label and gives the mean
and log-variance of a Gaussian latent; the decoder sees a latent and the
one-hot label and gives Bernoulli logits for every pixel. The sizes are those
of the classic MNIST VAE examples (20 latents, 500 hidden units). The parameters are the
canonical layout: ``{"encoder": {"fc1", "fc2_mean", "fc2_logvar"},
"decoder": {"fc1", "fc2"}}`` with ``(in, out)`` kernels.
"""

import jax
import jax.numpy as jnp

Params = dict[str, dict[str, dict[str, jax.Array]]]


def dense_init(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
    """A LeCun-normal kernel and a zero bias."""
    kernel = jax.nn.initializers.lecun_normal()(key, (n_in, n_out), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((n_out,), jnp.float32)}


def dense(layer: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return x @ layer["kernel"] + layer["bias"]


def init(
    key: jax.Array,
    num_pixels: int,
    num_classes: int = 10,
    latents: int = 20,
    hidden: int = 500,
) -> Params:
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    return {
        "encoder": {
            "fc1": dense_init(k1, num_pixels + num_classes, hidden),
            "fc2_mean": dense_init(k2, hidden, latents),
            "fc2_logvar": dense_init(k3, hidden, latents),
        },
        "decoder": {
            "fc1": dense_init(k4, latents + num_classes, hidden),
            "fc2": dense_init(k5, hidden, num_pixels),
        },
    }


def encode(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and log-variance of the latent for flat images ``x`` and one-hot labels ``y``."""
    p = params["encoder"]
    h = jax.nn.relu(dense(p["fc1"], jnp.concatenate([x, y], axis=-1)))
    return dense(p["fc2_mean"], h), dense(p["fc2_logvar"], h)


def decode(params: Params, z: jax.Array, y: jax.Array) -> jax.Array:
    """Bernoulli logits of the flat image for latents ``z`` and one-hot labels ``y``."""
    p = params["decoder"]
    h = jax.nn.relu(dense(p["fc1"], jnp.concatenate([z, y], axis=-1)))
    return dense(p["fc2"], h)


def reparameterize(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    std = jnp.exp(0.5 * logvar)
    eps = jax.random.normal(key, logvar.shape, logvar.dtype)
    return mean + eps * std


def apply(
    params: Params, x: jax.Array, labels: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reconstruction logits ``(batch, pixels)``, latent mean and log-variance; the noise is drawn from ``key``."""
    num_classes = params["encoder"]["fc1"]["kernel"].shape[0] - x[0].size
    y = jax.nn.one_hot(labels, num_classes, dtype=x.dtype)
    mean, logvar = encode(params, x.reshape((x.shape[0], -1)), y)
    z = reparameterize(key, mean, logvar)
    return decode(params, z, y), mean, logvar


def generate(params: Params, z: jax.Array, labels: jax.Array) -> jax.Array:
    """Pixel probabilities ``(batch, pixels)`` for latents ``z`` of classes ``labels``."""
    num_classes = params["decoder"]["fc1"]["kernel"].shape[0] - z.shape[-1]
    return jax.nn.sigmoid(decode(params, z, jax.nn.one_hot(labels, num_classes, dtype=z.dtype)))
