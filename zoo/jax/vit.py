"""A small Vision Transformer (ViT) classifier in plain JAX.

A conv with kernel and stride ``patch_size`` cuts the image into patches and
embeds each in ``width`` features; a learned class token is prepended and
learned position embeddings added, then dropout. ``depth`` pre-LayerNorm
encoder blocks follow: ``x + dropout(attn(norm1(x)))``, then ``x +
dropout(mlp2(dropout(gelu(mlp1(norm2(x))))))``. A final LayerNorm, the class
token, and a dense head. Images are NHWC, patches in row-major order. This is
the canonical layout: ``{"embed": {"kernel" (HWIO), "bias"}, "cls" (1, 1,
width), "pos_embedding" (1, patches + 1, width), "blocks_0": {"norm1", "attn":
{"query", "key", "value", "out"}, "norm2", "mlp1", "mlp2"}, ..., "norm",
"head"}``; the attention's kernels are ``(width, heads, head_dim)`` and ``(heads,
head_dim, width)``, each head's slice of a ``(width, width)`` matrix.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Params = dict[str, dict]


def dense_init(key: jax.Array, n_in: int, n_out: int) -> dict[str, jax.Array]:
    """A LeCun-normal kernel and a zero bias."""
    kernel = jax.nn.initializers.lecun_normal()(key, (n_in, n_out), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((n_out,), jnp.float32)}


def norm_init(width: int) -> dict[str, jax.Array]:
    return {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}


def attention_init(key: jax.Array, width: int, num_heads: int) -> Params:
    """Kernels drawn ``(width, width)``, then split into heads."""
    heads = (num_heads, width // num_heads)
    layers = [dense_init(k, width, width) for k in jax.random.split(key, 4)]
    params = {name: {"kernel": layer["kernel"].reshape((width, *heads)), "bias": layer["bias"].reshape(heads)}
              for name, layer in zip(("query", "key", "value"), layers)}
    params["out"] = {"kernel": layers[3]["kernel"].reshape((*heads, width)), "bias": layers[3]["bias"]}
    return params


def block_init(key: jax.Array, width: int, num_heads: int, mlp_dim: int) -> Params:
    k1, k2, k3 = jax.random.split(key, 3)
    return {"norm1": norm_init(width), "attn": attention_init(k1, width, num_heads), "norm2": norm_init(width),
            "mlp1": dense_init(k2, width, mlp_dim), "mlp2": dense_init(k3, mlp_dim, width)}


def init(
    key: jax.Array,
    in_shape: tuple[int, int, int],
    num_classes: int = 10,
    patch_size: int = 2,
    width: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_dim: int = 128,
) -> Params:
    height, image_width, channels = in_shape
    num_patches = (height // patch_size) * (image_width // patch_size)
    keys = jax.random.split(key, depth + 4)
    embed = jax.nn.initializers.lecun_normal()(keys[0], (patch_size, patch_size, channels, width), jnp.float32)
    params = {
        "embed": {"kernel": embed, "bias": jnp.zeros((width,), jnp.float32)},
        "cls": 0.02 * jax.random.normal(keys[1], (1, 1, width), jnp.float32),
        "pos_embedding": 0.02 * jax.random.normal(keys[2], (1, num_patches + 1, width), jnp.float32),
    }
    for i in range(depth):
        params[f"blocks_{i}"] = block_init(keys[3 + i], width, num_heads, mlp_dim)
    params["norm"] = norm_init(width)
    params["head"] = dense_init(keys[-1], width, num_classes)
    return params


def logical_axes(depth: int = 4) -> Params:
    """The name of each parameter axis, a ``PartitionSpec`` per leaf of :func:`init`'s tree: a sharding
    strategy maps names to mesh axes (``embed`` over the data axis is FSDP, ``heads`` and ``mlp`` over
    the model axis are tensor parallelism). Patch, channel, position and class axes are not split."""
    def dense_axes(n_in: str | None, n_out: str | None) -> dict[str, P]:
        return {"kernel": P(n_in, n_out), "bias": P(n_out)}

    norm = {"scale": P("embed"), "bias": P("embed")}
    qkv = {"kernel": P("embed", "heads", "kv"), "bias": P("heads", "kv")}
    block = {"norm1": norm, "attn": {"query": qkv, "key": qkv, "value": qkv,
                                     "out": {"kernel": P("heads", "kv", "embed"), "bias": P("embed")}},
             "norm2": norm, "mlp1": dense_axes("embed", "mlp"), "mlp2": dense_axes("mlp", "embed")}
    axes = {"embed": {"kernel": P(None, None, None, "embed"), "bias": P("embed")},
            "cls": P(None, None, "embed"), "pos_embedding": P(None, None, "embed")}
    axes.update({f"blocks_{i}": block for i in range(depth)})
    axes["norm"] = norm
    axes["head"] = dense_axes("embed", None)
    return axes


def dense(x: jax.Array, layer: dict[str, jax.Array], axes: int = 1) -> jax.Array:
    """Contracts the last ``axes`` axes of ``x`` with the first ``axes`` of the kernel, then adds the bias."""
    return jnp.tensordot(x, layer["kernel"], axes) + layer["bias"]


def layer_norm(x: jax.Array, params: dict[str, jax.Array], epsilon: float = 1e-6) -> jax.Array:
    """Over the last axis, with the statistics in float32 at least (bfloat16 inputs are widened)."""
    dtype = x.dtype
    x = x.astype(jnp.promote_types(dtype, jnp.float32))
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + epsilon)
    return (y * params["scale"] + params["bias"]).astype(dtype)


def attention(x: jax.Array, params: Params) -> jax.Array:
    """Multi-head self-attention: ``softmax(q k^T / sqrt(head_dim)) v`` per head, then the output projection."""
    query, key, value = (dense(x, params[name]) for name in ("query", "key", "value"))
    query = query / jnp.sqrt(query.shape[-1]).astype(query.dtype)
    weights = jax.nn.softmax(jnp.einsum("...qhd,...khd->...hqk", query, key))
    return dense(jnp.einsum("...hqk,...khd->...qhd", weights, value), params["out"], axes=2)


def dropout(key: jax.Array | None, rate: float, x: jax.Array) -> jax.Array:
    """Zeroes each entry with probability ``rate`` and scales the others by ``1 / (1 - rate)``; without a key
    (eval mode), the identity."""
    if key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def block_apply(params: Params, x: jax.Array, key: jax.Array | None, dropout_rate: float) -> jax.Array:
    # In train mode the key splits in three: the attention's output, the MLP's hidden layer, its output.
    k1, k2, k3 = (None,) * 3 if key is None else jax.random.split(key, 3)
    y = attention(layer_norm(x, params["norm1"]), params["attn"])
    x = x + dropout(k1, dropout_rate, y)
    y = jax.nn.gelu(dense(layer_norm(x, params["norm2"]), params["mlp1"]), approximate=False)
    y = dense(dropout(k2, dropout_rate, y), params["mlp2"])
    return x + dropout(k3, dropout_rate, y)


def apply(
    params: Params,
    x: jax.Array,
    key: jax.Array | None,
    train: bool,
    patch_size: int = 2,
    num_heads: int = 4,
    dropout_rate: float = 0.1,
) -> jax.Array:
    """Logits ``(batch, num_classes)`` for images ``(batch, height, width, channels)``.

    Train mode draws the dropout masks from ``key``, split in ``depth + 1``:
    the embeddings' dropout, then one per block. Eval mode needs no key. The
    parameters' shapes give the other sizes.
    """
    depth = sum(name.startswith("blocks_") for name in params)
    heads = params["blocks_0"]["attn"]["query"]["kernel"].shape[1] if depth else num_heads
    if heads != num_heads:  # the kernels' shapes give the heads: say so if they disagree
        raise ValueError(f"num_heads={num_heads}, but the attention kernels have {heads} heads")
    keys = jax.random.split(key, depth + 1) if train else [None] * (depth + 1)
    x = jax.lax.conv_general_dilated(
        x, params["embed"]["kernel"], window_strides=(patch_size, patch_size), padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["embed"]["bias"]
    batch, h, w, width = x.shape
    x = x.reshape((batch, h * w, width))  # patches in row-major order
    x = jnp.concatenate([jnp.broadcast_to(params["cls"], (batch, 1, width)), x], axis=1)
    x = dropout(keys[0], dropout_rate, x + params["pos_embedding"])
    for i in range(depth):
        x = block_apply(params[f"blocks_{i}"], x, keys[1 + i], dropout_rate)
    x = layer_norm(x, params["norm"])
    return dense(x[:, 0], params["head"])
