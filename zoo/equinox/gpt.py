"""A small GPT (decoder-only transformer language model) in Equinox.

GPT-2's architecture, pre-LayerNorm: token and learned position embeddings,
then dropout; ``depth`` blocks of ``x + dropout(attn(norm1(x)))`` (causal
multi-head self-attention) and ``x + dropout(mlp2(gelu(mlp1(norm2(x)))))``; a
final LayerNorm; the logits through a linear layer tied to the token embedding
(``eqx.nn.Shared``). Acts on a single sequence of int tokens: ``jax.vmap`` it over
a batch, with one key per example in training, and select eval mode with
``eqx.nn.inference_mode``.

``scan_layers`` builds the blocks with ``eqx.filter_vmap`` (their parameters
stacked on a leading axis) and runs them with ``jax.lax.scan``: one compiled
layer. Generation passes a cache of every layer's keys and values in and out:
``init_cache`` makes it, and a call given ``cache`` and the position ``index``
of its first token writes the new keys and values there and attends over
everything cached so far.

An Equinox module keeps no metadata on its arrays: :func:`logical_axes` names
each one's axes by its attribute path (``PARTITION_RULES``), and a sharding
strategy maps the names to mesh axes (``embed`` over the data axis is FSDP,
``heads`` and ``mlp`` over the model axis are tensor parallelism), for
``eqx.filter_shard``.
"""

import math
import re

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree

# The first pattern that matches an array's attribute path gives the axes of one layer's array.
# Linear weights are (out, in).
PARTITION_RULES = (
    (r"^pos_embed\.weight$", P(None, "embed")),
    (r"^embed\.", P("vocab", "embed")),
    (r"attn\.(query|key|value)_proj\.weight$", P("heads", "embed")),  # heads and head_dim in one axis
    (r"attn\.(query|key|value)_proj\.bias$", P("heads")),
    (r"attn\.output_proj\.weight$", P("embed", "heads")),
    (r"mlp1\.weight$", P("mlp", "embed")),
    (r"mlp1\.bias$", P("mlp")),
    (r"mlp2\.weight$", P("embed", "mlp")),
    (r"(attn\.output_proj|mlp2)\.bias$", P("embed")),
    (r"norm\d?\.(weight|bias)$", P("embed")),
)

# A layer's (keys, values), each (max_len, heads, head_dim); stacked on a leading layer axis when scanned.
KVCache = tuple[Float[Array, "*layers max_len heads head_dim"], Float[Array, "*layers max_len heads head_dim"]]


def cached_attention(
    attn: eqx.nn.MultiheadAttention,
    x: Float[Array, "tokens width"],
    cache: KVCache,
    index: Int[Array, ""] | int,
) -> tuple[Float[Array, "tokens width"], KVCache]:
    """``attn`` over the tokens at positions ``index`` onwards and everything cached before them.

    ``eqx.nn.MultiheadAttention`` keeps no cache: this uses its own projections
    (so the same parameters) and its formula, the query scaled before the
    product and the softmax in float32 at least.
    """
    length, heads = x.shape[0], attn.num_heads
    query, key, value = (jax.vmap(proj)(x).reshape(length, heads, -1)
                         for proj in (attn.query_proj, attn.key_proj, attn.value_proj))
    keys = jax.lax.dynamic_update_slice_in_dim(cache[0], key.astype(cache[0].dtype), index, axis=0)
    values = jax.lax.dynamic_update_slice_in_dim(cache[1], value.astype(cache[1].dtype), index, axis=0)
    mask = jnp.arange(keys.shape[0])[None, :] <= index + jnp.arange(length)[:, None]
    logits = jnp.einsum("qhd,khd->hqk", query / math.sqrt(query.shape[-1]), keys)
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    out = jnp.einsum("hqk,khd->qhd", weights.astype(values.dtype), values).reshape(length, -1)
    return jax.vmap(attn.output_proj)(out), (keys, values)


class Block(eqx.Module):
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    mlp1: eqx.nn.Linear
    mlp2: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        dropout_rate: float = 0.1,
        *,
        key: jax.Array,
    ) -> None:
        k1, k2, k3 = jax.random.split(key, 3)
        # LayerNorm normalises one token: jax.vmap it over the sequence.
        self.norm1 = eqx.nn.LayerNorm(width, eps=1e-5)
        # MultiheadAttention acts on one sequence, and has no biases unless asked.
        self.attn = eqx.nn.MultiheadAttention(num_heads, width, use_query_bias=True, use_key_bias=True,
                                              use_value_bias=True, use_output_bias=True, key=k1)
        self.norm2 = eqx.nn.LayerNorm(width, eps=1e-5)
        self.mlp1 = eqx.nn.Linear(width, mlp_dim, key=k2)
        self.mlp2 = eqx.nn.Linear(mlp_dim, width, key=k3)
        self.dropout = eqx.nn.Dropout(dropout_rate)

    def __call__(
        self,
        x: Float[Array, "tokens width"],
        cache: KVCache | None = None,
        index: Int[Array, ""] | int = 0,
        *,
        key: jax.Array | None = None,
    ) -> tuple[Float[Array, "tokens width"], KVCache | None]:
        # In train mode the key splits in two: the attention's output, the MLP's.
        k1, k2 = (None, None) if key is None else jax.random.split(key)
        y = jax.vmap(self.norm1)(x)
        if cache is None:
            length = x.shape[0]
            y = self.attn(y, y, y, mask=jnp.tril(jnp.ones((length, length), bool)))
        else:
            y, cache = cached_attention(self.attn, y, cache, index)
        x = x + self.dropout(y, key=k1)
        y = jax.vmap(self.mlp2)(jax.nn.gelu(jax.vmap(self.mlp1)(jax.vmap(self.norm2)(x))))
        return x + self.dropout(y, key=k2), cache


class GPT(eqx.Module):
    embed: eqx.nn.Shared  # (token embedding, logits layer), one weight
    pos_embed: eqx.nn.Embedding
    dropout: eqx.nn.Dropout
    blocks: list[Block] | Block  # a Block whose arrays have a leading layer axis when scanned
    norm: eqx.nn.LayerNorm
    depth: int = eqx.field(static=True)
    scan_layers: bool = eqx.field(static=True)

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        width: int = 64,
        depth: int = 3,
        num_heads: int = 4,
        mlp_dim: int = 256,
        dropout_rate: float = 0.1,
        scan_layers: bool = False,
        *,
        key: jax.Array,
    ) -> None:
        keys = jax.random.split(key, depth + 3)
        # Embeddings drawn from N(0, 0.02), as GPT-2's.
        embedding = eqx.nn.Embedding(weight=0.02 * jax.random.normal(keys[0], (vocab_size, width)))
        head = eqx.nn.Linear(width, vocab_size, use_bias=False, key=keys[-1])
        # The head's weight is replaced by the embedding's: one parameter.
        self.embed = eqx.nn.Shared((embedding, head), where=lambda pair: pair[1].weight,
                                   get=lambda pair: pair[0].weight)
        self.pos_embed = eqx.nn.Embedding(weight=0.02 * jax.random.normal(keys[1], (block_size, width)))
        self.dropout = eqx.nn.Dropout(dropout_rate)

        def make_block(key: jax.Array) -> Block:
            return Block(width, num_heads, mlp_dim, dropout_rate, key=key)

        block_keys = keys[2:-1]
        self.blocks = eqx.filter_vmap(make_block)(block_keys) if scan_layers else [make_block(k) for k in block_keys]
        self.norm = eqx.nn.LayerNorm(width, eps=1e-5)
        self.depth, self.scan_layers = depth, scan_layers

    def __call__(
        self,
        tokens: Int[Array, " tokens"],
        cache: list[KVCache] | KVCache | None = None,
        index: Int[Array, ""] | int = 0,
        *,
        key: jax.Array | None = None,
    ) -> tuple[Float[Array, "tokens vocab"], list[KVCache] | KVCache | None]:
        # Split in depth + 1: the embeddings' dropout, then one per block.
        keys = [None] * (self.depth + 1) if key is None else jax.random.split(key, self.depth + 1)
        embed, head = self.embed()
        positions = index + jnp.arange(tokens.shape[0])
        x = jax.vmap(embed)(tokens) + jax.vmap(self.pos_embed)(positions)
        x = self.dropout(x, key=keys[0])
        if self.scan_layers:
            params, static = eqx.partition(self.blocks, eqx.is_array)

            def layer(x, inputs):
                block, block_key, block_cache = inputs
                return eqx.combine(block, static)(x, block_cache, index, key=block_key)

            x, cache = jax.lax.scan(layer, x, (params, None if key is None else keys[1:], cache))
        else:
            caches = [None] * self.depth if cache is None else cache
            for i, block in enumerate(self.blocks):
                x, caches[i] = block(x, caches[i], index, key=keys[1 + i])
            cache = None if cache is None else caches
        return jax.vmap(head)(jax.vmap(self.norm)(x)), cache

    def init_cache(self, max_len: int, dtype: jnp.dtype = jnp.float32) -> list[KVCache] | KVCache:
        """Zeros for every layer's keys and values at ``max_len`` positions."""
        attn = self.blocks.attn if self.scan_layers else self.blocks[0].attn
        shape = (max_len, attn.num_heads, attn.qk_size)
        if self.scan_layers:
            zeros = jnp.zeros((self.depth, *shape), dtype)
            return zeros, zeros
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.depth)]


def logical_axes(model: GPT) -> PyTree[P | None]:
    """A ``PartitionSpec`` of axis names for every array of ``model`` (None elsewhere), by
    ``PARTITION_RULES``; the leading axis of the stacked blocks is ``layers``."""
    def axes(path: tuple, leaf: jax.Array | None) -> P | None:
        if leaf is None:
            return None
        dotted = jax.tree_util.keystr(path, simple=True, separator=".")
        spec = next((spec for pattern, spec in PARTITION_RULES if re.search(pattern, dotted)), None)
        if spec is None:
            raise ValueError(f"no partition rule for {dotted}")
        return P("layers", *spec) if leaf.ndim > len(spec) else spec
    is_array = lambda leaf: isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))  # noqa: E731 (eval_shape's too)
    return jax.tree_util.tree_map_with_path(axes, eqx.filter(model, is_array))
