"""The style adapters' helpers that the parity tests do not exercise on their own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shared import styles
from shared.errors import ZooError


def test_compile_low_opt_applies_its_options_and_computes_the_same():
    lowered = jax.jit(lambda x: jnp.cumsum(x * 3 + 1)).lower(jnp.arange(5))
    compiled = styles.compile_low_opt(lowered)
    assert compiled(jnp.arange(5)).tolist() == [1, 5, 12, 22, 35]
    # The options were accepted by this XLA, not dropped by the fallback.
    assert lowered.compile(compiler_options=styles.LOW_OPT)(jnp.arange(5)).tolist() == [1, 5, 12, 22, 35]


class _OldXla:
    """A lowered program whose XLA refuses the low-optimisation options."""

    def __init__(self):
        self.calls = []

    def compile(self, compiler_options=None):
        self.calls.append(compiler_options)
        if compiler_options:
            raise RuntimeError("INVALID_ARGUMENT: No such compile option: 'xla_backend_optimization_level'")
        return "compiled as usual"


def test_compile_low_opt_falls_back_to_a_plain_compile_on_an_xla_without_the_options():
    lowered = _OldXla()
    assert styles.compile_low_opt(lowered) == "compiled as usual"
    assert lowered.calls == [styles.LOW_OPT, None]


def test_build_once_shares_a_model_only_between_identical_builds():
    """The checkpoint and file readers' build: one model per set of arguments (a list given where the
    metadata holds one is the same argument as a tuple), another for other arguments or under x64, and
    a refusal is a refusal every time, never remembered as a model."""
    args = {"in_shape": (8, 8, 1), "num_classes": 10}
    first = styles.build_once("resnet", "haiku", stage_sizes=[1, 1], width=4, **args)
    assert styles.build_once("resnet", "haiku", stage_sizes=(1, 1), width=4, **args) is first
    assert first.hparams["stage_sizes"] == (1, 1) and first.style == "haiku"
    assert styles.build_once("resnet", "haiku", stage_sizes=(1, 1), width=8, **args) is not first
    assert styles.build_once("resnet", "equinox", stage_sizes=(1, 1), width=4, **args) is not first
    with jax.enable_x64(True):
        assert styles.build_once("resnet", "haiku", stage_sizes=(1, 1), width=4, **args) is not first
    for _ in range(2):
        with pytest.raises(ZooError, match="no hyperparameter"):
            styles.build_once("resnet", "haiku", depth=3, **args)
    assert styles.build_once("resnet", "haiku", stage_sizes=(1, 1), width=4, in_shape=[8, 8, 1]) is first
    # An argument that cannot be a key (an array) is built every time, not cached.
    sizes = np.array([16])
    once = styles.build_once("mlp", "jax", hidden_sizes=sizes, in_shape=(8, 8, 1))
    assert once is not styles.build_once("mlp", "jax", hidden_sizes=sizes, in_shape=(8, 8, 1))
    assert jax.eval_shape(once.init, jax.random.key(0))[0]["layers_0"]["kernel"].shape == (64, 16)
