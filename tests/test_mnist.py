"""shared.mnist: IDX parsing, checksums, where the files come from, and real MNIST test data.

No test touches the network: the connection probe is patched to say offline
(or, for the download path, the download manager is patched to copy files).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds

from shared import data, mnist
from shared.styles import ZooError

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
REAL_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
N_TRAIN, N_TEST = 20, 10
REAL_REACHABLE = mnist._reachable  # before the autouse fixture replaces it


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every test is offline unless it says otherwise."""
    monkeypatch.setattr(mnist, "_reachable", lambda *args, **kwargs: False)


def write_idx(path: Path, array: np.ndarray) -> None:
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as handle:
        handle.write(header + array.tobytes())


def checksum(path: Path) -> tuple[int, str]:
    return path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images (N, 28, 28) with distinct pixel sums, and labels covering 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = 0
    images[:, 0, 1] = np.arange(n)  # makes every image distinct
    images[0, 1, 1], images[0, 1, 2] = 0, 255  # the first image spans 0..255
    return images, (np.arange(n) % 10).astype(np.uint8)


def write_files(folder: Path, monkeypatch, dataset: str = "mnist",
                files=mnist.FILES, seed: int = 0) -> dict[str, np.ndarray]:
    """Write small IDX files for ``files`` into ``folder``; patch CHECKSUMS to match them."""
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic(N_TRAIN, seed)
    test_images, test_labels = synthetic(N_TEST, seed + 1)
    arrays = {mnist.TRAIN_IMAGES: train_images, mnist.TRAIN_LABELS: train_labels,
              mnist.TEST_IMAGES: test_images, mnist.TEST_LABELS: test_labels}
    for filename in files:
        write_idx(folder / filename, arrays[filename])
        monkeypatch.setitem(mnist.CHECKSUMS[dataset], filename, checksum(folder / filename))
    return arrays


def canonical(images: np.ndarray, labels: np.ndarray):
    """Images and labels in an order that depends only on the content (TFDS shuffles records)."""
    flat = images.reshape(len(images), -1)
    order = np.lexsort(np.vstack([flat.T[::-1], labels[None]]))  # by label, then every pixel
    return flat[order], labels[order]


def assert_split(split: data.Split, images: np.ndarray, labels: np.ndarray) -> None:
    assert split.images.shape == (len(labels), 28, 28, 1)
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert 0.0 <= split.images.min() and split.images.max() <= 1.0
    got_images, got_labels = canonical(np.rint(split.images * 255).astype(np.uint8), split.labels)
    want_images, want_labels = canonical(images, labels.astype(np.int32))
    np.testing.assert_array_equal(got_labels, want_labels)
    np.testing.assert_array_equal(got_images, want_images)


def assert_not_prepared(data_dir: Path, cls=mnist.ZooMnist) -> None:
    assert not cls(data_dir=str(data_dir), file_format="array_record").is_prepared()
    assert not list(data_dir.rglob("dataset_info.json"))
    assert not [p for p in data_dir.rglob("*") if "incomplete" in p.name]


def test_builds_from_manual_dir(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    arrays = write_files(manual, monkeypatch)
    dataset = data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)
    assert dataset.num_classes == 10 and dataset.in_shape == (28, 28, 1)
    assert_split(dataset.train, arrays[mnist.TRAIN_IMAGES], arrays[mnist.TRAIN_LABELS])
    assert_split(dataset.test, arrays[mnist.TEST_IMAGES], arrays[mnist.TEST_LABELS])
    assert dataset.train.images.max() == 1.0 and dataset.train.images.min() == 0.0
    builder = mnist.ZooMnist(data_dir=str(tmp_path / "data"), file_format="array_record")
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == N_TRAIN
    assert builder.info.splits["test"].num_examples == N_TEST


def test_keys_are_idx_indices(tmp_path):
    images, labels = synthetic(N_TEST, 3)
    builder = mnist.ZooMnist(data_dir=str(tmp_path), file_format="array_record")
    examples = list(builder._generate_examples(images[..., None], labels))
    assert [key for key, _ in examples] == list(range(N_TEST))
    for index, (_, example) in enumerate(examples):
        assert example["label"] == labels[index] and isinstance(example["label"], int)
        np.testing.assert_array_equal(example["image"][..., 0], images[index])


def test_default_manual_dir_subfolder_and_fashion(tmp_path, monkeypatch):
    """Without --manual-dir the files are found in <data_dir>/downloads/manual/<dataset>/."""
    data_dir = tmp_path / "data"
    arrays = write_files(data_dir / "downloads" / "manual" / "fashion_mnist", monkeypatch,
                         dataset="fashion_mnist", seed=5)
    dataset = data.load("fashion_mnist", data_dir=data_dir)
    assert_split(dataset.test, arrays[mnist.TEST_IMAGES], arrays[mnist.TEST_LABELS])
    builder = mnist.ZooFashionMnist(data_dir=str(data_dir), file_format="array_record")
    assert builder.info.features["label"].names[9] == "Ankle boot"


def test_default_manual_dir_flat(tmp_path, monkeypatch):
    """Files directly in TFDS's default manual dir are accepted too."""
    data_dir = tmp_path / "data"
    arrays = write_files(data_dir / "downloads" / "manual", monkeypatch)
    dataset = data.load("mnist", data_dir=data_dir)
    assert_split(dataset.train, arrays[mnist.TRAIN_IMAGES], arrays[mnist.TRAIN_LABELS])


def test_downloads_when_online(tmp_path, monkeypatch):
    """Files missing locally and the host reachable: the TFDS download manager fetches them."""
    source = tmp_path / "mirror"
    arrays = write_files(source, monkeypatch)
    requested = {}

    def fake_download(self, urls):
        requested.update(urls)
        target = tmp_path / "data" / "downloads"
        target.mkdir(parents=True, exist_ok=True)
        for filename in urls:
            shutil.copy(source / filename, target / f"fake_{filename}")
        return {filename: target / f"fake_{filename}" for filename in urls}

    monkeypatch.setattr(mnist, "_reachable", lambda *args, **kwargs: True)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
    (tmp_path / "empty").mkdir()
    dataset = data.load("mnist", data_dir=tmp_path / "data", manual_dir=tmp_path / "empty")
    assert requested == {f: "https://storage.googleapis.com/cvdf-datasets/mnist/" + f
                         for f in mnist.FILES}
    assert_split(dataset.test, arrays[mnist.TEST_IMAGES], arrays[mnist.TEST_LABELS])


def test_download_failure_is_a_zoo_error(tmp_path, monkeypatch):
    def failing_download(self, urls):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(mnist, "_reachable", lambda *args, **kwargs: True)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", failing_download)
    (tmp_path / "manual").mkdir()
    with pytest.raises(ZooError, match="connection reset.*--manual-dir"):
        data.load("mnist", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    assert_not_prepared(tmp_path / "data")


def test_wrong_checksum(tmp_path, monkeypatch):
    manual = tmp_path / "manual"
    write_files(manual, monkeypatch)
    bad = manual / mnist.TRAIN_LABELS
    write_idx(bad, np.zeros(N_TRAIN, np.uint8))  # a valid IDX file, but not the published one
    before = bad.read_bytes(), os.stat(bad).st_mtime_ns
    expected = mnist.CHECKSUMS["mnist"][mnist.TRAIN_LABELS][1]
    actual = hashlib.sha256(before[0]).hexdigest()
    with pytest.raises(ZooError) as error:
        data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)
    message = str(error.value)
    assert str(bad) in message and expected in message and actual in message
    assert "Delete or replace" in message
    assert (bad.read_bytes(), os.stat(bad).st_mtime_ns) == before
    assert sorted(p.name for p in manual.iterdir()) == sorted(mnist.FILES)
    assert_not_prepared(tmp_path / "data")


def test_wrong_checksum_names_the_other_dataset(tmp_path, monkeypatch):
    """A Fashion-MNIST file in the MNIST folder is recognised by its checksum."""
    manual = tmp_path / "manual"
    write_files(manual, monkeypatch)
    write_files(tmp_path / "fashion", monkeypatch, dataset="fashion_mnist", seed=7)
    shutil.copy(tmp_path / "fashion" / mnist.TEST_IMAGES, manual / mnist.TEST_IMAGES)
    with pytest.raises(ZooError, match="it is fashion_mnist's t10k-images-idx3-ubyte.gz"):
        data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)


@pytest.mark.parametrize("damage", ["truncated", "truncated_gzip", "bad_magic", "bad_dims",
                                    "count_mismatch", "not_gzip"])
def test_bad_idx_files(tmp_path, monkeypatch, damage):
    manual = tmp_path / "manual"
    write_files(manual, monkeypatch)
    target = manual / (mnist.TEST_LABELS if damage == "count_mismatch" else mnist.TRAIN_IMAGES)
    images = synthetic(N_TRAIN, 0)[0]
    if damage == "truncated":
        raw = gzip.decompress((target).read_bytes())
        with open(target, "wb") as raw_file, gzip.GzipFile(fileobj=raw_file, mode="wb") as handle:
            handle.write(raw[:-100])
        match = "truncated"
    elif damage == "truncated_gzip":
        target.write_bytes(target.read_bytes()[:-200])
        match = "not a readable gzip file"
    elif damage == "bad_magic":
        raw = bytearray(gzip.decompress(target.read_bytes()))
        raw[2:4] = b"\x08\x01"
        target.write_bytes(gzip.compress(bytes(raw)))
        match = "magic number"
    elif damage == "bad_dims":
        write_idx(target, np.zeros((N_TRAIN, 14, 56), np.uint8))
        match = "14x56 images"
    elif damage == "count_mismatch":
        write_idx(target, np.zeros(N_TEST - 1, np.uint8))
        match = "holds 10 images but"
    else:
        target.write_bytes(images.tobytes()[:5000])
        match = "not a readable gzip file"
    monkeypatch.setitem(mnist.CHECKSUMS["mnist"], target.name, checksum(target))
    with pytest.raises(ZooError, match=match) as error:
        data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)
    assert str(target) in str(error.value)
    assert_not_prepared(tmp_path / "data")


def test_offline_without_files_names_them_and_the_folder(tmp_path):
    manual = tmp_path / "my manual"
    with pytest.raises(ZooError) as error:
        data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)
    message = str(error.value)
    for filename in mnist.FILES:
        assert filename in message
    assert f"in {manual}/" in message and "--manual-dir" in message
    assert "storage.googleapis.com" in message
    assert_not_prepared(tmp_path / "data")


def test_offline_default_folder_and_only_missing_files(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    folder = data_dir / "downloads" / "manual" / "mnist"
    write_files(folder, monkeypatch, files=(mnist.TEST_IMAGES, mnist.TEST_LABELS))
    with pytest.raises(ZooError) as error:
        data.load("mnist", data_dir=data_dir)
    message = str(error.value)
    assert f"put {mnist.TRAIN_IMAGES}, {mnist.TRAIN_LABELS} in {folder}/" in message
    assert mnist.TEST_IMAGES not in message
    assert_not_prepared(data_dir)


def test_reachable_probe_fails_fast_on_a_closed_port():
    """The real probe, on localhost only: a closed port answers False at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connection refused
        assert REAL_REACHABLE(f"http://127.0.0.1:{port}/", timeout=1.0) is False
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert REAL_REACHABLE(f"http://127.0.0.1:{server.getsockname()[1]}/", timeout=1.0)


def real_dir() -> Path:
    if not all((REAL_DIR / f).is_file() for f in (mnist.TEST_IMAGES, mnist.TEST_LABELS)):
        pytest.skip(f"the real MNIST test files are not in {REAL_DIR}")
    return REAL_DIR


def test_real_test_files_match_the_published_checksums():
    folder = real_dir()
    for filename in (mnist.TEST_IMAGES, mnist.TEST_LABELS):
        mnist.verify_checksum("mnist", filename, folder / filename)  # the real, unpatched table
    md5sums = folder / "MD5SUMS"
    if md5sums.is_file():
        for line in md5sums.read_text().splitlines():
            digest, filename = line.split()
            assert hashlib.md5((folder / filename).read_bytes()).hexdigest() == digest


def test_real_mnist_test_split(tmp_path, monkeypatch):
    folder = real_dir()
    manual = tmp_path / "manual"
    write_files(manual, monkeypatch, files=(mnist.TRAIN_IMAGES, mnist.TRAIN_LABELS))
    for filename in (mnist.TEST_IMAGES, mnist.TEST_LABELS):
        shutil.copy(folder / filename, manual / filename)
    dataset = data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)
    test = dataset.test
    assert len(test) == 10_000 and test.images.shape == (10_000, 28, 28, 1)
    assert test.images.dtype == np.float32 and test.labels.dtype == np.int32
    assert test.images.min() == 0.0 and test.images.max() == 1.0
    assert np.bincount(test.labels, minlength=10).tolist() == REAL_TEST_LABEL_COUNTS
    assert len(dataset.train) == N_TRAIN
    # The same content as parsing the IDX files directly.
    images, labels = mnist.read_split(folder / mnist.TEST_IMAGES, folder / mnist.TEST_LABELS)
    assert_split(test, images, labels)


def test_a_damaged_mnist_cache_is_refused_with_the_folder_to_delete(tmp_path, monkeypatch):
    """MNIST needs its original files to be rebuilt, so a damaged cache is refused, never a Riegeli
    or KeyError traceback, and the folder is left for the user to look at and delete."""
    manual = tmp_path / "manual"
    write_files(manual, monkeypatch)
    data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)
    folder = tmp_path / "data" / "zoo_mnist" / "1.0.0"
    [train] = folder.glob("*-train.array_record*")
    train.write_bytes(train.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(ZooError) as error:
        data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)
    assert str(error.value) == (f"the mnist dataset in {folder} is damaged ({train.name} does not have its "
                                f"recorded size); delete {folder} and run again to rebuild it (offline, give the "
                                "original .gz files with --manual-dir)")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (folder / "dataset_info.json").unlink()
    with pytest.raises(ZooError, match="is damaged"):
        data.load("mnist", data_dir=tmp_path / "data", manual_dir=manual)
