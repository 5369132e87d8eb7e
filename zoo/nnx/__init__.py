"""Flax NNX (``flax.nnx``) models."""
