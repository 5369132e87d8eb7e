"""Attention, LayerNorm and GELU: where the frameworks differ, measured.

``test_parity.py`` proves that every style's ViT is the reference's network.
Here: each framework's attention kernel layout and bias defaults, how a mask
and a dropout key reach the attention, which attention takes a batch and which
one example, GELU's and LayerNorm's defaults, and that the converter's head
split is needed (a wrong one is caught). Every test here backs a row of the
site's porting-differences table.
"""

import dataclasses
import functools
from pathlib import Path

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
from shared.layouts import Converter, Layout, Renamed
from zoo.nnx import vit as zoo_nnx_vit

ZOO = Path(__file__).resolve().parent
MODEL = "vit"
WIDTH, HEADS, SEQ = 8, 2, 5
HEAD_DIM = WIDTH // HEADS


@functools.cache
def build(style: str, in_shape=(8, 8, 1)) -> styles_lib.Model:
    return styles_lib.build(MODEL, style, in_shape=in_shape)


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def haiku_attention(**kwargs):
    w_init = hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
    return hk.transform(lambda q, m=None: hk.MultiHeadAttention(HEADS, HEAD_DIM, model_size=WIDTH, w_init=w_init,
                                                                name="attn", **kwargs)(q, q, q, mask=m))


def test_attention_kernel_layouts_and_bias_defaults():
    """Linen and NNX: ``(in, heads, head_dim)`` kernels and ``(heads, head_dim)`` biases, output
    ``(heads, head_dim, out)``. Haiku: ``(in, heads * head_dim)``, output ``linear``, and no default
    initialiser. Equinox: ``(heads * head_dim, in)`` and no biases unless asked."""
    x = jnp.ones((1, SEQ, WIDTH))
    linen = nn.MultiHeadDotProductAttention(HEADS).init(jax.random.key(0), x)["params"]
    assert _shapes(linen) == {
        **{f"['{n}']['kernel']": (WIDTH, HEADS, HEAD_DIM) for n in ("query", "key", "value")},
        **{f"['{n}']['bias']": (HEADS, HEAD_DIM) for n in ("query", "key", "value")},
        "['out']['kernel']": (HEADS, HEAD_DIM, WIDTH), "['out']['bias']": (WIDTH,)}
    attention = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=nnx.Rngs(0))
    assert _shapes(nnx.to_pure_dict(nnx.state(attention, nnx.Param))) == _shapes(linen)

    haiku = haiku_attention().init(jax.random.key(0), x)
    assert _shapes(haiku) == {
        **{f"['attn/{n}']['w']": (WIDTH, HEADS * HEAD_DIM) for n in ("query", "key", "value", "linear")},
        **{f"['attn/{n}']['b']": (HEADS * HEAD_DIM,) for n in ("query", "key", "value", "linear")}}
    with pytest.raises(ValueError, match="w_init"):
        hk.transform(lambda q: hk.MultiHeadAttention(HEADS, HEAD_DIM, model_size=WIDTH)(q, q, q)).init(
            jax.random.key(0), x)

    plain = eqx.nn.MultiheadAttention(HEADS, WIDTH, key=jax.random.key(0))
    assert plain.query_proj.weight.shape == (HEADS * HEAD_DIM, WIDTH)
    assert all(layer.bias is None for layer in (plain.query_proj, plain.key_proj, plain.value_proj,
                                                plain.output_proj))


def test_attention_takes_a_batch_or_one_example():
    """Linen, NNX and Haiku attend over ``(batch, seq, features)``; Equinox's attention is
    written for one ``(seq, features)`` example and is vmapped over the batch."""
    batch = jnp.ones((3, SEQ, WIDTH))
    out = nn.MultiHeadDotProductAttention(HEADS).init_with_output(jax.random.key(0), batch)[0]
    assert out.shape == batch.shape
    assert nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=nnx.Rngs(0))(batch).shape == batch.shape
    fn = haiku_attention()
    assert fn.apply(fn.init(jax.random.key(0), batch), None, batch).shape == batch.shape
    attention = eqx.nn.MultiheadAttention(HEADS, WIDTH, key=jax.random.key(0))
    assert attention(batch[0], batch[0], batch[0]).shape == (SEQ, WIDTH)
    assert jax.vmap(lambda x: attention(x, x, x))(batch).shape == batch.shape
    with pytest.raises(ValueError, match="unpack"):  # (batch, seq, features) is not (seq, features)
        attention(batch, batch, batch)


def test_how_the_mask_reaches_the_attention():
    """A mask hiding key position 0: changing that position's input must not change the other
    positions' outputs. Linen, NNX and Haiku take it broadcastable to ``(batch, heads, q, k)``;
    Equinox per example as ``(q, k)``."""
    x = jax.random.normal(jax.random.key(1), (2, SEQ, WIDTH))
    y = x.at[:, 0].add(1.0)
    mask = jnp.ones((SEQ, SEQ), bool).at[:, 0].set(False)
    batch_mask = mask[None, None]

    def unchanged(fn):
        np.testing.assert_allclose(np.asarray(fn(x))[:, 1:], np.asarray(fn(y))[:, 1:], rtol=0, atol=1e-6)
        assert float(jnp.max(jnp.abs(fn(x)[:, 0] - fn(y)[:, 0]))) > 1e-4  # the query at 0 does change

    linen = nn.MultiHeadDotProductAttention(HEADS)
    params = linen.init(jax.random.key(0), x)
    unchanged(lambda q: jax.vmap(lambda r: linen.apply(params, r[None], r[None], mask=batch_mask)[0])(q))
    attention = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=nnx.Rngs(0))
    unchanged(lambda q: jax.vmap(lambda r: attention(r[None], r[None], mask=batch_mask)[0])(q))
    fn = haiku_attention()
    hk_params = fn.init(jax.random.key(0), x)
    unchanged(lambda q: jax.vmap(lambda r: fn.apply(hk_params, None, r[None], batch_mask)[0])(q))
    eqx_attention = eqx.nn.MultiheadAttention(HEADS, WIDTH, key=jax.random.key(0))
    unchanged(lambda q: jax.vmap(lambda r: eqx_attention(r, r, r, mask=mask))(q))


def test_how_the_dropout_key_reaches_the_attention():
    """Attention-weight dropout (the ViT keeps it at 0): Linen draws one mask for the whole batch
    from ``dropout_rng`` and by default (``broadcast_dropout=True``) shares it across the batch;
    Equinox draws per example from ``key=``, split once per head; Haiku's attention has none."""
    same = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (1, SEQ, WIDTH)), (4, SEQ, WIDTH))
    rng = jax.random.key(3)

    def linen_outputs(broadcast: bool):
        layer = nn.MultiHeadDotProductAttention(HEADS, dropout_rate=0.5, broadcast_dropout=broadcast)
        params = layer.init(jax.random.key(0), same, deterministic=True)
        return np.asarray(layer.apply(params, same, deterministic=False, dropout_rng=rng))

    shared = linen_outputs(True)
    np.testing.assert_array_equal(shared[0], shared[1])  # one mask for every example
    assert np.max(np.abs(linen_outputs(False)[0] - linen_outputs(False)[1])) > 1e-3
    assert registry.MODELS[MODEL].rng == "dropout"
    assert "dropout" not in " ".join(hk.MultiHeadAttention.__init__.__code__.co_varnames)
    attention = eqx.nn.MultiheadAttention(HEADS, WIDTH, dropout_p=0.5, key=jax.random.key(0))
    keys = jax.random.split(rng, 4)
    per_example = np.asarray(jax.vmap(lambda x, k: attention(x, x, x, key=k))(same, keys))
    assert np.max(np.abs(per_example[0] - per_example[1])) > 1e-3
    assert attention.dropout.p == 0.5 and not attention.dropout.inference


def test_gelu_defaults_to_the_tanh_approximation():
    """``nn.gelu``, ``nnx.gelu`` and ``jax.nn.gelu`` (Haiku's and Equinox's) default to the tanh
    approximation, PyTorch's ``nn.GELU`` to the exact erf form: up to 4.7e-4 apart. Every style of
    the ViT asks for ``approximate=False``."""
    x = jnp.linspace(-6.0, 6.0, 10001)
    for gelu in (nn.gelu, nnx.gelu, jax.nn.gelu):
        np.testing.assert_array_equal(np.asarray(gelu(x)), np.asarray(jax.nn.gelu(x, approximate=True)))
    gap = float(jnp.max(jnp.abs(jax.nn.gelu(x) - jax.nn.gelu(x, approximate=False))))
    assert 4e-4 < gap < 5e-4
    for style in ("flax", "nnx", "haiku", "equinox"):
        text = (ZOO / style / f"{MODEL}.py").read_text()
        assert "gelu(" in text and "approximate=False" in text, style


def test_layernorm_epsilon_and_variance_defaults():
    """Linen and NNX: epsilon 1e-6 and the fast variance ``E[x²] - E[x]²``; Haiku and Equinox:
    1e-5 and the two-pass ``E[(x - E[x])²]``. On features of small variance the epsilons differ
    visibly; the ViT sets 1e-6 and the two-pass variance everywhere."""
    assert nn.LayerNorm().epsilon == 1e-6 and nn.LayerNorm().use_fast_variance
    layer = nnx.LayerNorm(WIDTH, rngs=nnx.Rngs(0))
    assert layer.epsilon == 1e-6 and layer.use_fast_variance
    assert eqx.nn.LayerNorm(WIDTH).eps == 1e-5
    x = 1e-3 * jax.random.normal(jax.random.key(4), (1, WIDTH))  # variance ~1e-6, near the epsilons
    linen = nn.LayerNorm()
    flax_out = linen.apply(linen.init(jax.random.key(0), x), x)
    fn = hk.without_apply_rng(hk.transform(lambda v: hk.LayerNorm(-1, True, True)(v)))
    haiku_out = fn.apply(fn.init(jax.random.key(0), x), x)
    eqx_out = eqx.nn.LayerNorm(WIDTH)(x[0])
    assert float(jnp.max(jnp.abs(flax_out - haiku_out))) > 0.05
    np.testing.assert_allclose(np.asarray(haiku_out[0]), np.asarray(eqx_out), rtol=0, atol=1e-5)
    kwargs = registry.MODELS[MODEL].kwargs((8, 8, 1), 10, {})
    reference = build("jax").init_params(jax.random.key(0))
    assert kwargs["width"] == reference["norm"]["scale"].shape[0]
    for style in ("flax", "nnx", "haiku", "equinox"):
        text = (ZOO / style / f"{MODEL}.py").read_text()
        assert text.count("1e-6") >= 3, style  # norm1, norm2 and the final norm
        if style in ("flax", "nnx"):
            assert text.count("use_fast_variance=False") >= 3, style


def wrong_head_split(rules: dict) -> dict:
    """The Haiku rules with each query/key/value kernel split head-minor, ``(in, head_dim, heads)``
    read as ``(in, heads, head_dim)``: a valid permutation of the elements, the wrong one."""
    def head_minor(shape):
        inner = (shape[0], HEAD_DIM_DEFAULT, HEADS_DEFAULT)
        return Layout("head-minor split", lambda x: x.reshape(inner).transpose(0, 2, 1),
                      lambda x: x.transpose(0, 2, 1).reshape(shape))
    out = {}
    for path, rule in rules.items():
        if isinstance(rule, Renamed) and rule.canonical.endswith(("query/kernel", "key/kernel", "value/kernel")):
            rule = dataclasses.replace(rule, layout=head_minor((WIDTH_DEFAULT, WIDTH_DEFAULT)))
        out[path] = rule
    return out


_DEFAULTS = registry.MODELS[MODEL].defaults
WIDTH_DEFAULT, HEADS_DEFAULT = _DEFAULTS["width"], _DEFAULTS["num_heads"]
HEAD_DIM_DEFAULT = WIDTH_DEFAULT // HEADS_DEFAULT


def test_a_wrong_head_split_is_caught():
    images = jax.random.uniform(jax.random.key(5), (8, 8, 8, 1))
    reference = build("jax")
    canonical = reference.init_params(jax.random.key(6))
    expected = np.asarray(reference.apply(canonical, {}, images, None, jax.random.key(0), False)[0])
    net = build("haiku")
    template = jax.eval_shape(net.init_params, jax.random.key(0))
    rules = registry._vit_rules("haiku", (8, 8, 1), registry.MODELS[MODEL].resolve({}))
    right = net.apply(Converter("haiku", template, rules).from_canonical(canonical), {}, images, None, jax.random.key(0), False)[0]
    np.testing.assert_allclose(np.asarray(right), expected, rtol=0, atol=1e-5)
    wrong = Converter("haiku", template, wrong_head_split(rules)).from_canonical(canonical)
    assert np.max(np.abs(np.asarray(net.apply(wrong, {}, images, None, jax.random.key(0), False)[0]) - expected)) > 1e-3


def test_nnx_default_attention_loses_float64():
    """Without attention-weight dropout, ``nnx.MultiHeadAttention``'s default ``attention_fn`` hands
    over to ``jax.nn.dot_product_attention``, which scales after the product and takes the softmax
    in float32 even under x64: in float64 it is ~1e-7 off Linen's attention from the same
    parameters. The ViT passes Linen's formula instead (``zoo/nnx/vit.py``'s ``attention``)."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(7), (2, SEQ, WIDTH), jnp.float64)
        kwargs = dict(decode=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        default = nnx.MultiHeadAttention(HEADS, WIDTH, **kwargs)
        linens = nnx.MultiHeadAttention(HEADS, WIDTH, attention_fn=zoo_nnx_vit.attention, **kwargs)
        params = nnx.to_pure_dict(nnx.state(default, nnx.Param))
        nnx.update(linens, nnx.state(default, nnx.Param))
        expected = nn.MultiHeadDotProductAttention(HEADS, param_dtype=jnp.float64).apply({"params": params}, x)
        assert expected.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(linens(x)), np.asarray(expected), rtol=0, atol=1e-14)
        assert float(jnp.max(jnp.abs(default(x) - expected))) > 1e-9
