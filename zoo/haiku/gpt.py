"""A small GPT (decoder-only transformer language model) in Haiku.

GPT-2's architecture, pre-LayerNorm: token and learned position embeddings,
then dropout; ``depth`` blocks of ``x + dropout(attn(norm1(x)))`` (causal
multi-head self-attention) and ``x + dropout(mlp2(gelu(mlp1(norm2(x)))))``; a
final LayerNorm; the logits through the token embedding's matrix, transposed
(tied weights). Tokens are ``(batch, length)`` int arrays. Use it inside
``hk.transform``, and apply it with a key in training.

``scan_layers`` runs the blocks with ``hk.layer_stack`` (their parameters
stacked on a leading axis, one compiled layer). With ``decode=True`` each
attention keeps its keys and values for ``block_size`` positions in Haiku
state (``hk.transform_with_state``; the same parameters): apply the prompt,
then each new token, with their ``positions``.

Haiku keeps no metadata on a parameter: :func:`logical_axes` names each
one's axes by its module path (``PARTITION_RULES``), and a sharding strategy
maps the names to mesh axes (``embed`` over the data axis is FSDP, ``heads``
and ``mlp`` over the model axis are tensor parallelism).
"""

import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

# The first pattern that matches "module/name" gives the axes of one layer's parameter.
PARTITION_RULES = (
    (r"/pos_embed/embeddings$", P(None, "embed")),
    (r"/embed/embeddings$", P("vocab", "embed")),
    (r"/attn/(query|key|value)/w$", P("embed", "heads")),  # heads and head_dim in one axis
    (r"/attn/(query|key|value)/b$", P("heads")),
    (r"/attn/linear/w$", P("heads", "embed")),
    (r"/mlp1/w$", P("embed", "mlp")),
    (r"/mlp1/b$", P("mlp")),
    (r"/mlp2/w$", P("mlp", "embed")),
    (r"/(attn/linear|mlp2)/b$", P("embed")),
    (r"/norm\d?/(scale|offset)$", P("embed")),
)


def logical_axes(params: hk.Params) -> hk.Params:
    """A ``PartitionSpec`` of axis names for every parameter, by ``PARTITION_RULES``; the leading axis
    ``hk.layer_stack`` adds is ``layers``."""
    def axes(module_name: str, name: str, value: jax.Array) -> P:
        path = f"{module_name}/{name}"
        spec = next((spec for pattern, spec in PARTITION_RULES if re.search(pattern, path)), None)
        if spec is None:
            raise ValueError(f"no partition rule for {path}")
        return P("layers", *spec) if np.ndim(value) > len(spec) else spec
    return hk.data_structures.map(axes, params)


def dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
    """``hk.dropout`` with the next key of the transform's sequence in training; the identity in evaluation."""
    return hk.dropout(hk.next_rng_key(), rate, x) if is_training else x


class CausalSelfAttention(hk.MultiHeadAttention):
    """``hk.MultiHeadAttention`` over one sequence, masked causally.

    Haiku has no key/value cache: in decoding this module projects with the
    same ``hk.Linear`` layers (so the same parameters) and keeps the keys and
    values of ``cache_size`` positions in Haiku state, written at the new
    tokens' positions.
    """

    def __init__(self, num_heads: int, width: int, cache_size: int, name: str | None = None) -> None:
        # hk.MultiHeadAttention has no default w_init: LeCun normal.
        super().__init__(num_heads, key_size=width // num_heads, model_size=width,
                         w_init=hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal"), name=name)
        self.cache_size = cache_size

    def __call__(self, x: jax.Array, positions: jax.Array, decode: bool = False) -> jax.Array:
        if not decode:
            length = x.shape[-2]
            # The mask's rank must be the attention logits': (batch, heads, queries, keys).
            return super().__call__(x, x, x, mask=jnp.tril(jnp.ones((1, 1, length, length), bool)))

        def project(name: str) -> jax.Array:  # hk.MultiHeadAttention's projection of that name
            y = hk.Linear(self.num_heads * self.key_size, w_init=self.w_init, with_bias=self.with_bias,
                          b_init=self.b_init, name=name)(x)
            return y.reshape((*x.shape[:-1], self.num_heads, self.key_size))

        query, key, value = project("query"), project("key"), project("value")
        shape = (x.shape[0], self.cache_size, self.num_heads, self.key_size)
        key = jax.lax.dynamic_update_slice_in_dim(hk.get_state("cached_key", shape, key.dtype, init=jnp.zeros),
                                                  key, positions[0], axis=1)
        value = jax.lax.dynamic_update_slice_in_dim(hk.get_state("cached_value", shape, value.dtype,
                                                                 init=jnp.zeros), value, positions[0], axis=1)
        hk.set_state("cached_key", key)
        hk.set_state("cached_value", value)
        mask = (jnp.arange(self.cache_size)[None, :] <= positions[:, None])[None, None]
        logits = jnp.einsum("...thd,...Thd->...htT", query, key) / np.sqrt(self.key_size).astype(key.dtype)
        weights = jax.nn.softmax(jnp.where(mask, logits, -1e30))
        out = jnp.einsum("...htT,...Thd->...thd", weights, value).reshape((*x.shape[:-1], -1))
        return hk.Linear(self.model_size, w_init=self.w_init, with_bias=self.with_bias, b_init=self.b_init)(out)


class Block(hk.Module):
    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        block_size: int,
        dropout_rate: float = 0.1,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        self.norm1 = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-5, name="norm1")
        self.attn = CausalSelfAttention(num_heads, width, block_size, name="attn")
        self.norm2 = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-5, name="norm2")
        self.mlp1 = hk.Linear(mlp_dim, name="mlp1")
        self.mlp2 = hk.Linear(width, name="mlp2")
        self.dropout_rate = dropout_rate  # hk.dropout is a function, not a module

    def __call__(self, x: jax.Array, positions: jax.Array, is_training: bool, decode: bool = False) -> jax.Array:
        y = self.attn(self.norm1(x), positions, decode)
        x = x + dropout(y, self.dropout_rate, is_training)
        y = self.mlp2(jax.nn.gelu(self.mlp1(self.norm2(x))))
        return x + dropout(y, self.dropout_rate, is_training)


class GPT(hk.Module):
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
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        normal = hk.initializers.RandomNormal(0.02)
        self.embed = hk.Embed(vocab_size, width, w_init=normal, name="embed")
        self.pos_embed = hk.Embed(block_size, width, w_init=normal, name="pos_embed")
        self.dropout_rate = dropout_rate
        self.block = dict(width=width, num_heads=num_heads, mlp_dim=mlp_dim, block_size=block_size,
                          dropout_rate=dropout_rate)
        self.depth, self.scan_layers = depth, scan_layers
        if not scan_layers:
            self.blocks = [Block(**self.block, name=f"blocks_{i}") for i in range(depth)]
        self.norm = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-5, name="norm")

    def __call__(self, tokens: jax.Array, is_training: bool, positions: jax.Array | None = None,
                 decode: bool = False) -> jax.Array:
        positions = jnp.arange(tokens.shape[-1]) if positions is None else positions
        x = dropout(self.embed(tokens) + self.pos_embed(positions), self.dropout_rate, is_training)
        if self.scan_layers:
            # The layers' modules are made inside the stacked function: one set, stacked.
            def layer(x: jax.Array) -> jax.Array:
                return Block(**self.block, name="block")(x, positions, is_training, decode)

            x = hk.layer_stack(self.depth, name="blocks")(layer)(x)
        else:
            for block in self.blocks:
                x = block(x, positions, is_training, decode)
        return self.norm(x) @ self.embed.embeddings.T
