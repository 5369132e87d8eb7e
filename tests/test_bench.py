"""The benchmark harness itself (``zoo bench``), on tiny models: fields, ratios, FLOPs parity.

Nothing here asserts a speed: timings on a shared 2-core machine are the
benchmark's output, not something a test can hold it to.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from shared import bench, data, styles
from shared.cli import main
from shared.registry import MODELS, NAMES
from shared.train import TrainConfig

# XLA's CPU backend: the profile reads its runtime's kernel trace (each kernel under its HLO
# instruction's name), and docs/benchmarks.md's kernel counts are of its programs.
CPU_ONLY = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA's CPU kernels and kernel trace")

# Small but whole: the registry's small sizes (the ResNet keeps a stem, a plain block and a projection
# block; the ViT one attention block).
TINY = {name: dict(spec.small) for name, spec in MODELS.items()}


@pytest.fixture(scope="module")
def rows(digits):
    return bench.bench(("mlp",), ("jax", "nnx", "equinox"), batch_sizes=(8,), dataset=digits, rounds=2,
                       steps=3, progress=False, loader_s=0.02, hparams=TINY)


def test_every_row_has_every_field(rows):
    assert [(r["style"], r["pattern"]) for r in rows] == [
        ("jax", "fast"), ("jax", "guided"), ("nnx", "fast"), ("nnx", "idiomatic"), ("nnx", "guided"),
        ("equinox", "fast"), ("equinox", "idiomatic"), ("equinox", "guided")]
    # Plain JAX's documented pattern is the fast one: its guided row is that measurement, named.
    assert rows[1]["same_as"] == "fast" and {**rows[1], "pattern": "fast", "same_as": None} == rows[0]
    assert all(r["same_as"] is None for r in rows if r["style"] != "jax" or r["pattern"] == "fast")
    assert rows[4]["api"] == "nnx.cached_partial(nnx.jit step)" and rows[7]["api"] == "eqx.filter_jit on flat leaves"
    numbers = ("step_ms", "step_ratio", "step_ms_blocking", "blocking_ratio", "return_ms", "compile_s",
               "flops", "bytes_accessed", "peak_bytes", "data_examples_per_s", "examples_per_s",
               "data_headroom", "feed_examples_per_s", "feed_headroom")
    for row in rows:
        assert set(row) >= {*bench.ROW_KEYS, *numbers, "params", "ready_on_return", "device", "api"}
        assert row["model"] == "mlp" and row["batch_size"] == 8 and row["precision"] == "float32"
        for key in numbers:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert 0.0 <= row["ready_on_return"] <= 1.0
        assert (row["pytree_us"] > 0) if "fast" in (row["pattern"], row["same_as"]) else row["pytree_us"] is None
        assert row["params"] == 64 * 16 + 16 + 16 * 10 + 10
        assert row["time_by_kind_us"] is None  # traced only with --profile
        assert row["rounds"] == 2 and row["steps_per_round"] == 3
        assert len(row["round_ms"]) == len(row["round_ms_blocking"]) == 2
        assert row["step_ratio_iqr"][0] <= row["step_ratio"] <= row["step_ratio_iqr"][1]
        assert row["data_headroom"] == pytest.approx(row["data_examples_per_s"] * row["step_ms"] / 1e3 / 8)
    assert json.loads(json.dumps(rows)) == rows  # plain JSON


def test_the_short_table_has_one_ratio_per_style_pattern_and_batch(rows):
    table = bench.ratio_table(rows).splitlines()
    assert table[0] == "| style | pattern | batch 8: mlp |"
    by_label = {tuple(line.split(" | ")[:2]): line.rsplit(" | ", 1)[1].rstrip(" |") for line in table[2:]}
    assert list(by_label) == [("| nnx", "fast"), ("| nnx", "idiomatic"), ("| nnx", "guided"),
                              ("| equinox", "fast"), ("| equinox", "idiomatic"), ("| equinox", "guided")]
    row = next(r for r in rows if (r["style"], r["pattern"]) == ("equinox", "guided"))
    assert by_label["| equinox", "guided"] == f"{row['step_ratio']:.2f}"
    assert table[2] in bench.format_markdown(rows)


def test_reference_against_itself_is_one(rows):
    reference = rows[0]
    assert (reference["style"], reference["pattern"]) == ("jax", "fast")
    assert reference["step_ratio"] == 1.0 and reference["blocking_ratio"] == 1.0
    assert reference["step_ratio_iqr"] == [1.0, 1.0]
    assert reference["extra_ms"] == 0.0 and reference["flops_equal"]


def test_every_style_and_idiom_compiles_to_the_reference_flops(rows):
    assert all(r["flops_equal"] for r in rows), bench.flops_failures(rows)
    assert bench.flops_failures(rows) == []


def test_a_style_that_computes_something_else_is_caught(digits):
    """A flax MLP whose forward pass also doubles its input is the same network on other
    data: same parameters, different compiled step, and the FLOPs comparison must say so."""
    batch = data.train_batches(digits.train, 8, 0, 0)[0]
    cases = bench.make_cases("mlp", ("flax",), batch, in_shape=digits.in_shape, num_classes=10,
                             patterns=("fast",), **TINY["mlp"])
    flax_model = styles.build("mlp", "flax", in_shape=digits.in_shape, **TINY["mlp"])
    changed = dataclasses.replace(flax_model, apply=lambda p, s, x, y, k, t: flax_model.apply(p, s, 2.0 * x, y, k, t))
    key = jax.random.split(jax.random.key(0))[1]
    params = flax_model.from_canonical(cases[0].args[0].params)
    cases.append(bench.fast_case(changed, params, {}, jax.device_put(batch), bench.bench_config(8), key))
    rows = bench.compare_to_reference(bench.measure_group(
        cases, dataset=digits, data_examples_per_s=1.0, feed_examples_per_s=1.0, rounds=1, steps=2))
    assert [r["flops_equal"] for r in rows] == [True, True, False]
    failures = bench.flops_failures(rows)
    assert len(failures) == 1 and failures[0].startswith("mlp flax (fast) batch 8")
    assert "**NO**" in bench.format_markdown(rows)


class _Compiled:
    """``compile_case`` of each case, on first use: a test compiles only the cases it reads."""

    def __init__(self, cases):
        self.cases, self.infos = cases, {}

    def __getitem__(self, index: int) -> dict:
        if index not in self.infos:
            self.infos[index] = bench.compile_case(self.cases[index])
        return self.infos[index]


@pytest.fixture(scope="module")
def compiled_cases(request):
    """Per model: the reference, NNX's and Equinox's idiomatic steps and every fast step, made once
    and each compiled once, when first read (on digits, or 1-digit addition for a language model)."""
    cache = {}

    def get(name):
        if name not in cache:
            dataset = request.getfixturevalue("addition" if MODELS[name].kind == "lm" else "digits")
            batch = data.train_batches(dataset.train, 8, 0, 0)[0]
            cases = bench.make_cases(name, ("haiku", "nnx", "equinox"), batch, in_shape=dataset.in_shape,
                                     num_classes=dataset.num_classes, **TINY.get(name, {}))
            cache[name] = cases, _Compiled(cases)
        return cache[name]
    return get


@pytest.mark.parametrize("name", NAMES)
def test_idiomatic_steps_compute_what_the_loop_computes(name, compiled_cases):
    """nnx.jit and eqx.filter_jit steps, plain and as the frameworks' performance guides call
    them (nnx.cached_partial; filter_jit over flat leaves): the same FLOPs as the style's fast step
    (the loop's) and, step after step, the same loss (the same key reaches the same layers, so
    the same masks and noise are drawn)."""
    every, every_info = compiled_cases(name)
    picked = [i for i, c in enumerate(every) if c.style == "jax" or c.pattern != "fast"]
    cases, infos = [every[i] for i in picked], [every_info[i] for i in picked]
    assert [(c.style, c.pattern) for c in cases] == [("jax", "fast"), ("nnx", "idiomatic"), ("nnx", "guided"),
                                                      ("equinox", "idiomatic"), ("equinox", "guided")]
    assert infos[0]["flops"] > 0
    fast = {c.style: every_info[i] for i, c in enumerate(every)
            if c.pattern == "fast" and c.style in ("nnx", "equinox")}
    for case, info in zip(cases[1:], infos[1:]):
        # The same model as the style's fast step, stepped another way: the same FLOPs, or
        # different only by dtype conversions (nnx.Optimizer counts steps in uint32, so the
        # VAE's key needs none of the loop's int32 -> uint32 converts). How a style's fast
        # step compares with plain JAX's is zoo bench's check (bench.flops_failures).
        same = fast[case.style]
        assert info["flops"] - same["flops"] in (0, info["convert_flops"] - same["convert_flops"]), case.label
        assert info["linear_ops"] == same["linear_ops"], case.label
    fast_cases = {c.style: c for c in every if c.pattern == "fast" and c.style in ("nnx", "equinox")}
    losses = np.array([[float(c.loss(c.run(1))) for _ in range(3)] for c in cases])
    fast_losses = {style: [float(c.loss(c.run(1))) for _ in range(3)] for style, c in fast_cases.items()}
    assert len(set(losses[0])) == 3  # each step starts from the previous one's parameters
    for case, row in zip(cases[1:], losses[1:]):
        np.testing.assert_allclose(row, fast_losses[case.style], rtol=1e-5, err_msg=case.label)  # float32 rounding
    # A guided step is its framework's idiomatic step, called another way: the same numbers.
    np.testing.assert_array_equal(losses[2], losses[1])
    np.testing.assert_array_equal(losses[4], losses[3])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_float64_steps_of_every_pattern_agree_to_float64_rounding(name, digits):
    """zoo bench --precision float64: every style's and idiom's step runs in float64 (the
    idiomatic Equinox step casts its module, whose convolutions do not promote mixed dtypes)
    and three steps' losses agree with the reference's to 1e-12."""
    batch = data.train_batches(digits.train, 8, 0, 0)[0]
    with jax.enable_x64(True):
        cases = bench.make_cases(name, ("flax", "nnx", "equinox"), batch, in_shape=digits.in_shape,
                                 num_classes=10, precision="float64", **TINY.get(name, {}))
        for case in cases:
            bench.compile_case(case)
        losses = np.array([[float(c.loss(c.run(1))) for _ in range(3)] for c in cases])
    assert [c.precision for c in cases] == ["float64"] * len(cases)
    np.testing.assert_allclose(losses[1:], np.broadcast_to(losses[0], losses[1:].shape), rtol=1e-12, atol=0)


def fast_rows(name: str, digits, compiled_cases) -> list[dict]:
    """One measured round of the reference's, Haiku's and Equinox's fast steps, with the FLOPs notes."""
    every, _ = compiled_cases(name)
    cases = [c for c in every if c.pattern == "fast" and c.style in ("jax", "haiku", "equinox")]
    return bench.compare_to_reference(bench.measure_group(
        cases, dataset=digits, data_examples_per_s=1.0, feed_examples_per_s=1.0, rounds=1, steps=1))


def test_batchnorm_flops_are_explained_only_by_identical_linear_algebra(digits, compiled_cases):
    """The ResNet's Haiku and Equinox steps do more FLOPs than the reference (their BatchNorm
    keeps and debiases its statistics its own way); the bench explains that only because their
    convolutions and matrix products are the reference's, one for one."""
    rows = fast_rows("resnet", digits, compiled_cases)
    assert [r["flops_equal"] for r in rows] == [True, False, False]
    assert all("convolutions and matrix products" in r["flops_note"] for r in rows[1:])
    assert bench.flops_failures(rows) == []
    rows[2]["linear_ops"] = rows[2]["linear_ops"][1:]  # one convolution fewer: no longer explained
    assert len(bench.flops_failures(bench.compare_to_reference(rows))) == 1


def test_lstm_flops_are_explained_by_the_same_products_and_haiku_s_input_gradient(digits, compiled_cases):
    """The LSTM's Equinox step groups the gate products otherwise (per example, four gates in
    one matrix) and Haiku's does one product over ``[x, h]``: the bench explains their FLOPs
    only because their multiply-adds are the reference's, plus for Haiku exactly the gradient of
    the input rows its concatenated matmul computes (batch x features x 4 hidden) and nobody uses."""
    rows = fast_rows("lstm", digits, compiled_cases)
    assert [r["flops_equal"] for r in rows] == [True, False, False]
    assert rows[2]["dot_macs"] == rows[0]["dot_macs"] and rows[2]["extra_macs"] == 0
    hidden, features = TINY["lstm"]["hidden"], digits.in_shape[1] * digits.in_shape[2]
    assert rows[1]["extra_macs"] == 8 * features * 4 * hidden
    assert rows[1]["dot_macs"] - rows[0]["dot_macs"] == rows[1]["extra_macs"]
    assert "gradient of the input rows" in rows[1]["flops_note"]
    assert bench.flops_failures(rows) == []
    assert any("scans" in line and "loops" in line for line in bench.summary(rows))
    rows[1]["extra_macs"] -= 1  # a prediction one multiply-add off: no longer explained
    assert len(bench.flops_failures(bench.compare_to_reference(rows))) == 1


def test_vit_flops_are_explained_by_identical_linear_algebra_and_no_scan_is_claimed(digits, compiled_cases):
    """The ViT's Haiku and Equinox steps do other elementwise work (their own dropout keys;
    hk.dropout multiplies by its mask; their LayerNorms take the mean twice) around the reference's
    very convolutions and
    matrix products: the registry's ``elementwise_work`` explains it, but only while the linear
    algebra is identical op for op. The ViT does not scan, though its compiled step has while
    loops (XLA's CPU backend draws random bits in rolled loops): no scan-cost line for it."""
    rows = fast_rows("vit", digits, compiled_cases)
    assert [r["flops_equal"] for r in rows] == [True, False, False]
    assert all(r["dot_macs"] == rows[0]["dot_macs"] and "in two (jnp.var)" in r["flops_note"] for r in rows[1:])
    assert bench.flops_failures(rows) == []
    assert rows[0]["while_loops"] > 0 and bench.scan_costs(rows) == []
    rows[2]["linear_ops"] = rows[2]["linear_ops"][1:]  # one product fewer: no longer explained
    assert len(bench.flops_failures(bench.compare_to_reference(rows))) == 1


@CPU_ONLY
def test_the_equinox_resnet_s_extra_reductions_and_layout_changes_are_its_own_layers(compiled_cases):
    """docs/benchmarks.md: the Equinox ResNet's step spends more than the reference's on
    reductions, which are eqx.nn.BatchNorm's (each example's statistics over its own CHW array,
    then a mean over the vmapped axis), and on layout changes, which are its channels-first
    convolutions' (XLA's CPU convolutions run channels-last). Counted in the compiled HLO:
    BatchNorm's operations alone account for the Equinox step's excess of reduction kernels, and
    Conv's and BatchNorm's alone make more layout kernels than the reference's whole step (XLA
    adds copies of its own, named after no operation, around them)."""
    every, infos = compiled_cases("resnet")
    fast = {c.style: c for i, c in enumerate(every) if c.pattern == "fast" and infos[i]["flops"]}
    found = {style: bench.kernels(fast[style].hlo).values() for style in ("jax", "equinox")}

    def count(style, kind, layers=None):
        return sum(k == kind and (layers is None or any(layer in names for layer in layers))
                   for k, names in found[style])

    ref, eqx_all = count("jax", "reduction"), count("equinox", "reduction")
    assert eqx_all > ref and count("equinox", "reduction", ("eqx.nn.BatchNorm",)) >= eqx_all - ref
    ref, eqx_all = count("jax", "layout"), count("equinox", "layout")
    assert eqx_all > ref and count("equinox", "layout", ("eqx.nn.Conv", "eqx.nn.BatchNorm")) > ref


def test_dot_macs_counts_multiply_adds():
    def f(a, b):
        return jnp.concatenate([a, a], 1) @ b  # (4, 6) @ (6, 5): 4 * 5 * 6

    def g(a, b):
        return jax.vmap(lambda x: b @ x)(a)  # per example (5, 3) @ (3,): 4 * 5 * 3

    assert bench.dot_macs(jax.jit(f).lower(jnp.ones((4, 3)), jnp.ones((6, 5))).compile().as_text()) == 120
    assert bench.dot_macs(jax.jit(g).lower(jnp.ones((4, 3)), jnp.ones((5, 3))).compile().as_text()) == 60


def test_convert_elements_counts_what_xla_counts():
    def f(x, step):
        return x.astype(jnp.bfloat16), jax.random.key_data(jax.random.fold_in(jax.random.key(0), step))

    def g(x, step):
        return x, jax.random.key_data(jax.random.fold_in(jax.random.key(0), step))

    args = (jnp.ones((3, 4)), jnp.int32(1))
    cast, plain = (jax.jit(h).lower(*args).compile() for h in (f, g))
    assert bench.convert_elements(plain.as_text()) > 0  # the int32 step becomes uint32 for the key
    assert bench.convert_elements(cast.as_text()) - bench.convert_elements(plain.as_text()) == 3 * 4
    assert cast.cost_analysis()["flops"] - plain.cost_analysis()["flops"] == 3 * 4


@pytest.mark.parametrize("transfer", [False, True])
def test_loader_throughput_counts_examples(digits, transfer):
    rate = bench.loader_throughput(digits.train, 64, transfer=transfer, min_s=0.01, repeats=1)
    assert math.isfinite(rate) and rate > 0


@CPU_ONLY
def test_kernel_time_is_attributed_to_what_each_kernel_does():
    """zoo bench --profile: XLA's per-kernel trace, each kernel sorted by the work its HLO does.
    The six outputs are independent, so XLA cannot fuse one kind of work into another's kernel."""
    def f(x, w, m, key):
        conv = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (conv, x.reshape(32, -1) @ m, jax.random.uniform(key, (256, 256)), x.sum(axis=(1, 2)),
                jnp.transpose(x, (3, 1, 0, 2)), jnp.tanh(x))

    args = (jnp.ones((32, 16, 16, 8)), jnp.ones((3, 3, 8, 8)), jnp.ones((16 * 16 * 8, 64)), jax.random.key(0))
    compiled = jax.jit(f).lower(*args).compile()
    hlo = compiled.as_text()
    assert set(bench.instruction_kinds(hlo).values()) == set(bench.KINDS)
    times = bench.kernel_times(lambda: jax.block_until_ready([compiled(*args) for _ in range(3)]), hlo)
    assert times is not None and set(times) == set(bench.KINDS)
    assert all(times[kind] > 0 for kind in bench.KINDS), times
    assert bench.kernel_times(lambda: None, hlo) is None  # nothing ran: no kernel of the program traced


def test_bench_command_writes_json_markdown_and_chart(tmp_path, data_dir, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "mlp", "--styles", "equinox", "--patterns", "fast", "--batch-size", "8",
                 "--repeats", "2", "--steps", "2", "--data-dir", str(data_dir), "--out", str(out),
                 "--profile", "--no-progress"])
    assert code == 0
    rows = json.loads((out / "bench.json").read_text())
    assert isinstance(rows, list) and [(r["style"], r["pattern"]) for r in rows] == [("jax", "fast"),
                                                                                      ("equinox", "fast")]
    assert all(set(r) >= set(bench.ROW_KEYS) for r in rows)
    table = (out / "bench.md").read_text()
    assert "| mlp | 8 | equinox | fast |" in table and table in capsys.readouterr().out
    if jax.default_backend() == "cpu":  # --profile reads the CPU runtime's kernel trace (CPU_ONLY)
        # An MLP's step spends kernel time on its matrix products, and the table shows it.
        assert all(set(r["time_by_kind_us"]) == set(bench.KINDS) and r["time_by_kind_us"]["matmul"] > 0
                   for r in rows)
        assert "Where each step's time goes" in table
        assert "| mlp | 8 | equinox | fast | " in bench.kernel_table(rows)
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_profile_that_finds_no_kernels_says_so(tmp_path, data_dir, digits, monkeypatch, capsys):
    """On a backend whose trace does not name the kernels after the HLO, --profile has nothing to
    report: the command still writes its rows, and says in one line why they have no profile.
    (digits: the dataset is built first, so only that line reaches stderr.)"""
    monkeypatch.setattr(bench, "kernel_times", lambda run, hlo: None)
    code = main(["bench", "mlp", "--styles", "jax", "--patterns", "fast", "--batch-size", "8", "--repeats", "1",
                 "--steps", "1", "--data-dir", str(data_dir), "--out", str(tmp_path), "--profile", "--no-progress"])
    assert code == 0
    err = capsys.readouterr().err.strip()
    assert "--profile found none of the steps' kernels" in err and len(err.splitlines()) == 1
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert rows and all(r["time_by_kind_us"] is None for r in rows)
    assert "Where each step's time goes" not in (tmp_path / "bench.md").read_text()


def test_bench_command_fails_when_flops_differ(tmp_path, data_dir, monkeypatch, capsys):
    original = bench.make_cases

    def with_a_changed_style(name, styles_, batch, **kwargs):
        cases = original(name, styles_, batch, **kwargs)
        model = styles.build(name, "haiku", in_shape=kwargs["in_shape"])
        changed = dataclasses.replace(model, apply=lambda p, s, x, y, k, t: model.apply(p, s, x + 1.0, y, k, t))
        key = jax.random.split(jax.random.key(0))[1]
        cases.append(bench.fast_case(changed, model.from_canonical(cases[0].args[0].params), {},
                                     jax.device_put(batch), TrainConfig(batch_size=len(batch["label"])), key))
        return cases

    monkeypatch.setattr(bench, "make_cases", with_a_changed_style)
    code = main(["bench", "mlp", "--styles", "jax", "--batch-size", "4", "--repeats", "1", "--steps", "1",
                 "--data-dir", str(data_dir), "--json", str(tmp_path / "rows.json"),
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 1
    assert "FLOPs differ" in capsys.readouterr().err
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["flops_equal"] for r in rows if r["same_as"] is None] == [True, False]


@pytest.mark.parametrize("args,needle", [
    (["bench", "lenet"], "unknown model 'lenet'"),
    (["bench", "--styles", "keras"], "unknown style 'keras'"),
    (["bench", "--patterns", "slow"], "unknown pattern 'slow'"),
    (["bench", "--batch-size", "0"], "must be a positive integer, got 0"),
])
def test_bad_input_is_one_line(args, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_batch_larger_than_the_data_is_one_line(data_dir, digits, capsys):
    """(digits: the dataset is built first, so only the error reaches stderr.)"""
    assert main(["bench", "mlp", "--batch-size", "5000", "--data-dir", str(data_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "zoo: error: batch size 5000 is larger than the 1437 training examples of digits"
