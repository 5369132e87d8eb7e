"""A small GPT (decoder-only transformer language model) in Flax Linen.

GPT-2's architecture, pre-LayerNorm: token and learned position embeddings,
then dropout; ``depth`` blocks of ``x + dropout(attn(norm1(x)))`` (causal
multi-head self-attention) and ``x + dropout(mlp2(gelu(mlp1(norm2(x)))))``; a
final LayerNorm; the logits through the token embedding (``Embed.attend``:
tied weights). Tokens are ``(batch, length)`` int arrays. In train mode apply
with ``rngs={"dropout": key}``.

``scan_layers`` runs the blocks with ``nn.scan`` (their parameters stacked on
a leading axis, one compiled layer). ``decode=True`` keeps every layer's keys
and values in the ``"cache"`` collection: initialise it with a full-length
input, then apply one token at a time with its ``positions`` and
``mutable=["cache"]``.

Every parameter names its axes (``nn.with_logical_partitioning``): under
``nn.logical_axis_rules`` (``("embed", "data")`` for FSDP, ``("heads",
"model")`` and ``("mlp", "model")`` for tensor parallelism)
``nn.get_partition_spec`` gives their shardings.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

lecun_normal, zeros, ones = nn.initializers.lecun_normal(), nn.initializers.zeros, nn.initializers.ones


def layer_norm(dtype: Any, param_dtype: Any) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(zeros, ("embed",)))


class Block(nn.Module):
    width: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    decode: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.norm1 = layer_norm(self.dtype, self.param_dtype)
        self.attn = nn.MultiHeadDotProductAttention(
            self.num_heads, decode=self.decode, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(lecun_normal, ("embed", "heads", "kv")),
            bias_init=nn.with_logical_partitioning(zeros, ("heads", "kv")),
            out_kernel_init=nn.with_logical_partitioning(lecun_normal, ("heads", "kv", "embed")),
            out_bias_init=nn.with_logical_partitioning(zeros, ("embed",)))
        self.norm2 = layer_norm(self.dtype, self.param_dtype)
        self.mlp1 = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=nn.with_logical_partitioning(lecun_normal, ("embed", "mlp")),
                             bias_init=nn.with_logical_partitioning(zeros, ("mlp",)))
        self.mlp2 = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=nn.with_logical_partitioning(lecun_normal, ("mlp", "embed")),
                             bias_init=nn.with_logical_partitioning(zeros, ("embed",)))
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(self, x: jax.Array, mask: jax.Array | None, train: bool) -> tuple[jax.Array, None]:
        y = self.attn(self.norm1(x), mask=mask)
        x = x + self.dropout(y, deterministic=not train)
        y = self.mlp2(nn.gelu(self.mlp1(self.norm2(x))))
        return x + self.dropout(y, deterministic=not train), None  # (carry, output): nn.scan's form


class GPT(nn.Module):
    vocab_size: int
    block_size: int
    width: int = 64
    depth: int = 3
    num_heads: int = 4
    mlp_dim: int = 256
    dropout_rate: float = 0.1
    scan_layers: bool = False
    decode: bool = False
    dtype: Any = None  # computation dtype: bfloat16 for mixed precision
    param_dtype: Any = jnp.float32  # the parameters' dtype: float64 for float64 runs

    def setup(self) -> None:
        normal = nn.initializers.normal(0.02)
        self.embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                              embedding_init=nn.with_logical_partitioning(normal, ("vocab", "embed")))
        self.pos_embed = nn.Embed(self.block_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                  embedding_init=nn.with_logical_partitioning(normal, (None, "embed")))
        self.dropout = nn.Dropout(self.dropout_rate)
        block = {"width": self.width, "num_heads": self.num_heads, "mlp_dim": self.mlp_dim,
                 "dropout_rate": self.dropout_rate, "decode": self.decode, "dtype": self.dtype,
                 "param_dtype": self.param_dtype}
        if self.scan_layers:
            self.blocks = nn.scan(Block, variable_axes={"params": 0, "cache": 0},
                                  split_rngs={"params": True, "dropout": True},
                                  in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                                  metadata_params={nn.PARTITION_NAME: "layers"})(**block)
        else:
            # Linen names the submodules of a list attribute blocks_0, blocks_1, ...
            self.blocks = [Block(**block) for _ in range(self.depth)]
        self.norm = layer_norm(self.dtype, self.param_dtype)

    def __call__(self, tokens: jax.Array, train: bool, positions: jax.Array | None = None) -> jax.Array:
        positions = jnp.arange(tokens.shape[-1]) if positions is None else positions
        x = self.embed(tokens) + self.pos_embed(positions)
        x = self.dropout(x, deterministic=not train)
        # Decoding attends over the cache up to each token: the attention masks it itself.
        mask = None if self.decode else nn.make_causal_mask(tokens)
        if self.scan_layers:
            x, _ = self.blocks(x, mask, train)
        else:
            for block in self.blocks:
                x, _ = block(x, mask, train)
        return self.embed.attend(self.norm(x))
