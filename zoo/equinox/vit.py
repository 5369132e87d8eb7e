"""A small Vision Transformer (ViT) classifier in Equinox.

A conv with kernel and stride ``patch_size`` cuts the image into patches and
embeds each in ``width`` features; a learned class token is prepended and
learned position embeddings added, then dropout. ``depth`` pre-LayerNorm
encoder blocks follow: ``x + dropout(attn(norm1(x)))``, then ``x +
dropout(mlp2(dropout(gelu(mlp1(norm2(x))))))``. A final LayerNorm, the class
token, and a dense head. Acts on a single CHW example, ``in_shape`` being
``(channels, height, width)``: ``jax.vmap`` it over a batch, with one key per
example in training, and select eval mode with ``eqx.nn.inference_mode``.

An Equinox module keeps no metadata on its arrays: :func:`logical_axes` names
each one's axes by its attribute path (``PARTITION_RULES``), and a sharding
strategy maps the names to mesh axes (``embed`` over the data axis is FSDP,
``heads`` and ``mlp`` over the model axis are tensor parallelism), for
``eqx.filter_shard``.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, PyTree

# The first pattern that matches an array's attribute path gives its axes. Linear weights are (out, in),
# the conv's OIHW, its bias (out, 1, 1).
PARTITION_RULES = (
    (r"^embed\.weight$", P("embed", None, None, None)),
    (r"^embed\.bias$", P("embed", None, None)),
    (r"^(cls|pos_embedding)$", P(None, "embed")),  # one example's: no batch axis
    (r"attn\.(query|key|value)_proj\.weight$", P("heads", "embed")),  # heads and head_dim in one axis
    (r"attn\.(query|key|value)_proj\.bias$", P("heads")),
    (r"attn\.output_proj\.weight$", P("embed", "heads")),
    (r"mlp1\.weight$", P("mlp", "embed")),
    (r"mlp1\.bias$", P("mlp")),
    (r"mlp2\.weight$", P("embed", "mlp")),
    (r"(attn\.output_proj|mlp2)\.bias$", P("embed")),
    (r"norm\d?\.(weight|bias)$", P("embed")),
    (r"^head\.weight$", P(None, "embed")),
    (r"^head\.bias$", P(None)),
)


class EncoderBlock(eqx.Module):
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
        self.norm1 = eqx.nn.LayerNorm(width, eps=1e-6)
        # MultiheadAttention acts on one sequence, and has no biases unless asked.
        self.attn = eqx.nn.MultiheadAttention(num_heads, width, use_query_bias=True, use_key_bias=True,
                                              use_value_bias=True, use_output_bias=True, key=k1)
        self.norm2 = eqx.nn.LayerNorm(width, eps=1e-6)
        self.mlp1 = eqx.nn.Linear(width, mlp_dim, key=k2)
        self.mlp2 = eqx.nn.Linear(mlp_dim, width, key=k3)
        self.dropout = eqx.nn.Dropout(dropout_rate)

    def __call__(
        self, x: Float[Array, "tokens width"], *, key: jax.Array | None = None
    ) -> Float[Array, "tokens width"]:
        # In train mode the key splits in three: the attention's output, the MLP's hidden layer, its output.
        k1, k2, k3 = (None,) * 3 if key is None else jax.random.split(key, 3)
        y = jax.vmap(self.norm1)(x)
        y = self.attn(y, y, y)  # query, key and value: self-attention names all three
        x = x + self.dropout(y, key=k1)
        # jax.nn.gelu is the tanh approximation unless asked.
        y = jax.nn.gelu(jax.vmap(self.mlp1)(jax.vmap(self.norm2)(x)), approximate=False)
        y = jax.vmap(self.mlp2)(self.dropout(y, key=k2))
        return x + self.dropout(y, key=k3)


class ViT(eqx.Module):
    embed: eqx.nn.Conv2d
    cls: jax.Array
    pos_embedding: jax.Array
    dropout: eqx.nn.Dropout
    blocks: list[EncoderBlock]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

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
        *,
        key: jax.Array,
    ) -> None:
        channels, height, image_width = in_shape
        num_patches = (height // patch_size) * (image_width // patch_size)
        keys = jax.random.split(key, depth + 4)
        # Images are CHW and kernels OIHW.
        self.embed = eqx.nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size, padding="VALID",
                                   key=keys[0])
        # One example's class token and position embeddings: no batch axis.
        self.cls = 0.02 * jax.random.normal(keys[1], (1, width))
        self.pos_embedding = 0.02 * jax.random.normal(keys[2], (num_patches + 1, width))
        self.dropout = eqx.nn.Dropout(dropout_rate)
        self.blocks = [EncoderBlock(width, num_heads, mlp_dim, dropout_rate, key=keys[3 + i]) for i in range(depth)]
        self.norm = eqx.nn.LayerNorm(width, eps=1e-6)
        self.head = eqx.nn.Linear(width, num_classes, key=keys[-1])

    def __call__(
        self, x: Float[Array, "channels height width"], *, key: jax.Array | None = None
    ) -> Float[Array, " num_classes"]:
        # Split in depth + 1: the embeddings' dropout, then one per block.
        keys = [None] * (len(self.blocks) + 1) if key is None else jax.random.split(key, len(self.blocks) + 1)
        x = self.embed(x)
        width, h, w = x.shape
        x = x.reshape((width, h * w)).T  # (patches, width), patches in row-major order
        x = jnp.concatenate([self.cls, x], axis=0)
        x = self.dropout(x + self.pos_embedding, key=keys[0])
        for block, block_key in zip(self.blocks, keys[1:]):
            x = block(x, key=block_key)
        x = jax.vmap(self.norm)(x)
        return self.head(x[0])


def logical_axes(model: ViT) -> PyTree[P | None]:
    """A ``PartitionSpec`` of axis names for every array of ``model`` (None elsewhere), by
    ``PARTITION_RULES``."""
    def axes(path: tuple, leaf: jax.Array | None) -> P | None:
        if leaf is None:
            return None
        dotted = jax.tree_util.keystr(path, simple=True, separator=".")
        spec = next((spec for pattern, spec in PARTITION_RULES if re.search(pattern, dotted)), None)
        if spec is None:
            raise ValueError(f"no partition rule for {dotted}")
        return spec
    is_array = lambda leaf: isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))  # noqa: E731 (eval_shape's too)
    return jax.tree_util.tree_map_with_path(axes, eqx.filter(model, is_array))
