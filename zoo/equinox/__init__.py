"""Equinox models: modules are PyTrees that act on one example at a time."""
