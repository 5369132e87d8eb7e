"""The style adapters' helpers that the parity tests do not exercise on their own."""

import jax
import jax.numpy as jnp

from shared import styles


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
