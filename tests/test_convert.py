"""The public converter between styles, and the layout rules it relies on."""

import jax
import numpy as np
import pytest

from shared import styles
from shared.convert import Converter, convert, flatten_canonical
from shared.errors import ZooError


def test_convert_flax_to_haiku_and_back_is_exact():
    flax_model = styles.build("cnn", "flax", in_shape=(8, 8, 1))
    params = flax_model.init_params(jax.random.key(0))
    haiku_params = convert(params, "cnn", "flax", "haiku", in_shape=(8, 8, 1))
    assert "cnn/~/conv1" in haiku_params and set(haiku_params["cnn/~/conv1"]) == {"w", "b"}
    back = convert(haiku_params, "cnn", "haiku", "flax", in_shape=(8, 8, 1))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_converted_parameters_give_the_same_outputs():
    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    flax_model = styles.build("cnn", "flax", in_shape=(8, 8, 1))
    eqx_model = styles.build("cnn", "equinox", in_shape=(8, 8, 1))
    params = flax_model.init_params(jax.random.key(0))
    eqx_params = convert(params, "cnn", "flax", "equinox", in_shape=(8, 8, 1))
    np.testing.assert_allclose(eqx_model.apply(eqx_params, {}, x, None, None, False)[0],
                               flax_model.apply(params, {}, x, None, None, False)[0], atol=1e-5, rtol=0)


def test_a_wrong_flatten_permutation_is_caught():
    """Equinox flattens CHW: transposing dense1 without permuting its rows must fail parity."""
    x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))
    reference = styles.build("cnn", "jax", in_shape=(16, 16, 1))
    eqx_model = styles.build("cnn", "equinox", in_shape=(16, 16, 1))
    canonical = reference.init_params(jax.random.key(0))
    expected = reference.apply(canonical, {}, x, None, None, False)[0]
    np.testing.assert_allclose(eqx_model.apply(eqx_model.from_canonical(canonical), {}, x, None, None, False)[0],
                               expected, atol=1e-5, rtol=0)
    # The same converter without the row permutation: only the transpose.
    naive = Converter("equinox", jax.eval_shape(eqx_model.init_params, jax.random.key(0)))
    assert naive.rules[[r.canonical for r in naive.rules].index("dense1/kernel")].layout.note.startswith("transpose")
    wrong = eqx_model.apply(naive.from_canonical(canonical), {}, x, None, None, False)[0]
    assert float(np.max(np.abs(np.asarray(wrong) - np.asarray(expected)))) > 1e-3


def test_layout_notes_describe_equinox_leaves():
    model = styles.build("cnn", "equinox", in_shape=(28, 28, 1))
    notes = {r.canonical: r.layout.note for r in model.converter.rules}
    assert notes["conv1/kernel"] == "kernel OIHW -> HWIO"
    assert notes["conv1/bias"] == "bias (out, 1, 1) -> (out,)"
    assert "rows CHW -> HWC for a 7x7x64 feature map" in notes["dense1/kernel"]
    assert notes["dense2/kernel"].startswith("transpose")


def test_optimizer_state_converts_leaf_by_leaf():
    """Adam's moments have the parameters' layout, so the same rules convert them."""
    import optax

    model = styles.build("mlp", "equinox", in_shape=(8, 8, 1))
    params = model.init_params(jax.random.key(0))
    state = optax.adam(1e-3).init(params)
    mu = model.to_canonical(state[0].mu)
    assert flatten_canonical(mu)["layers_0/kernel"].shape == (64, 128)


def test_bad_hyperparameter_and_shape_are_refused():
    with pytest.raises(ZooError, match="no hyperparameter"):
        styles.build("cnn", "flax", in_shape=(8, 8, 1), latents=3)
    model = styles.build("mlp", "jax", in_shape=(8, 8, 1))
    params = model.init_params(jax.random.key(0))
    with pytest.raises(ZooError, match=r"built for images of shape \(8, 8, 1\)"):
        model.apply(params, {}, np.zeros((2, 28, 28, 1), np.float32), None, None, False)
