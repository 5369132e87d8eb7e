"""Parity: every style is the same network as the plain-JAX reference.

For every model and style: the parameter trees map one to one; conversion to
the canonical layout and back is exact; from the same canonical parameters the
forward pass, the gradients and 50 optax steps agree with the reference.

Tolerances, for float32 on a CPU:
- forward: 1e-5 absolute on logits (and on the VAE's mean and log-variance).
  Linen, NNX and Haiku lower to the very same XLA ops as the reference and
  agree bitwise; Equinox stores weights (out, in), convolves in CHW and so
  sums in another order, which costs a few ulps (about 1e-7 relative).
- gradients: 1e-5 times the largest gradient of the leaf (at least 1e-5).
- training: every one of the 50 losses within 1e-4 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shared import data as data_lib
from shared import styles as styles_lib
from shared import tasks
from shared.convert import flatten_canonical
from shared.train import TrainConfig, TrainState, make_optimizer, make_train_step
from zoo import MODELS, STYLES

CASES = [(m, s) for m in MODELS for s in STYLES if s != "jax"]
FORWARD_ATOL = 1e-5
GRAD_RTOL = 1e-5
TRAIN_RTOL = 1e-4


def build(model: str, style: str, digits) -> styles_lib.Model:
    return styles_lib.build(model, style, in_shape=digits.in_shape, num_classes=digits.num_classes)


@pytest.fixture(scope="module")
def batch(digits):
    return data_lib.train_batches(digits.train, 64, seed=0, epoch=0)[0]


def canonical_start(model: str, digits) -> dict:
    return build(model, "jax", digits).init(jax.random.key(42))


@pytest.mark.parametrize("model,style", CASES)
def test_parameter_tree_maps_one_to_one(model, style, digits):
    reference = flatten_canonical(jax.eval_shape(lambda: canonical_start(model, digits)))
    net = build(model, style, digits)
    native = jax.eval_shape(net.init, jax.random.key(0))
    converted = flatten_canonical(jax.eval_shape(net.to_canonical, native))
    assert len(jax.tree.leaves(native)) == len(reference)
    assert sorted(converted) == sorted(reference), "leftover or missing leaves"
    for path, leaf in reference.items():
        assert converted[path].shape == leaf.shape, path
        assert converted[path].dtype == leaf.dtype, path


@pytest.mark.parametrize("model,style", CASES)
def test_round_trip_is_exact(model, style, digits):
    net = build(model, style, digits)
    native = net.init(jax.random.key(1))
    back = net.from_canonical(net.to_canonical(native))
    assert jax.tree.structure(back) == jax.tree.structure(native)
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    canonical = canonical_start(model, digits)
    again = net.to_canonical(net.from_canonical(canonical))
    for path, leaf in flatten_canonical(canonical).items():
        np.testing.assert_array_equal(np.asarray(flatten_canonical(again)[path]), np.asarray(leaf))


def outputs(net, params, batch, key):
    return jax.jit(net.apply)(params, batch["image"], batch["label"], key)


@pytest.mark.parametrize("model,style", CASES)
def test_forward_matches_reference(model, style, digits, batch):
    reference = build(model, "jax", digits)
    net = build(model, style, digits)
    canonical = canonical_start(model, digits)
    key = jax.random.key(7)
    expected = outputs(reference, canonical, batch, key)
    got = outputs(net, net.from_canonical(canonical), batch, key)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        assert e.shape == g.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=0, atol=FORWARD_ATOL)


@pytest.mark.parametrize("style", [s for s in STYLES if s != "jax"])
def test_vae_draws_the_same_noise(style, digits, batch):
    """Same key: the same latent draw in every style; another key: another draw."""
    reference = build("vae", "jax", digits)
    net = build("vae", style, digits)
    canonical = canonical_start("vae", digits)
    params = net.from_canonical(canonical)
    key, other = jax.random.key(3), jax.random.key(4)
    logits, mean, logvar = outputs(net, params, batch, key)
    # The latent the reference draws with the shared noise key, decoded by the reference:
    from zoo.jax import vae

    eps = jax.random.normal(styles_lib.noise_key(key), mean.shape)
    z = mean + jnp.exp(0.5 * logvar) * eps
    y = jax.nn.one_hot(batch["label"], 10)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(vae.decode(canonical, z, y)),
                               rtol=0, atol=FORWARD_ATOL)
    other_logits = outputs(net, params, batch, other)[0]
    assert float(jnp.max(jnp.abs(other_logits - logits))) > 1e-3, "the key does not reach the draw"
    ref_loss = tasks.per_example("vae", outputs(reference, canonical, batch, key), batch)["loss"].mean()
    loss = tasks.per_example("vae", (logits, mean, logvar), batch)["loss"].mean()
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)


def canonical_grads(net, params, batch, key):
    def loss_fn(p):
        return tasks.per_example(net.kind, net.apply(p, batch["image"], batch["label"], key), batch)["loss"].mean()

    return flatten_canonical(net.to_canonical(jax.jit(jax.grad(loss_fn))(params)))


@pytest.mark.parametrize("model,style", CASES)
def test_gradients_match_reference(model, style, digits, batch):
    reference = build(model, "jax", digits)
    net = build(model, style, digits)
    canonical = canonical_start(model, digits)
    key = jax.random.key(11)
    expected = canonical_grads(reference, canonical, batch, key)
    got = canonical_grads(net, net.from_canonical(canonical), batch, key)
    assert sorted(got) == sorted(expected)
    for path, e in expected.items():
        scale = max(float(jnp.max(jnp.abs(e))), 1.0)
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(e), rtol=0, atol=GRAD_RTOL * scale,
                                   err_msg=path)


def train_losses(net, params, digits, steps: int) -> list[float]:
    config = TrainConfig(batch_size=64, lr=1e-3)
    optimizer = make_optimizer(config, steps, None)
    step = jax.jit(make_train_step(net, optimizer, config, jax.random.key(5)))
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), None)
    losses = []
    epoch = 0
    while len(losses) < steps:
        batches = data_lib.train_batches(digits.train, 64, seed=0, epoch=epoch)
        for i in range(min(len(batches), steps - len(losses))):
            state, loss, _ = step(state, batches[i])
            losses.append(float(loss))
        epoch += 1
    return losses


@pytest.mark.parametrize("model,style", CASES)
def test_fifty_adam_steps_match_reference(model, style, digits):
    reference = build(model, "jax", digits)
    net = build(model, style, digits)
    canonical = canonical_start(model, digits)
    expected = train_losses(reference, canonical, digits, 50)
    got = train_losses(net, net.from_canonical(canonical), digits, 50)
    assert expected[-1] < 0.8 * expected[0], "the reference did not learn: the check would be vacuous"
    np.testing.assert_allclose(got, expected, rtol=TRAIN_RTOL)
