"""LSTM cells and scans: where the frameworks differ, measured.

``test_parity.py`` proves that every style's LSTM is the reference's network.
Here: how each framework lays out its gates, where the bias sits, Haiku's
forget-gate offset, the order of the carry, and what each scan idiom expects;
and that the converter's gate order and offset are needed (a wrong one is
caught). Every test here backs a row of the site's porting-differences table.
"""

import dataclasses

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared import registry
from shared import styles as styles_lib
from shared.errors import ZooError
from shared.layouts import Converter
from shared.train import TrainConfig, trainable_labels
from zoo import harness
from zoo.jax.lstm import lstm_cell  # the reference cell: carry (c, h)

MODEL = "lstm"
FEATURES, HIDDEN = 3, 4
SMALL_HIDDEN = registry.MODELS[MODEL].small["hidden"]


def build(style: str) -> styles_lib.Model:
    return harness.build(MODEL, style)


def test_gate_layouts_as_each_framework_makes_them():
    """Linen and NNX: a kernel per gate for the input (no bias) and one for the hidden state (with
    the bias); NNX spells the forget gate's ``if_``. Haiku: one Linear over ``[x, h]``. Equinox:
    PyTorch's ``weight_ih``, ``weight_hh`` and one bias."""
    x, h = jnp.ones((1, FEATURES)), jnp.zeros((1, HIDDEN))
    linen = nn.LSTMCell(HIDDEN).init(jax.random.key(0), (h, h), x)["params"]
    assert {k: set(v) for k, v in linen.items()} == {
        **{f"i{g}": {"kernel"} for g in "ifgo"}, **{f"h{g}": {"kernel", "bias"} for g in "ifgo"}}
    assert linen["if"]["kernel"].shape == (FEATURES, HIDDEN) and linen["hf"]["kernel"].shape == (HIDDEN, HIDDEN)

    cell = nnx.LSTMCell(FEATURES, HIDDEN, rngs=nnx.Rngs(0))
    nnx_params = nnx.to_pure_dict(nnx.state(cell, nnx.Param))
    assert set(nnx_params) == {"ii", "if_", "ig", "io", "hi", "hf", "hg", "ho"}

    haiku_params = hk.transform(lambda x: hk.LSTM(HIDDEN, name="lstm")(
        x, hk.LSTMState(jnp.zeros((1, HIDDEN)), jnp.zeros((1, HIDDEN))))).init(jax.random.key(0), x)
    assert {k: {n: v.shape for n, v in p.items()} for k, p in haiku_params.items()} == {
        "lstm/linear": {"w": (FEATURES + HIDDEN, 4 * HIDDEN), "b": (4 * HIDDEN,)}}

    eqx_cell = eqx.nn.LSTMCell(FEATURES, HIDDEN, key=jax.random.key(0))
    assert (eqx_cell.weight_ih.shape, eqx_cell.weight_hh.shape, eqx_cell.bias.shape) == (
        (4 * HIDDEN, FEATURES), (4 * HIDDEN, HIDDEN), (4 * HIDDEN,))


def forget_gate_block(style: str) -> int:
    """Which quarter of a fused gate vector is the forget gate: push that quarter's bias up and
    the cell must keep its memory (f = 1, i * g = 0 with the input gate's bias pushed down)."""
    c = jnp.full((HIDDEN,), 0.5)
    x = jnp.zeros((FEATURES,))
    for block in range(4):
        bias = jnp.zeros((4 * HIDDEN,)).at[block * HIDDEN:(block + 1) * HIDDEN].set(30.0)
        if style == "haiku":
            fn = hk.without_apply_rng(hk.transform(lambda x, s: hk.LSTM(HIDDEN, name="lstm")(x, s)))
            params = {"lstm/linear": {"w": jnp.zeros((FEATURES + HIDDEN, 4 * HIDDEN)), "b": bias}}
            _, state = fn.apply(params, x[None], hk.LSTMState(jnp.zeros((1, HIDDEN)), c[None]))
            new_c = state.cell[0]
        else:
            cell = eqx.nn.LSTMCell(FEATURES, HIDDEN, key=jax.random.key(0))
            cell = eqx.tree_at(lambda m: (m.weight_ih, m.weight_hh, m.bias), cell,
                               (jnp.zeros_like(cell.weight_ih), jnp.zeros_like(cell.weight_hh), bias))
            _, new_c = cell(x, (jnp.zeros((HIDDEN,)), c))
        # f = 1 and the rest 0: c' = c + sigmoid(0) * tanh(0) = c.
        if np.allclose(np.asarray(new_c), 0.5, atol=1e-6):
            return block
    raise AssertionError(f"{style}: no block keeps the memory")


def test_gate_order_haiku_i_g_f_o_equinox_i_f_g_o():
    assert forget_gate_block("haiku") == registry.HAIKU_GATE_ORDER.index("f") == 2
    assert forget_gate_block("equinox") == registry.GATES.index("f") == 1


def test_haiku_adds_one_to_the_forget_gate():
    """All weights and biases zero, memory 1: Haiku's cell keeps sigmoid(1) of it, Linen's,
    NNX's and Equinox's sigmoid(0) = 1/2."""
    x, c = jnp.zeros((1, FEATURES)), jnp.ones((1, HIDDEN))
    fn = hk.without_apply_rng(hk.transform(lambda x, s: hk.LSTM(HIDDEN, name="lstm")(x, s)))
    zeros = {"lstm/linear": {"w": jnp.zeros((FEATURES + HIDDEN, 4 * HIDDEN)), "b": jnp.zeros((4 * HIDDEN,))}}
    _, state = fn.apply(zeros, x, hk.LSTMState(jnp.zeros((1, HIDDEN)), c))
    np.testing.assert_allclose(np.asarray(state.cell), jax.nn.sigmoid(1.0), rtol=1e-6)

    linen = nn.LSTMCell(HIDDEN)
    params = jax.tree.map(jnp.zeros_like, linen.init(jax.random.key(0), (c, c), x))
    (new_c, _), _ = linen.apply(params, (c, jnp.zeros((1, HIDDEN))), x)
    np.testing.assert_allclose(np.asarray(new_c), 0.5, rtol=1e-6)

    cell = eqx.nn.LSTMCell(FEATURES, HIDDEN, key=jax.random.key(0))
    cell = jax.tree.map(jnp.zeros_like, cell)
    _, eqx_c = cell(x[0], (jnp.zeros((HIDDEN,)), c[0]))
    np.testing.assert_allclose(np.asarray(eqx_c), 0.5, rtol=1e-6)


def test_carry_order_differs():
    """Linen and NNX carry ``(c, h)``; Haiku ``LSTMState(hidden, cell)``; Equinox ``(h, c)``.
    One step from a zero carry with a nonzero input gives h != c; each framework returns them in
    its own order."""
    canonical = harness.start(MODEL)[0]
    params = canonical["lstm"]["cell"]
    x = jax.random.normal(jax.random.key(1), (1, 8))
    zeros = jnp.zeros((1, SMALL_HIDDEN))
    (c, h), _ = lstm_cell(params, (zeros, zeros), x)
    assert float(jnp.max(jnp.abs(c - h))) > 1e-3
    linen_params = {"params": params}
    (lc, lh), _ = nn.LSTMCell(SMALL_HIDDEN).apply(linen_params, (zeros, zeros), x)
    np.testing.assert_array_equal(np.asarray(lc), np.asarray(c))
    eqx_net = build("equinox")
    cell = eqx_net.as_module(eqx_net.from_canonical(canonical), {}, False)[0].lstm
    eh, ec = cell(x[0], (zeros[0], zeros[0]))
    np.testing.assert_allclose(np.asarray(eh), np.asarray(h[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(ec), np.asarray(c[0]), atol=1e-6)
    assert hk.LSTMState._fields == ("hidden", "cell")


def test_scan_idioms_are_the_reference_scan():
    """nn.RNN and nnx.RNN scan a (batch, time, features) input over axis 1 from a zero carry;
    hk.dynamic_unroll is time-major unless ``time_major=False``; Equinox has no RNN layer and
    the model scans with ``jax.lax.scan`` itself. Each gives the reference's outputs."""
    images = jax.random.uniform(jax.random.key(2), (5, 8, 8, 1))
    canonical = harness.start(MODEL)[0]
    expected = jax.jit(build("jax").apply, static_argnums=5)(canonical, {}, images, None, None, False)[0]
    for style in ("flax", "nnx", "haiku", "equinox"):
        net = build(style)
        got = jax.jit(net.apply, static_argnums=5)(net.from_canonical(canonical), {}, images, None, None, False)[0]
        atol = 0 if style in registry.MODELS[MODEL].bitwise else 1e-5
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=atol, err_msg=style)
    # Haiku's default is time-major: the same (batch, time, features) array read as (time, batch, ...)
    # is another computation.
    core = hk.transform(lambda x: hk.dynamic_unroll(hk.LSTM(HIDDEN), x, hk.LSTM(HIDDEN).initial_state(2))[0])
    x = jnp.ones((2, 6, FEATURES))
    with pytest.raises(TypeError, match="concatenat"):
        core.init(jax.random.key(0), x)  # time-major: rows of a batch of 6 against a state of batch 2


def wrong_rules(**changes):
    """The Haiku LSTM's converter rules with one thing changed."""
    rules = registry._lstm_rules("haiku", (8, 8, 1), registry.MODELS[MODEL].resolve(registry.MODELS[MODEL].small))
    return {path: dataclasses.replace(rule, **changes.get(path, {})) for path, rule in rules.items()}


def outputs_with(rules, canonical, images):
    net = build("haiku")
    template = jax.eval_shape(net.init_params, jax.random.key(0))
    params = Converter("haiku", template, rules).from_canonical(canonical)
    return jax.jit(net.apply, static_argnums=5)(params, {}, images, None, None, False)[0]


def test_a_wrong_gate_order_or_a_missing_offset_is_caught(monkeypatch):
    images = jax.random.uniform(jax.random.key(4), (16, 8, 8, 1))
    reference = build("jax")
    canonical = jax.tree.map(lambda x: x, harness.start(MODEL)[0])
    # A nonzero canonical forget bias, so that the offset shows even where a zero would be 1.
    canonical["lstm"]["cell"]["hf"]["bias"] = jnp.full((SMALL_HIDDEN,), 0.3)
    expected = np.asarray(jax.jit(reference.apply, static_argnums=5)(canonical, {}, images, None, None, False)[0])
    right = np.asarray(outputs_with(wrong_rules(), canonical, images))
    np.testing.assert_allclose(right, expected, rtol=0, atol=1e-5)
    no_offset = wrong_rules(**{"lstm/linear/bias": {"offsets": {}}})
    assert np.max(np.abs(np.asarray(outputs_with(no_offset, canonical, images)) - expected)) > 1e-3
    monkeypatch.setattr(registry, "HAIKU_GATE_ORDER", registry.GATES)  # i, f, g, o: PyTorch's, not Haiku's
    assert np.max(np.abs(np.asarray(outputs_with(wrong_rules(), canonical, images)) - expected)) > 1e-3


def test_freezing_part_of_a_split_leaf_is_refused():
    """Equinox keeps the four input kernels in one ``weight_ih``: freezing one gate's alone is refused
    in one line; freezing all four (or a style that keeps them apart) is accepted."""
    with pytest.raises(ZooError, match="selects part of lstm/cell/"):
        trainable_labels(build("equinox"), TrainConfig(freeze=("lstm/cell/ii/*",)))
    assert trainable_labels(build("flax"), TrainConfig(freeze=("lstm/cell/ii/*",))) is not None
    assert trainable_labels(build("equinox"), TrainConfig(freeze=("lstm/cell/i*",))) is not None
