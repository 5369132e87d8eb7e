"""BatchNorm: where the frameworks differ, measured.

``test_parity.py`` proves that every style's ResNet is the reference's network
in training mode, and ``test_randomness.py`` how each draws its dropout mask.
Here: how each framework keeps its running statistics, how eval mode is
selected, BatchNorm's precision in a bfloat16 run, and the one difference no
configuration removes: Haiku and Equinox debias their running averages, so
their eval outputs differ from the reference's until ``decay**t`` vanishes.
All at the registry's small size.

Every test here backs a row of the site's porting-differences table.
"""

import functools

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest
from flax import nnx

from shared import data as data_lib
from shared import styles as styles_lib
from shared.layouts import flatten_canonical
from shared.registry import MODELS
from shared.train import TrainConfig, train
from zoo import harness
from zoo.harness import quick_init
from zoo.haiku.resnet import ResNet as HaikuResNet

MODEL = "resnet"
SPEC = MODELS[MODEL]
DECAY = SPEC.defaults["bn_momentum"]
KWARGS = SPEC.kwargs((8, 8, 1), 10, SPEC.small)


def build(style: str, precision: str = "float32") -> styles_lib.Model:
    return harness.build(MODEL, style, precision)


@functools.cache
def jitted(style: str, train: bool):
    net = build(style)
    return jax.jit(lambda p, s, x, y, k: net.apply(p, s, x, y, k, train))


@pytest.fixture(scope="module")
def batches(digits):
    return data_lib.train_batches(digits.train, 128, seed=0, epoch=0)


def layers_of(tree, kind) -> list:
    """Every module of type ``kind`` inside an object tree (NNX and Equinox modules are trees)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, kind))
    return [leaf for leaf in leaves if isinstance(leaf, kind)]


def test_every_framework_is_configured_with_the_same_decay_and_epsilon():
    """Linen and NNX call the decay ``momentum``, Haiku ``decay_rate``, Equinox ``momentum``;
    epsilon is 1e-5 everywhere, and Equinox runs in ``mode="batch"`` (its default "ema" mode
    normalises training batches with running averages, unlike every other framework)."""
    linen = build("flax").module
    bound = linen.bind(jax.eval_shape(lambda: linen.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), False)))
    linen_bns = [bound.stem_bn] + [bn for block in bound.blocks for bn in (block.bn1, block.bn2)]
    assert {(bn.momentum, bn.epsilon) for bn in linen_bns} == {(DECAY, 1e-5)}
    model = nnx.eval_shape(lambda: build("nnx").module(**KWARGS, rngs=nnx.Rngs(0)))
    assert {(bn.momentum, bn.epsilon) for bn in layers_of(model, nnx.BatchNorm)} == {(DECAY, 1e-5)}
    net = eqx.filter_eval_shape(lambda: build("equinox").module(**KWARGS, key=jax.random.key(0)))
    assert {(bn.momentum, bn.eps, bn.mode) for bn in layers_of(net, eqx.nn.BatchNorm)} == {(DECAY, 1e-5, "batch")}
    seen = []

    def spy(self, inputs, is_training, *args, **kw):
        seen.append((self.module_name, self.mean_ema.decay, self.eps, self.mean_ema.zero_debias))
        return original(self, inputs, is_training, *args, **kw)

    original = hk.BatchNorm.__call__
    hk.BatchNorm.__call__ = spy
    try:
        harness.fresh(MODEL, "haiku")  # building traces init once, under the spy: it sees every layer
    finally:
        hk.BatchNorm.__call__ = original
    assert {entry[1:] for entry in seen} == {(DECAY, 1e-5, True)}
    assert len({entry[0] for entry in seen}) == len(linen_bns) + 1  # and the projection's BN


def native_state_summary(style: str) -> dict[str, tuple]:
    """The initial state of the stem's BatchNorm, as the framework itself holds it."""
    net = build(style)
    _, state = quick_init(MODEL, style, jax.random.key(0))
    if style == "haiku":
        return {name: (float(np.mean(v["hidden"])), int(v["counter"]))
                for name, v in state.items() if name.endswith("stem_bn/~/mean_ema")
                or name.endswith("stem_bn/~/var_ema")}
    canonical = net.state_to_canonical(state)["stem_bn"]
    return {"mean": float(np.mean(canonical["mean"])), "var": float(np.mean(canonical["var"]))}


@pytest.mark.parametrize("style", ["jax", "flax", "nnx", "equinox"])
def test_running_statistics_start_at_mean_0_and_variance_1(style):
    assert native_state_summary(style) == {"mean": 0.0, "var": 1.0}


def test_haiku_running_averages_start_at_zero_with_a_counter():
    """hk.BatchNorm's ExponentialMovingAverage: ``hidden`` 0 for the mean *and* the variance,
    and a counter; the canonical variance 1 is ``hidden + decay**0``."""
    summary = native_state_summary("haiku")
    assert summary == {"res_net/~/stem_bn/~/mean_ema": (0.0, 0), "res_net/~/stem_bn/~/var_ema": (0.0, 0)}
    assert flatten_canonical(build("haiku").state_to_canonical(quick_init(MODEL, "haiku", jax.random.key(0))[1])) \
        .keys() == flatten_canonical(quick_init(MODEL, "jax", jax.random.key(0))[1]).keys()


def eval_gap(style: str, batches, updates: int) -> float:
    """Largest |eval logit - reference eval logit| after ``updates`` training batches, same params."""
    params, state = quick_init(MODEL, "jax", jax.random.key(0))
    train_ref = jitted("jax", True)
    for i in range(updates):
        _, state = train_ref(params, state, batches[i % len(batches)]["image"], batches[0]["label"],
                             jax.random.key(i))
    net = build(style)
    test = batches[-1]
    expected, _ = jitted("jax", False)(params, state, test["image"], test["label"], jax.random.key(0))
    got, _ = jitted(style, False)(net.from_canonical(params), net.state_from_canonical(state, updates),
                                  test["image"], test["label"], jax.random.key(0))
    return float(jnp.max(jnp.abs(got - expected)))


@pytest.mark.parametrize("style", ["haiku", "equinox"])
def test_debiased_eval_differs_then_vanishes(style, batches):
    """Haiku and Equinox divide their averages by ``1 - decay**t`` at eval time; the reference,
    Linen and NNX do not. With the same statistics the eval logits differ by O(1) after one
    update and by less than 1e-4 once ``decay**t`` is negligible (0.9**200 = 7e-10); the gap
    shrinks as t grows. Linen and NNX have no gap at all (``test_parity.py``)."""
    gaps = {t: eval_gap(style, batches, t) for t in (1, 10, 40, 200)}
    assert gaps[1] > 0.1, gaps
    assert gaps[1] > gaps[10] > gaps[40] > gaps[200], gaps
    assert gaps[200] < 1e-4, gaps


@pytest.mark.parametrize("style", ["flax", "nnx"])
def test_linen_and_nnx_eval_has_no_debiasing_gap(style, batches):
    assert eval_gap(style, batches, 1) == 0.0


def test_eval_mode_is_selected_in_each_framework_s_own_way(batches):
    """Linen: ``use_running_average``; NNX: ``model.eval()`` (static attributes, so the adapter
    keeps two graphdefs); Haiku: ``is_training``; Equinox: ``eqx.nn.inference_mode`` (a static
    field, so two static parts). Eval mode leaves the state as it is; train mode changes it."""
    batch = batches[0]
    model = nnx.eval_shape(lambda: build("nnx").module(**KWARGS, rngs=nnx.Rngs(0)))
    model.eval()
    assert all(bn.use_running_average for bn in layers_of(model, nnx.BatchNorm))
    assert all(d.deterministic for d in layers_of(model, nnx.Dropout))
    model.train()
    assert not any(bn.use_running_average for bn in layers_of(model, nnx.BatchNorm))
    net = eqx.filter_eval_shape(lambda: build("equinox").module(**KWARGS, key=jax.random.key(0)))
    assert all(layer.inference for layer in layers_of(eqx.nn.inference_mode(net), (eqx.nn.BatchNorm,
                                                                                    eqx.nn.Dropout)))
    for style in ("jax", "flax", "nnx", "haiku", "equinox"):
        params, state = quick_init(MODEL, style, jax.random.key(0))
        canonical = flatten_canonical(build(style).state_to_canonical(state))
        _, after_eval = jitted(style, False)(params, state, batch["image"], batch["label"], jax.random.key(0))
        _, after_train = jitted(style, True)(params, state, batch["image"], batch["label"], jax.random.key(0))
        after_eval = flatten_canonical(build(style).state_to_canonical(after_eval))
        after_train = flatten_canonical(build(style).state_to_canonical(after_train))
        for path in canonical:
            np.testing.assert_array_equal(after_eval[path], canonical[path], err_msg=f"{style} {path}")
        assert any(not np.array_equal(after_train[p], canonical[p]) for p in canonical), style


def test_haiku_batchnorm_keeps_float32_statistics_in_a_bfloat16_run(digits):
    """Haiku's mixed precision is a jmp policy per module class: the adapter gives ``hk.BatchNorm`` float32
    parameters, statistics and arithmetic (handing bfloat16 on), as Haiku's ImageNet example does. Under
    the model's own bfloat16 policy alone, its running averages would come back as bfloat16. (Traced for
    the dtypes only: nothing to compile.)"""
    net = build("haiku", "bfloat16")
    params, state = harness.native(MODEL, "haiku")
    batch = harness.batch(digits)
    _, new_state = jax.eval_shape(lambda p, s, x, y: net.apply(p, s, x, y, jax.random.key(0), True),
                                  params, state, batch["image"], batch["label"])
    floats = {leaf.dtype for leaf in jax.tree.leaves(new_state) if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.float32)}
    # The model class's policy alone reaches BatchNorm: bfloat16 statistics.
    kwargs = {k: v for k, v in KWARGS.items() if k != "in_channels"}
    forward = hk.transform_with_state(lambda x, training: HaikuResNet(**kwargs)(x, training))
    with hk.mixed_precision.push_policy(HaikuResNet, jmp.get_policy(styles_lib.HAIKU_POLICY)):
        init_params, init_state = jax.eval_shape(lambda k, x: forward.init(k, x, True), jax.random.key(0),
                                                 batch["image"][:2])
        _, bf16_state = jax.eval_shape(lambda p, s, k, x: forward.apply(p, s, k, x, True), init_params,
                                       init_state, jax.random.key(1), batch["image"])
    assert jnp.dtype(jnp.bfloat16) in {leaf.dtype for leaf in jax.tree.leaves(bf16_state)}


def test_a_frozen_layer_s_statistics_still_follow_its_batches(digits):
    """``--train-only head/*``: the frozen parameters do not move, but BatchNorm's running
    statistics are updated in training mode all the same (as PyTorch's ``train()`` does)."""
    net = build("haiku")
    params, state = quick_init(MODEL, "jax", jax.random.key(3))
    result = train(net, digits, TrainConfig(epochs=1, batch_size=256, train_only=("head/*",)),
                   init_params=net.from_canonical(params),
                   init_state=net.state_from_canonical(state, 0), progress=False)
    before, after = flatten_canonical(params), flatten_canonical(net.to_canonical(result.params))
    for path in before:
        frozen = not path.startswith("head/")
        assert np.array_equal(np.asarray(after[path]), np.asarray(before[path])) == frozen, path
    stats = flatten_canonical(net.state_to_canonical(result.model_state))
    assert not np.allclose(stats["stem_bn/mean"], 0.0)
