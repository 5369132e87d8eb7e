"""A small Vision Transformer (ViT) classifier in Flax NNX.

A conv with kernel and stride ``patch_size`` cuts the image into patches and
embeds each in ``width`` features; a learned class token is prepended and
learned position embeddings added, then dropout. ``depth`` pre-LayerNorm
encoder blocks follow: ``x + dropout(attn(norm1(x)))``, then ``x +
dropout(mlp2(dropout(gelu(mlp1(norm2(x))))))``. A final LayerNorm, the class
token, and a dense head. Switch modes with ``model.train()`` and
``model.eval()``, and give the dropout key as ``model(x,
rngs=nnx.Rngs(dropout=key))`` in train mode.

Every parameter names its axes in its variable's metadata
(``nnx.with_partitioning``); under ``nnx.logical_axis_rules`` (``("embed",
"data")`` for FSDP, ``("heads", "model")`` and ``("mlp", "model")`` for tensor
parallelism) ``nnx.get_partition_spec`` gives their shardings.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

lecun_normal = nnx.initializers.lecun_normal()
zeros, ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()



def partitioned(initializer: nnx.Initializer, names: tuple[str | None, ...]) -> nnx.Initializer:
    """``nnx.with_partitioning`` without eager sharding: the variable is placed where the train step puts
    it, so the model builds with no mesh (by default NNX shards a variable as it is made, which needs a
    mesh and rules for every name)."""
    return nnx.with_partitioning(initializer, names, eager_sharding=False)

def layer_norm(width: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, dtype=dtype, param_dtype=param_dtype,
                         scale_init=partitioned(ones, ("embed",)),
                         bias_init=partitioned(zeros, ("embed",)), rngs=rngs)


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

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        y = self.attn(self.norm1(x))
        x = x + self.dropout(y, rngs=rngs)
        # nnx.gelu is the tanh approximation unless asked.
        y = nnx.gelu(self.mlp1(self.norm2(x)), approximate=False)
        y = self.mlp2(self.dropout(y, rngs=rngs))
        return x + self.dropout(y, rngs=rngs)


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
                              padding="VALID", dtype=dtype, param_dtype=param_dtype,
                              kernel_init=partitioned(lecun_normal, (None, None, None, "embed")),
                              bias_init=partitioned(zeros, ("embed",)), rngs=rngs)
        normal = nnx.initializers.normal(0.02)
        self.cls = nnx.Param(normal(rngs.params(), (1, 1, width), param_dtype),
                             out_sharding=(None, None, "embed"), eager_sharding=False)
        self.pos_embedding = nnx.Param(normal(rngs.params(), (1, num_patches + 1, width), param_dtype),
                                       out_sharding=(None, None, "embed"), eager_sharding=False)
        self.dropout = nnx.Dropout(dropout_rate)
        # A list of submodules must be wrapped in nnx.List to be part of the state.
        self.blocks = nnx.List([EncoderBlock(width, num_heads, mlp_dim, dropout_rate, dtype=dtype,
                                             param_dtype=param_dtype, rngs=rngs) for _ in range(depth)])
        self.norm = layer_norm(width, dtype, param_dtype, rngs)
        self.head = nnx.Linear(width, num_classes, dtype=dtype, param_dtype=param_dtype,
                               kernel_init=partitioned(lecun_normal, ("embed", None)),
                               bias_init=partitioned(zeros, (None,)), rngs=rngs)

    def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.embed(x)
        batch, h, w, width = x.shape
        x = x.reshape((batch, h * w, width))  # patches in row-major order
        # Parameters of our own are cast to the computation dtype, as NNX's layers cast theirs.
        cls, pos_embedding = jnp.asarray(self.cls[...], x.dtype), jnp.asarray(self.pos_embedding[...], x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), x], axis=1)
        x = self.dropout(x + pos_embedding, rngs=rngs)
        for block in self.blocks:
            x = block(x, rngs)
        x = self.norm(x)
        return self.head(x[:, 0])
