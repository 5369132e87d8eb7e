"""Attention, LayerNorm and GELU: where the frameworks differ, measured.

``test_parity.py`` proves that every style's ViT is the reference's network.
Here: each framework's attention kernel layout and bias defaults, how a mask
and a dropout key reach the attention, which attention takes a batch and which
one example, GELU's and LayerNorm's defaults, and that the converter's head
split is needed (a wrong one is caught). Every test here backs a row of the
site's porting-differences table.
"""

import dataclasses
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
from zoo import harness

ZOO = Path(__file__).resolve().parent
MODEL = "vit"
WIDTH, HEADS, SEQ = 8, 2, 5
HEAD_DIM = WIDTH // HEADS


def build(style: str) -> styles_lib.Model:
    return harness.build(MODEL, style)


def _shapes(tree) -> dict:
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def haiku_attention(**kwargs):
    w_init = hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
    return hk.transform(lambda q, m=None: hk.MultiHeadAttention(HEADS, HEAD_DIM, model_size=WIDTH, w_init=w_init,
                                                                name="attn", **kwargs)(q, q, q, mask=m))


def test_attention_kernel_layouts_and_bias_defaults():
    """Linen and NNX: ``(in, heads, head_dim)`` kernels and ``(heads, head_dim)`` biases, output
    ``(heads, head_dim, out)``. Haiku: ``(in, heads * head_dim)``, output ``linear``, and no default
    initialiser. Equinox: ``(heads * head_dim, in)`` and no biases unless asked. (Shapes only:
    ``jax.eval_shape``, nothing compiled.)"""
    x = jnp.ones((1, SEQ, WIDTH))
    linen = jax.eval_shape(lambda: nn.MultiHeadDotProductAttention(HEADS).init(jax.random.key(0), x))["params"]
    assert _shapes(linen) == {
        **{f"['{n}']['kernel']": (WIDTH, HEADS, HEAD_DIM) for n in ("query", "key", "value")},
        **{f"['{n}']['bias']": (HEADS, HEAD_DIM) for n in ("query", "key", "value")},
        "['out']['kernel']": (HEADS, HEAD_DIM, WIDTH), "['out']['bias']": (WIDTH,)}
    attention = nnx.eval_shape(lambda: nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=nnx.Rngs(0)))
    assert _shapes(nnx.to_pure_dict(nnx.state(attention, nnx.Param))) == _shapes(linen)

    haiku = jax.eval_shape(lambda: haiku_attention().init(jax.random.key(0), x))
    assert _shapes(haiku) == {
        **{f"['attn/{n}']['w']": (WIDTH, HEADS * HEAD_DIM) for n in ("query", "key", "value", "linear")},
        **{f"['attn/{n}']['b']": (HEADS * HEAD_DIM,) for n in ("query", "key", "value", "linear")}}
    with pytest.raises(ValueError, match="w_init"):
        jax.eval_shape(lambda: hk.transform(lambda q: hk.MultiHeadAttention(HEADS, HEAD_DIM, model_size=WIDTH)(
            q, q, q)).init(jax.random.key(0), x))

    plain = eqx.filter_eval_shape(lambda: eqx.nn.MultiheadAttention(HEADS, WIDTH, key=jax.random.key(0)))
    assert plain.query_proj.weight.shape == (HEADS * HEAD_DIM, WIDTH)
    assert all(layer.bias is None for layer in (plain.query_proj, plain.key_proj, plain.value_proj,
                                                plain.output_proj))


def test_attention_takes_a_batch_or_one_example():
    """Linen, NNX and Haiku attend over ``(batch, seq, features)``; Equinox's attention is
    written for one ``(seq, features)`` example and is vmapped over the batch."""
    batch = jnp.ones((3, SEQ, WIDTH))
    out = jax.eval_shape(lambda: nn.MultiHeadDotProductAttention(HEADS).init_with_output(jax.random.key(0),
                                                                                        batch)[0])
    assert out.shape == batch.shape
    assert nnx.eval_shape(lambda: nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=nnx.Rngs(0))(batch)
                          ).shape == batch.shape
    fn = haiku_attention()
    assert jax.eval_shape(lambda: fn.apply(fn.init(jax.random.key(0), batch), None, batch)).shape == batch.shape
    attention = eqx.filter_eval_shape(lambda: eqx.nn.MultiheadAttention(HEADS, WIDTH, key=jax.random.key(0)))
    one = eqx.filter_eval_shape(lambda a, x: a(x, x, x), attention, batch[0])
    assert one.shape == (SEQ, WIDTH)
    assert eqx.filter_eval_shape(lambda a: jax.vmap(lambda x: a(x, x, x))(batch), attention).shape == batch.shape
    with pytest.raises(ValueError, match="unpack"):  # (batch, seq, features) is not (seq, features)
        eqx.filter_eval_shape(lambda a: a(batch, batch, batch), attention)


def test_how_the_mask_reaches_the_attention():
    """A mask hiding key position 0: changing that position's input must not change the other
    positions' outputs. Linen, NNX and Haiku take it broadcastable to ``(batch, heads, q, k)``;
    Equinox per example as ``(q, k)``. One compiled program per framework."""
    x = jax.random.normal(jax.random.key(1), (2, SEQ, WIDTH))
    y = x.at[:, 0].add(1.0)
    mask = jnp.ones((SEQ, SEQ), bool).at[:, 0].set(False)
    batch_mask = mask[None, None]

    def unchanged(fn):
        out_x, out_y = (np.asarray(a) for a in jax.jit(lambda a, b: (fn(a), fn(b)))(x, y))
        np.testing.assert_allclose(out_x[:, 1:], out_y[:, 1:], rtol=0, atol=1e-6)
        assert float(np.max(np.abs(out_x[:, 0] - out_y[:, 0]))) > 1e-4  # the query at 0 does change

    linen = nn.MultiHeadDotProductAttention(HEADS)
    params = jax.jit(linen.init)(jax.random.key(0), x)
    unchanged(lambda q: jax.vmap(lambda r: linen.apply(params, r[None], r[None], mask=batch_mask)[0])(q))
    attention = nnx.MultiHeadAttention(HEADS, WIDTH, decode=False, rngs=nnx.Rngs(0))
    graph, state = nnx.split(attention)
    unchanged(lambda q: jax.vmap(lambda r: nnx.merge(graph, state)(r[None], r[None], mask=batch_mask)[0])(q))
    fn = haiku_attention()
    hk_params = jax.jit(fn.init)(jax.random.key(0), x)
    unchanged(lambda q: jax.vmap(lambda r: fn.apply(hk_params, None, r[None], batch_mask)[0])(q))
    eqx_attention = eqx.nn.MultiheadAttention(HEADS, WIDTH, key=jax.random.key(0))
    unchanged(lambda q: jax.vmap(lambda r: eqx_attention(r, r, r, mask=mask))(q))


def test_how_the_dropout_key_reaches_the_attention():
    """Attention-weight dropout (the ViT keeps it at 0): Linen draws one mask for the whole batch
    from ``dropout_rng`` and by default (``broadcast_dropout=True``) shares it across the batch;
    Equinox draws per example from ``key=``, split once per head; Haiku's attention has none."""
    same = jnp.broadcast_to(jax.random.normal(jax.random.key(2), (1, SEQ, WIDTH)), (4, SEQ, WIDTH))
    rng = jax.random.key(3)

    @jax.jit
    def linen_outputs(x, rng):
        outs = []
        for broadcast in (True, False):
            layer = nn.MultiHeadDotProductAttention(HEADS, dropout_rate=0.5, broadcast_dropout=broadcast)
            params = layer.init(jax.random.key(0), x, deterministic=True)
            outs.append(layer.apply(params, x, deterministic=False, dropout_rng=rng))
        return outs

    shared, separate = (np.asarray(o) for o in linen_outputs(same, rng))
    np.testing.assert_array_equal(shared[0], shared[1])  # one mask for every example
    assert np.max(np.abs(separate[0] - separate[1])) > 1e-3
    assert registry.MODELS[MODEL].rng == "dropout"
    assert "dropout" not in " ".join(hk.MultiHeadAttention.__init__.__code__.co_varnames)
    attention = eqx.nn.MultiheadAttention(HEADS, WIDTH, dropout_p=0.5, key=jax.random.key(0))
    keys = jax.random.split(rng, 4)
    per_example = np.asarray(jax.jit(lambda xs, ks: jax.vmap(lambda x, k: attention(x, x, x, key=k))(xs, ks))(
        same, keys))
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
    visibly, so the ViT asks Haiku and Equinox for 1e-6 (Linen's and NNX's default) and leaves each
    framework its own variance (the same value, rounded otherwise: ``test_parity.py``)."""
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
    # The ViT's own layers: every LayerNorm at 1e-6.
    kwargs = registry.MODELS[MODEL].kwargs((8, 8, 1), 10, registry.MODELS[MODEL].small)
    linen_vit = build("flax").module
    bound = linen_vit.bind(jax.eval_shape(lambda: linen_vit.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), False)))
    assert {bound.norm.epsilon} | {n.epsilon for b in bound.blocks for n in (b.norm1, b.norm2)} == {1e-6}
    nnx_vit = nnx.eval_shape(lambda: build("nnx").module(**kwargs, rngs=nnx.Rngs(0)))
    assert {n.epsilon for _, n in nnx.iter_graph(nnx_vit) if isinstance(n, nnx.LayerNorm)} == {1e-6}
    eqx_vit = eqx.filter_eval_shape(lambda: build("equinox").module(**{**kwargs, "in_shape": (1, 8, 8)},
                                                                   key=jax.random.key(0)))
    norms = [leaf for leaf in jax.tree.leaves(eqx_vit, is_leaf=lambda x: isinstance(x, eqx.nn.LayerNorm))
             if isinstance(leaf, eqx.nn.LayerNorm)]
    assert norms and {n.eps for n in norms} == {1e-6}
    seen = []
    original = hk.LayerNorm.__call__

    def spy(self, *args, **kw):
        seen.append(self.eps)
        return original(self, *args, **kw)

    hk.LayerNorm.__call__ = spy
    try:
        harness.fresh(MODEL, "haiku")  # building traces init once, under the spy
    finally:
        hk.LayerNorm.__call__ = original
    assert seen and set(seen) == {1e-6}


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


_DEFAULTS = registry.MODELS[MODEL].resolve(registry.MODELS[MODEL].small)
WIDTH_DEFAULT, HEADS_DEFAULT = _DEFAULTS["width"], _DEFAULTS["num_heads"]
HEAD_DIM_DEFAULT = WIDTH_DEFAULT // HEADS_DEFAULT


def test_a_wrong_head_split_is_caught():
    images = jax.random.uniform(jax.random.key(5), (8, 8, 8, 1))
    reference = build("jax")
    canonical = harness.start(MODEL)[0]
    expected = np.asarray(jax.jit(reference.apply, static_argnums=5)(canonical, {}, images, None, None, False)[0])
    net = build("haiku")
    template = jax.eval_shape(net.init_params, jax.random.key(0))
    rules = registry._vit_rules("haiku", (8, 8, 1), net.hparams)
    evaluate = jax.jit(net.apply, static_argnums=5)
    right = evaluate(Converter("haiku", template, rules).from_canonical(canonical), {}, images, None, None, False)[0]
    np.testing.assert_allclose(np.asarray(right), expected, rtol=0, atol=1e-5)
    wrong = Converter("haiku", template, wrong_head_split(rules)).from_canonical(canonical)
    assert np.max(np.abs(np.asarray(evaluate(wrong, {}, images, None, None, False)[0]) - expected)) > 1e-3


def test_nnx_default_attention_loses_float64():
    """Without attention-weight dropout, ``nnx.MultiHeadAttention``'s default ``attention_fn`` hands
    over to ``jax.nn.dot_product_attention``, which scales after the product and takes the softmax
    in float32 even under x64: in float64 it is ~1e-7 off Linen's attention from the same
    parameters. The adapter's float64 runs give it Flax's own formula (``styles.float64_attention``),
    which agrees with Linen's to float64 rounding."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(7), (2, SEQ, WIDTH), jnp.float64)
        kwargs = dict(decode=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        default = nnx.MultiHeadAttention(HEADS, WIDTH, **kwargs)
        flax_formula = nnx.MultiHeadAttention(HEADS, WIDTH, attention_fn=styles_lib.float64_attention, **kwargs)
        params = nnx.to_pure_dict(nnx.state(default, nnx.Param))
        nnx.update(flax_formula, nnx.state(default, nnx.Param))
        expected = nn.MultiHeadDotProductAttention(HEADS, param_dtype=jnp.float64).apply({"params": params}, x)
        assert expected.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(flax_formula(x)), np.asarray(expected), rtol=0, atol=1e-14)
        assert float(jnp.max(jnp.abs(default(x) - expected))) > 1e-9
        net = harness.build(MODEL, "nnx", "float64")
        model = net.as_module(*jax.eval_shape(net.init, jax.random.key(0)), False)
        assert {a.attention_fn for _, a in nnx.iter_graph(model) if isinstance(a, nnx.MultiHeadAttention)} == {
            styles_lib.float64_attention}
    net = build("nnx")
    model = net.as_module(*jax.eval_shape(lambda k: net.init(k), jax.random.key(0)), False)
    assert {a.attention_fn for _, a in nnx.iter_graph(model) if isinstance(a, nnx.MultiHeadAttention)} == {
        nnx.dot_product_attention}
