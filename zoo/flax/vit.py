"""A small Vision Transformer (ViT) classifier in Flax Linen.

A conv with kernel and stride ``patch_size`` cuts the image into patches and
embeds each in ``width`` features; a learned class token is prepended and
learned position embeddings added, then dropout. ``depth`` pre-LayerNorm
encoder blocks follow: ``x + dropout(attn(norm1(x)))``, then ``x +
dropout(mlp2(dropout(gelu(mlp1(norm2(x))))))``. A final LayerNorm, the class
token, and a dense head.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def per_example_dropout(dropout: nn.Dropout, x: jax.Array, keys: jax.Array | None) -> jax.Array:
    """One mask per example, each from its own key, as Equinox draws them under jax.vmap; none without keys."""
    if keys is None:
        return x
    return jax.vmap(lambda f, k: dropout(f, deterministic=False, rng=k))(x, keys)


class EncoderBlock(nn.Module):
    width: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        # epsilon 1e-6 is Linen's default; the two-pass variance E[(x - E[x])^2]
        # is Haiku's and Equinox's (Linen's default is E[x^2] - E[x]^2).
        self.norm1 = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        # No dropout on the attention weights (dropout_rate=0.0, ViT's default;
        # Linen would draw one mask for the whole batch): dropout acts on the
        # embeddings, on this sublayer's output and twice in the MLP, as in the
        # ViT paper's Flax code.
        self.attn = nn.MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm2 = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False,
                                  dtype=self.dtype, param_dtype=self.param_dtype)
        self.mlp1 = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        self.mlp2 = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype)
        self.dropout = nn.Dropout(self.dropout_rate)

    def __call__(self, x: jax.Array, keys: jax.Array | None = None) -> jax.Array:
        # In train mode each example's key splits in three: the attention's output, the MLP's hidden layer, its output.
        k1, k2, k3 = (None,) * 3 if keys is None else jax.vmap(lambda k: jax.random.split(k, 3), out_axes=1)(keys)
        y = self.attn(self.norm1(x))
        x = x + per_example_dropout(self.dropout, y, k1)
        # nn.gelu is the tanh approximation unless asked.
        y = nn.gelu(self.mlp1(self.norm2(x)), approximate=False)
        y = self.mlp2(per_example_dropout(self.dropout, y, k2))
        return x + per_example_dropout(self.dropout, y, k3)


class ViT(nn.Module):
    num_classes: int = 10
    patch_size: int = 2
    width: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 128
    dropout_rate: float = 0.1
    dtype: Any = None  # computation dtype: bfloat16 for mixed precision
    param_dtype: Any = jnp.float32  # the parameters' dtype: float64 for float64 runs

    def setup(self) -> None:
        # Images are NHWC and kernels HWIO.
        self.embed = nn.Conv(self.width, kernel_size=(self.patch_size, self.patch_size), strides=self.patch_size,
                             padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype)
        self.cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, self.width), self.param_dtype)
        self.dropout = nn.Dropout(self.dropout_rate)
        # Linen names the submodules of a list attribute blocks_0, blocks_1, ...
        self.blocks = [EncoderBlock(self.width, self.num_heads, self.mlp_dim, self.dropout_rate,
                                    dtype=self.dtype, param_dtype=self.param_dtype) for _ in range(self.depth)]
        self.norm = nn.LayerNorm(epsilon=1e-6, use_fast_variance=False,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)

    # nn.compact next to setup: the position embeddings' length comes from the
    # input, which setup does not see, so they are created on the first call.
    @nn.compact
    def __call__(self, x: jax.Array, train: bool, dropout_rng: jax.Array | None = None) -> jax.Array:
        keys = [None] * (self.depth + 1)
        if train:
            # The key comes in as an argument: self.make_rng("dropout") would
            # fold a hash of this module's path into it, which no other
            # framework can reproduce. One key per example, each split in
            # depth + 1: the embeddings' dropout, then one per block.
            keys = jax.vmap(lambda k: jax.random.split(k, self.depth + 1), out_axes=1)(
                jax.random.split(dropout_rng, x.shape[0]))
        x = self.embed(x)
        batch, h, w, width = x.shape
        x = x.reshape((batch, h * w, width))  # patches in row-major order
        pos_embedding = self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, width),
                                   self.param_dtype)
        # Parameters in the computation dtype, as Linen's layers cast theirs.
        cls, pos_embedding = jnp.asarray(self.cls, x.dtype), jnp.asarray(pos_embedding, x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), x], axis=1)
        x = per_example_dropout(self.dropout, x + pos_embedding, keys[0])
        for block, block_keys in zip(self.blocks, keys[1:]):
            x = block(x, block_keys)
        x = self.norm(x)
        return self.head(x[:, 0])
