"""The language model from the command line: train on token data, checkpoint, generate in every style.

Small sizes throughout (width 16, one block; 1-digit addition, 80 training
problems), so each test compiles a handful of programs: what is checked is the
path through the tools, not the model's quality, which ``zoo compare gpt``
measures at full size (docs/porting.md).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from shared import checkpoint, data, styles
from shared.cli import main
from shared.layouts import flatten_canonical
from shared.registry import STYLES

SMALL = ["--width", "16", "--depth", "1", "--num-heads", "2", "--mlp-dim", "16"]


def zoo(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A plain-JAX GPT trained for 3 epochs on 1-digit addition, with its checkpoint."""
    root = tmp_path_factory.mktemp("lm")
    assert zoo("train", "gpt", "--style", "jax", *SMALL, "--digits", "1", "--batch-size", "40", "--epochs", "3",
               "--lr", "3e-3", "--no-progress", "--data-dir", data_dir, "--checkpoint-dir", root / "ck",
               "--out", root / "out") == 0
    return root


def test_training_reports_bits_token_accuracy_and_exact_match(trained):
    final = json.loads((trained / "out" / "metrics.json").read_text())["final"]
    assert {"test_loss", "test_bits", "test_accuracy", "test_exact_match"} <= set(final)
    assert final["test_bits"] == pytest.approx(final["test_loss"] / np.log(2), rel=1e-6)
    assert 0 <= final["test_exact_match"] <= final["test_accuracy"] <= 1
    meta = checkpoint.read_meta(*checkpoint.resolve(trained / "ck"))
    assert meta["dataset"] == "addition" and meta["dataset_options"] == {"digits": 1}
    assert meta["vocab"] == [str(d) for d in range(10)] and meta["in_shape"] == [3]


def test_every_style_generates_the_same_sums_from_one_checkpoint(trained, capsys):
    """Greedy decoding of one checkpoint, in every style, with the cache and without it: the same answer.
    The answer comes out least significant digit first (minGPT's encoding); zoo generate reads it back."""
    said = set()
    for style in STYLES:
        for cache in ([], ["--no-cache"]):
            assert zoo("generate", "gpt", "--checkpoint", trained / "ck", "--style", style, "--prompt", "7+8",
                       *cache) == 0
            line = capsys.readouterr().out.strip()
            assert re.fullmatch(r"7\+8=\d+ \((right|wrong: 15); tokens 78\d\d\)", line), line
            said.add(line)
    assert len(said) == 1, said


def test_sampling_draws_by_the_seed(trained, capsys):
    runs = []
    for seed in (0, 0, 1):
        assert zoo("generate", "gpt", "--checkpoint", trained / "ck", "--prompt", "12", "--temperature", "2",
                   "--samples", "8", "--seed", seed) == 0
        runs.append(capsys.readouterr().out.splitlines())
    assert runs[0] == runs[1] and runs[0] != runs[2] and len(runs[0]) == 8
    assert all(re.fullmatch(r"1\+2=\d+ \(.*; tokens 12\d\d\)", line) for line in runs[0]), runs[0]


def test_a_text_file_trains_and_generates(tmp_path, data_dir, capsys):
    text = tmp_path / "verse.txt"
    text.write_text("the quick brown fox jumps over the lazy dog; " * 60)
    assert zoo("train", "gpt", "--style", "haiku", *SMALL, "--dataset", "text", "--text-file", text,
               "--block-size", "16", "--batch-size", "32", "--epochs", "10", "--lr", "3e-3", "--no-progress",
               "--data-dir", data_dir,
               "--checkpoint-dir", tmp_path / "ck", "--out", tmp_path / "out") == 0
    capsys.readouterr()
    final = json.loads((tmp_path / "out" / "metrics.json").read_text())["final"]
    # Below the unigram entropy of this text's characters: it learned more than their frequencies.
    counts = np.unique(list(text.read_text()), return_counts=True)[1]
    unigram = float(-(counts / counts.sum() * np.log2(counts / counts.sum())).sum())
    assert final["test_bits"] < unigram
    assert zoo("generate", "gpt", "--checkpoint", tmp_path / "ck", "--prompt", "the ", "--max-new-tokens", "12",
               "--style", "equinox") == 0
    out = capsys.readouterr().out.rstrip("\n")
    assert out.startswith("the ") and len(out) == 16 and set(out) <= set(text.read_text())


def test_a_scanned_checkpoint_is_an_unrolled_ones(tmp_path, data_dir):
    """--scan-layers stacks the blocks in every style, but the canonical tree, and so the checkpoint,
    holds them layer by layer: an unrolled model reads a scanned run's parameters, and the reverse."""
    assert zoo("train", "gpt", "--style", "nnx", *SMALL[:2], "--depth", "2", *SMALL[4:], "--scan-layers",
               "--digits", "1", "--batch-size", "40", "--epochs", "1", "--no-progress", "--data-dir", data_dir,
               "--checkpoint-dir", tmp_path / "ck", "--out", tmp_path / "out") == 0
    meta = checkpoint.read_meta(*checkpoint.resolve(tmp_path / "ck"))
    assert meta["hparams"]["scan_layers"] is True
    hparams = {"width": 16, "depth": 2, "num_heads": 2, "mlp_dim": 16}
    canonical = {}
    for scan in (False, True):
        net = styles.build("gpt", "flax", in_shape=(3,), num_classes=10, scan_layers=scan, **hparams)
        params, _, _ = checkpoint.read_variables(tmp_path / "ck", net)
        canonical[scan] = flatten_canonical(net.to_canonical(params))
    assert sorted(canonical[False]) == sorted(canonical[True])
    assert any(p.startswith("blocks_1/") for p in canonical[False])
    for path, value in canonical[False].items():
        np.testing.assert_array_equal(np.asarray(canonical[True][path]), np.asarray(value), err_msg=path)


def test_the_addition_data_is_what_minGPT_encodes(addition):
    """1-digit addition: 100 problems, 20 test and 80 train, never both; a + b then the sum reversed; only
    the answer's targets count."""
    both = set()
    for split in (addition.train, addition.test):
        for x, y in zip(split.images, split.labels):
            a, b, low = x
            assert low == (a + b) % 10 and y[-1] == (a + b) // 10  # the sum's digits, least significant first
            assert list(y[:1]) == [-1] and list(y[1:]) == [low, (a + b) // 10]
            both.add((int(a), int(b)))
    assert len(both) == 100 and len(addition.train) == 80 and len(addition.test) == 20
    assert addition.encode("12").tolist() == [1, 2] and addition.decode([3, 4]) == "34"
    assert data.in_shape("addition", digits=1) == addition.in_shape == (3,)
