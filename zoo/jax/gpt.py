"""A small GPT (decoder-only transformer language model) in plain JAX.

GPT-2's architecture, pre-LayerNorm: token and learned position embeddings,
then dropout; ``depth`` blocks of ``x + dropout(attn(norm1(x)))`` (causal
multi-head self-attention) and ``x + dropout(mlp2(gelu(mlp1(norm2(x)))))``; a
final LayerNorm; the logits through the token embedding, transposed (tied
weights). Tokens are ``(batch, length)`` int arrays.

This is the canonical layout: ``{"embed": {"embedding" (vocab, width)},
"pos_embed": {"embedding" (block_size, width)}, "blocks_0": {"norm1",
"attn": {"query", "key", "value", "out"}, "norm2", "mlp1", "mlp2"}, ...,
"norm"}``, the attention's kernels ``(width, heads, head_dim)`` and ``(heads,
head_dim, width)``. With ``scan_layers`` the blocks are one tree whose leaves
have a leading layer axis, ``{"blocks": ...}``, run by ``jax.lax.scan``.

Generation keeps a cache of every layer's keys and values: ``init_cache``
makes it, and :func:`apply` given ``cache`` and the position ``index`` of its
first token appends the new tokens' keys and values and attends over
everything cached so far.
"""

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Params = dict[str, Any]
Cache = dict[str, Any]


def dense_init(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
    """A LeCun-normal kernel and a zero bias."""
    kernel = jax.nn.initializers.lecun_normal()(key, (n_in, n_out), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((n_out,), jnp.float32)}


def norm_init(width: int) -> dict[str, jax.Array]:
    return {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}


def attention_init(key: jax.Array, width: int, num_heads: int) -> Params:
    """Kernels drawn ``(width, width)``, then split into heads."""
    heads = (num_heads, width // num_heads)
    layers = [dense_init(k, width, width) for k in jax.random.split(key, 4)]
    params = {name: {"kernel": layer["kernel"].reshape((width, *heads)), "bias": layer["bias"].reshape(heads)}
              for name, layer in zip(("query", "key", "value"), layers)}
    params["out"] = {"kernel": layers[3]["kernel"].reshape((*heads, width)), "bias": layers[3]["bias"]}
    return params


def block_init(key: jax.Array, width: int, num_heads: int, mlp_dim: int) -> Params:
    k1, k2, k3 = jax.random.split(key, 3)
    return {"norm1": norm_init(width), "attn": attention_init(k1, width, num_heads), "norm2": norm_init(width),
            "mlp1": dense_init(k2, width, mlp_dim), "mlp2": dense_init(k3, mlp_dim, width)}


def init(
    key: jax.Array,
    vocab_size: int,
    block_size: int,
    width: int = 64,
    depth: int = 3,
    num_heads: int = 4,
    mlp_dim: int = 256,
    scan_layers: bool = False,
) -> Params:
    """Embeddings drawn from N(0, 0.02), as GPT-2's."""
    keys = jax.random.split(key, depth + 2)
    normal = jax.nn.initializers.normal(0.02)
    params = {"embed": {"embedding": normal(keys[0], (vocab_size, width), jnp.float32)},
              "pos_embed": {"embedding": normal(keys[1], (block_size, width), jnp.float32)}}
    blocks = [block_init(k, width, num_heads, mlp_dim) for k in keys[2:]]
    if scan_layers:
        params["blocks"] = jax.tree.map(lambda *layers: jnp.stack(layers), *blocks)
    else:
        params.update({f"blocks_{i}": block for i, block in enumerate(blocks)})
    params["norm"] = norm_init(width)
    return params


def logical_axes(depth: int = 3, scan_layers: bool = False) -> Params:
    """The name of each parameter axis, a ``PartitionSpec`` per leaf of :func:`init`'s tree: a sharding
    strategy maps names to mesh axes (``embed`` over the data axis is FSDP, ``heads`` and ``mlp`` over
    the model axis are tensor parallelism). A scanned stack's leading axis is ``layers``."""
    def dense_axes(n_in: str | None, n_out: str | None) -> dict[str, P]:
        return {"kernel": P(n_in, n_out), "bias": P(n_out)}

    norm = {"scale": P("embed"), "bias": P("embed")}
    qkv = {"kernel": P("embed", "heads", "kv"), "bias": P("heads", "kv")}
    block = {"norm1": norm, "attn": {"query": qkv, "key": qkv, "value": qkv,
                                     "out": {"kernel": P("heads", "kv", "embed"), "bias": P("embed")}},
             "norm2": norm, "mlp1": dense_axes("embed", "mlp"), "mlp2": dense_axes("mlp", "embed")}
    axes = {"embed": {"embedding": P("vocab", "embed")}, "pos_embed": {"embedding": P(None, "embed")}}
    if scan_layers:
        axes["blocks"] = jax.tree.map(lambda spec: P("layers", *spec), block)
    else:
        axes.update({f"blocks_{i}": block for i in range(depth)})
    axes["norm"] = norm
    return axes


def dense(x: jax.Array, layer: dict[str, jax.Array], axes: int = 1) -> jax.Array:
    """Contracts the last ``axes`` axes of ``x`` with the first ``axes`` of the kernel, then adds the bias."""
    return jnp.tensordot(x, layer["kernel"], axes) + layer["bias"]


def layer_norm(x: jax.Array, params: dict[str, jax.Array], epsilon: float = 1e-5) -> jax.Array:
    """Over the last axis, with the statistics in float32 at least (bfloat16 inputs are widened)."""
    dtype = x.dtype
    x = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + epsilon)
    return (y * params["scale"] + params["bias"]).astype(dtype)


def dropout(key: jax.Array | None, rate: float, x: jax.Array) -> jax.Array:
    """Zeroes each entry with probability ``rate`` and scales the others by ``1 / (1 - rate)``; without a key
    (evaluation, generation), the identity."""
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def attention(x: jax.Array, params: Params, positions: jax.Array, cache: Cache | None = None,
              index: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    """Causal multi-head self-attention, ``softmax(q k^T / sqrt(head_dim)) v`` over the keys at positions up to
    each query's. With ``cache`` (``{"key", "value"}``, ``(batch, max_len, heads, head_dim)``) the new keys
    and values are written at ``index`` onwards and the queries attend over the whole cache."""
    query, key, value = (dense(x, params[name]) for name in ("query", "key", "value"))
    key_positions = positions
    if cache is not None:
        key = jax.lax.dynamic_update_slice_in_dim(cache["key"], key.astype(cache["key"].dtype), index, axis=1)
        value = jax.lax.dynamic_update_slice_in_dim(cache["value"], value.astype(cache["value"].dtype), index, axis=1)
        cache = {"key": key, "value": value}
        key_positions = jnp.arange(key.shape[1])
    mask = key_positions[None, :] <= positions[:, None]  # (queries, keys): each sees itself and before
    query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key)
    weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(logits.dtype).min), axis=-1)
    out = dense(jnp.einsum("...hqk,...khd->...qhd", weights.astype(value.dtype), value), params["out"], axes=2)
    return out, cache


def block_apply(params: Params, x: jax.Array, positions: jax.Array, key: jax.Array | None, dropout_rate: float,
                cache: Cache | None = None, index: jax.Array | None = None) -> tuple[jax.Array, Cache | None]:
    # In training the key splits in two: the attention's output, the MLP's.
    k1, k2 = (None, None) if key is None else jax.random.split(key)
    y, cache = attention(layer_norm(x, params["norm1"]), params["attn"], positions, cache, index)
    x = x + dropout(k1, dropout_rate, y)
    y = dense(jax.nn.gelu(dense(layer_norm(x, params["norm2"]), params["mlp1"])), params["mlp2"])
    return x + dropout(k2, dropout_rate, y), cache


def apply(
    params: Params,
    tokens: jax.Array,
    key: jax.Array | None,
    train: bool,
    dropout_rate: float = 0.1,
    cache: Cache | None = None,
    index: jax.Array | int = 0,
) -> tuple[jax.Array, Cache | None]:
    """Logits ``(batch, length, vocab)`` for tokens ``(batch, length)`` at positions ``index`` onwards, and the
    cache (None without one). Train mode draws the dropout masks from ``key``, split in ``depth + 1``: the
    embeddings' dropout, then one per block."""
    scanned = "blocks" in params
    depth = jax.tree.leaves(params["blocks"])[0].shape[0] if scanned else sum(n.startswith("blocks_") for n in params)
    keys = jax.random.split(key, depth + 1) if train else [None] * (depth + 1)
    positions = index + jnp.arange(tokens.shape[-1])
    x = params["embed"]["embedding"][tokens] + params["pos_embed"]["embedding"][positions]
    x = dropout(keys[0], dropout_rate, x)
    if scanned:
        def layer(x, inputs):
            block, block_key, block_cache = inputs
            x, block_cache = block_apply(block, x, positions, block_key, dropout_rate, block_cache, index)
            return x, block_cache

        x, cache = jax.lax.scan(layer, x, (params["blocks"], keys[1:] if train else None, cache))
    else:
        new_cache = None if cache is None else {}
        for i in range(depth):
            x, block_cache = block_apply(params[f"blocks_{i}"], x, positions, keys[1 + i], dropout_rate,
                                         None if cache is None else cache[f"blocks_{i}"], index)
            if cache is not None:
                new_cache[f"blocks_{i}"] = block_cache
        cache = new_cache
    x = layer_norm(x, params["norm"])
    return x @ params["embed"]["embedding"].T.astype(x.dtype), cache


def init_cache(params: Params, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> Cache:
    """Zeros for every layer's keys and values, ``(batch, max_len, heads, head_dim)`` (with a leading layer
    axis when the blocks are scanned)."""
    scanned = "blocks" in params
    attn = (params["blocks"] if scanned else params["blocks_0"])["attn"]
    heads, head_dim = attn["key"]["kernel"].shape[-2:]
    shape = (batch_size, max_len, heads, head_dim)
    if scanned:
        depth = attn["key"]["kernel"].shape[0]
        zeros = jnp.zeros((depth, *shape), dtype)
        return {"key": zeros, "value": zeros}
    depth = sum(name.startswith("blocks_") for name in params)
    return {f"blocks_{i}": {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)} for i in range(depth)}
