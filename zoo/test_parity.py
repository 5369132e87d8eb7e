"""Parity: every style is the same network as the plain-JAX reference.

For every model of the registry (at its ``small`` size: every layer kind and
code path) and every style: the parameter and state trees map one to one;
conversion to the canonical layout and back is exact; from the same canonical
parameters and state, every deterministic path agrees with the reference:

- evaluation mode;
- training mode with every draw the midpoint (``shared.draws``: dropout keeps
  every unit, the VAE's noise is ~0, the same in every style), its outputs,
  BatchNorm's new state and the gradients;
- 50 Adam steps in float32 and in float64.

What each style draws, and that the same draws give the same outputs, is
``test_randomness.py``'s.

Tolerances:

- **bitwise** where the registry says a style lowers to the reference's very
  XLA ops (``ModelSpec.bitwise``);
- otherwise, float32: outputs and state within 1e-5 absolute (they sum in
  another order: Equinox's (out, in) weights and CHW convolutions, Linen's and
  NNX's one-pass LayerNorm variance, Haiku's two means; a few ulps of values of
  order 1), gradients within 1e-5 of each leaf's largest gradient (at least
  1e-5); training losses within 1e-4 relative, or, where Adam has amplified
  last-bit differences beyond it, within ``NOISE_FACTOR`` times the
  reference's own drift from a start moved by one ulp, with the same steps in
  float64 agreeing (below);
- float64: the final parameters and state within 1e-10 (rounding there is
  ~1e-16; a real difference of the network would stand out by orders of
  magnitude).
- Evaluation with running statistics: Haiku and Equinox debias theirs (see
  ``test_resnet.py``), so their eval outputs are compared with the reference's
  computed from the same debiased statistics.
"""

import math

import equinox as eqx
import flax.linen as linen
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shared import styles as styles_lib
from shared.layouts import flatten_canonical, nest_canonical
from shared.registry import NAMES, STYLES
from zoo import harness
from zoo.harness import OTHERS, build, start

CASES = [(m, s) for m in NAMES + harness.SCANNED for s in OTHERS]
STATEFUL = [(m, s) for m, s in CASES if harness.spec(m).state]
DEBIASED = ("haiku", "equinox")  # zero-debiased running averages, with a counter
FORWARD_ATOL = 1e-5
GRAD_RTOL = 1e-5
TRAIN_RTOL = 1e-4
# Two runs that differ only in rounding diverge by chance: the style's float32 loss drift from
# the reference against the reference's own drift from one ulp (measured: at most 4x, the ResNet).
NOISE_FACTOR = 10
FLOAT64_ATOL = 1e-10


def assert_close(got, expected, model, style, atol=FORWARD_ATOL, what=""):
    """Within ``atol``, and bitwise where the style lowers to the reference's ops (the registry's ``bitwise``)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, what
    if style in harness.spec(model).bitwise:
        np.testing.assert_array_equal(got, expected, err_msg=f"{what}: {style} should match bitwise")
    else:
        np.testing.assert_allclose(got, expected, rtol=0, atol=atol, err_msg=what)


@pytest.mark.parametrize("model,style", CASES)
def test_parameter_and_state_trees_map_one_to_one(model, style):
    reference = build(model, "jax")
    net = build(model, style)
    for kind in ("params", "state"):
        ref_native = jax.eval_shape(reference.init, jax.random.key(0))[kind == "state"]
        # The reference's tree is the canonical one, its scanned blocks unstacked.
        expected = flatten_canonical(jax.eval_shape(
            reference.to_canonical if kind == "params" else reference.state_to_canonical, ref_native))
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
    assert sorted(paths) == sorted(flatten_canonical(start(model)[0]))
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
    canonical, _ = start(model)
    again = flatten_canonical(net.to_canonical(net.from_canonical(canonical)))
    for path, leaf in flatten_canonical(canonical).items():
        assert_round_trip(again[path], leaf, path in shifted, path)
    # Gradients and optimiser moments take no offset: their round trip is exact everywhere.
    moments = net.converter.from_canonical(net.converter.to_canonical(native, offsets=False), offsets=False)
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(moments)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def trained_state(model: str, digits) -> dict:
    """A canonical state that has seen 5 training batches (running statistics away from 0 and 1)."""
    params, state = start(model)
    fn = harness.deterministic(model, "jax")
    batches = harness.batch(digits, 64, model), harness.batch(digits, 32, model)
    for i in range(5):
        images = batches[0]["image"] * (1 + i / 5)
        state = nest_canonical(fn(params, state, state, images, batches[0]["label"])["state"])
    return state


@pytest.mark.parametrize("model,style", STATEFUL)
def test_state_round_trip(model, style, digits):
    """Canonical -> native -> canonical. Exact but for Haiku's variance, which starts at 0 where the
    canonical one starts at 1: it is stored as ``var - decay**t`` and read back as ``hidden +
    decay**t``, one rounding each way (at most 1 ulp of the variance)."""
    net = build(model, style)
    state = trained_state(model, digits)
    again = flatten_canonical(net.state_to_canonical(net.state_from_canonical(state, 5)))
    for path, leaf in flatten_canonical(state).items():
        leaf = np.asarray(leaf)
        if style == "haiku" and path.endswith("/var"):
            np.testing.assert_allclose(np.asarray(again[path]), leaf, rtol=2 ** -23, atol=0, err_msg=path)
        else:
            np.testing.assert_array_equal(np.asarray(again[path]), leaf, err_msg=path)


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
def test_every_deterministic_path_matches_the_reference(model, style, digits):
    """Eval mode (running statistics that have seen 5 updates), and with every draw the midpoint:
    train-mode outputs, BatchNorm's new state and the loss's gradients.

    Linen and NNX normalise with the running statistics as they are, like the
    reference. Haiku and Equinox divide them by ``1 - decay**t`` first (Haiku's
    variance average having started from 0): their eval outputs are checked
    against the reference's computed from those very statistics, which pins
    down what they do; how far that is from the reference's own eval is
    measured in ``test_resnet.py``.
    """
    spec = harness.spec(model)
    params, state = start(model)
    batch = harness.batch(digits, model=model)
    trained = trained_state(model, digits) if spec.state else state
    eval_reference_state = trained
    if spec.state and style in DEBIASED:
        eval_reference_state = debiased(trained, spec.ema_decay(build(model, style).hparams), 5,
                                        variance_from_zero=style == "haiku")
    expected = harness.deterministic(model, "jax")(*harness.native(model, "jax"),
                                                   harness.native(model, "jax", (params, eval_reference_state), 5)[1],
                                                   batch["image"], batch["label"])
    got = harness.deterministic(model, style)(*harness.native(model, style),
                                              harness.native(model, style, (params, trained), 5)[1],
                                              batch["image"], batch["label"])
    for e, g in zip(jax.tree.leaves(expected["train"]), jax.tree.leaves(got["train"])):
        assert_close(g, e, model, style, what="train-mode outputs")
    eval_style = "debiased" if spec.state and style in DEBIASED else style  # not bitwise: another division
    for e, g in zip(jax.tree.leaves(expected["eval"]), jax.tree.leaves(got["eval"])):
        assert_close(g, e, model, eval_style, what="eval outputs")
    for path, e in expected["state"].items():
        # Haiku's variance comes back through `hidden + decay**t`: one rounding.
        atol = 2 ** -23 * float(jnp.max(e)) if style == "haiku" and path.endswith("/var") else FORWARD_ATOL
        np.testing.assert_allclose(np.asarray(got["state"][path]), np.asarray(e), rtol=0,
                                   atol=atol if style != "equinox" else FORWARD_ATOL, err_msg=path)
    assert sorted(got["grads"]) == sorted(expected["grads"])
    if style in spec.bitwise:
        for path, e in expected["grads"].items():
            np.testing.assert_array_equal(np.asarray(got["grads"][path]), np.asarray(e), err_msg=path)
        return
    floor = gradient_floor(model, style, trained, batch)
    for path, e in expected["grads"].items():
        atol = max(GRAD_RTOL * max(float(np.max(np.abs(e))), 1.0), NOISE_FACTOR * floor[path])
        np.testing.assert_allclose(np.asarray(got["grads"][path]), np.asarray(e), rtol=0, atol=atol, err_msg=path)


def gradient_floor(model: str, style: str, trained: dict, batch: dict) -> dict[str, float]:
    """Per leaf, how far the reference's gradient and the style's own move when the parameters move by
    one ulp either way: the rounding noise of each computation. A ReLU input that lands within rounding
    of 0 flips a unit on or off, and the gradient jumps by a finite amount (measured: 2.4e-4 in the
    small Equinox ResNet, from its own one-ulp move); float64 agrees to 1e-10 all the same."""
    params, state = start(model)
    floor: dict[str, float] = {}
    for who in ("jax", style):
        fn = harness.deterministic(model, who)
        grads = {}
        for direction in (0.0, np.inf, -np.inf):
            moved = params if not direction else harness.moved(params, direction)
            out = fn(*harness.native(model, who, (moved, state)), harness.native(model, who, (params, trained), 5)[1],
                     batch["image"], batch["label"])
            grads[direction] = out["grads"]
        for path, g in grads[0.0].items():
            moves = [float(np.max(np.abs(grads[d][path] - g))) for d in (jnp.inf, -jnp.inf)]
            floor[path] = max(floor.get(path, 0.0), *moves)
    return floor


_RUNS: dict[tuple, tuple] = {}  # each run once per worker: the reference's serves four styles


def run(model: str, style: str, digits, precision: str = "float32", moved: float = 0.0):
    """50 Adam steps (``harness.train_losses``); ``moved`` (``jnp.inf`` or ``-jnp.inf``): from the start
    moved by one ulp that way, which measures what rounding alone does to that style's run."""
    if (model, style, precision, moved) not in _RUNS:
        canonical = None
        if moved:
            params, state = start(model)
            canonical = (harness.moved(params, moved), state)
        if precision == "float64":
            with jax.enable_x64(True):
                _RUNS[model, style, precision, moved] = harness.train_losses(model, style, digits,
                                                                             precision="float64")
        else:
            _RUNS[model, style, precision, moved] = harness.train_losses(model, style, digits,
                                                                         canonical=canonical)
    return _RUNS[model, style, precision, moved]


@pytest.mark.parametrize("model,style", CASES)
def test_fifty_adam_steps_match_reference(model, style, digits):
    expected, expected_params, expected_state = run(model, "jax", digits)
    got, got_params, got_state = run(model, style, digits)
    # Not vacuous: the 50 steps train (the last ten losses 3% below the first ten, at least).
    assert expected[-10:].mean() < 0.97 * expected[:10].mean(), "the reference did not learn"
    if style in harness.spec(model).bitwise:
        np.testing.assert_array_equal(got, expected)
        for path in expected_params:
            np.testing.assert_array_equal(got_params[path], expected_params[path], err_msg=path)
        return
    drift = float(np.max(np.abs(got - expected)))
    if np.allclose(got, expected, rtol=TRAIN_RTOL, atol=0):
        for path, e in expected_state.items():  # the running statistics after 50 updates
            np.testing.assert_allclose(got_state[path], e, rtol=TRAIN_RTOL, atol=TRAIN_RTOL, err_msg=path)
        return
    # Beyond 1e-4: rounding only within NOISE_FACTOR times the drift one ulp of the start makes, in the
    # reference's run or in the style's own (a unit on the edge of a ReLU flips in one and not the
    # other); and the float64 test of this style agrees to 1e-10, where a real difference would not.
    noise = max(float(np.max(np.abs(run(model, who, digits, moved=way)[0] - run(model, who, digits)[0])))
                for who in ("jax", style) for way in (np.inf, -np.inf))
    assert drift <= NOISE_FACTOR * noise, (
        f"{style} drifts {drift:.2e} from the reference; one ulp of the start moves either by {noise:.2e}")


@pytest.mark.parametrize("model,style", CASES)
def test_fifty_float64_adam_steps_match_the_reference_to_1e_10(model, style, digits):
    """``precision="float64"``: parameters, state, optimiser and data in float64 (Linen and NNX
    through their own ``param_dtype``; NNX's attention through Flax's own formula, see
    ``styles.float64_attention``), 50 steps from one start."""
    expected_losses, expected, expected_state = run(model, "jax", digits, "float64")
    losses, got, got_state = run(model, style, digits, "float64")
    assert {np.asarray(leaf).dtype for leaf in got.values()} == {np.dtype(np.float64)}
    np.testing.assert_allclose(losses, expected_losses, rtol=FLOAT64_ATOL, atol=0)
    for path, e in expected.items():
        if style in harness.spec(model).bitwise:
            np.testing.assert_array_equal(got[path], e, err_msg=path)
        np.testing.assert_allclose(got[path], e, rtol=0, atol=FLOAT64_ATOL, err_msg=path)
    for path, e in expected_state.items():
        np.testing.assert_allclose(got_state[path], e, rtol=0, atol=FLOAT64_ATOL, err_msg=path)


def test_float64_dtypes_as_each_framework_makes_them():
    """What each framework creates under x64 (the porting table's float64 row), on tiny layers, traced
    for their dtypes only (``jax.eval_shape``: nothing to compile)."""
    key = jax.random.key(0)
    shapes = jax.eval_shape
    with jax.enable_x64(True):
        x32 = jnp.zeros((1, 4, 4, 1), jnp.float32)
        reference = styles_lib.build("mlp", "jax", in_shape=(4, 4, 1)).module
        assert shapes(lambda: reference.init(key, 16))["layers_0"]["kernel"].dtype == jnp.float32
        assert shapes(lambda: linen.Dense(3).init(key, x32))["params"]["kernel"].dtype == jnp.float32
        assert shapes(lambda: linen.Dense(3, param_dtype=jnp.float64).init(key, x32))["params"]["kernel"].dtype \
            == jnp.float64
        stats = shapes(lambda: linen.BatchNorm(use_running_average=False, param_dtype=jnp.float64).init(key, x32))
        assert stats["batch_stats"]["mean"].dtype == jnp.float32
        bn = nnx.eval_shape(lambda: nnx.BatchNorm(1, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
        assert bn.scale.dtype == jnp.float64 and bn.mean.dtype == jnp.float32
        linear = hk.transform(lambda x: hk.Linear(3)(x))
        assert shapes(lambda: linear.init(key, x32.reshape(1, -1)))["linear"]["w"].dtype == jnp.float32
        conv = eqx.filter_eval_shape(lambda: eqx.nn.Conv2d(1, 2, 3, key=key))
        assert conv.weight.dtype == jnp.float64
        with pytest.raises(TypeError, match="same dtypes"):
            eqx.filter_eval_shape(lambda c: c(jnp.zeros((1, 4, 4), jnp.float32)), conv)
        assert eqx.filter_eval_shape(lambda c: c(jnp.zeros((1, 4, 4), jnp.float64)), conv).dtype == jnp.float64


def test_float64_needs_x64_and_says_how():
    assert not jax.config.jax_enable_x64
    with pytest.raises(styles_lib.ZooError, match="jax_enable_x64"):
        styles_lib.build("mlp", "flax", in_shape=(8, 8, 1), precision="float64")


def test_every_style_has_a_parity_case():
    assert {s for _, s in CASES} == set(STYLES) - {"jax"}
    assert {m for m, _ in CASES} == set(NAMES) | set(harness.SCANNED)
