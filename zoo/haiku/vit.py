"""A small Vision Transformer (ViT) classifier in Haiku.

A conv with kernel and stride ``patch_size`` cuts the image into patches and
embeds each in ``width`` features; a learned class token is prepended and
learned position embeddings added, then dropout. ``depth`` pre-LayerNorm
encoder blocks follow: ``x + dropout(attn(norm1(x)))``, then ``x +
dropout(mlp2(dropout(gelu(mlp1(norm2(x))))))``. A final LayerNorm, the class
token, and a dense head. Use it inside ``hk.transform``.
"""

import haiku as hk
import jax
import jax.numpy as jnp


def per_example_dropout(x: jax.Array, keys: jax.Array | None, rate: float) -> jax.Array:
    """One mask per example, each from its own key, as Equinox draws them under jax.vmap; none without keys."""
    if keys is None:
        return x
    return jax.vmap(lambda k, f: hk.dropout(k, rate, f))(keys, x)


class EncoderBlock(hk.Module):
    def __init__(
        self,
        width: int,
        num_heads: int,
        mlp_dim: int,
        dropout_rate: float = 0.1,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        # hk.LayerNorm's eps defaults to 1e-5, where Flax's is 1e-6.
        self.norm1 = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-6, name="norm1")
        # hk.MultiHeadAttention has no dropout on the attention weights, which
        # ViT does not use either (rate 0.0): dropout acts on the embeddings, on
        # this sublayer's output and twice in the MLP, as in the ViT paper's Flax
        # code. It takes no default w_init: LeCun normal, Flax's default. Its
        # projections are hk.Linear layers named query, key, value and linear.
        self.attn = hk.MultiHeadAttention(num_heads, key_size=width // num_heads, model_size=width,
                                          w_init=hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal"),
                                          name="attn")
        self.norm2 = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-6, name="norm2")
        self.mlp1 = hk.Linear(mlp_dim, name="mlp1")
        self.mlp2 = hk.Linear(width, name="mlp2")
        self.dropout_rate = dropout_rate  # Haiku's dropout is a function, hk.dropout, not a module

    def __call__(self, x: jax.Array, keys: jax.Array | None = None) -> jax.Array:
        # In train mode each example's key splits in three: the attention's output, the MLP's hidden layer, its output.
        k1, k2, k3 = (None,) * 3 if keys is None else jax.vmap(lambda k: jax.random.split(k, 3), out_axes=1)(keys)
        y = self.norm1(x)
        y = self.attn(y, y, y)  # query, key and value: self-attention names all three
        x = x + per_example_dropout(y, k1, self.dropout_rate)
        # jax.nn.gelu is the tanh approximation unless asked.
        y = jax.nn.gelu(self.mlp1(self.norm2(x)), approximate=False)
        y = self.mlp2(per_example_dropout(y, k2, self.dropout_rate))
        return x + per_example_dropout(y, k3, self.dropout_rate)


class ViT(hk.Module):
    def __init__(
        self,
        num_classes: int = 10,
        patch_size: int = 2,
        width: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_dim: int = 128,
        dropout_rate: float = 0.1,
        name: str | None = None,
    ) -> None:
        super().__init__(name=name)
        # Images are NHWC and kernels HWIO.
        self.embed = hk.Conv2D(width, kernel_shape=patch_size, stride=patch_size, padding="VALID", name="embed")
        self.dropout_rate = dropout_rate
        self.blocks = [EncoderBlock(width, num_heads, mlp_dim, dropout_rate, name=f"blocks_{i}")
                       for i in range(depth)]
        self.norm = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-6, name="norm")
        self.head = hk.Linear(num_classes, name="head")

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        keys = [None] * (len(self.blocks) + 1)
        if is_training:
            # One key per example, each split in depth + 1: the embeddings'
            # dropout, then one per block.
            keys = jax.vmap(lambda k: jax.random.split(k, len(self.blocks) + 1), out_axes=1)(
                jax.random.split(hk.next_rng_key(), x.shape[0]))
        x = self.embed(x)
        batch, h, w, width = x.shape
        x = x.reshape((batch, h * w, width))  # patches in row-major order
        # The class token and position embeddings are this module's own
        # parameters, created on the first call (their length follows the input).
        normal = hk.initializers.RandomNormal(0.02)
        cls = hk.get_parameter("cls", (1, 1, width), x.dtype, init=normal)
        pos_embedding = hk.get_parameter("pos_embedding", (1, h * w + 1, width), x.dtype, init=normal)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), x], axis=1)
        x = per_example_dropout(x + pos_embedding, keys[0], self.dropout_rate)
        for block, block_keys in zip(self.blocks, keys[1:]):
            x = block(x, block_keys)
        x = self.norm(x)
        return self.head(x[:, 0])
