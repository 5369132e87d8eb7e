"""A small Vision Transformer (ViT) classifier in Flax NNX.

A conv with kernel and stride ``patch_size`` cuts the image into patches and
embeds each in ``width`` features; a learned class token is prepended and
learned position embeddings added, then dropout. ``depth`` pre-LayerNorm
encoder blocks follow: ``x + dropout(attn(norm1(x)))``, then ``x +
dropout(mlp2(dropout(gelu(mlp1(norm2(x))))))``. A final LayerNorm, the class
token, and a dense head. Switch modes with ``model.train()`` and
``model.eval()``.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.attention import dot_product_attention_weights


def per_example_dropout(dropout: nnx.Dropout, x: jax.Array, keys: jax.Array | None) -> jax.Array:
    """One mask per example, each from its own key, as Equinox draws them under jax.vmap; none without keys."""
    if keys is None:
        return x
    return jax.vmap(lambda f, k: dropout(f, rngs=k))(x, keys)


def attention(query: jax.Array, key: jax.Array, value: jax.Array, **kwargs: Any) -> jax.Array:
    """Linen's dot_product_attention, from NNX's own attention weights.

    nnx.dot_product_attention hands a call without attention dropout to
    jax.nn.dot_product_attention, which scales the logits after the product
    and always takes the softmax in float32, in float64 runs too.
    """
    weights = dot_product_attention_weights(query, key, **kwargs)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=kwargs.get("precision"))


class EncoderBlock(nnx.Module):
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
        # epsilon 1e-6 is NNX's default; the two-pass variance E[(x - E[x])^2]
        # is Haiku's and Equinox's (NNX's default is E[x^2] - E[x]^2).
        self.norm1 = nnx.LayerNorm(width, epsilon=1e-6, use_fast_variance=False,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # No dropout on the attention weights (dropout_rate=0.0, ViT's default;
        # NNX would draw one mask for the whole batch): dropout acts on the
        # embeddings, on this sublayer's output and twice in the MLP, as in the
        # ViT paper's Flax code. decode (the autoregressive cache) has no
        # default: NNX refuses to run without it.
        self.attn = nnx.MultiHeadAttention(num_heads, width, attention_fn=attention, decode=False,
                                           dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, epsilon=1e-6, use_fast_variance=False,
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp1 = nnx.Linear(width, mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp2 = nnx.Linear(mlp_dim, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout_rate)

    def __call__(self, x: jax.Array, keys: jax.Array | None = None) -> jax.Array:
        # In train mode each example's key splits in three: the attention's output, the MLP's hidden layer, its output.
        k1, k2, k3 = (None,) * 3 if keys is None else jax.vmap(lambda k: jax.random.split(k, 3), out_axes=1)(keys)
        y = self.attn(self.norm1(x))
        x = x + per_example_dropout(self.dropout, y, k1)
        # nnx.gelu is the tanh approximation unless asked.
        y = nnx.gelu(self.mlp1(self.norm2(x)), approximate=False)
        y = self.mlp2(per_example_dropout(self.dropout, y, k2))
        return x + per_example_dropout(self.dropout, y, k3)


class ViT(nnx.Module):
    def __init__(
        self,
        in_shape: tuple[int, int, int],
        num_classes: int = 10,
        patch_size: int = 2,
        width: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_dim: int = 128,
        dropout_rate: float = 0.1,
        dtype: Any = None,  # computation dtype: bfloat16 for mixed precision
        param_dtype: Any = jnp.float32,  # the parameters' dtype: float64 for float64 runs
        *,
        rngs: nnx.Rngs,
    ) -> None:
        height, image_width, channels = in_shape
        num_patches = (height // patch_size) * (image_width // patch_size)
        # Images are NHWC and kernels HWIO.
        self.embed = nnx.Conv(channels, width, kernel_size=(patch_size, patch_size), strides=patch_size,
                              padding="VALID", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        normal = nnx.initializers.normal(0.02)
        self.cls = nnx.Param(normal(rngs.params(), (1, 1, width), param_dtype))
        self.pos_embedding = nnx.Param(normal(rngs.params(), (1, num_patches + 1, width), param_dtype))
        # No rngs: the key comes with each call, so the layer holds no RNG state.
        self.dropout = nnx.Dropout(dropout_rate)
        # A list of submodules must be wrapped in nnx.List to be part of the state.
        self.blocks = nnx.List([EncoderBlock(width, num_heads, mlp_dim, dropout_rate, dtype, param_dtype, rngs=rngs)
                                for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, epsilon=1e-6, use_fast_variance=False,
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        keys = [None] * (len(self.blocks) + 1)
        if not self.dropout.deterministic:
            # One key per example, each split in depth + 1: the embeddings'
            # dropout, then one per block. rngs.dropout() is fold_in(key, n)
            # for the n-th draw on the stream "dropout".
            keys = jax.vmap(lambda k: jax.random.split(k, len(self.blocks) + 1), out_axes=1)(
                jax.random.split(rngs.dropout(), x.shape[0]))
        x = self.embed(x)
        batch, h, w, width = x.shape
        x = x.reshape((batch, h * w, width))  # patches in row-major order
        # Parameters in the computation dtype, as NNX's layers cast theirs.
        cls, pos_embedding = jnp.asarray(self.cls[...], x.dtype), jnp.asarray(self.pos_embedding[...], x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), x], axis=1)
        x = per_example_dropout(self.dropout, x + pos_embedding, keys[0])
        for block, block_keys in zip(self.blocks, keys[1:]):
            x = block(x, block_keys)
        x = self.norm(x)
        return self.head(x[:, 0])
