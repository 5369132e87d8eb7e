"""A small Vision Transformer (ViT) classifier in Flax Linen.

A conv with kernel and stride ``patch_size`` cuts the image into patches and
embeds each in ``width`` features; a learned class token is prepended and
learned position embeddings added, then dropout. ``depth`` pre-LayerNorm
encoder blocks follow: ``x + dropout(attn(norm1(x)))``, then ``x +
dropout(mlp2(dropout(gelu(mlp1(norm2(x))))))``. A final LayerNorm, the class
token, and a dense head. In train mode apply with ``rngs={"dropout": key}``.

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
    return nn.LayerNorm(dtype=dtype, param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(zeros, ("embed",)))


class EncoderBlock(nn.Module):
    width: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def setup(self) -> None:
        self.norm1 = layer_norm(self.dtype, self.param_dtype)
        self.attn = nn.MultiHeadDotProductAttention(
            self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
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

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.attn(self.norm1(x))
        x = x + self.dropout(y, deterministic=not train)
        # nn.gelu is the tanh approximation unless asked.
        y = nn.gelu(self.mlp1(self.norm2(x)), approximate=False)
        y = self.mlp2(self.dropout(y, deterministic=not train))
        return x + self.dropout(y, deterministic=not train)


class ViT(nn.Module):
    in_shape: tuple[int, int, int]
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
        height, image_width, _ = self.in_shape
        num_patches = (height // self.patch_size) * (image_width // self.patch_size)
        # Images are NHWC and kernels HWIO.
        self.embed = nn.Conv(self.width, kernel_size=(self.patch_size, self.patch_size), strides=self.patch_size,
                             padding="VALID", dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=nn.with_logical_partitioning(lecun_normal, (None, None, None, "embed")),
                             bias_init=nn.with_logical_partitioning(zeros, ("embed",)))
        normal = nn.initializers.normal(0.02)
        self.cls = self.param("cls", nn.with_logical_partitioning(normal, (None, None, "embed")), (1, 1, self.width),
                              self.param_dtype)
        self.pos_embedding = self.param("pos_embedding", nn.with_logical_partitioning(normal, (None, None, "embed")),
                                        (1, num_patches + 1, self.width), self.param_dtype)
        self.dropout = nn.Dropout(self.dropout_rate)
        # Linen names the submodules of a list attribute blocks_0, blocks_1, ...
        self.blocks = [EncoderBlock(self.width, self.num_heads, self.mlp_dim, self.dropout_rate,
                                    dtype=self.dtype, param_dtype=self.param_dtype) for _ in range(self.depth)]
        self.norm = layer_norm(self.dtype, self.param_dtype)
        self.head = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                             kernel_init=nn.with_logical_partitioning(lecun_normal, ("embed", None)),
                             bias_init=nn.with_logical_partitioning(zeros, (None,)))

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = self.embed(x)
        batch, h, w, width = x.shape
        x = x.reshape((batch, h * w, width))  # patches in row-major order
        # Parameters of our own are cast to the computation dtype, as Linen's layers cast theirs.
        cls, pos_embedding = jnp.asarray(self.cls, x.dtype), jnp.asarray(self.pos_embedding, x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), x], axis=1)
        x = self.dropout(x + pos_embedding, deterministic=not train)
        for block in self.blocks:
            x = block(x, train)
        x = self.norm(x)
        return self.head(x[:, 0])
