"""Bad input, table-driven: every subcommand, every class of option and path.

Each case runs ``zoo`` on a small world of files (a file, a read-only folder,
a finished checkpoint, an earlier site) and asserts that it is refused before
any work starts: the exit status, exactly one line on stderr that says what was
wrong, no traceback, and not one byte of the world changed or added. The
world is the current folder too, so a default output path (``runs/...``) that
got written would show up as well.

Below the table: the cases that need real processes (a second writer on a
checkpoint folder, Orbax's noise on a damaged checkpoint) and strict JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import checkpoint
from shared.args import MAX_COUNT, MAX_LIST, SEED_LIMIT
from shared.cli import main

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under ``folder`` with, for files, its size, mtime and bytes. (A folder's own
    mtime is left out: checking that a folder can be written creates and removes a file in it.)"""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir() and not path.is_symlink():
            out[rel] = ("dir", path.stat().st_mode)
        else:
            stat = path.lstat()
            out[rel] = (stat.st_size, stat.st_mtime_ns, path.read_bytes() if path.is_file() else None)
    return out


@dataclasses.dataclass(frozen=True)
class World:
    root: Path
    data_dir: Path
    read_only: Path  # a folder nothing can be written in, even by root

    def expand(self, arg: str) -> str:
        return (arg.replace("{root}", str(self.root)).replace("{data}", str(self.data_dir))
                .replace("{ro}", str(self.read_only)))


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir, digits) -> World:
    root = tmp_path_factory.mktemp("world")
    (root / "file").write_text("a file, not a folder\n")
    (root / "empty").mkdir()
    (root / "x.py").mkdir()  # a folder whose name looks like a file
    (root / "model.py").write_text("# the user's own file\n")
    assert main(["train", "mlp", "--style", "jax", "--hidden-sizes", "8", "--epochs", "2", "--no-progress",
                 "--data-dir", str(data_dir), "--checkpoint-dir", str(root / "ckpt"),
                 "--out", str(root / "ckpt-out")]) == 0
    site = root / "site"
    site.mkdir()
    (site / "index.html").write_text("<html>the earlier site</html>\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("the user's notes\n")
    bad = root / "bad-runs"
    bad.mkdir()
    (bad / "compare-mlp-digits.json").write_text('{"model": "mlp", "rows": [{"style": "jax"}]}')
    broken = root / "broken-runs"
    broken.mkdir()
    (broken / "compare-mlp-digits.json").write_text('{"model": "mlp", "rows": [')
    (root / "new\nline").write_text("a file with a newline in its name\n")
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "loop").symlink_to(root / "loop")
    (root / "old-site" / "img").mkdir(parents=True)
    (root / "old-site" / "index.html").write_text("<html>an earlier site</html>\n")
    (root / "old-site" / "img" / "photo.jpg").write_text("the user's photo\n")
    for name, edit in (("bad-hparams", lambda m: m["hparams"].update(hidden_sizes=[-8])),
                       ("bad-log", lambda m: m["log"].update(step_losses="none")),
                       ("bad-config", lambda m: m["config"].update(epochs="two"))):
        shutil.copytree(root / "ckpt", root / name)
        metadata = root / name / "22" / "meta" / "metadata"
        meta = json.loads(metadata.read_text())
        edit(meta)
        metadata.write_text(json.dumps(meta))
    # A language model's checkpoint (1-digit addition: 3 tokens a sequence), and text files good and bad.
    assert main(["train", "gpt", "--style", "jax", "--width", "8", "--depth", "1", "--num-heads", "2",
                 "--mlp-dim", "8", "--digits", "1", "--batch-size", "40", "--epochs", "1", "--no-progress",
                 "--data-dir", str(data_dir), "--checkpoint-dir", str(root / "gpt-ckpt"),
                 "--out", str(root / "gpt-out")]) == 0
    (root / "empty.txt").write_text("")
    (root / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    (root / "nul.txt").write_bytes(b"text\x00more text\n")
    (root / "short.txt").write_text("a few words, not many\n" * 4)
    shutil.copytree(root / "ckpt", root / "stray-step")
    (root / "stray-step" / "33").write_text("the user's file, named like the next step\n")
    shutil.copytree(root / "ckpt", root / "lock-link")
    (root / "lock-link" / checkpoint.LOCK_NAME).symlink_to(root / "file")
    if os.geteuid() == 0:
        # Root writes through any permission bits; /proc takes no new files from anyone.
        read_only = Path("/proc")
    else:
        read_only = root / "read-only"
        read_only.mkdir()
        read_only.chmod(0o555)
    return World(root, data_dir, read_only)


TRAIN = ["train", "mlp", "--style", "jax", "--no-progress", "--data-dir", "{data}"]
COMPARE = ["compare", "mlp", "--styles", "jax,flax", "--no-progress", "--data-dir", "{data}"]
BENCH = ["bench", "mlp", "--styles", "jax", "--no-progress", "--data-dir", "{data}"]
SAMPLE = ["sample", "vae", "--style", "jax", "--checkpoint", "{root}/ckpt"]
GPT = ["train", "gpt", "--style", "jax", "--no-progress", "--data-dir", "{data}"]
TEXT = [*GPT, "--dataset", "text", "--text-file"]
GENERATE = ["generate", "gpt", "--checkpoint", "{root}/gpt-ckpt"]
HUGE = "9" * 30

# (id, arguments, what the one line must say)
CASES = [
    # --- paths: a file where a folder is needed, the reverse, unwritable, empty, missing
    ("train-out-is-a-file", [*TRAIN, "--out", "{root}/file"], "--out {root}/file is a file, not a folder"),
    ("train-out-under-a-file", [*TRAIN, "--out", "{root}/file/run"], "{root}/file is a file, not a folder"),
    ("train-out-unwritable", [*TRAIN, "--out", "{ro}/run"], "cannot write in {ro}"),
    ("train-out-empty", [*TRAIN, "--out", ""], "--out: expected a path, got an empty one"),
    ("train-checkpoint-dir-is-a-file", [*TRAIN, "--checkpoint-dir", "{root}/file"], "is a file, not a folder"),
    ("train-checkpoint-dir-unwritable", [*TRAIN, "--checkpoint-dir", "{ro}/ckpt"], "cannot write in {ro}"),
    ("train-checkpoint-dir-empty", [*TRAIN, "--checkpoint-dir", " "], "expected a path, got an empty one"),
    ("train-data-dir-is-a-file", ["train", "mlp", "--style", "jax", "--data-dir", "{root}/file"],
     "--data-dir {root}/file is a file, not a folder"),
    ("train-data-dir-unwritable", ["train", "mlp", "--style", "jax", "--data-dir", "{ro}/tfds"],
     "cannot write in {ro}"),
    ("train-data-dir-empty", ["train", "mlp", "--style", "jax", "--data-dir", ""], "expected a path"),
    ("train-manual-dir-is-a-file", [*TRAIN, "--manual-dir", "{root}/file"], "is a file; give a folder"),
    ("train-init-from-missing", [*TRAIN, "--init-from", "{root}/no-such"], "--init-from {root}/no-such does not exist"),
    ("train-resume-from-a-file", [*TRAIN, "--resume", "--checkpoint-dir", "{root}/file"], "is a file"),
    ("train-resume-a-foreign-folder", [*TRAIN, "--resume", "--checkpoint-dir", "{root}/notes"],
     "--checkpoint-dir {root}/notes holds no zoo checkpoint but todo.txt"),
    ("train-into-a-used-checkpoint-dir", [*TRAIN, "--hidden-sizes", "8", "--checkpoint-dir", "{root}/ckpt"],
     "already holds checkpoints (steps 11, 22); pass --resume"),
    ("train-resume-other-batch-size", [*TRAIN, "--resume", "--checkpoint-dir", "{root}/ckpt", "--batch-size", "256"],
     "batch-size 128 there, 256 here"),
    ("train-resume-past-the-end", [*TRAIN, "--resume", "--checkpoint-dir", "{root}/ckpt", "--epochs", "1"],
     "it is at step 22, past the 11 steps of 1 epoch; give --epochs 2 or more"),
    ("train-resume-another-model", ["train", "cnn", "--style", "nnx", "--resume", "--checkpoint-dir", "{root}/ckpt"],
     "model mlp there, cnn here"),
    ("train-out-newline", [*TRAIN, "--out", "{root}/new\nline"], "--out {root}/new\\nline is a file"),
    ("train-out-dangling-link", [*TRAIN, "--out", "{root}/dangling"], "{root}/dangling is a symbolic link to"),
    ("train-checkpoint-dir-under-a-loop", [*TRAIN, "--checkpoint-dir", "{root}/loop/ckpt"],
     "{root}/loop is a symbolic link to {root}/loop, which does not lead"),
    ("train-out-name-too-long", [*TRAIN, "--out", "{root}/" + "a" * 300], "a file or folder name is at most 255"),
    ("train-resume-bad-hyperparameter", [*TRAIN, "--resume", "--checkpoint-dir", "{root}/bad-hparams"],
     "its metadata has hyperparameter hidden_sizes = -8, which --hidden-sizes would refuse"),
    ("train-init-from-bad-log", [*TRAIN, "--init-from", "{root}/bad-log"], "its metadata has a log that is not"),
    ("sample-bad-config", [*SAMPLE[:-1], "{root}/bad-config", "--out", "{root}/s.png"],
     "its metadata has a config this zoo refuses"),
    ("train-resume-onto-a-file-named-like-a-step", [*TRAIN, "--resume", "--checkpoint-dir", "{root}/stray-step",
                                                    "--epochs", "3"],
     "{root}/stray-step/33 is not a checkpoint, but a step of this run would be saved under its name"),
    ("train-lock-file-is-a-link", [*TRAIN, "--resume", "--checkpoint-dir", "{root}/lock-link", "--epochs", "3"],
     "cannot lock {root}/lock-link/.zoo-lock (Too many levels of symbolic links)"),
    ("coordinator-garbage", [*TRAIN, "--coordinator", "not a host", "--num-processes", "1", "--process-id", "0"],
     "--coordinator 'not a host': expected HOST:PORT"),
    ("coordinator-port", [*TRAIN, "--coordinator", "127.0.0.1:99999", "--num-processes", "1", "--process-id", "0"],
     "with a port from 1 to 65535"),
    ("process-id-beyond", [*TRAIN, "--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 must be below --num-processes 2"),
    ("abbreviated-option", [*COMPARE, "--style", "jax"], "unrecognized arguments: --style jax"),
    ("lr-beyond-float32", [*TRAIN, "--lr", "1e308"], "a positive number that float32 can hold"),
    ("bench-patterns-empty-entry", [*BENCH, "--patterns", "fast,"], "got 'fast,' (an empty entry)"),
    # --- integers: signs, sizes, overflow, words
    ("seed-negative", [*TRAIN, "--seed", "-1"], f"--seed: must be a seed from 0 to {SEED_LIMIT - 1}, got -1"),
    ("seed-2**32", [*TRAIN, "--seed", str(SEED_LIMIT)], f"must be at most {SEED_LIMIT - 1}"),
    ("seed-overflow", [*TRAIN, "--seed", HUGE], f"must be at most {SEED_LIMIT - 1}"),
    ("seed-word", [*TRAIN, "--seed", "one"], "expected a seed from 0"),
    ("epochs-overflow", [*TRAIN, "--epochs", HUGE], f"--epochs: must be at most {MAX_COUNT}"),
    ("epochs-too-many-steps", [*TRAIN, "--epochs", str(MAX_COUNT)], "steps, more than the"),
    ("warmup-overflow", [*TRAIN, "--warmup-steps", "99999999999999999999"], f"must be at most {MAX_COUNT}"),
    ("warmup-negative", [*TRAIN, "--warmup-steps", "-1"], "must be an integer >= 0"),
    ("batch-size-overflow", [*TRAIN, "--batch-size", HUGE], f"must be at most {MAX_COUNT}"),
    ("batch-size-float", [*TRAIN, "--batch-size", "1.5"], "expected a positive integer, got '1.5'"),
    ("save-every-zero", [*TRAIN, "--checkpoint-dir", "{root}/new", "--save-every", "0"], "must be a positive"),
    ("keep-zero", [*TRAIN, "--checkpoint-dir", "{root}/new", "--keep", "0"], "must be a positive integer"),
    ("devices-too-many", [*TRAIN, "--devices", "4096"], "--devices 4096 asked for, but only"),
    # --- meshes and sharding strategies (the ones that need several devices: tests/test_parallel.py)
    ("mesh-not-pairs", [*GPT, "--mesh", "2x2"], "'2x2' is not a mesh; give axis=size pairs"),
    ("mesh-unknown-axis", [*GPT, "--mesh", "data=1,pipe=2"], "unknown mesh axis 'pipe' in 'data=1,pipe=2'"),
    ("mesh-axis-twice", [*GPT, "--mesh", "data=1,data=1"], "mesh axis 'data' given twice"),
    ("mesh-axis-zero", [*GPT, "--mesh", "model=0"], "must have a size from 1 to 4096, got 0"),
    ("mesh-product", [*GPT, "--mesh", "data=2,model=2"], "--mesh data=2,model=2 has 4 devices but the run has 1"),
    ("compare-mesh-product", [*COMPARE, "--mesh", "model=2"], "--mesh data=1,model=2 has 2 devices"),
    ("strategy-unknown", [*GPT, "--strategy", "zero3"], "invalid choice: 'zero3'"),
    ("strategy-needs-axes", [*TRAIN, "--strategy", "fsdp"], "mlp does not name its parameters' axes"),
    ("bench-mesh-needs-axes", [*BENCH, "--mesh", "data=1"], "mlp does not name its parameters' axes"),
    ("bench-mesh-product", ["bench", "gpt", "--mesh", "data=2", "--no-progress"], "has 2 devices but the run has 1"),
    ("bench-devices-without-mesh", [*BENCH, "--devices", "1"], "--devices goes with --mesh"),
    ("process-id-negative", [*TRAIN, "--process-id", "-1"], "must be an integer >= 0"),
    ("num-processes-zero", [*TRAIN, "--num-processes", "0"], "must be a positive integer"),
    # --- numbers: NaN, infinities, signs, ranges
    ("lr-inf", [*TRAIN, "--lr", "inf"], "--lr: must be a positive number, got inf"),
    ("lr-zero", [*TRAIN, "--lr", "0"], "must be a positive number, got 0"),
    ("weight-decay-nan", [*TRAIN, "--weight-decay", "nan"], "--weight-decay: must be a finite number >= 0"),
    ("weight-decay-negative", [*TRAIN, "--weight-decay", "-1"], "must be a finite number >= 0, got -1"),
    ("weight-decay-inf", [*TRAIN, "--weight-decay", "inf"], "must be a finite number >= 0"),
    ("momentum-nan", [*TRAIN, "--momentum", "nan"], "--momentum: must be a number in [0, 1)"),
    ("momentum-inf", [*TRAIN, "--momentum", "inf"], "must be a number in [0, 1)"),
    ("momentum-negative", [*TRAIN, "--momentum", "-5"], "must be a number in [0, 1), got -5"),
    ("momentum-one", [*TRAIN, "--momentum", "1"], "must be a number in [0, 1), got 1"),
    ("ema-one", [*TRAIN, "--ema", "1"], "--ema: must be a number between 0 and 1"),
    ("ema-nan", [*TRAIN, "--ema", "nan"], "must be a number between 0 and 1"),
    ("clip-norm-nan", [*TRAIN, "--clip-norm", "nan"], "--clip-norm: must be a positive number"),
    # --- hyperparameters: sizes the machine cannot hold, malformed lists, flags of other models
    ("hidden-sizes-too-big", [*TRAIN, "--hidden-sizes", "3000000,3000000"], "parameters: training holds 4 copies"),
    ("hidden-sizes-zero", [*TRAIN, "--hidden-sizes", "0"], "must be a positive integer, got 0"),
    ("hidden-sizes-gap", [*TRAIN, "--hidden-sizes", "8,,8"], "expected comma-separated positive integers"),
    ("hidden-sizes-too-many", [*TRAIN, "--hidden-sizes", ",".join(["8"] * (MAX_LIST + 1))],
     f"at most {MAX_LIST} sizes"),
    ("hidden-sizes-overflow", [*TRAIN, "--hidden-sizes", HUGE], f"must be at most {MAX_COUNT}"),
    ("resnet-width-too-big", ["train", "resnet", "--style", "flax", "--data-dir", "{data}", "--width", "1000000"],
     "parameters: training holds 4 copies"),
    ("resnet-dropout-one", ["train", "resnet", "--style", "flax", "--dropout", "1"], "must be a number in [0, 1)"),
    ("resnet-bn-momentum-nan", ["train", "resnet", "--style", "nnx", "--bn-momentum", "nan"], "in [0, 1)"),
    ("vae-latents-overflow", ["train", "vae", "--style", "haiku", "--latents", HUGE], "must be at most"),
    ("another-models-flag", [*TRAIN, "--latents", "4"], "mlp does not take --latents"),
    # --- choices
    ("unknown-model", ["train", "lenet", "--style", "jax"], "invalid choice: 'lenet'"),
    ("unknown-style", ["train", "mlp", "--style", "pytorch"], "invalid choice: 'pytorch'"),
    ("unknown-dataset", [*TRAIN, "--dataset", "cifar"], "invalid choice: 'cifar'"),
    ("unknown-optimizer", [*TRAIN, "--optimizer", "lion"], "invalid choice: 'lion'"),
    ("unknown-command", ["fly"], "invalid choice: 'fly'"),
    ("no-command", [], "the following arguments are required: command"),
    ("list-takes-nothing", ["list", "mlp"], "unrecognized arguments: mlp"),
    # --- compare
    ("compare-out-is-a-folder", [*COMPARE, "--out", "{root}/empty"], "--out {root}/empty is a folder"),
    ("compare-out-not-json", [*COMPARE, "--out", "{root}/rows.txt"], "give a name ending in .json"),
    ("compare-out-under-a-file", [*COMPARE, "--out", "{root}/file/rows.json"], "is a file, not a folder"),
    ("compare-out-unwritable", [*COMPARE, "--out", "{ro}/rows.json"], "cannot write in {ro}"),
    ("compare-no-styles", ["compare", "mlp", "--styles", ","], "unknown style (none)"),
    ("compare-unknown-style", ["compare", "mlp", "--styles", "jax,keras"], "unknown style 'keras'"),
    ("compare-init-from-missing", [*COMPARE, "--init-from", "{root}/no-such"], "does not exist"),
    ("compare-seed-negative", [*COMPARE, "--seed", "-3"], "must be a seed from 0"),
    # --- bench
    ("bench-out-is-a-file", [*BENCH, "--out", "{root}/file"], "--out {root}/file is a file, not a folder"),
    ("bench-out-unwritable", [*BENCH, "--out", "{ro}/bench"], "cannot write in {ro}"),
    ("bench-json-is-a-folder", [*BENCH, "--json", "{root}/empty"], "--json {root}/empty is a folder"),
    ("bench-json-not-json", [*BENCH, "--json", "{root}/bench.csv"], "give a name ending in .json"),
    ("bench-json-empty", [*BENCH, "--json", ""], "expected a path"),
    ("bench-data-dir-is-a-file", ["bench", "mlp", "--data-dir", "{root}/file"], "is a file, not a folder"),
    ("bench-repeats-zero", [*BENCH, "--repeats", "0"], "must be a positive integer, got 0"),
    ("bench-steps-overflow", [*BENCH, "--steps", HUGE], "must be at most"),
    ("bench-unknown-model", ["bench", "lenet"], "lenet"),
    ("bench-unknown-pattern", [*BENCH, "--patterns", "slow"], "unknown pattern 'slow'"),
    ("bench-seed-overflow", [*BENCH, "--seed", HUGE], "must be at most"),
    # --- site
    ("site-out-is-a-file", ["site", "--out", "{root}/file", "--models", "mlp"], "is a file, not a folder"),
    ("site-out-empty", ["site", "--out", ""], "expected a path, got an empty one"),
    ("site-out-unwritable", ["site", "--out", "{ro}/site", "--models", "mlp"], "cannot write in {ro}"),
    ("site-out-holds-other-files", ["site", "--out", "{root}/notes", "--models", "mlp"],
     "holds files the site does not write (todo.txt)"),
    ("site-out-is-the-current-folder", ["site", "--out", "{root}", "--models", "mlp"],
     "is the current folder or holds it"),
    ("site-out-img-holds-a-photo", ["site", "--out", "{root}/old-site", "--models", "mlp"],
     "holds files the site does not write (img/photo.jpg)"),
    ("site-runs-is-a-file", ["site", "--out", "{root}/site", "--runs", "{root}/file"], "--runs {root}/file is a file"),
    ("site-runs-malformed", ["site", "--out", "{root}/site", "--runs", "{root}/bad-runs", "--models", "mlp",
                             "--force"],
     "a row without max_param_diff, params"),
    ("site-runs-not-json", ["site", "--out", "{root}/site", "--runs", "{root}/broken-runs", "--models", "mlp",
                            "--force"],
     "is not valid JSON"),
    ("site-unknown-model", ["site", "--models", "mlp,lenet"], "unknown model 'lenet'"),
    # --- show
    ("show-width-huge", ["show", "mlp", "--width", "99999999"], "--width: must be at most 2000"),
    ("show-width-narrow", ["show", "mlp", "--width", "5"], "must be at least 20 characters, got 5"),
    ("show-unknown-style", ["show", "mlp", "--styles", "torch"], "unknown style 'torch'"),
    # --- copy
    ("copy-unwritable", ["copy", "mlp", "--style", "flax", "{ro}/project"], "cannot write in {ro}"),
    ("copy-over-a-file", ["copy", "mlp", "--style", "flax", "{root}/model.py"], "already exists; pass --force"),
    ("copy-under-a-file", ["copy", "mlp", "--style", "flax", "{root}/file/mlp.py"], "is a file, not a folder"),
    ("copy-into-a-py-folder", ["copy", "mlp", "--style", "flax", "{root}/x.py"], "{root}/x.py is a folder"),
    ("copy-into-a-file", ["copy", "mlp", "--style", "flax", "{root}/file"], "exists and is not a folder"),
    ("copy-empty", ["copy", "mlp", "--style", "flax", ""], "got an empty one"),
    # --- import and export
    ("import-missing-file", ["import", "{root}/no-such.msgpack", "--model", "cnn", "--from", "flax", "--out",
                             "{root}/imported"], "FILE {root}/no-such.msgpack does not exist"),
    ("import-into-a-used-folder", ["import", "{root}/model.py", "--model", "mlp", "--from", "haiku", "--out",
                                   "{root}/notes"], "--out {root}/notes is not empty"),
    ("import-unknown-format", ["import", "{root}/file", "--model", "mlp", "--from", "haiku", "--out",
                               "{root}/imported"], "cannot tell the format of {root}/file"),
    ("import-zoo-checkpoint", ["import", "{root}/ckpt", "--model", "mlp", "--from", "jax", "--out",
                               "{root}/imported"], "is a zoo checkpoint already"),
    ("export-eqx-from-flax", ["export", "{root}/ckpt", "--style", "flax", "--format", "eqx", "--out",
                              "{root}/x.eqx"], "--format eqx is Equinox's"),
    ("export-out-is-a-folder", ["export", "{root}/ckpt", "--style", "haiku", "--format", "npz", "--out",
                                "{root}/empty"], "--out {root}/empty is a folder"),
    # --- sample
    ("sample-out-not-png", [*SAMPLE, "--out", "{root}/samples.txt"], "give a name ending in .png"),
    ("sample-out-is-a-folder", [*SAMPLE, "--out", "{root}/empty"], "--out {root}/empty is a folder"),
    ("sample-out-unwritable", [*SAMPLE, "--out", "{ro}/s.png"], "cannot write in {ro}"),
    ("sample-checkpoint-missing", ["sample", "vae", "--style", "jax", "--checkpoint", "{root}/no-such",
                                   "--out", "{root}/s.png"], "--checkpoint {root}/no-such does not exist"),
    ("sample-not-a-vae", [*SAMPLE, "--out", "{root}/s.png"], "holds a mlp, not a vae"),
    ("sample-per-class-zero", [*SAMPLE, "--per-class", "0"], "must be a positive integer, got 0"),
    ("sample-per-class-huge", [*SAMPLE, "--per-class", "1000000"], "must be at most 1000"),
    ("sample-seed-negative", [*SAMPLE, "--seed", "-1"], "must be a seed from 0"),
    # --- token data and the language model
    ("gpt-on-images", [*GPT, "--dataset", "digits"], "gpt reads token sequences and --dataset digits holds images"),
    ("mlp-on-tokens", [*TRAIN, "--dataset", "pydoc"], "mlp reads images and --dataset pydoc holds token sequences"),
    ("text-without-a-file", [*GPT, "--dataset", "text"], "--dataset text needs --text-file FILE"),
    ("text-file-missing", [*TEXT, "{root}/no-such.txt"], "--text-file {root}/no-such.txt does not exist"),
    ("text-file-is-a-folder", [*TEXT, "{root}/empty"], "{root}/empty is a folder"),
    ("text-file-empty", [*TEXT, "{root}/empty.txt"], "{root}/empty.txt is empty"),
    ("text-file-not-utf8", [*TEXT, "{root}/latin1.txt"], "is not UTF-8 text (byte 0xe9 at offset 3"),
    ("text-file-binary", [*TEXT, "{root}/nul.txt"], "holds a NUL byte"),
    ("text-block-too-long", [*TEXT, "{root}/short.txt", "--block-size", "64"],
     "--block-size 64 is too long for"),
    ("addition-digits-zero", [*GPT, "--digits", "0"], "--digits"),
    ("addition-digits-seven", [*GPT, "--digits", "7"], "--digits"),
    ("gpt-heads-do-not-divide", [*GPT, "--width", "10", "--num-heads", "4"], "4 heads do not divide width 10"),
    ("generate-an-mlp", ["generate", "gpt", "--checkpoint", "{root}/ckpt"], "holds a mlp, not a gpt"),
    ("generate-checkpoint-missing", ["generate", "gpt", "--checkpoint", "{root}/no-such"],
     "--checkpoint {root}/no-such does not exist"),
    ("generate-top-k-greedy", [*GENERATE, "--top-k", "3"], "--top-k samples, and --temperature 0 decodes"),
    ("generate-temperature-negative", [*GENERATE, "--temperature", "-1"], "--temperature"),
    ("generate-unknown-character", [*GENERATE, "--prompt", "1x"], "'x' not in the model's 10 characters"),
    ("generate-too-long", [*GENERATE, "--prompt", "12", "--max-new-tokens", "5"],
     "beyond the 3 the model was trained for"),
    ("generate-addition-too-many-digits", [*GENERATE, "--prompt", "12+3"],
     "expected A+B with numbers of at most 1 digits"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line_before_any_work(case, world, monkeypatch, capsys):
    _, args, needle = case
    monkeypatch.chdir(world.root)  # default outputs (runs/..., site/) would land in the world
    before = snapshot(world.root)
    try:
        status = main([world.expand(a) for a in args])
    except SystemExit as exit_info:  # argparse's own refusals
        status = exit_info.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert status == 2, (status, err)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("zoo"), err
    assert world.expand(needle) in err, err
    assert snapshot(world.root) == before


# Through a real process: what reaches the terminal, beyond what Python's own stderr sees.
@pytest.mark.parametrize("args", [
    [*TRAIN, "--out", "{root}/file"],
    ["site", "--out", "{root}/notes", "--models", "mlp"],
    ["copy", "mlp", "--style", "haiku", "{ro}/project"],
], ids=["train", "site", "copy"])
def test_a_real_process_prints_exactly_the_one_line(args, world):
    before = snapshot(world.root)
    proc = subprocess.run([sys.executable, "-m", "shared.cli", *map(world.expand, args)], capture_output=True,
                          text=True, timeout=120, cwd=world.root)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("zoo: error: "), proc.stderr
    assert proc.stdout == ""
    assert snapshot(world.root) == before


def test_a_damaged_checkpoint_gives_the_refusal_and_nothing_else(world, tmp_path):
    """Tensorstore completes the reads of a failed restore on Orbax's closed event loop, which
    used to print 7 to 25 'Event loop is closed' tracebacks after the refusal."""
    damaged = tmp_path / "ckpt"
    shutil.copytree(world.root / "ckpt", damaged)
    (damaged / "22" / "params" / "manifest.ocdbt").unlink()
    proc = subprocess.run([sys.executable, "-m", "shared.cli", *TRAIN[:-1], str(world.data_dir), "--epochs", "3",
                           "--resume", "--checkpoint-dir", str(damaged), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"checkpoint {damaged / '22'} is corrupted or truncated" in proc.stderr
    assert f"move {damaged / '22'} elsewhere to use step 11" in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- one writer per checkpoint folder


def zoo_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shared.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.heavy
def test_a_second_writer_is_refused_naming_the_first_and_a_killed_one_blocks_nothing(world, tmp_path, capsys):
    directory = tmp_path / "ckpt"
    args = [*[world.expand(a) for a in TRAIN], "--hidden-sizes", "8", "--checkpoint-dir", directory]
    first = zoo_process(*args, "--epochs", "100000", "--out", tmp_path / "first")
    try:
        deadline = time.monotonic() + 120
        # The lock file names its holder once the lock is held; the first checkpoint comes after.
        while not ((directory / checkpoint.LOCK_NAME).is_file()
                   and f"pid {first.pid} " in (directory / checkpoint.LOCK_NAME).read_text()
                   and checkpoint.steps(directory)):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never took the lock and saved"
            time.sleep(0.05)
        # A second process, fresh or resuming, is refused at once, and names the first.
        for extra in ([], ["--resume"]):
            second = subprocess.run([sys.executable, "-m", "shared.cli", *map(str, args), *extra, "--epochs",
                                     "100000", "--out", tmp_path / "second"], capture_output=True, text=True,
                                    timeout=120)
            assert second.returncode == 2, second.stderr
            assert second.stderr.strip().splitlines() == [
                f"zoo: error: {directory} is in use by another zoo run (pid {first.pid} on {os.uname().nodename}); "
                "wait for it to end, or choose another --checkpoint-dir"], second.stderr
            assert not (tmp_path / "second").exists()
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    # The killed run's lock is gone with it: the next run resumes at once and finishes.
    done = checkpoint.steps(directory)[-1]
    epochs = done // 11 + 1
    assert main([*map(str, args), "--resume", "--epochs", str(epochs), "--out", str(tmp_path / "third")]) == 0
    assert checkpoint.steps(directory)[-1] == 11 * epochs
    assert not (directory / checkpoint.LOCK_NAME).exists()  # released, and removed by the run that held it


@pytest.mark.heavy
def test_two_runs_started_together_on_one_folder_one_trains_and_one_is_refused(world, tmp_path):
    directory = tmp_path / "ckpt"
    args = [*[world.expand(a) for a in TRAIN], "--hidden-sizes", "8", "--epochs", "3", "--checkpoint-dir",
            directory, "--save-every", "2"]
    runs = [zoo_process(*args, "--out", tmp_path / name, "--seed", seed) for name, seed in (("a", 1), ("b", 2))]
    results = [(p.wait(timeout=240), *p.communicate()) for p in runs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    [(_, _, refusal)] = [r for r in results if r[0] == 2]
    # Refused either while the other held the folder or, had it finished first, for its checkpoints.
    assert len(refusal.strip().splitlines()) == 1 and (
        "is in use by another zoo run" in refusal or "already holds checkpoints" in refusal), refusal
    # The folder holds the winner's steps only, complete, and its metadata is the winner's seed.
    winner = 1 if results[0][0] == 0 else 2
    assert checkpoint.steps(directory) == [30, 32, 33]  # every 2 steps and at the end, the newest 3
    assert checkpoint.read_meta(directory, 33)["config"]["seed"] == winner


# --------------------------------------------------------------------------- strict JSON, finished runs


def strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which strict JSON parsers reject")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_resuming_a_finished_run_says_so_and_writes_nothing(world, capsys):
    before = snapshot(world.root)
    args = [world.expand(a) for a in TRAIN] + ["--resume", "--checkpoint-dir", str(world.root / "ckpt"),
                                               "--out", str(world.root / "ckpt-out")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"nothing to train: the newest checkpoint in {world.root / 'ckpt'} already completes "
                          "the 2 epochs of this run")
    assert snapshot(world.root) == before
    strict_json(world.root / "ckpt-out" / "metrics.json")


def test_every_json_output_is_strict(tmp_path):
    from shared import files

    payload = {"loss": float("nan"), "ms": float("inf"), "rows": [1, -float("inf"), (2.5, None)]}
    files.write_json(tmp_path / "x.json", payload)
    assert strict_json(tmp_path / "x.json") == {"loss": None, "ms": None, "rows": [1, None, [2.5, None]]}
    assert "NaN" not in files.dumps(payload)
