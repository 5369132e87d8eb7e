"""What each model is trained to do: its per-example loss and metrics.

Classifiers (MLP, CNN) minimise softmax cross-entropy and report accuracy. The
VAE minimises the negative ELBO: binary cross-entropy summed over the pixels
plus the KL divergence of the latent from a standard normal, per example; the
mean over examples is the convention of Flax's VAE example.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def per_example(kind: str, outputs, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``{"loss": (batch,), ...metrics}``, every value one number per example."""
    if kind == "classifier":
        logits = outputs
        labels = batch["label"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
        return {"loss": loss, "accuracy": correct}
    logits, mean, logvar = outputs
    pixels = batch["image"].reshape((logits.shape[0], -1))
    bce = optax.sigmoid_binary_cross_entropy(logits, pixels).sum(axis=-1)
    kl = -0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=-1)
    return {"loss": bce + kl, "bce": bce, "kl": kl}


def headline(kind: str) -> str:
    """The metric a person reads first: accuracy, or the negative ELBO."""
    return "accuracy" if kind == "classifier" else "loss"
