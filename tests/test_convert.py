"""The public converter between styles, and the layout rules it relies on."""

import jax
import numpy as np
import pytest

from shared import styles
from shared.convert import Converter, convert, flatten_canonical
from shared.errors import ZooError
from shared.registry import STYLES


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


@pytest.fixture(scope="module")
def wide_mlps():
    """Every style's MLP (300, 100) parameters: not the default (128, 128) model's."""
    return {s: styles.build("mlp", s, in_shape=(8, 8, 1), hidden_sizes=(300, 100)).init_params(jax.random.key(0))
            for s in STYLES}


@pytest.mark.parametrize("style", STYLES)
def test_a_mismatched_conversion_is_refused_in_one_line_with_style_as_source_and_as_target(style, wide_mlps):
    others = [s for s in STYLES if s != style]
    # As the source: a tree of the wrong widths.
    with pytest.raises(ZooError) as err:
        convert(wide_mlps[style], "mlp", style, others[0], in_shape=(8, 8, 1))
    assert "\n" not in str(err.value) and "expected shape (128,), got (300,)" in str(err.value)
    assert "layers_0/" in str(err.value)  # the canonical path
    # As the target: canonical parameters of the wrong widths, and CNN parameters made for 28x28.
    wide = styles.build("mlp", others[0], in_shape=(8, 8, 1), hidden_sizes=(300, 100)).to_canonical(
        wide_mlps[others[0]])
    with pytest.raises(ZooError, match=r"^layers_0/\w+: expected shape \((128,|64, 128)\), got \((300,|64, 300)\)"):
        styles.build("mlp", style, in_shape=(8, 8, 1)).from_canonical(wide)
    cnn = styles.build("cnn", "jax", in_shape=(28, 28, 1)).init_params(jax.random.key(0))
    with pytest.raises(ZooError, match=r"^dense1/kernel: expected shape \(256, 256\), got \(3136, 256\)"):
        styles.build("cnn", style, in_shape=(8, 8, 1)).from_canonical(cnn)  # canonical: the reference's tree
    # A deeper MLP: other leaves altogether, whichever side.
    deep = styles.build("mlp", style, in_shape=(8, 8, 1), hidden_sizes=(32, 32, 32)).init_params(jax.random.key(0))
    with pytest.raises(ZooError) as err:
        convert(deep, "mlp", style, others[0], in_shape=(8, 8, 1))
    assert "\n" not in str(err.value)
    canonical = styles.build("mlp", "jax", in_shape=(8, 8, 1), hidden_sizes=(32, 32, 32)).init_params(
        jax.random.key(0))
    with pytest.raises(ZooError, match="unexpected layers_3/bias, layers_3/kernel"):
        styles.build("mlp", style, in_shape=(8, 8, 1), hidden_sizes=(32, 32)).from_canonical(canonical)


@pytest.mark.parametrize("style", STYLES)
def test_mismatched_state_is_refused_in_one_line(style):
    narrow = styles.build("resnet", "jax", in_shape=(8, 8, 1), width=4)
    state = narrow.state_to_canonical(jax.eval_shape(narrow.init, jax.random.key(0))[1])
    state = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state)
    wide = styles.build("resnet", style, in_shape=(8, 8, 1), width=8)
    with pytest.raises(ZooError, match=r"state blocks_0/bn1/mean: expected shape \(8,\), got \(4,\)"):
        wide.state_from_canonical(state, 3)
    with pytest.raises(ZooError, match="not this model.s state: missing"):
        wide.state_from_canonical({"stem_bn": state["stem_bn"]}, 3)
