"""Each style's own default initialiser, measured against its documentation.

These differ on purpose, and a user porting a model needs to see how:

========== ======================================== ==================================
style      dense / conv kernel                      bias
========== ======================================== ==================================
jax        LeCun normal: std 1/sqrt(fan_in)         zeros
flax, nnx  LeCun normal (truncated normal rescaled  zeros
           to std 1/sqrt(fan_in))
haiku      truncated normal, stddev 1/sqrt(fan_in), zeros
           cut at 2 std: real std 0.8796/sqrt(fan_in)
equinox    uniform(+-1/sqrt(fan_in)):               uniform(+-1/sqrt(fan_in))
           std 1/sqrt(3 fan_in)
========== ======================================== ==================================

fan_in is the input size of a dense layer and kh*kw*in_channels of a conv.
"""

import math

import equinox as eqx
import flax.linen as nn
import haiku as hk
import jax
import numpy as np
import pytest
from flax import nnx

from shared import styles
from shared.convert import flatten_canonical

# Standard deviation of a standard normal truncated to [-2, 2].
TRUNCATED_STD = 0.87962566103423978
KERNEL_STD = {"jax": 1.0, "flax": 1.0, "nnx": 1.0, "haiku": TRUNCATED_STD, "equinox": 1 / math.sqrt(3)}
BIAS_STD = {"jax": 0.0, "flax": 0.0, "nnx": 0.0, "haiku": 0.0, "equinox": 1 / math.sqrt(3)}

# Layers large enough for tight estimates: MLP layers_0 on 28x28 inputs (784 x 1024 weights)
# and the CNN's conv2 (3 x 3 x 32 x 64 weights).
LAYERS = {"mlp": ("layers_0", 784), "cnn": ("conv2", 3 * 3 * 32)}


@pytest.mark.parametrize("model", sorted(LAYERS))
@pytest.mark.parametrize("style", ["jax", "flax", "nnx", "haiku", "equinox"])
def test_default_initialiser(style, model):
    net = styles.build(model, style, in_shape=(28, 28, 1),
                       **({"hidden_sizes": (1024,)} if model == "mlp" else {}))
    params = flatten_canonical(net.to_canonical(net.init_params(jax.random.key(0))))
    layer, fan_in = LAYERS[model]
    kernel = np.asarray(params[f"{layer}/kernel"], np.float64)
    bias = np.asarray(params[f"{layer}/bias"], np.float64)
    expected = KERNEL_STD[style] / math.sqrt(fan_in)
    # The sample std of n >= 18k draws is within 2% of the truth with overwhelming
    # probability (its relative error is about 1/sqrt(2n) < 0.6%); the styles differ by 12% or more.
    assert kernel.std() == pytest.approx(expected, rel=0.02)
    assert abs(kernel.mean()) < 5 * expected / math.sqrt(kernel.size)
    if BIAS_STD[style] == 0.0:
        assert not bias.any()
    else:  # only 64 to 1024 draws: a looser 25% band, still far from zero
        assert bias.std() == pytest.approx(BIAS_STD[style] / math.sqrt(fan_in), rel=0.25)


# Each framework's embedding layer left to its default initialiser (the GPT overrides it with N(0, 0.02)
# in every style): (vocabulary, features) of (1000, 64), 64,000 draws.
EMBED_STD = {"flax": 1 / math.sqrt(64), "nnx": 1 / math.sqrt(64), "haiku": TRUNCATED_STD, "equinox": 1.0}


@pytest.mark.parametrize("style", sorted(EMBED_STD))
def test_default_embedding_initialiser(style):
    key = jax.random.key(0)
    if style == "flax":
        table = nn.Embed(1000, 64).init(key, np.zeros((1,), np.int32))["params"]["embedding"]
    elif style == "nnx":
        table = nnx.Embed(1000, 64, rngs=nnx.Rngs(0)).embedding[...]
    elif style == "haiku":
        f = hk.transform(lambda t: hk.Embed(1000, 64)(t))
        table = f.init(key, np.zeros((1,), np.int32))["embed"]["embeddings"]
    else:
        table = eqx.nn.Embedding(1000, 64, key=key).weight
    table = np.asarray(table, np.float64)
    assert table.shape == (1000, 64)
    assert table.std() == pytest.approx(EMBED_STD[style], rel=0.02)
    assert abs(table.mean()) < 5 * EMBED_STD[style] / math.sqrt(table.size)
