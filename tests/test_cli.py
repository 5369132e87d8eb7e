"""The zoo command line: listing, training, comparing and its errors."""

import json
import os
import subprocess
import sys

import pytest

from shared.cli import main
from shared.registry import NAMES, STYLES


def run_zoo(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_list_shows_every_model_and_style(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in (*NAMES, *STYLES):
        assert word in out
    assert "-" not in out.splitlines()[1].split()[1:], "a model file is missing"


@pytest.mark.parametrize("args,needle", [
    (["train", "lenet", "--style", "jax"], ["'lenet'", *NAMES]),
    (["train", "mlp", "--style", "pytorch"], ["'pytorch'", "jax", "flax", "nnx", "haiku", "equinox"]),
    (["train", "mlp", "--style", "jax", "--dataset", "cifar"], ["'cifar'", "digits", "mnist", "fashion_mnist"]),
    (["train", "mlp", "--style", "jax", "--batch-size", "0"], "must be a positive integer, got 0"),
    (["train", "mlp", "--style", "jax", "--epochs", "-3"], "must be a positive integer, got -3"),
    (["compare", "mlp", "--styles", "jax,keras"], "unknown style 'keras'"),
    (["train", "mlp", "--style", "jax", "--lr", "nan"], "must be a positive number"),
])
def test_bad_input_is_one_line_with_exit_status_2(args, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for word in [needle] if isinstance(needle, str) else needle:
        assert word in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_errors_raised_after_parsing_are_one_line_too(tmp_path, data_dir, digits, capsys):
    """(digits: the dataset is built first, so only the error reaches stderr.)"""
    code = main(["train", "mlp", "--style", "jax", "--data-dir", str(data_dir), "--batch-size", "5000",
                 "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("zoo: error: batch size 5000 is larger than the 1437 training examples")
    assert len(err.splitlines()) == 1


def test_train_writes_metrics_and_curves(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    code = main(["train", "mlp", "--style", "haiku", "--epochs", "2", "--data-dir", str(data_dir),
                 "--out", str(out), "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "mlp" and metrics["style"] == "haiku" and metrics["dataset"] == "digits"
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert len(metrics["steps"]["loss"]) == 2 * (1437 // 128)
    assert metrics["history"][1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert 0.5 < metrics["final"]["test_accuracy"] <= 1.0
    assert (out / "curves.png").stat().st_size > 10_000
    assert "test_accuracy" in capsys.readouterr().out


def test_compare_json_rows(tmp_path):
    """The real command in a fresh process: JSON rows on stdout, nothing else."""
    # A fresh data dir: building the dataset must not print to stdout either.
    proc = run_zoo("compare", "mlp", "--epochs", "2", "--json", "--data-dir", str(tmp_path / "tfds"),
                   "--styles", "flax,equinox", "--out", str(tmp_path / "c.json"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["style"] for r in rows] == ["flax", "equinox"]
    for row in rows:
        assert set(row) >= {"style", "params", "train_loss", "test_accuracy", "step_ms", "step_ratio",
                            "max_param_diff"}
        assert row["params"] == 26122
        assert row["max_param_diff"] < 1e-5  # two epochs: float32 rounding only
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == rows
