"""Model parallelism (shared.parallel): each framework's own sharding annotations, on a device mesh.

In this process (one device): every style's annotations, mapped through its
converter, place every parameter where the plain-JAX reference's do, for every
strategy, unrolled and scanned; and refusals are one line. On four CPU devices
(a fresh process, ``--xla_force_host_platform_device_count=4``), per style:
the live shardings of the parameters and Adam's moments, the bytes each device
holds, the collectives the compiled step contains, 50 steps against one
device's, and a checkpoint written on one mesh and resumed on another by the
next style.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from shared import checkpoint, data, parallel
from shared.errors import ZooError
from shared.layouts import flatten_canonical
from shared.registry import STYLES
from zoo import harness

# Where fsdp+tp puts the reference's parameters (mesh axes by canonical path); the vocabulary, a head's
# width, patches, positions and classes are never split, and dp replicates everything.
FSDP_TP_GPT = {
    "embed/embedding": P(None, "data"),
    "pos_embed/embedding": P(None, "data"),
    "blocks_0/attn/query/kernel": P("data", "model"),
    "blocks_0/attn/query/bias": P("model"),
    "blocks_1/attn/value/kernel": P("data", "model"),
    "blocks_0/attn/out/kernel": P("model", None, "data"),
    "blocks_0/attn/out/bias": P("data"),
    "blocks_1/mlp1/kernel": P("data", "model"),
    "blocks_1/mlp1/bias": P("model"),
    "blocks_1/mlp2/kernel": P("model", "data"),
    "blocks_1/mlp2/bias": P("data"),
    "blocks_0/norm1/scale": P("data"),
    "norm/bias": P("data"),
}
FSDP_TP = {"gpt": FSDP_TP_GPT, "vit": {
    "embed/kernel": P(None, None, None, "data"),
    "embed/bias": P("data"),
    "cls": P(None, None, "data"),
    "pos_embedding": P(None, None, "data"),
    "blocks_0/attn/key/kernel": P("data", "model"),
    "blocks_0/attn/out/kernel": P("model", None, "data"),
    "blocks_0/mlp1/kernel": P("data", "model"),
    "blocks_0/mlp2/bias": P("data"),
    "head/kernel": P("data"),
    "head/bias": P(),
}}


def only(spec: P, axis: str) -> P:
    """``spec`` with every mesh axis but ``axis`` dropped (fsdp's or tp's part of fsdp+tp)."""
    entries = [a if a == axis else None for a in spec]
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


@pytest.mark.parametrize("variant", ["gpt", "gpt:scan", "vit"])
@pytest.mark.parametrize("strategy", parallel.STRATEGIES)
def test_every_style_places_every_parameter_where_the_reference_does(variant, strategy):
    """Linen's logical partitioning, NNX's variable metadata (with the stacked ``layers`` axis that
    ``nnx.vmap`` and ``nnx.scan`` add under ``transform_metadata``), Haiku's and Equinox's path rules
    and plain JAX's spec tree, each mapped to the canonical layout through the style's converter
    (transposes, Haiku's and Equinox's (width, heads * head_dim) kernels, unstacked layers)."""
    want = {path: spec if strategy == "fsdp+tp" else
            P() if strategy == "dp" else only(spec, "data" if strategy == "fsdp" else "model")
            for path, spec in FSDP_TP[variant.partition(":")[0]].items()}
    reference = None
    for style in STYLES:
        model = harness.build(variant, style)
        got = parallel.canonical_specs(model, parallel.native_specs(model, strategy))
        assert set(got) == set(model.converter.canonical_paths())
        assert {path: got[path] for path in want} == want, style
        if reference is None:
            reference = got
        assert got == reference, style


def test_a_spec_is_read_back_where_the_layout_moves_it_and_never_guessed():
    """Equinox keeps the query kernel as (heads * head_dim, width): its first axis split over ``model``
    is the canonical kernel's heads axis, (width, heads, head_dim). Blocks that are no split of one
    canonical axis (a scrambling permutation) are refused, not mapped to the nearest spec."""
    model = harness.build("gpt", "equinox")
    specs = parallel.native_specs(model, "dp")
    specs["blocks.0.attn.query_proj.weight"] = P("model", None)
    assert parallel.canonical_specs(model, specs)["blocks_0/attn/query/kernel"] == P(None, "model")
    specs["blocks.0.attn.query_proj.weight"] = P(None, "model")
    assert parallel.canonical_specs(model, specs)["blocks_0/attn/query/kernel"] == P("model")
    checkerboard = parallel._blocks((4, 4), 0, 2) ^ parallel._blocks((4, 4), 1, 2)
    with pytest.raises(ValueError, match="no split of one canonical axis"):
        parallel._spec_of({"model": checkerboard}, (4, 4), "somewhere")


def test_refusals_name_the_axis_the_size_and_the_fix():
    model = harness.build("gpt", "flax")  # small: width 16, 2 heads, MLP 32
    with pytest.raises(ZooError, match=r"splits the 'heads' axis of blocks_0/attn/\w+/\w+, of size 2 "
                                       r"\(--num-heads\), over model=4, which does not divide it"):
        parallel.check_divides(model, "tp", {"data": 1, "model": 4})
    with pytest.raises(ZooError, match=r"'embed' axis .* of size 16 \(--width\), over data=3"):
        parallel.check_divides(model, "fsdp", {"data": 3, "model": 1})
    parallel.check_divides(model, "dp", {"data": 3, "model": 1})  # nothing split: any mesh
    with pytest.raises(ZooError, match="mlp does not name its parameters' axes.*--strategy tp is for vit, gpt"):
        parallel.check_strategy(harness.build("mlp", "haiku"), "tp")
    with pytest.raises(ZooError, match="has 4 devices but the run has 2"):
        parallel.mesh_shape(parallel.parse_mesh("data=2,model=2"), 2)
    assert parallel.parse_mesh(" model = 2 ") == (("data", 1), ("model", 2))
    assert parallel.mesh_shape(None, 4) == {"data": 4, "model": 1}


def test_collectives_are_read_from_hlo_text():
    hlo = """
  %ag = f32[16,4,4]{2,1,0} all-gather(f32[8,4,4]{2,1,0} %p), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  %ar = (f32[32,9,16]{2,1,0}, bf16[8]{0}) all-reduce(%x, %y), channel_id=2, to_apply=%add
  %ars = f32[4]{0} all-reduce-start(f32[4]{0} %z), channel_id=3, to_apply=%add
  %rs = f32[2,16]{1,0} reduce-scatter(f32[4,16]{1,0} %g), channel_id=4, dimensions={0}, to_apply=%add
  %not = f32[4]{0} add(f32[4]{0} %a, f32[4]{0} %b)
"""
    assert parallel.collectives(hlo) == {
        "all-gather": {"count": 1, "bytes": 16 * 4 * 4 * 4, "shapes": ["f32[16,4,4]"]},
        "all-reduce": {"count": 2, "bytes": 32 * 9 * 16 * 4 + 8 * 2 + 16, "shapes": ["f32[32,9,16]", "bf16[8]",
                                                                                    "f32[4]"]},
        "reduce-scatter": {"count": 1, "bytes": 2 * 16 * 4, "shapes": ["f32[2,16]"]}}


# --------------------------------------------------------------------------- four devices

FOUR_DEVICES = r'''
import contextlib, importlib, io, json, os, sys
assert "jax" not in sys.modules
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from shared import bench, checkpoint, cli, data, parallel, styles, train
from shared.layouts import flatten_canonical

style, reader, data_dir, tmp = sys.argv[1:5]
assert len(jax.devices()) == 4
dataset = data.load("addition", data_dir)
# 4 heads, so that tp can split them four ways.
SMALL = {"width": 16, "depth": 2, "num_heads": 4, "mlp_dim": 32}
# dp's placement (everything replicated) is the data-parallel test's (tests/test_checkpoint.py), and its
# collectives are in zoo bench's rows below.
MESHES = {"fsdp": (("data", 4), ("model", 1)), "tp": (("data", 1), ("model", 4)),
          "fsdp+tp": (("data", 2), ("model", 2))}


def build(name, **hparams):
    return styles.build("gpt", name, in_shape=dataset.in_shape, num_classes=dataset.num_classes,
                        **{**SMALL, **hparams})


def on_devices(tree, shardings):
    """The bytes of ``tree`` each device should hold under ``shardings``: a leaf's, divided by the
    sizes of the mesh axes its spec splits it over."""
    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
        split = 1
        for entry in sharding.spec:
            for axis in (entry,) if isinstance(entry, str) else (entry or ()):
                split *= sharding.mesh.shape[axis]
        total += leaf.nbytes // split
    return total


model, reference = build(style), build("jax")
start = reference.init(jax.random.key(0))
params0, state0 = model.from_canonical(reference.to_canonical(start[0])), model.state_from_canonical(start[1])
report = {}
batch = data.train_batches(dataset.train, 64, 0, 0)[0]
for strategy, shape in MESHES.items():
    config = train.TrainConfig(epochs=1, batch_size=64, devices=4, mesh=shape, strategy=strategy)
    mesh = train.make_mesh(4, shape)
    optimizer = train.make_optimizer(config, 100, None)
    begin = train.TrainState(jnp.zeros((), jnp.int32), params0, state0, optimizer.init(params0), None)
    state, step = train.placed_step(model, optimizer, config, jax.random.key(1), begin, mesh)
    placed = jax.device_put(batch, NamedSharding(mesh, P("data")))
    compiled = step.lower(state, placed).compile()
    after, _, _ = compiled(state, placed)
    want = parallel.shardings(model, strategy, mesh)
    # The live shardings, after a step: parameters, and Adam's moments paired with their parameter.
    live = jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), after.params, want)
    moments = optax.tree_map_params(optimizer, lambda a, s: a.sharding.is_equivalent_to(s, a.ndim),
                                    after.opt_state, want,
                                    transform_non_params=lambda a: a.sharding.is_fully_replicated)
    held = {"params": parallel.bytes_per_device(after.params), "opt_state": parallel.bytes_per_device(after.opt_state)}
    replicated = NamedSharding(mesh, P())
    moment_shardings = optax.tree_map_params(optimizer, lambda _, s: s, after.opt_state, want,
                                             transform_non_params=lambda _: replicated)
    report[strategy] = {
        "live": all(jax.tree.leaves(live)), "moments": all(jax.tree.leaves(moments)),
        "held": {k: sorted(set(v.values())) for k, v in held.items()},
        "expected": {"params": on_devices(after.params, want),
                     "opt_state": on_devices(after.opt_state, moment_shardings)},
        "whole": {"params": sum(a.nbytes for a in jax.tree.leaves(after.params)),
                  "opt_state": sum(a.nbytes for a in jax.tree.leaves(after.opt_state))},
        "collectives": parallel.collectives(compiled.as_text())}

# The ViT on the 2x2 mesh with fsdp+tp: its heads and MLP units over model, its width over data.
digits = data.load("digits", data_dir)
vit = styles.build("vit", style, in_shape=digits.in_shape, num_classes=digits.num_classes, width=16, depth=1,
                   num_heads=2, mlp_dim=32)
config = train.TrainConfig(epochs=1, batch_size=64, devices=4, mesh=MESHES["fsdp+tp"], strategy="fsdp+tp")
mesh = train.make_mesh(4, config.mesh)
optimizer = train.make_optimizer(config, 100, None)
params, vit_state = vit.init(jax.random.key(0))
state, step = train.placed_step(vit, optimizer, config, jax.random.key(1),
                                train.TrainState(jnp.zeros((), jnp.int32), params, vit_state,
                                                 optimizer.init(params), None), mesh)
placed = jax.device_put(data.train_batches(digits.train, 64, 0, 0)[0], NamedSharding(mesh, P("data")))
compiled = step.lower(state, placed).compile()
after, _, _ = compiled(state, placed)
want = parallel.shardings(vit, "fsdp+tp", mesh)
report["vit"] = {
    "live": all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), after.params, want))),
    "held": sorted(set(parallel.bytes_per_device(after.params).values())),
    "expected": on_devices(after.params, want), "whole": sum(a.nbytes for a in jax.tree.leaves(after.params)),
    "collectives": parallel.collectives(compiled.as_text())}

# zoo bench --mesh's measure, for plain JAX on the 2x2 mesh: its fsdp+tp step is the one compiled above.
if style == "jax":
    rows = bench.sharding_rows("gpt", (), dataset=dataset, mesh=MESHES["fsdp+tp"], batch_size=64, devices=4,
                               hparams=SMALL, progress=False)
    report["bench"] = {"rows": rows, "table": bench.format_sharding(rows)}

# The framework's own way to place the model, against the loop's placement, on the 2x2 mesh with fsdp+tp.
mesh = train.make_mesh(4, MESHES["fsdp+tp"])
want, rules = parallel.shardings(model, "fsdp+tp", mesh), parallel.RULES["fsdp+tp"]
module = importlib.import_module(f"zoo.{style}.gpt")
named = lambda spec: NamedSharding(mesh, parallel.to_mesh_axes(spec, "fsdp+tp"))  # noqa: E731
if style == "flax":  # the boxes' names, through Linen's rules
    import flax.linen as nn
    boxed = jax.eval_shape(lambda key: model.module.init(key, jnp.zeros((1, 9), jnp.int32), False), jax.random.key(0))
    own = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)["params"]
elif style == "nnx":  # the scale-up guide's way: the variables' specs under NNX's rules, then nnx.update
    from flax import nnx
    net = model.as_module(params0, state0, True)
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(nnx.state(net, nnx.Param))
    nnx.update(net, jax.device_put(nnx.state(net, nnx.Param), jax.tree.map(lambda s: NamedSharding(mesh, s), specs)))
    own = jax.tree.map(lambda v: v.sharding, nnx.to_pure_dict(nnx.state(net, nnx.Param)))
elif style == "equinox":  # the module's arrays placed by eqx.filter_shard, read back by attribute path
    import equinox as eqx
    net = model.as_module(params0, state0, True)[0]
    placed = eqx.filter_shard(net, jax.tree.map(named, module.logical_axes(net)))
    own = {jax.tree_util.keystr(path, simple=True, separator="."): leaf.sharding
           for path, leaf in jax.tree_util.tree_leaves_with_path(eqx.filter(placed, eqx.is_array))}
elif style == "haiku":  # the rules' specs, by hk.data_structures.map
    own = jax.tree.map(named, module.logical_axes(params0))
else:
    own = jax.tree.map(named, module.logical_axes(depth=SMALL["depth"]))
report["own"] = all(jax.tree.leaves(jax.tree.map(lambda o, w, p: o.is_equivalent_to(w, p.ndim), own, want, params0)))

# A checkpoint written by this style on fsdp over 4x1, resumed by the next style on fsdp+tp over 2x2, against
# the next style trained on 2x2 throughout. No dropout: the frameworks draw their masks differently.
tiny = data.load("addition", data_dir, digits=1)
writer = styles.build("gpt", style, in_shape=tiny.in_shape, num_classes=tiny.num_classes, dropout=0.0, **SMALL)
resumer = styles.build("gpt", reader, in_shape=tiny.in_shape, num_classes=tiny.num_classes, dropout=0.0, **SMALL)
begin = writer.init(jax.random.key(3))
first = train.TrainConfig(epochs=2, batch_size=8, devices=4, mesh=MESHES["fsdp"], strategy="fsdp")
checkpoint.train(writer, tiny, first, f"{tmp}/ckpt", init_params=begin[0], init_state=begin[1], progress=False)
later = train.TrainConfig(epochs=4, batch_size=8, devices=4, mesh=MESHES["fsdp+tp"], strategy="fsdp+tp")
resumed = checkpoint.train(resumer, tiny, later, f"{tmp}/ckpt", resume=True, progress=False)
whole = train.train(resumer, tiny, later, init_params=resumer.from_canonical(writer.to_canonical(begin[0])),
                    init_state=resumer.state_from_canonical(writer.state_to_canonical(begin[1])), progress=False)
placed = parallel.shardings(resumer, "fsdp+tp", train.make_mesh(4, MESHES["fsdp+tp"]))
report["resumed"] = {
    "steps": [len(resumed.step_losses), len(whole.step_losses)],
    "losses": float(np.max(np.abs(np.asarray(resumed.step_losses) - whole.step_losses)
                           / np.asarray(whole.step_losses))),
    "placed": all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim),
                                               resumed.params, placed)))}

# Refusals that need several devices, as the command line gives them.
def refused(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            status = cli.main(["train", "gpt", "--style", style, "--no-progress", "--data-dir", data_dir,
                               "--out", f"{tmp}/refused", *args])
        except SystemExit as exit_info:
            status = exit_info.code
    return status, err.getvalue().strip()


report["refused"] = [refused("--mesh", "model=4", "--num-heads", "2", "--strategy", "tp"),
                     refused("--mesh", "data=4", "--batch-size", "6"),
                     refused("--devices", "2", "--mesh", "data=2,model=2")]
report["refused_wrote"] = os.path.exists(f"{tmp}/refused")
print(json.dumps(report))
'''


def activation_in(dims: tuple[int, ...], shapes: list[str]) -> bool:
    """Whether a float32 result of these dimensions, in any order (Equinox's vmapped layers lay a batch out
    their own way), is among ``shapes``."""
    return any(shape.startswith("f32[") and sorted(map(int, shape[4:-1].split(","))) == sorted(dims)
               for shape in shapes if shape != "f32[]")


@pytest.mark.heavy
@pytest.mark.parametrize("style", STYLES)
def test_sharded_on_four_devices(style, data_dir, tmp_path):
    """On four CPU devices, for each strategy on its mesh (fsdp 4x1, tp 1x4, fsdp+tp 2x2):

    - every parameter and Adam moment lives where the strategy puts it, after a step (and the ViT's, with
      fsdp+tp, whose step gathers weights and all-reduces activations too);
    - the framework's own way of placing a model puts every parameter where the loop does: Linen's
      ``nn.logical_to_mesh_sharding``, NNX's ``nnx.get_partition_spec`` under ``nnx.logical_axis_rules``
      and ``nnx.update``, Equinox's ``eqx.filter_shard``, Haiku's rules;
    - each device holds exactly its share of the parameter and optimiser bytes (``addressable_shards``);
    - the compiled step has the strategy's collectives. dp and fsdp sum the gradient over the batch's
      devices (XLA:CPU as one all-reduce, then each device keeps its slice: no reduce-scatter pass runs
      on CPU), fsdp also gathers each split weight where it is used (all-gather); tp all-reduces
      activations inside the layers, (batch per data shard, length, width) in float32;
    - a checkpoint written on 4x1 with fsdp is resumed by the next style on 2x2 with fsdp+tp, placed
      there, and continues as that style's uninterrupted 2x2 run does (without dropout);
    - the command line refuses heads that the model axis does not divide, a batch the data axis does
      not divide and a mesh of more devices than asked for, in one line, writing nothing.
    """
    reader = STYLES[(STYLES.index(style) + 1) % len(STYLES)]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", FOUR_DEVICES, style, reader, str(data_dir), str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    activation = {"tp": (64, 9, 16), "fsdp+tp": (32, 9, 16)}  # batch 64 over data, 9 tokens, width 16
    for strategy in ("fsdp", "tp", "fsdp+tp"):
        got = report[strategy]
        assert got["live"] and got["moments"], (strategy, got)
        for part in ("params", "opt_state"):
            assert got["held"][part] == [got["expected"][part]], (strategy, part, got)
        ops = got["collectives"]
        assert got["held"]["params"][0] < got["whole"]["params"] / 2, (strategy, got)
        if "fsdp" in strategy:
            assert ops["all-gather"]["bytes"] >= got["whole"]["params"] / 2, (strategy, ops)
        else:
            assert "all-gather" not in ops, (strategy, ops)
        gradient = ops.get("reduce-scatter", {}).get("bytes", 0) + ops.get("all-reduce", {}).get("bytes", 0)
        if strategy != "tp":  # the batch is split: the gradient is summed across devices
            assert gradient >= got["expected"]["params"], (strategy, ops)
        if strategy in activation:
            assert activation_in(activation[strategy], ops["all-reduce"]["shapes"]), (strategy, ops)
        else:
            assert not activation_in((64 // (4 if strategy != "tp" else 1), 9, 16),
                                     ops.get("all-reduce", {}).get("shapes", [])), (strategy, ops)
    resumed = report["resumed"]
    assert resumed["steps"][0] == resumed["steps"][1] > 0 and resumed["placed"], resumed
    assert resumed["losses"] < 1e-4, resumed
    assert report["own"]
    if style == "jax":  # zoo bench --mesh reads the same program: fsdp+tp on 2x2 as measured above
        rows = {row["strategy"]: row for row in report["bench"]["rows"]}
        assert list(rows) == list(parallel.STRATEGIES) and all(r["mesh"] == {"data": 2, "model": 2}
                                                                for r in rows.values())
        mine = report["fsdp+tp"]
        assert rows["fsdp+tp"]["collective_bytes"]["all-gather"] == mine["collectives"]["all-gather"]["bytes"]
        assert rows["fsdp+tp"]["collective_bytes"]["all-reduce"] == mine["collectives"]["all-reduce"]["bytes"]
        assert rows["fsdp+tp"]["held_bytes"] == mine["expected"]["params"] + mine["expected"]["opt_state"]
        assert rows["dp"]["held_bytes"] == rows["dp"]["whole_bytes"] > 2 * rows["fsdp+tp"]["held_bytes"]
        assert "| fsdp+tp | jax |" in report["bench"]["table"]
    vit = report["vit"]  # patches of 2x2 on 8x8 digits: 17 tokens of width 16, 32 examples per data shard
    assert vit["live"] and vit["held"] == [vit["expected"]] and vit["expected"] < vit["whole"] / 2, vit
    assert vit["collectives"]["all-gather"]["count"] > 0, vit
    assert activation_in((32, 17, 16), vit["collectives"]["all-reduce"]["shapes"]), vit
    heads, batch, devices = report["refused"]
    assert heads[0] == 2 and "splits the 'heads' axis" in heads[1] and "over model=4" in heads[1], heads
    assert batch[0] == 2 and "batch-size 6 must be divisible by the mesh's data axis (4 devices)" in batch[1], batch
    assert devices[0] == 2 and "--mesh data=2,model=2 has 4 devices but the run has 2" in devices[1], devices
    assert all(len(line.splitlines()) == 1 for _, line in report["refused"])
    assert not report["refused_wrote"]


@pytest.mark.heavy
def test_compare_on_a_two_by_two_mesh(data_dir, tmp_path):
    """``zoo compare gpt --devices 4 --mesh data=2,model=2 --strategy fsdp+tp``, small, 50 Adam steps
    (1-digit addition, batch 8, 5 epochs of 10): sharded, at parity with the reference (its noise floor,
    float64 where above it) and with its own run on one device, by the same rule. Linen (the reference's
    ops) and Equinox (the most different layouts) besides the reference, which is always run: each
    style's sharding is checked above, and every style's compare at the GPT's full size is in
    docs/porting.md."""
    out = tmp_path / "compare.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "compare", "gpt", "--styles", "flax,equinox",
                           "--devices", "4", "--mesh",
                           "data=2,model=2", "--strategy", "fsdp+tp", "--width", "16", "--depth", "1", "--num-heads",
                           "2", "--mlp-dim", "32", "--digits", "1", "--batch-size", "8", "--epochs", "5",
                           "--no-progress", "--data-dir", str(data_dir), "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["config"]["strategy"] == "fsdp+tp" and report["config"]["mesh"] == [["data", 2], ["model", 2]]
    assert [row["style"] for row in report["rows"]] == ["flax", "equinox"]
    for row in report["rows"]:
        assert row["parity"] in ("bitwise", "rounding"), row
        assert row["one_device_parity"] in ("bitwise", "rounding"), row
        assert row["one_device_diff"] is not None and row["noise_floor"] > 0, row
    assert "max |param - 1 device|" in proc.stdout
    steps = len(data.load("addition", data_dir, digits=1).train) // 8 * report["config"]["epochs"]
    assert steps == 50, steps


@pytest.mark.heavy
def test_two_processes_shard_as_one_process_with_four_devices(data_dir, tmp_path, two_hosts):
    """``jax.distributed`` over localhost: two processes with two CPU devices each train the scanned NNX GPT
    (the ``layers`` axis that ``nnx.vmap`` and ``nnx.scan`` add to each variable's sharding) on a 2x2
    mesh with fsdp+tp, as one process with four devices does. Each process holds only its devices'
    shards; a checkpoint gathers them (every process joins) and process 0 alone writes the outputs.
    The same program on the same mesh, with the cross-process sums in Gloo: the losses agree to
    float32 rounding (1e-5, the parity tolerance; measured here: identical, losses and parameters)."""
    args = ["train", "gpt", "--style", "nnx", "--scan-layers", "--width", "16", "--depth", "2", "--num-heads", "2",
            "--mlp-dim", "32", "--digits", "1", "--batch-size", "8", "--epochs", "2", "--no-progress",
            "--mesh", "data=2,model=2", "--strategy", "fsdp+tp", "--data-dir", str(data_dir)]
    runs = two_hosts([*args, "--checkpoint-dir", tmp_path / "two", "--out", tmp_path / "two-out"], devices=2)
    for returncode, _, err in runs:
        assert returncode == 0, err[-3000:]
    outs = [(out, err) for _, out, err in runs]
    assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]
    one = subprocess.run([sys.executable, "-m", "shared.cli", *args, "--checkpoint-dir", tmp_path / "one",
                          "--out", tmp_path / "one-out"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert one.returncode == 0, one.stderr[-3000:]
    losses = [json.loads((tmp_path / f"{run}-out" / "metrics.json").read_text())["steps"]["loss"]
              for run in ("two", "one")]
    assert len(losses[0]) == len(losses[1]) == 20
    assert max(abs(a - b) / b for a, b in zip(*losses)) < 1e-5, losses
    _, two, _ = checkpoint.load_variables(tmp_path / "two", "jax")
    _, ref, _ = checkpoint.load_variables(tmp_path / "one", "jax")
    two, ref = flatten_canonical(two), flatten_canonical(ref)
    assert two.keys() == ref.keys()
    assert max(float(abs(two[p] - ref[p]).max()) for p in ref) < 1e-5
