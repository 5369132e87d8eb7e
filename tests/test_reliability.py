"""Lose nothing, refuse nothing of our own: what a fuzz of bad inputs, kills and concurrent runs found, and
the properties that close each class.

- Every checkpoint zoo writes, for every model of the registry and every style, with the default
  hyperparameters and with each one given explicitly, is read by every reader: resume, --init-from,
  export in every format, import of the exported file, and zoo sample for a model that samples.
- Every model in every style trains, evaluates, checkpoints and resumes under --precision bfloat16 and
  float64, in zoo compare and zoo train (a few steps of the small model).
- Every command that writes a file or folder leaves what is there alone unless given --force, refuses
  a second writer of the same output in one line, and, killed mid-write, leaves the old content.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from shared import checkpoint, files, porting, styles
from shared.cli import build_parser, main
from shared.layouts import flatten_canonical
from shared.registry import MODELS, NAMES, STYLES
from shared.train import RunLog, TrainConfig, TrainState, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def zoo(*args) -> int:
    return main([str(a) for a in args])


def one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zoo: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def data_for(model: str, request) -> object:
    """What ``model`` reads here: the digits, or for a language model 1-digit addition."""
    return request.getfixturevalue("addition" if MODELS[model].kind == "lm" else "digits")


def data_flags(model: str) -> list[str]:
    """Two steps an epoch: batches of 512 digits, or of 40 of the 80 problems of 1-digit addition."""
    return ["--digits", "1", "--batch-size", "40"] if MODELS[model].kind == "lm" else ["--batch-size", "512"]


def small_flags(model: str, **given) -> list[str]:
    """The command-line flags of the registry's small size (``given`` on top)."""
    out = []
    for name, value in {**MODELS[model].small, **given}.items():
        out += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return out


# --------------------------------------------------------------------------- the five reproductions


def test_a_default_vit_checkpoint_is_read_by_every_reader(tmp_path, data_dir, digits, capsys):
    """The ViT's default ``patch_size`` is None (chosen from the image size): the metadata holds that None,
    which the readers refused as "corrupted". Export, resume and --init-from read it now."""
    ck = tmp_path / "ck"
    flags = small_flags("vit")  # the small ViT, its patch size left to its default
    assert "--patch-size" not in flags
    common = ["--no-progress", "--data-dir", data_dir, "--batch-size", "256"]
    assert zoo("train", "vit", "--style", "flax", "--epochs", "1", *flags, *common, "--checkpoint-dir", ck,
               "--out", tmp_path / "out") == 0
    folder, step = checkpoint.resolve(ck)
    assert checkpoint.read_meta(folder, step)["hparams"]["patch_size"] is None
    for fmt in porting.EXPORT_FORMATS:
        style = "equinox" if fmt == "eqx" else "flax"
        assert zoo("export", ck, "--style", style, "--format", fmt, "--out", tmp_path / f"vit.{fmt}") == 0
    assert zoo("train", "vit", "--style", "haiku", "--epochs", "2", "--resume", "--checkpoint-dir", ck,
               *common, "--out", tmp_path / "resumed") == 0
    assert zoo("train", "vit", "--style", "nnx", "--epochs", "1", *flags, *common, "--init-from", ck,
               "--out", tmp_path / "init") == 0


def test_export_leaves_an_existing_file_alone_unless_forced(tmp_path, data_dir, digits, capsys):
    ck = tmp_path / "ck"
    assert zoo("train", "mlp", "--style", "jax", "--epochs", "1", *small_flags("mlp"), "--no-progress",
               "--data-dir", data_dir, "--checkpoint-dir", ck, "--out", tmp_path / "out") == 0
    capsys.readouterr()
    precious = tmp_path / "precious.msgpack"
    precious.write_text("my precious notes\n")
    assert zoo("export", ck, "--style", "flax", "--format", "msgpack", "--out", precious) == 2
    one_line(capsys, "already exists", "--force")
    assert precious.read_text() == "my precious notes\n"
    assert zoo("export", ck, "--style", "flax", "--format", "msgpack", "--out", precious, "--force") == 0
    assert precious.read_bytes() != b"my precious notes\n"


def test_compare_in_bfloat16_with_batchnorm(tmp_path, data_dir, digits):
    """The reference's eval used float32 running statistics on bfloat16 activations and fed the float32
    result to a bfloat16 convolution: a traceback. Its BatchNorm now works in float32 and hands on the
    activations' dtype, as the frameworks' do."""
    assert zoo("compare", "resnet", "--precision", "bfloat16", "--epochs", "1", "--batch-size", "512",
               *small_flags("resnet"), "--no-noise-floor", "--no-progress", "--data-dir", data_dir,
               "--out", tmp_path / "c.json") == 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["style"] for r in rows] == list(STYLES) and all(np.isfinite(r["test_loss"]) for r in rows)


def test_two_imports_into_one_folder_at_once_one_is_refused(tmp_path, data_dir, digits):
    """Two real processes import into the same new folder: one writes the checkpoint, the other is refused
    in one line (the folder is held from the start), never a traceback."""
    saved = tmp_path / "mlp.npz"
    net = styles.build("mlp", "haiku", in_shape=(28, 28, 1), hidden_sizes=(8,))
    flat = {k: np.asarray(v) for k, v in flatten_canonical(net.init_params(jax.random.key(0))).items()}
    np.savez(saved, **flat)
    out = tmp_path / "imported"
    command = [sys.executable, "-m", "shared.cli", "import", str(saved), "--model", "mlp", "--from", "haiku",
               "--hidden-sizes", "8", "--out", str(out)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [proc.communicate(timeout=300) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 2], results
    err = results[[proc.returncode for proc in procs].index(2)][1].strip()
    assert len(err.splitlines()) == 1 and err.startswith("zoo: error: "), err
    assert "another zoo run" in err or "is not empty" in err, err
    assert checkpoint.steps(out) == [0]


def test_resume_starts_a_run_where_there_is_nothing_to_resume(tmp_path, data_dir, digits, capsys):
    """On preemptible machines one command is run again and again: --resume on a folder that does not
    exist yet, or that a run killed before its first save left empty (or with an unfinished save),
    starts the run and says so in one line; a folder holding anything else is still refused."""
    common = ["train", "mlp", "--style", "jax", "--epochs", "1", *small_flags("mlp"), "--no-progress",
              "--data-dir", data_dir, "--resume"]
    assert zoo(*common, "--checkpoint-dir", tmp_path / "new", "--out", tmp_path / "a") == 0
    assert "nothing to resume in" in capsys.readouterr().out
    assert checkpoint.steps(tmp_path / "new")[-1] == 11
    killed = tmp_path / "killed"
    (killed / f"5{checkpoint.TMP_DIR_SUFFIX}").mkdir(parents=True)  # an unfinished save
    assert zoo(*common, "--checkpoint-dir", killed, "--out", tmp_path / "b") == 0
    assert checkpoint.steps(killed)[-1] == 11
    # ... and then the same command resumes: the run is complete.
    assert zoo(*common, "--checkpoint-dir", killed, "--out", tmp_path / "c") == 0
    assert "already completes" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    assert zoo(*common, "--checkpoint-dir", foreign, "--out", tmp_path / "d") == 2
    one_line(capsys, "holds no zoo checkpoint but notes.txt")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


# --------------------------------------------------------------------------- every checkpoint, every reader


def write_checkpoint(directory: Path, model: str, digits, **hparams) -> styles.Model:
    """A checkpoint as a run writes it (step 0: the start of a run), of ``model`` built with ``hparams``."""
    net = styles.build(model, "jax", in_shape=digits.in_shape, num_classes=digits.num_classes, **hparams)
    config = TrainConfig(epochs=1, batch_size=min(128, len(digits.train)))
    params, state = net.init(jax.random.key(0))
    optimizer = make_optimizer(config, 11, None)
    start = TrainState(np.zeros((), np.int32), params, state, optimizer.init(params), None)
    saver = checkpoint.Saver(directory, net, digits, config, RunLog(), save_every=1, keep=1)
    with checkpoint.locked(directory):
        saver.save(0, start)
        saver.close()
    return net


@pytest.mark.parametrize("model", NAMES)
def test_every_checkpoint_we_write_is_read_by_every_reader(model, tmp_path, request):
    digits = data_for(model, request)
    spec = MODELS[model]
    kwargs = spec.kwargs(digits.in_shape, digits.num_classes, {})
    # Every hyperparameter given, as the model resolves its default (the ViT's patch size: 2 on digits).
    given = {k: (v if v is not None else kwargs[k]) for k, v in spec.resolve({}).items()}
    for label, hparams in (("default", {}), ("explicit", given)):
        ck = tmp_path / label
        write_checkpoint(ck, model, digits, **hparams)
        meta = checkpoint.read_meta(*checkpoint.resolve(ck))
        config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        for style in STYLES:
            net = styles.build(model, style, in_shape=digits.in_shape, num_classes=digits.num_classes,
                               **{k: tuple(v) if isinstance(v, list) else v for k, v in meta["hparams"].items()})
            state, _ = checkpoint.restore_state(ck, net, digits, config)  # --resume
            assert int(state.step) == 0
            checkpoint.read_variables(ck, net)  # --init-from
            for fmt in porting.EXPORT_FORMATS:
                if fmt == "eqx" and style != "equinox":
                    continue
                exported = porting.export(ck, style, fmt, tmp_path / f"{label}-{style}.{fmt}")
                imported = porting.import_params(exported, model, style, in_shape=digits.in_shape,
                                                 num_classes=digits.num_classes, **meta_hparams(meta))
                assert sorted(flatten_canonical(imported.params)) == sorted(net.converter.canonical_paths())
        if spec.kind == "vae":
            assert zoo("sample", model, "--style", "nnx", "--checkpoint", ck, "--per-class", "1",
                       "--out", tmp_path / f"{label}.png") == 0


def meta_hparams(meta: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in meta["hparams"].items() if v is not None}


# --------------------------------------------------------------------------- every model, every style, every precision


# The registry's small GPT has two blocks, for the scan-over-layers checks; one passes through every
# layer kind these runs check.
ONE_BLOCK = {"gpt": {"depth": 1}}


@pytest.mark.parametrize("precision", ["bfloat16", "float64"])
@pytest.mark.parametrize("model", NAMES)
def test_every_model_trains_checkpoints_and_resumes_in_every_style_and_precision(model, precision, tmp_path,
                                                                                 data_dir, digits):
    """Two steps an epoch (:func:`data_flags`) of the small model: zoo compare trains and evaluates every
    style; zoo train then checkpoints an epoch and resumes a second in every style, the resumed run taking
    the precision, batch size and dataset options from the checkpoint. (A subprocess would turn on x64 for
    float64; in this process compare and train get the precision through jax.enable_x64.)"""
    flags = small_flags(model, **ONE_BLOCK.get(model, {}))
    resumed = ["--no-progress", "--data-dir", data_dir]
    common = ["--precision", precision, *data_flags(model), *resumed]
    with jax.enable_x64(precision == "float64"):
        assert zoo("compare", model, "--epochs", "1", *flags, *common, "--no-noise-floor",
                   "--out", tmp_path / "c.json") == 0
        rows = json.loads((tmp_path / "c.json").read_text())["rows"]
        assert [r["style"] for r in rows] == list(STYLES) and all(np.isfinite(r["test_loss"]) for r in rows)
        for style in STYLES:
            ck = tmp_path / style
            assert zoo("train", model, "--style", style, "--epochs", "1", *flags, *common, "--checkpoint-dir", ck,
                       "--out", tmp_path / f"{style}-a") == 0
            assert zoo("train", model, "--style", style, "--epochs", "2", "--resume", *resumed,
                       "--checkpoint-dir", ck, "--out", tmp_path / f"{style}-b") == 0
            meta = checkpoint.read_meta(*checkpoint.resolve(ck))
            assert meta["step"] == 4 and meta["precision"] == precision
            dtypes = {a["dtype"] for p, a in meta["arrays"].items() if p.startswith("params/")}
            assert dtypes == {"float64" if precision == "float64" else "float32"}


# --------------------------------------------------------------------------- every command that writes


@contextlib.contextmanager
def another_run_writing(lock: Path):
    """What another zoo run writing the same output holds: an exclusive lock on the output's lock file (an
    open file description of its own, so this process's zoo is refused as another process's would be)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = files.acquire_lock(lock, wait=False)
    os.pwrite(fd, b"held by the test", 0)
    try:
        yield
    finally:
        files.release_lock(lock, fd)


def writers(tmp: Path, data_dir: Path, vae_checkpoint: Path, mlp_checkpoint: Path):
    """(name, arguments, the output, the lock another writer holds, the file that would be replaced)."""
    data = ["--no-progress", "--data-dir", str(data_dir)]
    mlp = [*data, *small_flags("mlp")]
    out = tmp / "out"
    return [
        ("train", ["train", "mlp", "--style", "jax", "--epochs", "1", *mlp, "--out", out],
         out / files.LOCK_NAME, out / "metrics.json"),
        ("compare", ["compare", "mlp", "--styles", "jax", "--epochs", "1", *mlp, "--no-noise-floor",
                     "--out", tmp / "c.json"], tmp / f".c.json{files.LOCK_NAME}", tmp / "c.json"),
        ("bench", ["bench", "mlp", "--styles", "jax", "--patterns", "fast", "--batch-size", "8", "--repeats", "1",
                   "--steps", "1", *data, "--out", out], out / files.LOCK_NAME, out / "bench.md"),
        ("export", ["export", str(mlp_checkpoint), "--style", "haiku", "--format", "npz", "--out", tmp / "p.npz"],
         tmp / f".p.npz{files.LOCK_NAME}", tmp / "p.npz"),
        ("sample", ["sample", "vae", "--style", "jax", "--checkpoint", str(vae_checkpoint), "--per-class", "1",
                    "--out", tmp / "s.png"], tmp / f".s.png{files.LOCK_NAME}", tmp / "s.png"),
        ("copy", ["copy", "mlp", "--style", "jax", str(tmp / "m.py"), "--no-check"],
         tmp / f".m.py{files.LOCK_NAME}", tmp / "m.py"),
        ("site", ["site", "--models", "mlp", "--runs", str(tmp / "no-runs"), "--out", tmp / "site"],
         tmp / f".site{files.LOCK_NAME}", tmp / "site" / "index.html"),
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_dir, digits):
    root = tmp_path_factory.mktemp("ckpts")
    for model in ("mlp", "vae"):
        assert zoo("train", model, "--style", "jax", "--epochs", "1", *small_flags(model), "--no-progress",
                   "--data-dir", data_dir, "--checkpoint-dir", root / model, "--out", root / f"{model}-out") == 0
    return root


WRITERS = ["train", "compare", "bench", "export", "sample", "copy", "site"]


@pytest.mark.parametrize("name", WRITERS)
def test_a_writer_replaces_nothing_unasked_refuses_a_second_writer_and_a_kill_leaves_the_old(
        name, tmp_path, data_dir, checkpoints, capsys, monkeypatch):
    (_, args, lock, target), = [w for w in writers(tmp_path, data_dir, checkpoints / "vae", checkpoints / "mlp")
                                if w[0] == name]
    args = [str(a) for a in args]
    target.parent.mkdir(parents=True, exist_ok=True)
    if name == "site":  # an earlier zoo site: its files are the site's own
        (target.parent / "site.css").write_text("/* the earlier site */\n")
    target.write_bytes(b"what was there\n")
    before = {p: p.read_bytes() for p in target.parent.rglob("*") if p.is_file()}

    # 1. Nothing is replaced unasked.
    assert main(args) == 2
    one_line(capsys, "already", "--force")
    assert {p: p.read_bytes() for p in target.parent.rglob("*") if p.is_file()} == before

    # 2. A second writer of the same output is refused in one line, touching nothing.
    with another_run_writing(lock):
        assert main([*args, "--force"]) == 2
        one_line(capsys, "is being written by another zoo run", "held by the test")
    assert target.read_bytes() == b"what was there\n"

    # 3. Killed as the new content takes the old one's place: the old content stays, no half file.
    real_replace = os.replace
    kills = []

    def killed(src, dst, *rest, **kw):
        if not kills and Path(dst).resolve() in (target.resolve(), target.parent.resolve()):
            kills.append(dst)
            raise KeyboardInterrupt
        return real_replace(src, dst, *rest, **kw)

    monkeypatch.setattr(os, "replace", killed)
    assert main([*args, "--force"]) == 130
    monkeypatch.setattr(os, "replace", real_replace)
    assert kills, "the write was never interrupted"
    capsys.readouterr()
    assert target.read_bytes() == b"what was there\n"
    assert not [p for p in target.parent.rglob("*") if ".tmp" in p.name or p.name.endswith(files.LOCK_NAME)]

    # 4. Asked, it is replaced.
    assert main([*args, "--force"]) == 0
    assert target.read_bytes() != b"what was there\n"
    assert not lock.exists()


def test_every_command_that_writes_is_checked():
    """The table above covers every subcommand with an output (--out, DEST): a new writer must join it.
    (zoo import writes only into a new or empty folder, held from its start: its own test is above.)"""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    writing = sorted(name for name, p in sub.choices.items()
                     if any(a.dest in ("out", "dest") for a in p._actions) and name not in ("import",))
    assert writing == sorted(WRITERS)
