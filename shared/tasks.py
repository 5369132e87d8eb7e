"""What each model is trained to do: its per-example loss and metrics.

Classifiers (MLP, CNN) minimise softmax cross-entropy and report accuracy. The
VAE minimises the negative ELBO: binary cross-entropy summed over the pixels
plus the KL divergence of the latent from a standard normal, per example; the
mean over examples is the convention of Flax's VAE example. A language model
minimises the cross-entropy of each next token, averaged over the tokens that
count (a target of -1 does not: the question of an addition problem), and
reports it in bits too, the share of tokens it predicts, and the share of
examples whose every counted token it predicts: on addition, the problems it
solves (greedy decoding gives the same answer token by token, since each
answer token is predicted from the correct ones before it).
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
    if kind == "lm":
        return per_sequence(outputs, batch["label"])
    logits, mean, logvar = outputs
    pixels = batch["image"].reshape((logits.shape[0], -1))
    bce = optax.sigmoid_binary_cross_entropy(logits, pixels).sum(axis=-1)
    kl = -0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar), axis=-1)
    return {"loss": bce + kl, "bce": bce, "kl": kl}


def per_sequence(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """A language model's metrics per example, over the targets that count (``>= 0``)."""
    counted = targets >= 0
    n = jnp.maximum(counted.sum(axis=-1), 1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(counted, targets, 0))
    loss = jnp.where(counted, ce, 0.0).sum(axis=-1) / n
    right = (jnp.argmax(logits, axis=-1) == targets) | ~counted
    return {"loss": loss, "bits": loss / jnp.log(2.0).astype(loss.dtype),
            "accuracy": (right & counted).sum(axis=-1) / n,
            "exact_match": jnp.all(right, axis=-1).astype(loss.dtype)}


def headline(kind: str) -> str:
    """The metric a person reads first: accuracy, the negative ELBO, or a language model's bits per token."""
    return {"classifier": "accuracy", "lm": "bits"}.get(kind, "loss")
