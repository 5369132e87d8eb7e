"""Training features behave identically in every style.

Schedules, clipping, the optimisers, EMA, fine-tuning subsets and mixed
precision all live in the one shared loop, so from the same canonical start on
the same batches every style must follow the reference step for step:
float32 losses within 1e-4 relative (as in test_parity.py), frozen parameters
bitwise unchanged. bfloat16 tolerances are stated where they are used.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from shared import styles as styles_lib
from shared.convert import flatten_canonical
from shared.draws import midpoint_key
from shared.train import TrainConfig, train
from shared.registry import MODELS, NAMES, STYLES
from zoo import harness

OTHERS = [s for s in STYLES if s != "jax"]


def run(model: str, style: str, digits, config: TrainConfig, canonical: dict, precision: str = "float32"):
    """A training run of the small model from ``canonical``."""
    net = harness.build(model, style, precision)
    state = net.state_from_canonical(start_state(model, digits), 0)
    result = train(net, digits, config, init_params=net.from_canonical(canonical), init_state=state,
                   progress=False)
    return net, result


def start(model: str, digits) -> dict:
    return harness.start(model)[0]


def start_state(model: str, digits) -> dict:
    return harness.start(model)[1]


CONFIGS = {
    "adamw+warmup_cosine+clip+ema": TrainConfig(epochs=2, optimizer="adamw", weight_decay=1e-2,
                                                schedule="warmup_cosine", warmup_steps=5, clip_norm=1.0,
                                                ema=0.9, lr=3e-3),
    "sgd+linear_warmup+clip": TrainConfig(epochs=2, optimizer="sgd", momentum=0.9, lr=0.1,
                                          schedule="linear_warmup", warmup_steps=8, clip_norm=0.5),
}


@pytest.fixture(scope="module")
def references(digits):
    canonical = start("mlp", digits)
    return canonical, {name: run("mlp", "jax", digits, config, canonical)[1] for name, config in CONFIGS.items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("style", OTHERS)
def test_optimiser_features_match_reference(style, name, digits, references):
    canonical, reference = references[0], references[1][name]
    config = CONFIGS[name]
    net, result = run("mlp", style, digits, config, canonical)
    np.testing.assert_allclose(result.step_losses, reference.step_losses, rtol=1e-4)
    # The learning rate per step is optax's schedule, the same in every style.
    steps = len(result.step_lrs)
    if config.schedule == "warmup_cosine":
        expected = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, steps)
    else:
        expected = optax.join_schedules([optax.linear_schedule(0.0, config.lr, config.warmup_steps),
                                         optax.constant_schedule(config.lr)], [config.warmup_steps])
    np.testing.assert_allclose(result.step_lrs, [float(expected(i)) for i in range(steps)], rtol=1e-6)
    assert result.step_lrs[0] == 0.0 and max(result.step_lrs) == pytest.approx(config.lr)
    if config.ema:
        ema = flatten_canonical(net.to_canonical(result.ema_params))
        raw = flatten_canonical(net.to_canonical(result.params))
        ref_ema = flatten_canonical(harness.build("mlp", "jax").to_canonical(reference.ema_params))
        for path in ref_ema:
            np.testing.assert_allclose(ema[path], ref_ema[path], atol=1e-5, rtol=0, err_msg=path)
        assert any(float(jnp.max(jnp.abs(ema[p] - raw[p]))) > 1e-4 for p in raw), "EMA equals raw params"
        assert "ema_test_accuracy" in result.final and "test_accuracy" in result.final


def test_clipping_changes_the_updates(digits, references):
    """Guards the check above from being vacuous: without clipping the run differs."""
    canonical, reference = references
    config = CONFIGS["sgd+linear_warmup+clip"]
    unclipped = TrainConfig(**{**config.__dict__, "clip_norm": None})
    _, result = run("mlp", "jax", digits, unclipped, canonical)
    assert abs(result.step_losses[-1] - reference["sgd+linear_warmup+clip"].step_losses[-1]) > 1e-3


def optimiser_state_size(opt_state) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0)


@pytest.mark.parametrize("style", STYLES)
def test_freezing_the_vae_encoder(style, digits):
    canonical = start("vae", digits)
    config = TrainConfig(epochs=1, freeze=("encoder*",))
    net, result = run("vae", style, digits, config, canonical)
    before, after = flatten_canonical(canonical), flatten_canonical(net.to_canonical(result.params))
    for path in before:
        if path.startswith("encoder/"):
            np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]), err_msg=path)
        else:
            assert not np.array_equal(np.asarray(after[path]), np.asarray(before[path])), path
    # Adam keeps two moments for each trained parameter and nothing for the frozen ones.
    from shared.train import make_optimizer, trainable_labels

    optimizer = make_optimizer(config, 11, trainable_labels(net, config))
    decoder_size = sum(int(np.size(v)) for p, v in before.items() if p.startswith("decoder/"))
    assert optimiser_state_size(optimizer.init(net.from_canonical(canonical))) == 2 * decoder_size


@pytest.mark.parametrize("style", OTHERS)
def test_training_only_the_cnn_head_matches_reference(style, digits):
    canonical = start("cnn", digits)
    config = TrainConfig(epochs=1, train_only=("dense2/*",))
    ref_net, reference = run("cnn", "jax", digits, config, canonical)
    net, result = run("cnn", style, digits, config, canonical)
    before, after = flatten_canonical(canonical), flatten_canonical(net.to_canonical(result.params))
    ref_after = flatten_canonical(ref_net.to_canonical(reference.params))
    for path in before:
        if path.startswith("dense2/"):
            np.testing.assert_allclose(after[path], ref_after[path], atol=1e-5, rtol=0)
            assert not np.array_equal(np.asarray(after[path]), np.asarray(before[path]))
        else:
            np.testing.assert_array_equal(np.asarray(after[path]), np.asarray(before[path]), err_msg=path)
    np.testing.assert_allclose(result.step_losses, reference.step_losses, rtol=1e-4)


def test_patterns_that_match_nothing_are_refused(digits):
    net = styles_lib.build("vae", "flax", in_shape=digits.in_shape)
    with pytest.raises(styles_lib.ZooError, match="matches no parameter of vae; its parameters are .*encoder/fc1/kernel"):
        train(net, digits, TrainConfig(epochs=1, freeze=("decoder/fc3*",)), progress=False)
    with pytest.raises(styles_lib.ZooError, match="leaves no parameter to train"):
        train(net, digits, TrainConfig(epochs=1, freeze=("*",)), progress=False)


# bfloat16 keeps 8 significant bits (relative spacing 2**-8 = 0.4%). Styles cast
# at slightly different points (Flax and NNX cast each layer's inputs, the
# explicit-cast styles let float32 noise and one-hot labels promote), so
# outputs may differ by a few bfloat16 roundings: we allow 2% of the output's
# scale, against 2e-3 to 8e-3 between bfloat16 and float32 here.
BF16_RTOL = 2e-2
BF16_FACTOR = 1.5


_FORWARD: dict[tuple, object] = {}  # (model, style, precision): outputs on the first 64 test images


def forward(model: str, style: str, precision: str, digits):
    """Training-mode outputs (with batch statistics, and every draw the midpoint, where the model has
    them) from the common start, on a first training batch; each once per worker (the references' serve
    four styles)."""
    if (model, style, precision) not in _FORWARD:
        net = harness.build(model, style, precision)
        canonical, state = start(model, digits), start_state(model, digits)
        batch = harness.batch(digits, 64, model)
        _FORWARD[model, style, precision] = jax.jit(net.apply, static_argnums=5)(
            net.from_canonical(canonical), net.state_from_canonical(state, 0), batch["image"],
            batch["label"], midpoint_key(), MODELS[model].train_mode)[0]
    return _FORWARD[model, style, precision]


@pytest.mark.parametrize("model", NAMES)
@pytest.mark.parametrize("style", OTHERS)
def test_bfloat16_forward_matches_reference(model, style, digits):
    """The style's bfloat16 outputs are as close to the float32 ones as the reference's bfloat16 outputs
    are (within 1.5 times: each rounds on its own, in its own order), and really are bfloat16's.

    A bound relative to the outputs' scale does not fit every model: the GPT's logits at initialisation
    are small (0.23) against what bfloat16 rounding through two blocks adds (0.006 in the reference
    itself), so two bfloat16 computations differ by up to twice that."""
    expected = forward(model, "jax", "bfloat16", digits)
    got = forward(model, style, "bfloat16", digits)
    full = forward(model, "jax", "float32", digits)
    for e, g, f in zip(jax.tree.leaves(expected), jax.tree.leaves(got), jax.tree.leaves(full)):
        assert g.dtype == jnp.float32  # outputs come back in float32 for the loss
        reference_error = float(jnp.max(jnp.abs(e - f)))
        assert reference_error > 1e-4  # bfloat16 really was used: the result is not the float32 one
        assert float(jnp.max(jnp.abs(g - f))) > 1e-4
        assert float(jnp.max(jnp.abs(g - f))) <= BF16_FACTOR * reference_error


@pytest.mark.parametrize("style", OTHERS)
def test_bfloat16_training_matches_reference(style, digits):
    canonical = start("mlp", digits)
    config = TrainConfig(epochs=1)
    _, reference = run("mlp", "jax", digits, config, canonical, precision="bfloat16")
    net, result = run("mlp", style, digits, config, canonical, precision="bfloat16")
    np.testing.assert_allclose(result.step_losses, reference.step_losses, rtol=BF16_RTOL)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(result.params)), "params must stay float32"


def test_bfloat16_accuracy_within_one_point_of_float32(digits):
    """The MLP at its full size: bfloat16 loses no accuracy worth a point."""
    full_net = styles_lib.build("mlp", "jax", in_shape=digits.in_shape)
    half_net = styles_lib.build("mlp", "jax", in_shape=digits.in_shape, precision="bfloat16")
    key = jax.random.key(3)
    canonical = styles_lib.compile_low_opt(jax.jit(full_net.init).lower(key))(key)[0]
    config = TrainConfig(epochs=20)
    full = train(full_net, digits, config, init_params=canonical, init_state={}, progress=False)
    half = train(half_net, digits, config, init_params=canonical, init_state={}, progress=False)
    assert full.final["test_accuracy"] > 0.95
    assert abs(half.final["test_accuracy"] - full.final["test_accuracy"]) <= 0.01
