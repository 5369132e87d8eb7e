"""A small Vision Transformer (ViT) classifier in Haiku.

A conv with kernel and stride ``patch_size`` cuts the image into patches and
embeds each in ``width`` features; a learned class token is prepended and
learned position embeddings added, then dropout. ``depth`` pre-LayerNorm
encoder blocks follow: ``x + dropout(attn(norm1(x)))``, then ``x +
dropout(mlp2(dropout(gelu(mlp1(norm2(x))))))``. A final LayerNorm, the class
token, and a dense head. Use it inside ``hk.transform``, and apply it with a
key in training.

Haiku keeps no metadata on a parameter: :func:`logical_axes` names each
one's axes by its module path (``PARTITION_RULES``), and a sharding strategy
maps the names to mesh axes (``embed`` over the data axis is FSDP, ``heads``
and ``mlp`` over the model axis are tensor parallelism).
"""

import re

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# The first pattern that matches "module/name" gives the axes of a parameter.
PARTITION_RULES = (
    (r"/embed/w$", P(None, None, None, "embed")),
    (r"/embed/b$", P("embed")),
    (r"/(cls|pos_embedding)$", P(None, None, "embed")),
    (r"/attn/(query|key|value)/w$", P("embed", "heads")),  # heads and head_dim in one axis
    (r"/attn/(query|key|value)/b$", P("heads")),
    (r"/attn/linear/w$", P("heads", "embed")),
    (r"/mlp1/w$", P("embed", "mlp")),
    (r"/mlp1/b$", P("mlp")),
    (r"/mlp2/w$", P("mlp", "embed")),
    (r"/(attn/linear|mlp2)/b$", P("embed")),
    (r"/norm\d?/(scale|offset)$", P("embed")),
    (r"/head/w$", P("embed", None)),
    (r"/head/b$", P(None)),
)


def logical_axes(params: hk.Params) -> hk.Params:
    """A ``PartitionSpec`` of axis names for every parameter, by ``PARTITION_RULES``."""
    def axes(module_name: str, name: str, value: jax.Array) -> P:
        path = f"{module_name}/{name}"
        spec = next((spec for pattern, spec in PARTITION_RULES if re.search(pattern, path)), None)
        if spec is None:
            raise ValueError(f"no partition rule for {path}")
        return spec
    return hk.data_structures.map(axes, params)


def dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
    """``hk.dropout`` with the next key of the transform's sequence in training; the identity in evaluation."""
    return hk.dropout(hk.next_rng_key(), rate, x) if is_training else x


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
        self.norm1 = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-6, name="norm1")
        # hk.MultiHeadAttention has no default w_init: LeCun normal. Its
        # projections are hk.Linear layers named query, key, value and linear.
        self.attn = hk.MultiHeadAttention(num_heads, key_size=width // num_heads, model_size=width,
                                          w_init=hk.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal"),
                                          name="attn")
        self.norm2 = hk.LayerNorm(axis=-1, create_scale=True, create_offset=True, eps=1e-6, name="norm2")
        self.mlp1 = hk.Linear(mlp_dim, name="mlp1")
        self.mlp2 = hk.Linear(width, name="mlp2")
        self.dropout_rate = dropout_rate  # hk.dropout is a function, not a module

    def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
        y = self.norm1(x)
        y = self.attn(y, y, y)  # query, key and value: self-attention names all three
        x = x + dropout(y, self.dropout_rate, is_training)
        # jax.nn.gelu is the tanh approximation unless asked.
        y = jax.nn.gelu(self.mlp1(self.norm2(x)), approximate=False)
        y = self.mlp2(dropout(y, self.dropout_rate, is_training))
        return x + dropout(y, self.dropout_rate, is_training)


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
        x = self.embed(x)
        batch, h, w, width = x.shape
        x = x.reshape((batch, h * w, width))  # patches in row-major order
        # Parameters of a module's own are made on its first call: their shapes follow the input.
        normal = hk.initializers.RandomNormal(0.02)
        cls = hk.get_parameter("cls", (1, 1, width), x.dtype, init=normal)
        pos_embedding = hk.get_parameter("pos_embedding", (1, h * w + 1, width), x.dtype, init=normal)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, width)), x], axis=1)
        x = dropout(x + pos_embedding, self.dropout_rate, is_training)
        for block in self.blocks:
            x = block(x, is_training)
        x = self.norm(x)
        return self.head(x[:, 0])
