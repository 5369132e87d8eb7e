"""The digits dataset and the batching shared by every style."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from shared import data
from shared.styles import ZooError


def test_digits_split_shapes_and_ranges(digits):
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.in_shape == (8, 8, 1) and digits.num_classes == 10
    for split in (digits.train, digits.test):
        assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
        assert split.images.min() == 0.0 and split.images.max() == 1.0
        assert set(np.unique(split.labels)) == set(range(10))


def test_digits_test_split_is_every_fifth_image(digits):
    from sklearn.datasets import load_digits

    raw = load_digits()
    expected = np.rint(raw.images[::5] * (255 / 16)).astype(np.float32)[..., None] / 255
    # TFDS stores records in its own order: compare as sorted multisets of (label, pixels).
    def rows(images, labels):
        flat = np.concatenate([labels[:, None].astype(np.float32), images.reshape(len(labels), -1)], 1)
        return flat[np.lexsort(flat.T[::-1])]

    np.testing.assert_array_equal(rows(digits.test.images, digits.test.labels),
                                  rows(expected, raw.target[::5]))


def test_shuffle_is_deterministic_per_seed_and_epoch(digits):
    a = data.train_batches(digits.train, 32, seed=1, epoch=0)
    b = data.train_batches(digits.train, 32, seed=1, epoch=0)
    c = data.train_batches(digits.train, 32, seed=1, epoch=1)
    d = data.train_batches(digits.train, 32, seed=2, epoch=0)
    np.testing.assert_array_equal(a[3]["image"], b[3]["image"])
    assert not np.array_equal(a[3]["image"], c[3]["image"])
    assert not np.array_equal(a[3]["image"], d[3]["image"])
    assert len(a) == 1437 // 32 and a[0]["image"].shape == (32, 8, 8, 1)


def test_an_epoch_sees_every_example_at_most_once():
    """Examples numbered by their label: one epoch's batches are a permutation, minus the remainder."""
    n = 103
    split = data.Split(np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), np.arange(n, dtype=np.int32))
    batches = data.train_batches(split, 10, seed=0, epoch=0)
    seen = np.concatenate([batches[i]["label"] for i in range(len(batches))])
    assert len(batches) == 10 and len(seen) == 100 and len(set(seen.tolist())) == 100
    for i in range(len(batches)):
        np.testing.assert_array_equal(batches[i]["image"][:, 0, 0, 0], batches[i]["label"])
    assert not np.array_equal(seen, np.arange(100))  # shuffled


def test_eval_batches_cover_every_example_once(digits):
    seen = []
    for batch in data.eval_batches(digits.test, 128):
        assert batch["image"].shape[0] == 128
        seen.append(batch["label"][batch["mask"] > 0])
    assert sum(len(s) for s in seen) == 360
    np.testing.assert_array_equal(np.concatenate(seen), digits.test.labels)


def test_second_load_reads_the_built_dataset(digits, data_dir):
    again = data.load("digits", data_dir)
    np.testing.assert_array_equal(again.train.labels, digits.train.labels)


def test_unknown_dataset_names_the_choices(data_dir):
    with pytest.raises(ZooError, match="digits, mnist, fashion_mnist"):
        data.load("cifar", data_dir)


def test_batch_larger_than_split_is_refused(digits):
    with pytest.raises(ZooError, match="larger than"):
        data.train_batches(digits.test, 1000, seed=0, epoch=0)


# --------------------------------------------------------------------------- a damaged cache


def _files(folder: Path) -> dict[str, Path]:
    return {p.name.split("-")[1].split(".")[0] if "array_record" in p.name else p.name: p for p in folder.iterdir()}


def truncate_train(folder: Path) -> None:
    path = _files(folder)["train"]
    path.write_bytes(path.read_bytes()[:1000])


def flip_a_byte(folder: Path) -> None:
    path = _files(folder)["test"]
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def delete_train(folder: Path) -> None:
    _files(folder)["train"].unlink()


def delete_info(folder: Path) -> None:
    (folder / "dataset_info.json").unlink()


def break_info(folder: Path) -> None:
    (folder / "dataset_info.json").write_text('{"name": "zoo_dig')


def checksums_of_another_shape(folder: Path) -> None:
    (folder / data.CHECKSUMS).write_text("[]")


def version_is_a_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("not a folder")


DAMAGES = (truncate_train, flip_a_byte, delete_train, delete_info, break_info, checksums_of_another_shape,
           version_is_a_file)


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.__name__ for d in DAMAGES])
def test_a_damaged_digits_cache_is_rebuilt_and_reads_the_same(damage, digits, tmp_path, capsys):
    data.load("digits", tmp_path)
    folder = tmp_path / "zoo_digits" / "1.0.0"
    assert (folder / data.CHECKSUMS).is_file()
    damage(folder)
    capsys.readouterr()
    again = data.load("digits", tmp_path)
    assert "was damaged" in capsys.readouterr().err
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(again, split).images, getattr(digits, split).images)
        np.testing.assert_array_equal(getattr(again, split).labels, getattr(digits, split).labels)
    # Rebuilt whole: the next load finds nothing wrong and says nothing.
    data.load("digits", tmp_path)
    assert "damaged" not in capsys.readouterr().err


def test_a_cache_built_before_the_checksums_is_checked_by_reading_it_then_recorded(digits, tmp_path):
    data.load("digits", tmp_path)
    record = tmp_path / "zoo_digits" / "1.0.0" / data.CHECKSUMS
    sums = record.read_text()
    record.unlink()
    data.load("digits", tmp_path)
    assert record.read_text() == sums
