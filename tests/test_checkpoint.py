"""Checkpoints: exact resume after a real SIGKILL, determinism, cross-style resume,
refusals that touch nothing, the NaN guard, --init-from and zoo sample.

"Bitwise" claims are within one style: the same XLA programs on the same
inputs. Across styles (Haiku -> Equinox) the same network sums in another
order, so losses agree to float32 rounding (1e-5 relative) at the first
resumed step and drift apart slowly after (Adam amplifies rounding).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from orbax.checkpoint.utils import TMP_DIR_SUFFIX

from shared import checkpoint
from shared.cli import main
from shared.convert import flatten_canonical
from shared.registry import STYLES

# digits with batch 32: 44 steps per epoch, so step 5, 10, ... are mid-epoch.
STEPS_PER_EPOCH = 1437 // 32


def zoo(*args: str) -> int:
    return main([str(a) for a in args])


def cnn_args(style: str, data_dir: Path, *extra) -> list[str]:
    return ["train", "cnn", "--style", style, "--epochs", "2", "--batch-size", "32", "--no-progress",
            "--data-dir", str(data_dir), *map(str, extra)]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder`` with its size, mtime and content hash."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            out[rel] = ("dir", path.stat().st_mtime_ns)
        else:
            stat = path.stat()
            out[rel] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def final_arrays(directory: Path) -> dict[str, dict]:
    """The manifest of the newest checkpoint: shape, dtype and CRC-32 of every stored array."""
    folder, step = checkpoint.resolve(directory)
    return checkpoint.read_meta(folder, step)["arrays"]


def canonical_params(directory: Path, style: str) -> dict[str, np.ndarray]:
    model, params, _ = checkpoint.load_variables(directory, style)
    return {k: np.asarray(v) for k, v in flatten_canonical(model.to_canonical(params)).items()}


def metrics(out: Path) -> dict:
    payload = json.loads((out / "metrics.json").read_text())
    payload.pop("step_ms")  # a timing
    return payload


# --------------------------------------------------------------------------- kill and resume


def start_and_kill(args: list[str], directory: Path, log: Path, timeout: float = 240) -> list[int]:
    """Run ``zoo`` in a real subprocess, SIGKILL it once a checkpoint exists, return the complete steps."""
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=stderr)
    deadline = time.monotonic() + timeout
    try:
        # Orbax renames a step's folder to its number only once the save is complete.
        while not (directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())):
            assert proc.poll() is None, \
                f"zoo exited ({proc.returncode}) before its first checkpoint: {log.read_text()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be killed; make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return checkpoint.steps(directory)


@pytest.mark.heavy
@pytest.mark.parametrize("style", STYLES)
def test_sigkill_mid_epoch_then_resume_is_bitwise_identical_and_reruns_are_deterministic(style, data_dir,
                                                                                         tmp_path):
    killed, resumed = tmp_path / "killed", tmp_path / "resumed"
    found = start_and_kill(cnn_args(style, data_dir, "--save-every", 5, "--checkpoint-dir", killed,
                                    "--out", tmp_path / "killed-out"), killed, tmp_path / "killed.log")
    total = 2 * STEPS_PER_EPOCH
    assert found and found[-1] < total, found
    assert found[-1] % STEPS_PER_EPOCH, f"step {found[-1]} is not mid-epoch"

    # Resume (saving at epoch ends only), then run the same command uninterrupted, twice.
    assert zoo(*cnn_args(style, data_dir, "--checkpoint-dir", killed, "--resume", "--out", resumed)) == 0
    for name in ("a", "b"):
        assert zoo(*cnn_args(style, data_dir, "--checkpoint-dir", tmp_path / f"ckpt-{name}",
                             "--out", tmp_path / name)) == 0

    # Every array of the final checkpoint (parameters and optimiser state) is
    # bitwise the same: same shapes, dtypes and CRC-32 of the bytes.
    reference = final_arrays(tmp_path / "ckpt-a")
    assert final_arrays(killed) == reference
    assert final_arrays(tmp_path / "ckpt-b") == reference
    a = canonical_params(tmp_path / "ckpt-a", style)
    for other in (killed, tmp_path / "ckpt-b"):
        got = canonical_params(other, style)
        for path in a:
            np.testing.assert_array_equal(got[path], a[path], err_msg=path)
    assert checkpoint.steps(killed)[-1] == total

    # The resumed run's metrics continue the killed run's: the same losses, epoch by epoch and step by step.
    first = metrics(tmp_path / "a")
    assert len(first["steps"]["loss"]) == total
    assert metrics(resumed)["steps"] == first["steps"]
    assert metrics(resumed)["history"] == first["history"]
    assert metrics(tmp_path / "b") == first


@pytest.mark.heavy
def test_a_haiku_checkpoint_resumes_in_equinox_with_the_same_running_statistics(digits, data_dir, tmp_path):
    """The ResNet: Haiku keeps zero-debiased averages with counters, Equinox (mode "batch") its
    own counters; the checkpoint holds the canonical statistics and the update count, so
    Equinox resumes with the very statistics Haiku had and continues the run. (Small, and without
    dropout, whose masks each framework draws its own way: the losses can then be compared.)"""
    from shared import styles, train

    haiku, copy = tmp_path / "haiku", tmp_path / "copy"
    small = ["--stage-sizes", "1,1", "--width", "4", "--dropout", "0"]
    assert zoo("train", "resnet", "--style", "haiku", "--epochs", "1", "--batch-size", "32", "--save-every", 20, *small,
               "--checkpoint-dir", haiku, "--no-progress", "--data-dir", data_dir,
               "--out", tmp_path / "haiku-out") == 0
    assert checkpoint.steps(haiku) == [20, 40, 44]
    shutil.copytree(haiku, copy)
    for step in (40, 44):  # our own copy: keep step 20 as its newest
        shutil.rmtree(copy / str(step))
    assert checkpoint.read_meta(copy, 20)["state_updates"] == 20
    # Equinox's state restored from Haiku's checkpoint: Haiku's statistics, Equinox's counters at 20.
    config = train.TrainConfig(epochs=1, batch_size=32)
    eqx_model = styles.build("resnet", "equinox", in_shape=digits.in_shape, stage_sizes=(1, 1), width=4, dropout=0.0)
    restored, _ = checkpoint.restore_state(copy, eqx_model, digits, config)
    hk_model, _, hk_state = checkpoint.load_variables(copy, "haiku")
    assert all(int(leaf) == 20 for path, leaf in jax.tree_util.tree_leaves_with_path(hk_state)
               if "counter" in jax.tree_util.keystr(path))
    got = flatten_canonical(eqx_model.state_to_canonical(restored.model_state))
    want = flatten_canonical(hk_model.state_to_canonical(hk_state))
    assert got.keys() == want.keys() and len(got) == 12  # 6 BatchNorms' mean and var
    for path in want:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)
    assert {int(leaf) for leaf in jax.tree.leaves(restored.model_state) if np.ndim(leaf) == 0} == {20}
    # Only the model and --resume: everything else comes from the checkpoint.
    assert zoo("train", "resnet", "--style", "equinox", "--resume", "--checkpoint-dir", copy, "--no-progress",
               "--data-dir", data_dir, "--out", tmp_path / "equinox-out") == 0
    reference = metrics(tmp_path / "haiku-out")["steps"]["loss"]
    resumed = metrics(tmp_path / "equinox-out")
    assert resumed["style"] == "equinox" and len(resumed["steps"]["loss"]) == len(reference) == 44
    assert resumed["steps"]["loss"][:20] == reference[:20]  # kept from the checkpoint
    # Step 21 is the first Equinox computes, from Haiku's parameters: the same loss, to float32 rounding.
    np.testing.assert_allclose(resumed["steps"]["loss"][20], reference[20], rtol=1e-5)
    assert checkpoint.steps(copy) == [20, 44]
    written = checkpoint.read_meta(copy, 44)
    assert written["style"] == "equinox" and written["log"]["step_losses"] == resumed["steps"]["loss"]
    assert written["state_updates"] == 44


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def cnn_checkpoint(data_dir, tmp_path_factory) -> Path:
    """A jax-style CNN run: 11 steps of batch 128, checkpoints at 5, 10 and 11."""
    directory = tmp_path_factory.mktemp("cnn") / "ckpt"
    assert zoo("train", "cnn", "--style", "jax", "--epochs", "1", "--no-progress", "--data-dir", data_dir,
               "--save-every", 5, "--checkpoint-dir", directory, "--out", directory.parent / "out") == 0
    assert checkpoint.steps(directory) == [5, 10, 11]
    return directory


def refused(capsys, *args) -> str:
    assert zoo(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zoo: error: "), err
    return err


@pytest.mark.parametrize("style", STYLES)
def test_refusals_name_what_does_not_match_and_touch_nothing(style, cnn_checkpoint, data_dir, tmp_path,
                                                             capsys):
    before = snapshot(cnn_checkpoint)
    base = ["--style", style, "--epochs", "1", "--no-progress", "--data-dir", data_dir,
            "--checkpoint-dir", cnn_checkpoint, "--resume", "--out", tmp_path / "out"]
    err = refused(capsys, "train", "mlp", *base)
    assert "model cnn there, mlp here" in err
    err = refused(capsys, "train", "cnn", *base, "--lr", "0.01", "--batch-size", "64")
    assert "batch-size 128 there, 64 here" in err and "lr 0.001 there, 0.01 here" in err
    err = refused(capsys, "train", "cnn", *base, "--freeze", "conv1/*")
    assert "freeze () there, (conv1/*) here" in err
    # A fresh run may not write into a folder that holds another run's checkpoints.
    err = refused(capsys, "train", "cnn", *[a for a in base if a != "--resume"])
    assert "already holds checkpoints (steps 5, 10, 11); pass --resume" in err
    # Starting from its parameters needs a network of the same shape.
    err = refused(capsys, "train", "mlp", "--style", style, "--init-from", cnn_checkpoint,
                  "--data-dir", data_dir, "--epochs", "1")
    assert "model cnn there, mlp here" in err
    assert snapshot(cnn_checkpoint) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needle", [
    (["--resume"], "--resume needs --checkpoint-dir DIR"),
    (["--save-every", "5"], "--save-every needs --checkpoint-dir DIR"),
    (["--keep", "2"], "--keep needs --checkpoint-dir DIR"),
    (["--resume", "--init-from", "x", "--checkpoint-dir", "y"], "give either --resume"),
])
def test_checkpoint_options_that_do_not_go_together(args, needle, capsys):
    err = refused(capsys, "train", "cnn", "--style", "jax", *args)
    assert needle in err


def test_another_shape_is_refused(digits, data_dir, tmp_path, capsys):  # digits: the dataset built already
    small = tmp_path / "small"
    assert zoo("train", "mlp", "--style", "flax", "--hidden-sizes", "32", "--epochs", "1", "--no-progress",
               "--data-dir", data_dir, "--checkpoint-dir", small, "--out", tmp_path / "out") == 0
    before = snapshot(small)
    err = refused(capsys, "train", "mlp", "--style", "nnx", "--hidden-sizes", "64", "--resume",
                  "--checkpoint-dir", small, "--data-dir", data_dir)
    assert "hparams hidden_sizes=(32) there, hidden_sizes=(64) here" in err
    err = refused(capsys, "train", "mlp", "--style", "equinox", "--hidden-sizes", "64", "--init-from", small,
                  "--data-dir", data_dir)
    assert "params/layers_0/bias is float32(32,) there, float32(64,) here" in err
    assert snapshot(small) == before


def corrupt_meta(step_dir: Path) -> None:
    (step_dir / "meta" / "metadata").write_text('{"format": 1, "model": "cn')


def truncate_arrays(step_dir: Path) -> None:
    for path in (step_dir / "params").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_array_bytes(step_dir: Path) -> None:
    """Flip one byte inside the stored arrays: Orbax reads it back without complaint, the CRC-32 catches it."""
    largest = max((p for p in (step_dir / "opt_state").rglob("*") if p.is_file() and p.parent.name == "d"),
                  key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))


# Each kind of damage is read by two styles; the checksum check by all five.
DAMAGES = [(s, flip_array_bytes) for s in STYLES] + [(s, d) for d in (corrupt_meta, truncate_arrays)
                                                      for s in ("haiku", "equinox")]


# Orbax's event loop complains on its way out of a failed restore; the refusal is what we check.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("style,damage", DAMAGES, ids=[f"{s}-{d.__name__}" for s, d in DAMAGES])
def test_a_damaged_checkpoint_is_refused_and_left_as_it_is(style, damage, cnn_checkpoint, data_dir, tmp_path,
                                                          capsys):
    damaged = tmp_path / "ckpt"
    shutil.copytree(cnn_checkpoint, damaged)
    damage(damaged / "11")
    before = snapshot(damaged)
    err = refused(capsys, "train", "cnn", "--style", style, "--resume", "--checkpoint-dir", damaged, "--epochs", 2,
                  "--no-progress", "--data-dir", data_dir, "--out", tmp_path / "out")
    assert f"checkpoint {damaged / '11'} is corrupted or truncated" in err
    assert f"move {damaged / '11'} elsewhere to use step 10" in err
    assert snapshot(damaged) == before


def test_an_unfinished_save_is_never_read_and_the_next_save_of_its_step_replaces_it(cnn_checkpoint, data_dir,
                                                                                     tmp_path):
    """A save killed half-way leaves Orbax's temporary folder (``STEP`` + Orbax's TMP_DIR_SUFFIX).
    It is not a step: resuming uses the newest complete one, and re-saving its step replaces it."""
    directory = tmp_path / "ckpt"
    shutil.copytree(cnn_checkpoint, directory)
    shutil.rmtree(directory / "11")
    partial = directory / f"11{TMP_DIR_SUFFIX}"
    shutil.copytree(cnn_checkpoint / "11", partial)
    shutil.rmtree(partial / "opt_state")
    assert checkpoint.steps(directory) == [5, 10]
    assert zoo("train", "cnn", "--style", "nnx", "--resume", "--checkpoint-dir", directory, "--no-progress",
               "--data-dir", data_dir, "--out", tmp_path / "out") == 0
    assert checkpoint.steps(directory) == [5, 10, 11]
    assert not partial.exists()
    assert sorted(p.name for p in directory.iterdir()) == ["10", "11", "5"]  # no lock file left either
    assert final_arrays(directory) == final_arrays(cnn_checkpoint)


# --------------------------------------------------------------------------- NaN guard


@pytest.mark.parametrize("style", STYLES)
def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(style, data_dir, digits, tmp_path,
                                                                             capsys):  # digits: built already
    directory = tmp_path / "ckpt"
    code = zoo("train", "cnn", "--style", style, "--lr", "1e12", "--epochs", "1", "--batch-size", "32",
               "--save-every", 1, "--checkpoint-dir", directory, "--no-progress", "--data-dir", data_dir,
               "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("zoo: training stopped: non-finite loss at step 2; "
                          "first non-finite parameter: conv1/bias"), err
    assert err.endswith(f"the newest checkpoint, from before it, is {directory / '1'}"), err
    assert checkpoint.steps(directory) == [1]
    model, params, _ = checkpoint.load_variables(directory, style)
    leaves = jax.tree.leaves(params)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)
    # After one step at lr 1e12 every weight moved by about 1e12: the checkpoint really is step 1.
    assert max(float(np.max(np.abs(np.asarray(leaf)))) for leaf in leaves) > 1e10
    assert not (tmp_path / "out" / "metrics.json").exists()


# --------------------------------------------------------------------------- --init-from and zoo sample


def test_init_from_takes_only_the_parameters_from_any_style(cnn_checkpoint, digits, data_dir, tmp_path,
                                                            capsys):
    from shared import data, tasks

    warm = tmp_path / "warm"
    common = ["--epochs", "1", "--no-progress", "--data-dir", data_dir]
    assert zoo("train", "cnn", "--style", "equinox", *common, "--init-from", cnn_checkpoint, "--out", warm,
               "--checkpoint-dir", tmp_path / "ckpt") == 0
    # The first loss is the checkpoint's parameters' loss on the first batch, not a fresh network's...
    model, params, state = checkpoint.load_variables(cnn_checkpoint, "equinox")
    batch = data.train_batches(digits.train, 128, 0, 0)[0]

    def loss(params) -> float:
        outputs, _ = model.apply(params, state, batch["image"], batch["label"], jax.random.key(0), True)
        return float(tasks.per_example(model.kind, outputs, batch)["loss"].mean())

    warm_losses = metrics(warm)["steps"]["loss"]
    np.testing.assert_allclose(warm_losses[0], loss(params), rtol=1e-5)  # float32 rounding across styles
    assert abs(loss(model.init_params(jax.random.split(jax.random.key(0))[0])) - warm_losses[0]) > 0.05
    # ...and the run counts from step 0 with a fresh optimiser: its one epoch ends at step 11.
    assert checkpoint.steps(tmp_path / "ckpt") == [11]
    assert checkpoint.read_meta(tmp_path / "ckpt", 11)["log"]["step_losses"] == warm_losses
    # zoo compare starts every style from them too.
    capsys.readouterr()
    assert zoo("compare", "cnn", "--styles", "flax", *common, "--json", "--init-from", cnn_checkpoint,
               "--out", tmp_path / "c.json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["train_loss"] < 0.95 * json.loads(
        (cnn_checkpoint.parent / "out" / "metrics.json").read_text())["history"][0]["train_loss"]
    assert rows[0]["max_param_diff"] < 1e-5


def test_zoo_sample_reads_a_checkpoint_in_any_style(cnn_checkpoint, data_dir, tmp_path, capsys):
    from PIL import Image

    directory = tmp_path / "vae"
    assert zoo("train", "vae", "--style", "haiku", "--hidden", "64", "--latents", "4", "--epochs", "1",
               "--no-progress", "--data-dir", data_dir, "--checkpoint-dir", directory,
               "--out", tmp_path / "out") == 0
    grids = {}
    for style, where in (("equinox", directory), ("nnx", directory / "11")):
        out = tmp_path / f"{style}.png"
        # A name without an extension gets .png.
        assert zoo("sample", "vae", "--style", style, "--checkpoint", where, "--per-class", 3,
                   "--out", out.with_suffix("") if style == "nnx" else out) == 0
        assert f"wrote {out}" in capsys.readouterr().out
        with Image.open(out) as image:
            grids[style] = np.asarray(image)
        assert grids[style].shape == (10 * (24 + 2) + 2, 3 * (24 + 2) + 2)  # 8x8 digits upscaled x3, 2px gaps
        assert grids[style].std() > 10  # not a blank image
    # The same parameters and latents give the same pixels in both styles, up to 8-bit rounding.
    assert np.max(np.abs(grids["equinox"].astype(int) - grids["nnx"].astype(int))) <= 1
    err = refused(capsys, "sample", "vae", "--style", "jax", "--checkpoint", cnn_checkpoint)
    assert f"checkpoint {cnn_checkpoint / '11'} holds a cnn, not a vae" in err


# --------------------------------------------------------------------------- the optimiser state, every style


FEATURES = {"epochs": 1, "optimizer": "adamw", "clip_norm": 1.0, "ema": 0.9, "freeze": ("layers_0/*",)}


@pytest.fixture(scope="module")
def mlp_reference(digits, tmp_path_factory):
    """The jax-style MLP trained one epoch with every optimiser feature, checkpointed."""
    from shared import styles, train

    ref = styles.build("mlp", "jax", in_shape=digits.in_shape)
    init = ref.init_params(jax.random.key(1))
    directory = tmp_path_factory.mktemp("mlp") / "jax"
    checkpoint.train(ref, digits, train.TrainConfig(**FEATURES), directory, init_params=init, progress=False)
    return ref, init, directory


@pytest.mark.parametrize("style", [s for s in STYLES if s != "jax"])
def test_every_optimiser_state_maps_to_the_same_canonical_checkpoint(style, digits, mlp_reference, tmp_path):
    """adamw + clipping + EMA + a frozen subset: every style writes the same canonical
    checkpoint, and reads the jax-written one back exactly."""
    from shared import styles, train

    config = train.TrainConfig(**FEATURES)
    ref, init, reference = mlp_reference
    net = styles.build("mlp", style, in_shape=digits.in_shape)
    # This style's own initial state, written as a checkpoint, has the reference's layout.
    optimizer = train.make_optimizer(config, 11, train.trainable_labels(net, config))
    params = net.from_canonical(init)
    saver = checkpoint.Saver(tmp_path / style, net, digits, config, train.RunLog(), save_every=1, keep=1)
    saver.save(0, train.TrainState(jax.numpy.zeros((), jax.numpy.int32), params, {}, optimizer.init(params),
                                   params))
    saver.close()
    written, expected = final_arrays(tmp_path / style), final_arrays(reference)
    assert {p: (v["shape"], v["dtype"]) for p, v in written.items()} == \
        {p: (v["shape"], v["dtype"]) for p, v in expected.items()}
    assert not any(p.startswith("opt_state/") and "layers_0" in p for p in written), "frozen: no moments"
    # Restore the jax-written trained state in this style and map it back: nothing is lost or moved.
    state, log = checkpoint.restore_state(reference, net, digits, config)
    assert int(state.step) == 11 and len(log.step_losses) == 11 and math.isfinite(log.step_losses[-1])
    back = checkpoint.flatten(checkpoint.to_canonical_tree(net, jax.device_get(state.opt_state)))
    ref_state, _ = checkpoint.restore_state(reference, ref, digits, config)
    ref_back = checkpoint.flatten(checkpoint.to_canonical_tree(ref, jax.device_get(ref_state.opt_state)))
    assert back.keys() == ref_back.keys() and len(back) == 10  # 2 counts; mu and nu of 4 trained leaves
    for path in ref_back:
        np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(ref_back[path]), err_msg=path)
    for tree, ref_tree in ((state.params, ref_state.params), (state.ema_params, ref_state.ema_params)):
        got, want = flatten_canonical(net.to_canonical(tree)), flatten_canonical(ref.to_canonical(ref_tree))
        for path in want:
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)


# --------------------------------------------------------------------------- several devices

MULTI_DEVICE = r'''
import json, os, sys
assert "jax" not in sys.modules
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
import numpy as np
from jax.sharding import PartitionSpec
from shared import checkpoint, data, styles, train
from shared.convert import flatten_canonical

assert len(jax.local_devices()) == 4
seen = []
make_train_step, jit = train.make_train_step, jax.jit
steps = []


def spying_make_train_step(*args):
    """The loop's own step, marked for ``spying_jit``."""
    steps.append(make_train_step(*args))
    return steps[-1]


def spying_jit(fun, **kwargs):
    """``jax.jit``; for the loop's step, it also reports the shardings XLA compiled the step for.

    (Read from the compiled step rather than from a host callback inside it:
    JAX keeps no program with a host callback in its compile cache.)
    """
    jitted = jit(fun, **kwargs)
    if not any(fun is step for step in steps):
        return jitted

    def step(state, batch):
        if not seen:
            (state_sharding, batch_sharding), _ = jitted.lower(state, batch).compile().input_shardings
            seen.extend([("batch", batch_sharding["image"]), ("params", jax.tree.leaves(state_sharding.params)[0])])
        return jitted(state, batch)
    return step


train.make_train_step = spying_make_train_step
jax.jit = spying_jit
dataset = data.load("digits", sys.argv[1])
report = {}
# The small sizes: BatchNorm in the stem, a plain block and a projection block. No dropout: each framework
# draws its masks its own way, and the runs are compared.
HPARAMS = {"mlp": {"hidden_sizes": (16,)}, "resnet": {"stage_sizes": (1, 1), "width": 4, "dropout": 0.0}}
starts = {name: styles.build(name, "jax", in_shape=dataset.in_shape, **HPARAMS[name]).init(jax.random.key(0))
          for name in ("mlp", "resnet")}
# Every style's MLP (the sharding itself), and the ResNet where BatchNorm is written three
# different ways: the reference's (as Linen and NNX), Haiku's, and Equinox's over a named vmap axis.
runs = ([("mlp", style, 4) for style in ("jax", "flax", "nnx", "haiku", "equinox")] + [("mlp", "jax", 1)]
        + [("resnet", style, 4) for style in ("jax", "haiku", "equinox")] + [("resnet", "jax", 1)])
params, states = {}, {}
for name, style, devices in runs:
    model = styles.build(name, style, in_shape=dataset.in_shape, **HPARAMS[name])
    start, start_state = starts[name]  # one initialiser for all: a fresh process pays for each
    seen.clear()
    # Batch 512: two steps an epoch, so the comparison is of rounding, not of Adam amplifying it.
    config = train.TrainConfig(epochs=1, batch_size=512, devices=devices)
    folder = f"{sys.argv[2]}/{name}-{style}-{devices}"  # checkpoints of replicated arrays, read on one device
    result = checkpoint.train(model, dataset, config, folder, init_params=model.from_canonical(start),
                              init_state=model.state_from_canonical(start_state, 0), progress=False)
    _, stored_params, stored_state = checkpoint.load_variables(folder, "jax")
    params[name, style, devices], states[name, style, devices] = map(flatten_canonical,
                                                                     (stored_params, stored_state))
    (_, batch), (_, param) = seen[:2]
    leaf = jax.tree.leaves(result.params)[0]
    report[f"{name}-{style}-{devices}"] = {
        "batch_devices": len(batch.device_set), "batch_split": batch.spec == PartitionSpec("data"),
        "batch_shard": list(batch.shard_shape((config.batch_size, *dataset.in_shape))),
        "params_replicated": param.is_fully_replicated and leaf.sharding.is_fully_replicated,
        "params_devices": len(leaf.sharding.device_set)}
def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(a[p]) - np.asarray(b[p])))) for p in b)


for name, style, devices in runs:
    if devices == 4:
        report[f"{name}-{style}"] = max_diff(params[name, style, 4], params[name, "jax", 1])
        if name == "resnet":
            report[f"{name}-{style}-state"] = max_diff(states[name, style, 4], states[name, "jax", 1])
# What per-device statistics would have been: the stem BN's batch mean over one quarter of the
# first batch against the whole batch's (the checkpoints hold the whole batch's).
batch = data.train_batches(dataset.train, 512, 0, 0)[0]
stem = jax.lax.conv_general_dilated(batch["image"], starts["resnet"][0]["stem"]["kernel"], (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
report["quarter_vs_whole_mean"] = float(np.max(np.abs(stem[:128].mean((0, 1, 2)) - stem.mean((0, 1, 2)))))
print(json.dumps(report))
'''


@pytest.mark.heavy
def test_data_parallel_over_four_devices_matches_one(data_dir, tmp_path):
    """Four CPU devices in a fresh process: each batch split four ways, the parameters replicated.

    Every style's MLP trains on four devices from the same canonical start,
    and the ResNet, because of BatchNorm, in its three ways of computing the
    statistics (the reference's, which Linen and NNX share op for op,
    Haiku's, and Equinox's over a named vmap axis); the reference is the
    plain-JAX style on one device. ``jax.jit`` over a sharded batch computes the batch statistics over
    the whole (global) batch, with an all-reduce XLA inserts (in Equinox
    too: its ``axis_name`` is the vmapped batch axis, sharded), so the
    running statistics match one device's. The gradient and the statistics
    are summed in another order (per device, then across devices), so both
    match to float32 rounding, against the parity tolerance of 1e-5; two
    Adam steps keep the rounding from being amplified (after dozens of steps
    it grows to 1e-3, as between any two orders of summation).
    """
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE, str(data_dir), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in ("mlp", "resnet"):
        one = report[f"{name}-jax-1"]
        assert one["batch_devices"] == 1 and one["batch_shard"] == [512, 8, 8, 1], one
    for name, style in [("mlp", s) for s in STYLES] + [("resnet", s) for s in ("jax", "haiku", "equinox")]:
        four = report[f"{name}-{style}-4"]
        assert four == {"batch_devices": 4, "batch_split": True, "batch_shard": [128, 8, 8, 1],
                        "params_replicated": True, "params_devices": 4}, (name, style, four)
        assert report[f"{name}-{style}"] < 1e-5, (name, style, report[f"{name}-{style}"])
    for style in ("jax", "haiku", "equinox"):
        # BatchNorm's statistics are the whole batch's, however it is sharded: the same running
        # averages as on one device, where per-device statistics would be off by far more.
        assert report[f"resnet-{style}-state"] < 1e-5, (style, report[f"resnet-{style}-state"])
    assert report["quarter_vs_whole_mean"] > 1e-3


@pytest.mark.heavy
def test_two_processes_train_as_one(data_dir, tmp_path, two_hosts):
    """The same command on two "hosts" (two processes with two CPU devices each, joined by
    jax.distributed over localhost) trains like one process on one device: the batch is split
    four ways and the gradient summed across processes, so only float32 rounding differs (1e-5
    is the parity tolerance; measured: 7e-8). Process 0 alone writes the outputs."""
    args = ["train", "mlp", "--style", "flax", "--epochs", "1", "--no-progress", "--data-dir", str(data_dir)]
    runs = two_hosts([*args, "--checkpoint-dir", tmp_path / "ckpt", "--out", tmp_path / "out"], devices=2, timeout=300)
    for returncode, _, err in runs:
        assert returncode == 0, err[-3000:]
    outs = [(out, err) for _, out, err in runs]
    assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]  # (Gloo reports its connections there too)
    assert zoo(*args, "--devices", "1", "--checkpoint-dir", tmp_path / "one", "--out", tmp_path / "one-out") == 0
    two, one = canonical_params(tmp_path / "ckpt", "flax"), canonical_params(tmp_path / "one", "flax")
    assert max(float(np.max(np.abs(two[p] - one[p]))) for p in one) < 1e-5
    np.testing.assert_allclose(metrics(tmp_path / "out")["steps"]["loss"],
                               metrics(tmp_path / "one-out")["steps"]["loss"], rtol=1e-5)
