"""Flax Linen (``flax.linen``) models."""
