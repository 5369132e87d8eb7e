"""The zoo command line: listing, training, comparing and its errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from shared import compare
from shared.cli import build_parser, config_from, main
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
        assert row["noise_floor"] > 0  # the reference from a one-ulp move of its start
    # Linen lowers to the reference's ops; Equinox sums in another order: within the noise floor, or
    # confirmed as rounding by the same runs in float64.
    assert [r["parity"] for r in rows] == ["bitwise", "rounding"]
    assert rows[0]["max_param_diff"] == 0 < rows[1]["max_param_diff"]
    assert rows[1]["max_param_diff"] <= rows[1]["noise_floor"] or rows[1]["float64_diff"][0] < 1e-12
    assert rows[1]["max_param_diff"] <= rows[1]["noise_floor"] or rows[1]["confirm_steps"] == 22
    assert all(r["draws"] is None and r["parity_run"] == "this run" for r in rows)  # the MLP draws nothing
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == rows


def test_float64_from_the_command_line_trains_checkpoints_and_resumes_in_float64(tmp_path, data_dir, digits):
    """--precision float64 turns on x64 in a fresh process; a resumed run takes the precision
    from the checkpoint, and any style resumes it (here Equinox a Linen run)."""
    from shared import checkpoint

    ckpt = tmp_path / "ckpt"
    common = ["--epochs", "1", "--no-progress", "--data-dir", str(data_dir), "--checkpoint-dir", str(ckpt)]
    proc = run_zoo("train", "mlp", "--style", "flax", "--precision", "float64", *common, "--out",
                   str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr
    meta = checkpoint.read_meta(ckpt, 11)
    assert meta["precision"] == "float64"
    assert {a["dtype"] for p, a in meta["arrays"].items() if not p.endswith("count")} == {"float64"}
    proc = run_zoo("train", "mlp", "--style", "equinox", "--resume", *common[2:], "--epochs", "2",
                   "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert checkpoint.steps(ckpt)[-1] == 22
    assert {a["dtype"] for p, a in checkpoint.read_meta(ckpt, 22)["arrays"].items()
            if not p.endswith("count")} == {"float64"}


def test_a_style_beyond_the_noise_floor_is_different_and_fails(monkeypatch, digits, data_dir, tmp_path, capsys):
    """A Haiku MLP that sees its inputs scaled by 1.01: the same parameters, another network."""
    original = compare.styles_lib.build

    def build(name, style, **kwargs):
        model = original(name, style, **kwargs)
        if style != "haiku":
            return model
        return dataclasses.replace(model, apply=lambda p, s, x, y, k, t: model.apply(p, s, 1.01 * x, y, k, t))

    monkeypatch.setattr(compare.styles_lib, "build", build)
    code = main(["compare", "mlp", "--epochs", "1", "--styles", "flax,haiku", "--json", "--no-progress",
                 "--hidden-sizes", "16", "--data-dir", str(data_dir), "--out", str(tmp_path / "c.json")])
    out, err = capsys.readouterr()
    assert code == 1
    rows = json.loads(out)
    assert [r["parity"] for r in rows] == ["bitwise", "DIFFERENT"]
    assert rows[1]["max_param_diff"] > rows[1]["noise_floor"] > 0
    # Confirmed in float64, where the difference does not shrink as rounding would.
    assert rows[1]["float64_diff"][0] > compare.SHRINK * rows[1]["float32_diff_at_confirm"][0] > 0
    assert err.strip().splitlines() == [err.strip()]  # one line, the dataset already built
    assert "haiku differ" in err and "noise floor" in err and "float64" in err
    code = main(["compare", "mlp", "--epochs", "1", "--styles", "haiku", "--json", "--no-progress",
                 "--hidden-sizes", "16", "--no-noise-floor", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "d.json")])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and rows[0]["noise_floor"] is None and rows[0]["parity"] is None


def test_the_batch_size_defaults_per_model_and_a_flag_overrides_it(capsys):
    """The registry's batch size (the ViT trains on batches of 64, the others on 128) unless given;
    --help lists it per model."""
    parse = build_parser().parse_args
    assert config_from(parse(["train", "vit", "--style", "jax"])).batch_size == 64
    assert config_from(parse(["train", "mlp", "--style", "jax"])).batch_size == 128
    assert config_from(parse(["train", "vit", "--style", "jax", "--batch-size", "32"])).batch_size == 32
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    assert "vit 64" in " ".join(capsys.readouterr().out.split())


def test_a_style_that_only_rounds_is_confirmed_in_float64_even_above_the_floor(monkeypatch, digits, data_dir,
                                                                              tmp_path, capsys):
    """With the floor forced to 0 (the one-ulp move made a no-op), the last-bit differences of Haiku's LSTM
    (one matrix product over [x, h] where the others take two) are above it: the float64 runs confirm
    them as rounding (they shrink by ~1e-9), and the row says so."""
    monkeypatch.setattr(compare.jnp, "nextafter", lambda x, direction: x)
    code = main(["compare", "lstm", "--epochs", "1", "--styles", "haiku", "--json", "--no-progress",
                 "--hidden", "16", "--data-dir", str(data_dir), "--out", str(tmp_path / "c.json")])
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert rows[0]["noise_floor"] == 0 < rows[0]["max_param_diff"]
    assert rows[0]["confirm_steps"] == 11  # one epoch: the whole run
    assert rows[0]["float64_diff"][0] <= compare.SHRINK * rows[0]["float32_diff_at_confirm"][0]
    assert rows[0]["parity"] == "rounding"


def test_compare_says_which_runs_drew_their_own_numbers(digits, data_dir, tmp_path, capsys):
    """A model that draws (the ResNet's dropout): the losses and accuracy come from each style's own draws,
    the differences and verdict from a second run in which every draw is the midpoint in every style;
    the table says so, and no style is DIFFERENT for its draws alone."""
    code = main(["compare", "resnet", "--epochs", "1", "--stage-sizes", "1,1", "--width", "4", "--no-progress",
                 "--data-dir", str(data_dir), "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert {r["draws"] for r in rows} == {"own"} and {r["parity_run"] for r in rows} == {"midpoint draws"}
    assert all(r["parity"] in ("bitwise", "rounding") for r in rows), rows
    # Own draws: the styles' losses differ from one another (Linen's, NNX's, Haiku's and Equinox's masks).
    assert len({r["train_loss"] for r in rows}) > 1
    assert "each style drew its own dropout masks or noise" in out


@pytest.mark.parametrize("precision,diff,floor,confirmed,expected", [
    ("float32", 0.0, 1e-3, None, "bitwise"),
    ("float32", 5e-4, 1e-3, None, "rounding"),
    ("float32", 2e-3, 1e-3, None, "DIFFERENT"),  # above the floor, not confirmed
    ("float32", 2e-3, 1e-3, [1e-12], "rounding"),  # shrank by 5e-10
    ("float32", 2e-3, 1e-3, [1e-4], "DIFFERENT"),  # shrank by 5e-2 only: a real difference
    ("float64", 5e-11, 1e-12, None, "rounding"),  # within 100 floors
    ("float64", 5e-9, 1e-12, None, "DIFFERENT"),
])
def test_the_verdict(precision, diff, floor, confirmed, expected):
    row = {"max_param_diff": diff, "max_state_diff": None, "noise_floor": floor, "noise_floor_state": None,
           "float64_diff": confirmed}
    assert compare.parity(row, precision) == expected
