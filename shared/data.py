"""Datasets: TFDS builders stored as array_record, read with ``tfds.data_source``.

Every dataset here is a TensorFlow-Datasets builder owned by this project. It is
built once into the TFDS data dir (``--data-dir``, else ``$TFDS_DATA_DIR``,
else ``~/tensorflow_datasets``) as array_record files and read back with
``tfds.data_source``; TensorFlow itself is never needed. Features are stored as
``tfds.features.Tensor`` (uint8 images, int labels).

A split is read once into memory as NHWC float32 images in ``[0, 1]`` and int32
labels; batches are then gathered with numpy indexing inside a ``grain``
pipeline, which keeps the loader far faster than any train step here.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images,
  pixel values 0..16 rescaled to 0..255). The split is fixed: every fifth image
  (index 0, 5, 10, ...) is in ``test`` (360 images), the rest in ``train``
  (1,437). Works offline and builds in about a second.
- ``mnist`` and ``fashion_mnist``: the original IDX files (see :mod:`shared.mnist`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
from absl import logging as absl_logging
import numpy as np
import tensorflow_datasets as tfds

from shared import files, mnist
from shared.args import path_arg
from shared.errors import ZooError, check_choice

DATASETS = ("digits", "mnist", "fashion_mnist")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The dataset options every subcommand that reads data takes."""
    p.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="digits (embedded, offline), mnist or fashion_mnist (default: digits)")
    p.add_argument("--data-dir", type=path_arg,
                   help="TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--manual-dir", type=path_arg,
                   help="folder holding the original MNIST/Fashion-MNIST .gz files, for offline use")


def check_dirs(name: str, data_dir: str | os.PathLike | None = None,
               manual_dir: str | os.PathLike | None = None) -> None:
    """The data dir can hold (or already holds) dataset ``name``, and the manual dir is a folder.

    Called before any work starts; :func:`load` checks the same, later.
    """
    check_choice("dataset", name, DATASETS)
    if manual_dir is not None and Path(manual_dir).expanduser().exists():
        # (One that does not exist yet is where MNIST's error will say to put its files.)
        files.input_path(manual_dir, "--manual-dir", folder=True)
    folder = Path(data_dir).expanduser() if data_dir else default_data_dir()
    what = "--data-dir" if data_dir else ("$TFDS_DATA_DIR" if os.environ.get("TFDS_DATA_DIR") else "the data dir")
    if folder.exists() and not folder.is_dir():
        raise ZooError(f"{what} {folder} is a file, not a folder; give a folder for the datasets")
    cls = _builder_class(name)
    if (folder / cls.name / str(cls.VERSION)).is_dir():
        files.input_path(folder, what, folder=True)  # built already: a read-only data dir is fine
    else:
        files.output_dir(folder, what)


class ZooDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 handwritten digits, with a fixed train/test split."""

    REBUILT_WHEN_DAMAGED = True  # about a second, offline: no reason to ask the user
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Every fifth image is in test."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's bundled UCI handwritten digits, 8x8 pixels, 10 classes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(test=False),
                "test": self._generate_examples(test=True)}

    def _generate_examples(self, test: bool):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[..., None]
        for index, (image, label) in enumerate(zip(images, digits.target)):
            if (index % 5 == 0) == test:
                yield index, {"image": image, "label": int(label)}


@dataclasses.dataclass(frozen=True)
class Split:
    """One split in memory: NHWC float32 images in [0, 1] and int32 labels."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def default_data_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets").expanduser()


def _builder_class(name: str) -> type[tfds.core.GeneratorBasedBuilder]:
    return {"digits": ZooDigits, "mnist": mnist.ZooMnist, "fashion_mnist": mnist.ZooFashionMnist}[name]


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise builds (and checks) of one dataset across processes (parallel tests, two shells).

    The lock file is removed on the way out (see :func:`shared.files.acquire_lock`).
    """
    try:
        fd = files.acquire_lock(path, wait=True)
    except PermissionError:  # a read-only data dir, shared by a team: nothing is built in it
        yield
        return
    try:
        yield
    finally:
        files.release_lock(path, fd)


# Written beside a dataset once it is built: the size and sha256 of every file, checked before every read.
CHECKSUMS = "zoo-checksums.json"


def _file_sums(folder: Path) -> dict[str, dict[str, Any]]:
    sums = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CHECKSUMS:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            sums[path.name] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return sums


def _builder(cls: type[tfds.core.GeneratorBasedBuilder], data_dir: Path) -> tfds.core.DatasetBuilder:
    return cls(data_dir=str(data_dir), file_format="array_record")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


def _damage(cls: type[tfds.core.GeneratorBasedBuilder], data_dir: Path, folder: Path) -> str | None:
    """What is wrong with the built dataset in ``folder`` (None: nothing), by the checksums written at
    build time.

    A dataset built before the checksums existed is read once in full; if that works, its
    checksums are recorded now.
    """
    record = folder / CHECKSUMS
    if os.path.lexists(record) and not record.is_file():
        return f"its {CHECKSUMS} is not a file"
    if not record.exists():
        try:  # TFDS reads dataset_info.json as it makes the builder
            builder = _builder(cls, data_dir)
            if not builder.is_prepared():
                return "its dataset_info.json is missing"
            _read(builder)
        except Exception as error:  # Riegeli, TFDS and JSON errors: all mean a damaged cache here
            return f"it cannot be read: {_first_line(error)}"
        with contextlib.suppress(PermissionError):  # a read-only data dir: checked now, recorded by its owner
            files.write_text(record, json.dumps(_file_sums(folder), indent=2) + "\n")
        return None
    try:
        expected = json.loads(record.read_text())
    except (ValueError, RecursionError):  # not UTF-8 either; nested beyond Python's stack
        return f"its {CHECKSUMS} is not valid JSON"
    if not (isinstance(expected, dict) and expected and all(
            isinstance(v, dict) and set(v) == {"size", "sha256"} for v in expected.values())):
        return f"its {CHECKSUMS} is not what zoo writes"
    found = _file_sums(folder)
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"{missing[0]} is missing"
    for name, want in expected.items():
        if found[name] != want:
            what = "size" if found[name]["size"] != want["size"] else "sha256"
            return f"{name} does not have its recorded {what}"
    return None


def prepare(name: str, data_dir: str | os.PathLike | None = None,
            manual_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
    """Build ``name`` into the data dir unless it is there already and whole; return its builder.

    A built dataset is checked against the checksums recorded when it was built. A damaged
    digits cache is rebuilt at once (it takes a second); a damaged MNIST cache is refused with
    the folder to delete, since rebuilding it needs the original files.
    """
    check_dirs(name, data_dir, manual_dir)
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    cls = _builder_class(name)
    absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS warns about a not-yet-built folder
    folder = data_dir / cls.name / str(cls.VERSION)
    made = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
    data_dir.mkdir(parents=True, exist_ok=True)
    new = [p for p in (data_dir / cls.name, data_dir / "downloads") if not os.path.lexists(p)]
    try:
        with _lock(data_dir / f".{cls.name}.lock"):
            return _prepare_locked(name, cls, data_dir, folder, manual_dir)
    except BaseException:
        # A build that failed takes back what it made: this dataset's folder, TFDS's downloads/
        # while it holds no file (other datasets may share it), and the folders made for them.
        if data_dir / cls.name in new:
            shutil.rmtree(data_dir / cls.name, ignore_errors=True)
        if data_dir / "downloads" in new and not any(f for *_, f in os.walk(data_dir / "downloads")):
            shutil.rmtree(data_dir / "downloads", ignore_errors=True)
        for made_dir in made:
            with contextlib.suppress(OSError):
                made_dir.rmdir()
        raise


def _prepare_locked(name: str, cls: type[tfds.core.GeneratorBasedBuilder], data_dir: Path, folder: Path,
                    manual_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
    if os.path.lexists(folder) and (folder.is_symlink() or not folder.is_dir()):
        problem = "it is not a folder"
    else:
        problem = _damage(cls, data_dir, folder) if folder.exists() else None
    if problem and getattr(cls, "REBUILT_WHEN_DAMAGED", False):
        print(f"zoo: the {name} dataset in {folder} was damaged ({problem}); rebuilding it", file=sys.stderr)
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
        else:
            folder.unlink()
    elif problem:
        raise ZooError(f"the {name} dataset in {folder} is damaged ({problem}); delete {folder} and run "
                       f"again to rebuild it (offline, give the original .gz files with --manual-dir)")
    builder = _builder(cls, data_dir)
    if not builder.is_prepared():
        tfds.disable_progress_bar()
        config = tfds.download.DownloadConfig(
            manual_dir=str(Path(manual_dir).expanduser()) if manual_dir else None)
        # TFDS prints what it builds on stdout: kept from stdout (results, zoo compare --json)
        # and from stderr (one line of ours says it instead).
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(download_config=config)
        except PermissionError as error:
            raise ZooError(f"cannot write the dataset to {data_dir}: {error}; "
                           "pick another folder with --data-dir") from None
        files.write_text(folder / CHECKSUMS, json.dumps(_file_sums(folder), indent=2) + "\n")
        print(f"zoo: built the {name} dataset in {folder}", file=sys.stderr)
    return builder


def read_split(source) -> Split:
    records = source.__getitems__(range(len(source)))
    images = np.stack([r["image"] for r in records]).astype(np.float32) / 255.0
    labels = np.asarray([r["label"] for r in records], dtype=np.int32)
    return Split(images, labels)


def _read(builder: tfds.core.DatasetBuilder) -> Dataset:
    sources = tfds.data_source(builder.name, data_dir=builder.data_dir_root,
                               builder_kwargs={"file_format": "array_record"})
    num_classes = builder.info.features["label"].num_classes
    name = next(n for n in DATASETS if _builder_class(n).name == builder.name)
    return Dataset(name, read_split(sources["train"]), read_split(sources["test"]), num_classes)


def load(name: str, data_dir: str | os.PathLike | None = None,
         manual_dir: str | os.PathLike | None = None) -> Dataset:
    """Build (first time only) and read a dataset into memory."""
    builder = prepare(name, data_dir, manual_dir)
    try:
        return _read(builder)
    except Exception as error:  # changed between the check and the read: still one line
        folder = Path(builder.data_dir)
        raise ZooError(f"the {name} dataset in {folder} cannot be read ({_first_line(error)}); "
                       f"delete {folder} and run again to rebuild it") from None


def train_batches(split: Split, batch_size: int, seed: int, epoch: int) -> grain.MapDataset:
    """The batches of one training epoch, shuffled by ``(seed, epoch)``.

    Random access (``batches[i]``) makes the order exactly reproducible and
    resumable from any step. The last partial batch is dropped so that every
    step has the same shape; the next epoch's shuffle puts those examples
    elsewhere.

    The epoch's permutation is drawn once with numpy and each batch is one
    fancy-indexing gather. (``MapDataset.shuffle(...).batch(...)`` looks up
    every example's shuffled index one at a time, about 30 us each: 4 ms for a
    batch of 128, slower than every train step here; ``zoo bench`` measures it.)
    """
    if batch_size > len(split):
        raise ZooError(f"batch size {batch_size} is larger than the {len(split)} training examples")
    order = np.random.default_rng(_epoch_seed(seed, epoch)).permutation(len(split))

    def gather(step: int) -> dict[str, np.ndarray]:
        index = order[step * batch_size:(step + 1) * batch_size]
        return {"image": split.images[index], "label": split.labels[index]}

    return grain.MapDataset.range(len(split) // batch_size).map(gather)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def eval_batches(split: Split, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order. The last batch is padded to full size and
    carries a ``mask`` that is 0 on the padding, so nothing is dropped."""
    for start in range(0, len(split), batch_size):
        index = np.arange(start, start + batch_size)
        mask = index < len(split)
        index = np.where(mask, index, len(split) - 1)
        yield {"image": split.images[index], "label": split.labels[index],
               "mask": mask.astype(np.float32)}
