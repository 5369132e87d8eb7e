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


def test_image_datasets_have_no_vocabulary(digits):
    assert digits.kind == "images" and digits.vocab is None and not digits.answer
    assert digits.provenance == {} and digits.options == {}
    with pytest.raises(ZooError, match="holds images"):
        digits.encode("1")


# --------------------------------------------------------------------------- token datasets


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message and "\r" not in message
    return message


@pytest.fixture(scope="module")
def addition(data_dir):
    return data.load("addition", data_dir, digits=2)


def whole_sequences(split: data.Split) -> np.ndarray:
    """The stored sequences again: the inputs and the last target."""
    return np.concatenate([split.images, split.labels[:, -1:]], axis=1)


def test_addition_shapes_mask_and_vocabulary(addition):
    assert (len(addition.test), len(addition.train)) == (2000, 8000) == data.addition_split_sizes(2)
    assert addition.kind == "tokens" and addition.answer
    assert addition.in_shape == (6,) and addition.num_classes == 10
    assert addition.vocab == tuple("0123456789")
    assert addition.options == {"digits": 2} and addition.provenance["digits"] == 2
    for split in (addition.train, addition.test):
        assert split.images.dtype == np.int32 and split.labels.dtype == np.int32
        assert split.images.shape == split.labels.shape == (len(split), 6)
        assert (split.labels[:, :3] == -1).all()  # 2n - 1 targets masked: only the sum's digits count
        assert split.labels[:, 3:].min() >= 0 and split.labels[:, 3:].max() <= 9
        np.testing.assert_array_equal(split.labels[:, 3:-1], split.images[:, 4:])  # the next token
        assert split.images.min() >= 0 and split.images.max() <= 9


def test_addition_sums_are_right_and_reversed(addition):
    for split in (addition.train, addition.test):
        seq = whole_sequences(split).astype(np.int64)
        a = seq[:, 0] * 10 + seq[:, 1]
        b = seq[:, 2] * 10 + seq[:, 3]
        c = seq[:, 4] + seq[:, 5] * 10 + seq[:, 6] * 100  # least significant digit first
        np.testing.assert_array_equal(a + b, c)
    # One by hand: 73 + 35 = 108, stored as 7 3 3 5 then 8 0 1.
    row = next(r for r in whole_sequences(addition.train) if addition.decode(r[:4]) == "7335")
    assert addition.decode(row) == "7335801"


def test_addition_splits_are_disjoint_and_together_every_problem(addition):
    test = {tuple(r) for r in addition.test.images[:, :4].tolist()}
    train = {tuple(r) for r in addition.train.images[:, :4].tolist()}
    assert len(test) == 2000 and len(train) == 8000 and not test & train
    assert len(test | train) == 10**4  # all problems of two digits


def test_addition_splits_are_fixed_and_the_same_after_a_rebuild(addition, tmp_path, capsys):
    first = data.load("addition", tmp_path, digits=2)
    shutil.rmtree(tmp_path / "zoo_addition" / "digits2")
    again = data.load("addition", tmp_path, digits=2)
    assert capsys.readouterr().err.count("built the addition dataset") == 2
    for split in ("train", "test"):
        for built in (first, again):
            np.testing.assert_array_equal(getattr(built, split).images, getattr(addition, split).images)
            np.testing.assert_array_equal(getattr(built, split).labels, getattr(addition, split).labels)
    # The order is a property of the seed alone: the test problems come first.
    order = data.addition_order(2, 10**4)
    np.testing.assert_array_equal(whole_sequences(addition.test), data.addition_sequences(order[:2000], 2))
    np.testing.assert_array_equal(whole_sequences(addition.train), data.addition_sequences(order[2000:], 2))


def test_addition_of_three_digits_tests_on_thousands_of_problems():
    test, train = data.addition_split_sizes(3)
    assert test >= 5000 and (test, train) == (10_000, 50_000)
    for digits in range(1, data.MAX_DIGITS + 1):
        test, train = data.addition_split_sizes(digits)
        order = data.addition_order(digits, test + train)
        assert len(np.unique(order)) == test + train and 0 <= order.min() and order.max() < 10 ** (2 * digits)
    assert data.addition_split_sizes(1) == (20, 80)


def test_a_built_dataset_is_read_not_rebuilt(addition, data_dir, capsys):
    again = data.load("addition", data_dir, digits=2)
    assert "built" not in capsys.readouterr().err
    np.testing.assert_array_equal(again.test.labels, addition.test.labels)


def test_a_damaged_addition_cache_is_rebuilt(tmp_path, capsys):
    first = data.load("addition", tmp_path, digits=1)
    flip_a_byte(tmp_path / "zoo_addition" / "digits1" / "1.0.0")
    again = data.load("addition", tmp_path, digits=1)
    assert "was damaged" in capsys.readouterr().err
    np.testing.assert_array_equal(again.train.images, first.train.images)


def test_encode_and_decode_round_trip(addition):
    ids = addition.encode("0123456789")
    assert ids.dtype == np.int32 and ids.tolist() == list(range(10))
    assert addition.decode(ids) == "0123456789" and addition.decode([]) == ""
    row = addition.test.images[0]
    np.testing.assert_array_equal(addition.encode(addition.decode(row)), row)
    with pytest.raises(ZooError) as error:
        addition.encode("12+3")
    assert "'+'" in one_line(error)
    with pytest.raises(ZooError) as error:
        addition.decode([1, -1])
    assert "-1" in one_line(error)


def test_token_splits_batch_like_images(addition):
    batch = data.train_batches(addition.train, 32, seed=0, epoch=0)[0]
    assert batch["image"].shape == batch["label"].shape == (32, 6) and batch["image"].dtype == np.int32
    last = list(data.eval_batches(addition.test, 300))[-1]
    assert last["image"].shape == (300, 6) and int(last["mask"].sum()) == 2000 % 300


def test_options_that_do_not_apply_are_ignored(digits, data_dir):
    again = data.load("digits", data_dir, digits=99, block_size=-1, text_file="no such file")
    np.testing.assert_array_equal(again.test.labels, digits.test.labels)


@pytest.mark.parametrize("digits_", [0, 7, True, 2.0])
def test_digits_out_of_range_are_refused(digits_, data_dir):
    with pytest.raises(ZooError) as error:
        data.load("addition", data_dir, digits=digits_)
    assert "--digits" in one_line(error)


def test_pydoc_provenance_windows_and_split(data_dir):
    import hashlib
    import platform

    pydoc = data.load("pydoc", data_dir)
    text = data.pydoc_text()
    assert pydoc.provenance["python_version"] == platform.python_version()
    assert pydoc.provenance["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert pydoc.options == {"block_size": 64} and pydoc.kind == "tokens" and not pydoc.answer
    assert pydoc.vocab == tuple(sorted(set(text))) and pydoc.num_classes == len(pydoc.vocab)
    assert pydoc.in_shape == (64,)
    start = len(text) - len(text) // 10  # the last 10% is test
    assert (len(pydoc.train), len(pydoc.test)) == ((start - 1) // 64, (len(text) - start - 1) // 64)
    for split, offset in ((pydoc.train, 0), (pydoc.test, start)):
        assert (split.labels >= 0).all() and split.images.dtype == split.labels.dtype == np.int32
        np.testing.assert_array_equal(split.labels[:, :-1], split.images[:, 1:])
        np.testing.assert_array_equal(split.labels[:-1, -1], split.images[1:, 0])  # windows share one character
        for i in (0, len(split) - 1):
            assert pydoc.decode(split.images[i]) == text[offset + 64 * i:offset + 64 * (i + 1)]
            assert pydoc.decode(split.labels[i]) == text[offset + 64 * i + 1:offset + 64 * (i + 1) + 1]


def test_pydoc_block_size_too_long_is_refused(data_dir):
    with pytest.raises(ZooError) as error:
        data.load("pydoc", data_dir, block_size=10**6)
    assert "--block-size 1000000 is too long" in one_line(error) and "at most" in one_line(error)


TEXT = "First Citizen:\nBefore we proceed any further, hear me speak — ça suffit.\n\n" * 20


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_a_text_file_is_a_character_dataset(text_file, data_dir, capsys):
    import hashlib

    small = data.load("text", data_dir, text_file=text_file, block_size=16)
    assert small.vocab == tuple(sorted(set(TEXT))) and small.in_shape == (16,)
    assert small.options == {"text_file": str(text_file.resolve()), "block_size": 16}
    assert small.provenance["path"] == str(text_file.resolve())
    assert small.provenance["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    start = len(TEXT) - len(TEXT) // 10
    assert (len(small.train), len(small.test)) == ((start - 1) // 16, (len(TEXT) - start - 1) // 16)
    assert small.decode(small.test.images[0]) == TEXT[start:start + 16]
    assert small.decode(small.test.labels[0]) == TEXT[start + 1:start + 17]
    assert small.decode(small.train.images[3]) == TEXT[48:64]
    # Read again, not rebuilt; an edited file is another dataset.
    capsys.readouterr()
    data.load("text", data_dir, text_file=text_file, block_size=16)
    assert "built" not in capsys.readouterr().err
    text_file.write_text(TEXT + "Speak, speak.\n", encoding="utf-8")
    edited = data.load("text", data_dir, text_file=text_file, block_size=16)
    assert "built the text dataset" in capsys.readouterr().err
    assert edited.provenance["sha256"] != small.provenance["sha256"] and "," in edited.vocab


def write_missing(path: Path) -> None:
    pass


def write_folder(path: Path) -> None:
    path.mkdir()


def write_empty(path: Path) -> None:
    path.write_bytes(b"")


def write_latin1(path: Path) -> None:
    path.write_bytes("Ça ira, ça ira.\n".encode("latin-1") * 50)


def write_nul(path: Path) -> None:
    path.write_bytes(b"text, then a NUL\0 and more text\n" * 50)


REFUSALS = {write_missing: "does not exist", write_folder: "is a folder", write_empty: "is empty",
            write_latin1: "is not UTF-8 text", write_nul: "NUL"}


@pytest.mark.parametrize("write", REFUSALS, ids=[w.__name__ for w in REFUSALS])
def test_a_bad_text_file_is_refused_in_one_line_before_any_work(write, tmp_path):
    path = tmp_path / "corpus.txt"
    write(path)
    for call in (data.check_dirs, data.load):
        with pytest.raises(ZooError) as error:
            call("text", tmp_path / "tfds", text_file=path)
        assert REFUSALS[write] in one_line(error) and str(path) in one_line(error)
    assert not (tmp_path / "tfds").exists()  # nothing made


def test_text_needs_a_text_file(tmp_path):
    for call in (data.check_dirs, data.load):
        with pytest.raises(ZooError) as error:
            call("text", tmp_path / "tfds")
        assert "--dataset text needs --text-file FILE" in one_line(error)


@pytest.mark.parametrize("block_size", [len(TEXT) // 10, 10**6])
def test_a_block_size_the_text_is_too_short_for_is_refused(block_size, text_file, tmp_path):
    for call in (data.check_dirs, data.load):
        with pytest.raises(ZooError) as error:
            call("text", tmp_path / "tfds", text_file=text_file, block_size=block_size)
        assert f"--block-size {block_size} is too long" in one_line(error)
        assert f"at most {len(TEXT) // 10 - 1}" in one_line(error)
    assert not (tmp_path / "tfds").exists()
    data.load("text", tmp_path / "tfds", text_file=text_file, block_size=len(TEXT) // 10 - 1)  # the longest


def test_a_text_too_short_for_any_window_says_so(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("tiny")
    with pytest.raises(ZooError) as error:
        data.check_dirs("text", tmp_path / "tfds", text_file=path, block_size=1)
    assert "longer text" in one_line(error)


def test_the_data_arguments():
    from shared.args import Parser

    parser = Parser(prog="zoo")
    data.add_data_args(parser)
    args = parser.parse_args([])
    assert (args.dataset, args.digits, args.block_size, args.text_file) == (None, 3, 64, None)
    args = parser.parse_args(["--dataset", "text", "--text-file", "~/t.txt", "--block-size", "8", "--digits", "6"])
    assert args.dataset == "text" and args.block_size == 8 and args.digits == 6
    assert args.text_file == str(Path("~/t.txt").expanduser())
    assert set(data.DATASETS) == {"digits", "mnist", "fashion_mnist", "addition", "pydoc", "text"}
    for bad in (["--digits", "7"], ["--digits", "0"], ["--block-size", "0"], ["--text-file", ""],
                ["--dataset", "shakespeare"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
