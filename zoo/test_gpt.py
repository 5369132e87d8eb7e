"""The GPT: what a language model adds to the parity checks every model gets.

``test_parity.py`` checks the GPT like every model, unrolled and scanned
(``gpt:scan``: every style's own scan, from the same canonical start, against
the scanned reference): its trees map one to one and round-trip exactly, its
teacher-forced logits, gradients and 50 Adam steps (float32 and float64) match
the reference's. ``test_randomness.py`` checks its dropout by its law, scanned
too. Here, for every style, unrolled and scanned:

- the scanned and unrolled models are the same network: from the same
  canonical parameters, the same outputs and gradients;
- cached decoding (each framework's own key/value cache, one token at a time)
  gives at every position the logits of the full forward pass;
- greedy generation from the same parameters gives the same tokens in every
  style, with the cache and without it;
- the logits are tied to the token embedding, and each framework's cache has
  its documented layout (the porting table's rows).

Tolerances: float32, 1e-5 absolute on logits of order 1 (a few ulps: the
cache attends over a masked full-length block where the forward pass attends
over the sequence, and the styles sum in their own order).
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared import generate as generate_lib
from shared import tasks
from shared.layouts import flatten_canonical
from shared.registry import STYLES
from zoo import harness
from zoo.harness import build

VARIANTS = ("gpt", "gpt:scan")
ATOL = 1e-5


def tokens(examples: int = 8) -> np.ndarray:
    """Addition problems as the model reads them: 9 tokens each."""
    return harness.addition().images[:examples]


@pytest.fixture(scope="module")
def sharp():
    """Canonical parameters whose logits are decisive: the start's token embedding scaled to N(0, 1). Greedy
    choices from a fresh model (embeddings of 0.02) are near ties that rounding could break either way."""
    params, state = harness.start("gpt")
    params = jax.tree.map(np.asarray, params)
    params["embed"]["embedding"] = params["embed"]["embedding"] * 50.0
    return params, state


def logits(model: str, style: str, canonical: dict, x: np.ndarray) -> np.ndarray:
    net = build(model, style)
    out, _ = jax.jit(lambda p, t: net.apply(p, {}, t, None, None, False))(net.from_canonical(canonical), x)
    return np.asarray(out)


@pytest.mark.parametrize("style", STYLES)
def test_scanned_and_unrolled_are_the_same_network(style):
    """From the same canonical parameters: eval logits, and the gradients of the loss, canonical."""
    params, _ = harness.start("gpt")
    batch = harness.batch(None, 16, "gpt")
    results = {}
    for model in VARIANTS:
        net = build(model, style)

        def loss(p, net=net):
            out, _ = net.apply(p, {}, batch["image"], batch["label"], None, False)
            return tasks.per_example("lm", out, batch)["loss"].mean(), out

        (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(net.from_canonical(params))
        results[model] = out, flatten_canonical(net.converter.to_canonical(grads, offsets=False))
    np.testing.assert_allclose(results["gpt:scan"][0], results["gpt"][0], rtol=0, atol=ATOL)
    assert sorted(results["gpt:scan"][1]) == sorted(results["gpt"][1])
    for path, g in results["gpt"][1].items():
        scale = max(float(np.max(np.abs(g))), 1.0)
        np.testing.assert_allclose(results["gpt:scan"][1][path], g, rtol=0, atol=ATOL * scale, err_msg=path)


@pytest.mark.parametrize("model", VARIANTS)
@pytest.mark.parametrize("style", STYLES)
def test_cached_decoding_gives_the_full_forward_logits(model, style):
    """One token at a time through the style's own cache (Linen's "cache" collection, NNX's nnx.Cache,
    Haiku state, a cache in and out in Equinox and plain JAX): at every position, the logits the whole
    sequence gives at once."""
    params, _ = harness.start("gpt")
    net = build(model, style)
    native = net.from_canonical(params)
    x = tokens()
    full = logits(model, style, params, x)
    decode = jax.jit(net.decode)
    cache = net.init_cache(native, len(x))
    stepped = []
    for i in range(x.shape[1]):
        out, cache = decode(native, cache, jnp.asarray(x[:, i:i + 1]), jnp.int32(i))
        stepped.append(np.asarray(out[:, 0]))
    np.testing.assert_allclose(np.stack(stepped, axis=1), full, rtol=0, atol=ATOL)
    # Not vacuous: a later token changes the logits of the positions after it, and only those.
    changed = x.copy()
    changed[:, 4] = (changed[:, 4] + 1) % 10
    other = logits(model, style, params, changed)
    np.testing.assert_array_equal(other[:, :4], full[:, :4])
    assert np.max(np.abs(other[:, 4:] - full[:, 4:])) > 1e-3


def test_greedy_generations_are_the_same_in_every_style(sharp):
    """Six-token prompts (two 3-digit operands) and four tokens more, greedily: the same tokens in every
    style, scanned or not, with the cache; and the reference's without it (recomputing the prefix at every
    step; that the cache gives every style the full forward pass's logits is checked above). The choices
    are decisive (each step's top two logits at least 1e-3 apart in the reference), so rounding cannot
    flip one."""
    params, _ = sharp
    prompts = tokens(16)[:, :6]
    expected = None
    for model in VARIANTS:
        for style in STYLES:
            net = build(model, style)
            native = net.from_canonical(params)
            for cached in (True, False) if (model, style) == ("gpt", "jax") else (True,):
                out = generate_lib.generate(net, native, prompts, 4, cached=cached)
                if expected is None:
                    expected = out
                    full = logits(model, style, params, out[:, :9])[:, 5:]
                    top = np.sort(full, axis=-1)
                    assert np.min(top[..., -1] - top[..., -2]) > 1e-3, "near ties: the check would be luck"
                    np.testing.assert_array_equal(out[:, :6], prompts)
                    assert len({row.tobytes() for row in out[:, 6:]}) > 1, "every prompt continued alike"
                np.testing.assert_array_equal(out, expected, err_msg=f"{model} {style} cached={cached}")


@pytest.mark.parametrize("style", STYLES)
def test_the_logits_are_tied_to_the_token_embedding(style):
    """One matrix: zeroing token 3's embedding row zeroes its logit at every position (the logits are
    ``x @ embedding.T``), and the canonical tree holds no other output matrix."""
    params, _ = harness.start("gpt")
    params = jax.tree.map(np.array, params)  # writable copies
    params["embed"]["embedding"][3] = 0.0
    out = logits("gpt", style, params, tokens())
    np.testing.assert_array_equal(out[..., 3], 0.0)
    assert np.min(np.abs(out[..., 4])) > 0
    assert [p for p in flatten_canonical(params) if p.endswith("kernel") and "blocks" not in p] == []


def test_each_frameworks_cache_layout():
    """Where each framework keeps a layer's keys and values for 2 sequences of up to 9 positions (2 heads of
    8): Linen's "cache" collection and NNX's nnx.Cache hold cached_key/cached_value (batch, length, heads,
    head_dim) and a scalar cache_index they advance themselves; Haiku state the same two arrays, written
    at the positions given; Equinox one (length, heads, head_dim) pair per example and layer; plain JAX a
    dict per layer. Scanned, every array gains a leading layer axis."""
    shapes = {}
    for model in VARIANTS:
        for style in STYLES:
            net = build(model, style)
            params = jax.eval_shape(net.init, jax.random.key(0))[0]
            cache = jax.eval_shape(lambda p, net=net: net.init_cache(p, 2), params)
            shapes[model, style] = {jax.tree_util.keystr(p): tuple(leaf.shape)
                                    for p, leaf in jax.tree_util.tree_leaves_with_path(cache)}
    kv = (2, 9, 2, 8)
    assert shapes["gpt", "flax"] == {f"['blocks_{i}']['attn']['{n}']": s for i in range(2)
                                     for n, s in (("cached_key", kv), ("cached_value", kv), ("cache_index", ()))}
    assert shapes["gpt", "nnx"] == {f"['blocks'][{i}]['attn']['{n}']": s for i in range(2)
                                    for n, s in (("cache_index", ()), ("cached_key", kv), ("cached_value", kv))}
    assert shapes["gpt", "haiku"] == {f"['gpt/~/blocks_{i}/~/attn']['{n}']": kv for i in range(2)
                                      for n in ("cached_key", "cached_value")}
    assert shapes["gpt", "equinox"] == {f"[{i}][{j}]": (2, 9, 2, 8) for i in range(2) for j in range(2)}
    assert shapes["gpt", "jax"] == {f"['blocks_{i}']['{n}']": kv for i in range(2) for n in ("key", "value")}
    # Scanned: the same arrays stacked on a leading layer axis (after Equinox's batch axis: each example
    # has its own cache, one array for its layers).
    stacked = (2, *kv)
    assert shapes["gpt:scan", "flax"] == shapes["gpt:scan", "nnx"] == {
        "['blocks']['attn']['cache_index']": (2,), "['blocks']['attn']['cached_key']": stacked,
        "['blocks']['attn']['cached_value']": stacked}
    assert shapes["gpt:scan", "haiku"] == {f"['gpt/blocks/block/~/attn']['{n}']": stacked
                                           for n in ("cached_key", "cached_value")}
    assert shapes["gpt:scan", "equinox"] == {"[0]": stacked, "[1]": stacked}
    assert shapes["gpt:scan", "jax"] == {"['key']": stacked, "['value']": stacked}


def test_nnx_is_causal_during_decode_attends_to_the_first_position_only():
    """flax#5591, in the installed flax: ``nnx.MultiHeadAttention(..., decode=True)`` called with
    ``is_causal=True`` masks the one new query against the whole cache as if it were position 0. The NNX
    GPT passes no mask and no is_causal when decoding (the cache masks itself); where the framework
    changes, this fails and the porting row must change with it."""
    attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 4, 8))
    full = attn(x, mask=nnx.make_causal_mask(jnp.zeros((1, 4))))
    np.testing.assert_allclose(attn(x, is_causal=True), full, rtol=0, atol=ATOL)  # the same, undecoded
    attn.init_cache((1, 4, 8))
    right = [attn(x[:, i:i + 1], decode=True) for i in range(4)]
    np.testing.assert_allclose(jnp.concatenate(right, axis=1), full, rtol=0, atol=ATOL)
    attn.init_cache((1, 4, 8))
    wrong = [attn(x[:, i:i + 1], decode=True, is_causal=True) for i in range(4)]
    assert float(jnp.max(jnp.abs(jnp.concatenate(wrong, axis=1) - full))) > 1e-2


def test_haiku_needs_a_four_dimensional_mask():
    """``hk.MultiHeadAttention`` takes a mask of the logits' rank (batch, heads, queries, keys): the causal
    ``jnp.tril`` of (length, length) that Equinox takes is refused."""
    x = jnp.ones((1, 4, 8))

    def attend(mask):
        mha = hk.MultiHeadAttention(2, 4, w_init=hk.initializers.VarianceScaling(1.0))
        return mha(x, x, x, mask=mask)

    f = hk.transform(attend)
    good = jnp.tril(jnp.ones((1, 1, 4, 4), bool))
    f.apply(f.init(jax.random.key(0), good), None, good)
    with pytest.raises(ValueError, match="Mask dimensionality"):
        f.init(jax.random.key(0), jnp.tril(jnp.ones((4, 4), bool)))
