"""Parity: every style is the same network as the plain-JAX reference.

For every model of the registry and every style: the parameter and state trees
map one to one; conversion to the canonical layout and back is exact; from the
same canonical parameters, state and key the forward pass (training and
evaluation mode), the new state, the gradients and 50 optax steps agree with
the reference.

Tolerances, for float32 on a CPU:
- forward: 1e-5 absolute on the outputs (logits; the VAE's mean and
  log-variance) and on the new state. Linen, NNX and Haiku lower to the very
  same XLA ops as the reference and agree bitwise; that is asserted too.
  Equinox stores weights (out, in), convolves in CHW, normalises with
  ``(x - mean) / sqrt(var + eps)`` and so sums and rounds in another order,
  which costs a few ulps (about 1e-7 relative).
- gradients: 1e-5 times the largest gradient of the leaf (at least 1e-5).
- training: every one of the 50 losses within 1e-4 relative. Where a style
  misses that, it is accepted only as rounding noise, and only when both hold:
  the reference itself, started from its parameters moved by one ulp
  (``jnp.nextafter``), drifts by more than 1e-4 over the same 50 steps (the
  float32 comparison is below the noise floor: Adam amplifies last-bit
  differences of the gradients, and the ResNet's BatchNorm sums in another
  order in Haiku and Equinox), with the style's drift at most
  ``NOISE_FACTOR`` times the reference's; and the same 50 steps in float64
  agree within ``FLOAT64_RTOL``, where a real difference of the network (an
  epsilon, a momentum, a mask) would stand out by orders of magnitude.
- evaluation with running statistics: Haiku and Equinox debias theirs (see
  ``test_resnet.py``), so their eval outputs are compared with the
  reference's computed from the same debiased statistics.
"""

import functools
import math

import equinox as eqx
import flax.linen as linen
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared import compare
from shared import data as data_lib
from shared import styles as styles_lib
from shared import tasks
from shared.layouts import flatten_canonical
from shared.registry import MODELS, NAMES, STYLES
from shared.train import TrainConfig, TrainState, make_optimizer, make_train_step

CASES = [(m, s) for m in NAMES for s in STYLES if s != "jax"]
STATEFUL = [(m, s) for m, s in CASES if MODELS[m].state]
DEBIASED = ("haiku", "equinox")  # zero-debiased running averages, with a counter
FORWARD_ATOL = 1e-5
GRAD_RTOL = 1e-5
TRAIN_RTOL = 1e-4
# Two runs that differ only in rounding diverge by chance: the style's float32 drift from the
# reference against the reference's own drift from one ulp. Measured for the ResNet on digits
# (jax 0.10.2, CPU): Haiku 2.6e-3 absolute against 8.7e-4, Equinox 8.7e-4 against 8.7e-4.
NOISE_FACTOR = 10
# float64 runs of the same steps: measured within 7e-16 relative for the ResNet (Haiku, Equinox, Linen).
FLOAT64_RTOL = 1e-12


@functools.cache
def build(model: str, style: str, in_shape=(8, 8, 1)) -> styles_lib.Model:
    return styles_lib.build(model, style, in_shape=in_shape, num_classes=10)


@functools.cache
def _compiled_init(model: str, style: str, in_shape=(8, 8, 1)):
    return styles_lib.compile_low_opt(jax.jit(build(model, style, in_shape).init).lower(jax.random.key(0)))


def quick_init(model: str, style: str, key: jax.Array, in_shape=(8, 8, 1)):
    """``build(model, style).init(key)``, compiled once at a low optimisation level.

    Initialisers are many small random programs whose compilation costs seconds
    at the default level (a ResNet's: 5 to 9 s) and nothing to run. The draws
    have the same distribution, not necessarily the same last bits as an eager
    ``init``; every check here starts from whatever the reference drew.
    """
    return _compiled_init(model, style, in_shape)(key)


@functools.cache
def jitted(model: str, style: str, train: bool):
    return jax.jit(functools.partial(_apply, build(model, style), train=train))


def _apply(net, params, state, images, labels, key, *, train):
    return net.apply(params, state, images, labels, key, train)


@pytest.fixture(scope="module")
def batch(digits):
    return data_lib.train_batches(digits.train, 64, seed=0, epoch=0)[0]


@functools.cache
def canonical_start(model: str) -> tuple[dict, dict]:
    """The reference's initial parameters and state (canonical by definition)."""
    return quick_init(model, "jax", jax.random.key(42))


@functools.cache
def trained_state(model: str, batch_key: int) -> dict:
    """A canonical state that has seen a few training batches (running statistics away from 0 and 1)."""
    params, state = canonical_start(model)
    fn = jitted(model, "jax", True)
    images = jax.random.uniform(jax.random.key(batch_key), (64, 8, 8, 1))
    for i in range(5):
        _, state = fn(params, state, images * (1 + i / 5), jnp.zeros((64,), jnp.int32), jax.random.key(i))
    return state


def native_start(model: str, style: str, updates: int = 0):
    params, state = canonical_start(model)
    net = build(model, style)
    return net.from_canonical(params), net.state_from_canonical(state, updates)


def run(model, style, params, state, batch, key, train):
    return jitted(model, style, train)(params, state, batch["image"], batch["label"], key)


def assert_close(got, expected, model, style, atol=FORWARD_ATOL, what=""):
    """Within ``atol``, and bitwise where the style lowers to the reference's ops (the registry's ``bitwise``)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, what
    if style in MODELS[model].bitwise:
        np.testing.assert_array_equal(got, expected, err_msg=f"{what}: {style} should match bitwise")
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol, err_msg=what)


@pytest.mark.parametrize("model,style", CASES)
def test_parameter_and_state_trees_map_one_to_one(model, style):
    reference = build(model, "jax")
    net = build(model, style)
    for kind in ("params", "state"):
        ref_tree = jax.eval_shape(reference.init, jax.random.key(0))[kind == "state"]
        expected = flatten_canonical(ref_tree)
        native = jax.eval_shape(lambda k: net.init(k)[kind == "state"], jax.random.key(0))
        convert = net.to_canonical if kind == "params" else net.state_to_canonical
        converted = flatten_canonical(jax.eval_shape(convert, native))
        assert sorted(converted) == sorted(expected), f"{kind}: leftover or missing leaves"
        for path, leaf in expected.items():
            assert converted[path].shape == leaf.shape, path
            assert converted[path].dtype == leaf.dtype, path
    # The native leaves partition the canonical ones: each canonical leaf comes from exactly one
    # native leaf (a native leaf may hold several, an LSTM's gates), element for element.
    native_params = jax.eval_shape(lambda k: net.init(k)[0], jax.random.key(0))
    paths = net.converter.canonical_paths()
    assert sorted(paths) == sorted(flatten_canonical(jax.eval_shape(reference.init, jax.random.key(0))[0]))
    assert len(jax.tree.leaves(native_params)) == len(net.converter.rules)
    for rule, leaf in zip(net.converter.rules, jax.tree.leaves(native_params)):
        assert math.prod(leaf.shape) == sum(math.prod(s) for s in rule.part_shapes), rule.native


def random_like(tree, seed: int):
    """Distinct random values in the shapes of ``tree``: a round trip must bring every one back."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    return treedef.unflatten([rng.standard_normal(leaf.shape).astype(leaf.dtype) for leaf in leaves])


def assert_round_trip(got, expected, offset: bool, what: str):
    """Bitwise; but a leaf with a constant offset (Haiku's forget-gate bias, stored as the canonical
    bias minus 1) goes through ``b - 1`` and back: one rounding each way, at most an ulp of ``|b| + 1``."""
    got, expected = np.asarray(got), np.asarray(expected)
    if not offset:
        np.testing.assert_array_equal(got, expected, err_msg=what)
        return
    ulp = np.spacing(np.abs(expected).astype(expected.dtype) + 1)
    assert np.all(np.abs(got - expected) <= ulp), what


@pytest.mark.parametrize("model,style", CASES)
def test_round_trip_is_exact(model, style):
    net = build(model, style)
    shifted = {p for rule in net.converter.rules if rule.split for p in rule.split.offsets}
    native = random_like(jax.eval_shape(lambda k: net.init(k)[0], jax.random.key(1)), 1)
    back = net.from_canonical(net.to_canonical(native))
    assert jax.tree.structure(back) == jax.tree.structure(native)
    for rule, a, b in zip(net.converter.rules, jax.tree.leaves(native), jax.tree.leaves(back)):
        assert_round_trip(b, a, bool(set(rule.parts) & shifted), rule.native)
    canonical, _ = canonical_start(model)
    again = flatten_canonical(net.to_canonical(net.from_canonical(canonical)))
    for path, leaf in flatten_canonical(canonical).items():
        assert_round_trip(again[path], leaf, path in shifted, path)
    # Gradients and optimiser moments take no offset: their round trip is exact everywhere.
    moments = net.converter.from_canonical(net.converter.to_canonical(native, offsets=False), offsets=False)
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(moments)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


@pytest.mark.parametrize("model,style", STATEFUL)
def test_state_round_trip(model, style):
    """Canonical -> native -> canonical. Exact but for Haiku's variance, which starts
    at 0 where the canonical one starts at 1: it is stored as ``var - decay**t``
    and read back as ``hidden + decay**t``, one rounding each way (at most 1 ulp
    of the variance)."""
    net = build(model, style)
    state = trained_state(model, 0)
    again = flatten_canonical(net.state_to_canonical(net.state_from_canonical(state, 5)))
    for path, leaf in flatten_canonical(state).items():
        leaf = np.asarray(leaf)
        if style == "haiku" and path.endswith("/var"):
            np.testing.assert_allclose(np.asarray(again[path]), leaf, rtol=2 ** -23, atol=0, err_msg=path)
        else:
            np.testing.assert_array_equal(np.asarray(again[path]), leaf, err_msg=path)


@pytest.mark.parametrize("model,style", CASES)
def test_train_mode_forward_and_new_state_match_reference(model, style, batch):
    key = jax.random.key(7)
    params, state = canonical_start(model)
    expected, expected_state = run(model, "jax", params, state, batch, key, True)
    got, got_state = run(model, style, *native_start(model, style), batch, key, True)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        assert_close(g, e, model, style, what="outputs")
    got_state = flatten_canonical(build(model, style).state_to_canonical(got_state))
    for path, e in flatten_canonical(expected_state).items():
        # Haiku's variance comes back through `hidden + decay**t`: one rounding.
        atol = 2 ** -23 * float(jnp.max(e)) if style == "haiku" and path.endswith("/var") else FORWARD_ATOL
        np.testing.assert_allclose(np.asarray(got_state[path]), np.asarray(e), rtol=0,
                                   atol=atol if style != "equinox" else FORWARD_ATOL, err_msg=path)


def debiased(state: dict, decay: float, updates: int, variance_from_zero: bool) -> dict:
    """The statistics a debiasing framework normalises with, in the canonical layout."""
    scale = 1 - decay ** updates
    out = {}
    for path, value in flatten_canonical(state).items():
        if path.endswith("/var") and variance_from_zero:
            value = value - decay ** updates  # Haiku's var EMA started from 0, not 1
        layer, stat = path.rsplit("/", 1)
        out.setdefault(layer, {})[stat] = value / scale
    nested: dict = {}
    for layer, stats in out.items():
        node = nested
        for part in layer.split("/"):
            node = node.setdefault(part, {})
        node.update(stats)
    return nested


@pytest.mark.parametrize("model,style", CASES)
def test_eval_mode_forward_matches_reference(model, style, batch):
    """Eval mode, with running statistics that have seen 5 updates.

    Linen and NNX normalise with the running statistics as they are, like the
    reference. Haiku and Equinox divide them by ``1 - decay**t`` first (Haiku's
    variance average having started from 0): their outputs are checked against
    the reference's computed from those very statistics, which pins down what
    they do; how far that is from the reference's own eval is measured in
    ``test_resnet.py``.
    """
    key = jax.random.key(8)
    params, _ = canonical_start(model)
    state = trained_state(model, 0)
    net = build(model, style)
    reference_state = state
    if MODELS[model].state and style in DEBIASED:
        decay = MODELS[model].ema_decay(net.hparams)
        reference_state = debiased(state, decay, 5, variance_from_zero=style == "haiku")
    expected, _ = run(model, "jax", params, reference_state, batch, key, False)
    got, got_state = run(model, style, net.from_canonical(params), net.state_from_canonical(state, 5),
                         batch, key, False)
    bitwise_here = style if not (MODELS[model].state and style in DEBIASED) else "debiased"
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        assert_close(g, e, model, bitwise_here, what="eval outputs")
    for path, leaf in flatten_canonical(net.state_to_canonical(got_state)).items():
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(flatten_canonical(state)[path]),
                                   rtol=2 ** -23, atol=0, err_msg=f"eval changed the state at {path}")


@pytest.mark.parametrize("style", [s for s in STYLES if s != "jax"])
def test_vae_draws_the_same_noise(style, batch):
    """Same key: the same latent draw in every style; another key: another draw.

    The draw is per example: ``rng_key(key)`` split into one key per example.
    """
    params, state = canonical_start("vae")
    key, other = jax.random.key(3), jax.random.key(4)
    (logits, mean, logvar), _ = run("vae", style, *native_start("vae", style), batch, key, True)
    from zoo.jax import vae

    keys = jax.random.split(styles_lib.rng_key(key), len(batch["label"]))
    eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:]))(keys)
    z = mean + jnp.exp(0.5 * logvar) * eps
    y = jax.nn.one_hot(batch["label"], 10)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(vae.decode(params, z, y)),
                               rtol=0, atol=FORWARD_ATOL)
    other_logits = run("vae", style, *native_start("vae", style), batch, other, True)[0][0]
    assert float(jnp.max(jnp.abs(other_logits - logits))) > 1e-3, "the key does not reach the draw"


@pytest.mark.parametrize("model,style", [(m, s) for m, s in CASES if MODELS[m].rng == "dropout"])
def test_dropout_masks_are_the_same_from_the_same_key(model, style, batch):
    """Dropout draws per example from ``rng_key(key)``: the same masks in every style.

    Train-mode outputs agree (above); here another key must change them, and
    eval mode must not depend on the key at all.
    """
    net_args = native_start(model, style)
    a = run(model, style, *net_args, batch, jax.random.key(1), True)[0]
    b = run(model, style, *net_args, batch, jax.random.key(2), True)[0]
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3, "the key does not reach the dropout"
    ref_a = run(model, "jax", *canonical_start(model), batch, jax.random.key(1), True)[0]
    assert_close(a, ref_a, model, style, what="train-mode outputs with dropout")
    e1 = run(model, style, *net_args, batch, jax.random.key(1), False)[0]
    e2 = run(model, style, *net_args, batch, jax.random.key(2), False)[0]
    np.testing.assert_array_equal(np.asarray(e1), np.asarray(e2), err_msg="eval mode depends on the key")


@functools.cache
def jitted_grad(model: str, style: str):
    """The training-mode loss's gradient, compiled once per style (the reference's serves four)."""
    net = build(model, style)

    def loss_fn(params, state, batch, key):
        outputs, _ = net.apply(params, state, batch["image"], batch["label"], key, True)
        return tasks.per_example(net.kind, outputs, batch)["loss"].mean()

    return jax.jit(jax.grad(loss_fn))


def canonical_grads(model, style, params, state, batch, key):
    grads = jitted_grad(model, style)(params, state, batch, key)
    return flatten_canonical(build(model, style).converter.to_canonical(grads, offsets=False))


@pytest.mark.parametrize("model,style", CASES)
def test_gradients_match_reference(model, style, batch):
    key = jax.random.key(11)
    expected = canonical_grads(model, "jax", *canonical_start(model), batch, key)
    got = canonical_grads(model, style, *native_start(model, style), batch, key)
    assert sorted(got) == sorted(expected)
    for path, e in expected.items():
        scale = max(float(np.max(np.abs(e))), 1.0)
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(e), rtol=0, atol=GRAD_RTOL * scale,
                                   err_msg=path)


def train_losses(net, params, state, digits, steps: int, dtype=np.float32) -> tuple[list[float], TrainState]:
    """``steps`` Adam steps on digits; ``dtype=np.float64`` needs ``jax.enable_x64`` around the call."""
    config = TrainConfig(batch_size=64, lr=1e-3)
    optimizer = make_optimizer(config, steps, None)
    step = jax.jit(make_train_step(net, optimizer, config, jax.random.key(5)))
    floats = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jnp.asarray(x, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    params, state = floats(params), floats(state)
    train_state = TrainState(jnp.zeros((), jnp.int32), params, state, optimizer.init(params), None)
    losses = []
    epoch = 0
    while len(losses) < steps:
        batches = data_lib.train_batches(digits.train, 64, seed=0, epoch=epoch)
        for i in range(min(len(batches), steps - len(losses))):
            train_state, loss, _ = step(train_state, floats(batches[i]))
            losses.append(float(loss))
        epoch += 1
    return losses, train_state


_RUNS: dict[tuple, object] = {}  # keyed by what a run depends on; the dataset is always digits


def float64_losses(model: str, style: str, digits, steps: int = 50) -> np.ndarray:
    """The 50 steps in float64; each run once per worker (the reference's serves two styles)."""
    if ("float64", model, style, steps) not in _RUNS:
        _RUNS["float64", model, style, steps] = _float64_losses(model, style, digits, steps)
    return _RUNS["float64", model, style, steps]


def _float64_losses(model: str, style: str, digits, steps: int) -> np.ndarray:
    with jax.enable_x64(True):
        net = styles_lib.build(model, style, in_shape=(8, 8, 1), num_classes=10)
        params, state = canonical_start(model)
        native = net.from_canonical(params), net.state_from_canonical(state, 0)
        losses, final = train_losses(net, *native, digits, steps, dtype=np.float64)
        assert jax.tree.leaves(final.params)[0].dtype == jnp.float64
    return np.asarray(losses)


def one_ulp_drift(model: str, digits, expected: list[float], steps: int = 50) -> float:
    """The reference's own largest loss difference when its start is moved by one ulp."""
    if ("ulp", model, steps) not in _RUNS:
        params, state = canonical_start(model)
        moved = jax.tree.map(lambda x: jnp.nextafter(x, jnp.inf), params)
        _RUNS["ulp", model, steps] = train_losses(build(model, "jax"), moved, state, digits, steps)[0]
    return float(np.max(np.abs(np.asarray(_RUNS["ulp", model, steps]) - np.asarray(expected))))


@pytest.fixture(scope="module")
def reference_runs(digits):
    """The reference's 50 losses and final canonical state, per model: run once, compared four times."""
    runs = {}

    def get(model: str) -> tuple[list[float], dict]:
        if model not in runs:
            losses, final = train_losses(build(model, "jax"), *canonical_start(model), digits, 50)
            runs[model] = losses, build(model, "jax").state_to_canonical(final.model_state)
        return runs[model]
    return get


@pytest.mark.parametrize("model,style", CASES)
def test_fifty_adam_steps_match_reference(model, style, digits, reference_runs):
    expected, expected_state = reference_runs(model)
    got, final = train_losses(build(model, style), *native_start(model, style), digits, 50)
    assert expected[-1] < 0.8 * expected[0], "the reference did not learn: the check would be vacuous"
    got_state = flatten_canonical(build(model, style).state_to_canonical(final.model_state))
    drift = float(np.max(np.abs(np.asarray(got) - np.asarray(expected))))
    if np.allclose(got, expected, rtol=TRAIN_RTOL, atol=0):
        # The running statistics after 50 updates: the same, within the loss tolerance.
        for path, e in flatten_canonical(expected_state).items():
            np.testing.assert_allclose(np.asarray(got_state[path]), np.asarray(e), rtol=TRAIN_RTOL,
                                       atol=TRAIN_RTOL, err_msg=path)
        return
    # Beyond 1e-4: rounding noise only if the reference's own one-ulp drift is beyond it too...
    noise = one_ulp_drift(model, digits, expected)
    assert noise > TRAIN_RTOL * min(np.abs(expected)), (
        f"{style} drifts {drift:.2e} from the reference, whose own one-ulp drift is only {noise:.2e}")
    assert drift <= NOISE_FACTOR * noise, f"{style} drifts {drift:.2e}, the reference's one-ulp drift {noise:.2e}"
    # ...and if the same steps in float64 agree, where rounding is 1e-16.
    np.testing.assert_allclose(float64_losses(model, style, digits), float64_losses(model, "jax", digits),
                               rtol=FLOAT64_RTOL, atol=0, err_msg=f"{model}/{style} in float64")


# --------------------------------------------------------------------------- float64 end to end

# Float64's epsilon is 2.2e-16; 22 Adam steps from the same start, summed in another order
# (Equinox), end within 1.4e-14 of the reference (measured, every model). 1e-10 leaves room
# for longer runs and still sits six orders below the 1e-6 to 1e-3 of the float32 runs: a layer
# that silently computed in float32 would fail it.
FLOAT64_PARAM_ATOL = 1e-10
# Smaller instances of the same architectures (two stages; two blocks): compiling five styles in x64 is
# what costs here, and every layer type and key split is still exercised.
FLOAT64_HPARAMS = {"resnet": {"stage_sizes": (1, 1), "width": 8},
                   "vit": {"depth": 2, "width": 32, "mlp_dim": 64}}


@pytest.mark.heavy  # a minute each, mostly compiling five styles in x64: collected first
@pytest.mark.parametrize("model", NAMES)
def test_float64_training_matches_the_reference_to_1e_10(model, digits):
    """``precision="float64"``: parameters, state, optimiser and data in float64 in every
    style (Linen and NNX through their own ``param_dtype``), two epochs from one start."""
    with jax.enable_x64(True):
        hparams = FLOAT64_HPARAMS.get(model, {})
        reference = styles_lib.build(model, "jax", in_shape=digits.in_shape, num_classes=digits.num_classes,
                                     precision="float64", **hparams)
        start, start_state = styles_lib.compile_low_opt(jax.jit(reference.init).lower(jax.random.key(0)))(
            jax.random.key(0))
        assert {leaf.dtype for leaf in jax.tree.leaves(start)} == {jnp.dtype(jnp.float64)}
        rows, results = compare.compare(model, digits, TrainConfig(epochs=2), STYLES, precision="float64",
                                        progress=False, hparams=hparams, init_canonical=start,
                                        init_canonical_state=start_state, noise_floor=False)
        for style, result in results.items():
            dtypes = {leaf.dtype for leaf in jax.tree.leaves((result.params, result.model_state))
                      if jnp.issubdtype(leaf.dtype, jnp.floating)}
            assert dtypes == {jnp.dtype(jnp.float64)}, (style, dtypes)
    for row in rows:
        assert row["max_param_diff"] <= FLOAT64_PARAM_ATOL, row
        assert row["max_state_diff"] is None or row["max_state_diff"] <= FLOAT64_PARAM_ATOL, row
        if row["style"] in MODELS[model].bitwise and not MODELS[model].state:  # BatchNorm's statistics round apart
            assert row["max_param_diff"] == 0.0, row


def test_float64_dtypes_as_each_framework_makes_them():
    """What each framework creates under x64 (the porting table's float64 row), on tiny layers."""
    key = jax.random.key(0)
    with jax.enable_x64(True):
        x32 = jnp.zeros((1, 4, 4, 1), jnp.float32)
        reference = styles_lib.build("mlp", "jax", in_shape=(4, 4, 1)).module
        assert reference.init(key, 16)["layers_0"]["kernel"].dtype == jnp.float32
        assert linen.Dense(3).init(key, x32)["params"]["kernel"].dtype == jnp.float32
        assert linen.Dense(3, param_dtype=jnp.float64).init(key, x32)["params"]["kernel"].dtype == jnp.float64
        stats = linen.BatchNorm(use_running_average=False, param_dtype=jnp.float64).init(key, x32)["batch_stats"]
        assert stats["mean"].dtype == jnp.float32
        bn = nnx.BatchNorm(1, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        assert bn.scale.dtype == jnp.float64 and bn.mean.dtype == jnp.float32
        linear = hk.transform(lambda x: hk.Linear(3)(x))
        assert linear.init(key, x32.reshape(1, -1))["linear"]["w"].dtype == jnp.float32
        conv = eqx.nn.Conv2d(1, 2, 3, key=key)
        assert conv.weight.dtype == jnp.float64
        with pytest.raises(TypeError, match="same dtypes"):
            conv(jnp.zeros((1, 4, 4), jnp.float32))
        assert conv(jnp.zeros((1, 4, 4), jnp.float64)).dtype == jnp.float64


def test_float64_needs_x64_and_says_how():
    assert not jax.config.jax_enable_x64
    with pytest.raises(styles_lib.ZooError, match="jax_enable_x64"):
        styles_lib.build("mlp", "flax", in_shape=(8, 8, 1), precision="float64")
