"""A small GPT (decoder-only transformer language model) in Flax NNX.

GPT-2's architecture, pre-LayerNorm: token and learned position embeddings,
then dropout; ``depth`` blocks of ``x + dropout(attn(norm1(x)))`` (causal
multi-head self-attention) and ``x + dropout(mlp2(gelu(mlp1(norm2(x)))))``; a
final LayerNorm; the logits through the token embedding (``Embed.attend``:
tied weights). Tokens are ``(batch, length)`` int arrays. Switch modes with
``model.train()`` and ``model.eval()``, and give the dropout key as
``model(tokens, rngs=nnx.Rngs(dropout=key))`` in train mode.

``scan_layers`` builds the blocks with ``nnx.vmap`` (their parameters stacked
on a leading axis) and runs them with ``nnx.scan``: one compiled layer.
Generation: ``model.init_cache(batch, max_len)``, then one token at a time,
``model(token, positions, decode=True)``, each layer's keys and values kept in
its attention's ``nnx.Cache`` variables.

Every parameter names its axes in its variable's metadata
(``nnx.with_partitioning``); under ``nnx.logical_axis_rules`` (``("embed",
"data")`` for FSDP, ``("heads", "model")`` and ``("mlp", "model")`` for tensor
parallelism) ``nnx.get_partition_spec`` gives their shardings. The stacked
blocks' leading axis is ``layers``, in ``nnx.vmap`` and in every ``nnx.scan``
over them.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

lecun_normal = nnx.initializers.lecun_normal()
zeros, ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()
LAYERS = {nnx.PARTITION_NAME: "layers"}  # the stacked blocks' leading axis



def partitioned(initializer: nnx.Initializer, names: tuple[str | None, ...]) -> nnx.Initializer:
    """``nnx.with_partitioning`` without eager sharding: the variable is placed where the train step puts
    it, so the model builds with no mesh (by default NNX shards a variable as it is made, which needs a
    mesh and rules for every name)."""
    return nnx.with_partitioning(initializer, names, eager_sharding=False)

def layer_norm(width: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                         scale_init=partitioned(ones, ("embed",)),
                         bias_init=partitioned(zeros, ("embed",)), rngs=rngs)


class Block(nnx.Module):
    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        dropout_rate: float = 0.1,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        *,
        rngs: nnx.Rngs,
    ) -> None:
        self.norm1 = layer_norm(width, dtype, param_dtype, rngs)
        # decode (the autoregressive cache) has no default: it must be given.
        self.attn = nnx.MultiHeadAttention(
            num_heads, width, decode=False, dtype=dtype, param_dtype=param_dtype,
            kernel_init=partitioned(lecun_normal, ("embed", "heads", "kv")),
            bias_init=partitioned(zeros, ("heads", "kv")),
            out_kernel_init=partitioned(lecun_normal, ("heads", "kv", "embed")),
            out_bias_init=partitioned(zeros, ("embed",)), rngs=rngs)
        self.norm2 = layer_norm(width, dtype, param_dtype, rngs)
        self.mlp1 = nnx.Linear(width, mlp_dim, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=partitioned(lecun_normal, ("embed", "mlp")),
                               bias_init=partitioned(zeros, ("mlp",)), rngs=rngs)
        self.mlp2 = nnx.Linear(mlp_dim, width, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=partitioned(lecun_normal, ("mlp", "embed")),
                               bias_init=partitioned(zeros, ("embed",)), rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)

    def __call__(self, x: jax.Array, mask: jax.Array | None, decode: bool, rngs: nnx.Rngs | None = None) -> jax.Array:
        y = self.attn(self.norm1(x), mask=mask, decode=decode)
        x = x + self.dropout(y, rngs=rngs)
        y = self.mlp2(nnx.gelu(self.mlp1(self.norm2(x))))
        return x + self.dropout(y, rngs=rngs)


class GPT(nnx.Module):
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
        dtype: Any = None,  # computation dtype: bfloat16 for mixed precision
        param_dtype: Any = jnp.float32,  # the parameters' dtype: float64 for float64 runs
        *,
        rngs: nnx.Rngs,
    ) -> None:
        normal = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(vocab_size, width, dtype=dtype, param_dtype=param_dtype,
                               embedding_init=partitioned(normal, ("vocab", "embed")), rngs=rngs)
        self.pos_embed = nnx.Embed(block_size, width, dtype=dtype, param_dtype=param_dtype,
                                   embedding_init=partitioned(normal, (None, "embed")), rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)

        def make_block(rngs: nnx.Rngs) -> Block:
            return Block(width, num_heads, mlp_dim, dropout_rate, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        if scan_layers:
            self.blocks = nnx.split_rngs(splits=depth)(nnx.vmap(make_block, in_axes=0, out_axes=0,
                                                                       transform_metadata=LAYERS))(rngs)
        else:
            # A list of submodules must be wrapped in nnx.List to be part of the state.
            self.blocks = nnx.List([make_block(rngs) for _ in range(depth)])
        self.norm = layer_norm(width, dtype, param_dtype, rngs)
        self.width, self.depth, self.scan_layers = width, depth, scan_layers

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, decode: bool = False,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        positions = jnp.arange(tokens.shape[-1]) if positions is None else positions
        x = self.dropout(self.embed(tokens) + self.pos_embed(positions), rngs=rngs)
        # Decoding attends over the cache up to each token: the attention masks it itself.
        mask = None if decode else nnx.make_causal_mask(tokens)
        if not self.scan_layers:
            for block in self.blocks:
                x = block(x, mask, decode, rngs)
        elif rngs is None:
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=LAYERS)
            def run(x: jax.Array, block: Block) -> jax.Array:
                return block(x, mask, decode)

            x = run(x, self.blocks)
        else:
            # Each layer draws its dropout from its own split of the keys.
            @nnx.split_rngs(splits=self.depth)
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, transform_metadata=LAYERS)
            def run_drawing(x: jax.Array, block: Block, rngs: nnx.Rngs) -> jax.Array:
                return block(x, mask, decode, rngs)

            x = run_drawing(x, self.blocks, rngs)
        return self.embed.attend(self.norm(x))

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> None:
        """Zeroed ``nnx.Cache`` keys and values for ``max_len`` positions in every layer's attention."""
        shape = (batch_size, max_len, self.width)
        if self.scan_layers:
            @nnx.vmap(in_axes=0, axis_size=self.depth, transform_metadata=LAYERS)
            def init(block: Block) -> None:
                block.attn.init_cache(shape, dtype)

            init(self.blocks)
        else:
            for block in self.blocks:
                block.attn.init_cache(shape, dtype)
