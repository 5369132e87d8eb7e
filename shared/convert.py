"""Porting parameters and state between frameworks: the public API.

Every conversion goes through the canonical layout (the plain-JAX reference's
trees), leaf by leaf; the rules themselves live in :mod:`shared.layouts` and in
each style's adapter (:mod:`shared.styles`).
"""

from __future__ import annotations

from typing import Any

from shared import styles
from shared.layouts import Canonical, Converter, Layout, chw_rows_to_hwc, flatten_canonical  # noqa: F401

PyTree = Any


def convert(params: PyTree, model: str, src_style: str, dst_style: str, *,
            in_shape: tuple[int, int, int], num_classes: int = 10, **hparams: Any) -> PyTree:
    """Convert a model's parameters from one style to another, exactly.

    ``params`` is the source style's own parameter tree (a Linen ``params``
    dict, a Haiku params dict, NNX parameters as ``nnx.to_pure_dict`` gives them, the
    Equinox adapter's flat dict of the module's arrays by attribute path
    (``{"blocks.0.conv1.weight": ...}``), or the plain-JAX dict). The result is
    the destination style's tree, ready for its ``apply``; for NNX and Equinox,
    ``styles.build(...).as_module(params, state, train)`` gives the framework's
    own module holding it.
    """
    src = styles.build_once(model, src_style, in_shape=in_shape, num_classes=num_classes, **hparams)
    dst = styles.build_once(model, dst_style, in_shape=in_shape, num_classes=num_classes, **hparams)
    return dst.from_canonical(src.to_canonical(params))


def convert_state(state: PyTree, model: str, src_style: str, dst_style: str, *, updates: int,
                  in_shape: tuple[int, int, int], num_classes: int = 10, **hparams: Any) -> PyTree:
    """Convert a model's state (BatchNorm's running statistics) from one style to another.

    ``updates`` is how many training steps the statistics have seen: Haiku and
    Equinox keep that count to debias their averages, the canonical state (like
    Linen's ``batch_stats``) does not.
    """
    src = styles.build_once(model, src_style, in_shape=in_shape, num_classes=num_classes, **hparams)
    dst = styles.build_once(model, dst_style, in_shape=in_shape, num_classes=num_classes, **hparams)
    return dst.state_from_canonical(src.state_to_canonical(state), updates)
