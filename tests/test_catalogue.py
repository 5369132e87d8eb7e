"""Reading and taking the catalogue: the alignment, ``zoo show`` and ``zoo copy``.

The copy checks run a fresh ``python -I -S`` in the destination folder, so
neither this repository nor its editable install is importable there, with
every installed package that jax, numpy and the style's framework do not
require hidden. One process per style imports all three copied models.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shared import catalogue
from shared.cli import main
from shared import registry
from shared.registry import NAMES as MODELS, STYLES

ROOT = Path(__file__).resolve().parents[1]
GUTTER = re.compile(r"^\s*(\d+)(?: |$)")


def file_lines(model: str, style: str) -> list[str]:
    return (ROOT / "zoo" / style / f"{model}.py").read_text().splitlines()


def test_align_keeps_every_line_and_puts_shared_lines_on_one_row():
    sources = {
        "a": ["class M:", "    x = nn.Dense(3)", "", "    def f(self, v):", "        return self.x(v)"],
        "b": ["class M:", "    x: Linear", "    y: int", "", "    x = eqx.nn.Linear(3)",
              "    def f(self, v):", "        return self.x(v)"],
        "c": ["def f(params, v):", "    return v @ params['x']"],
    }
    rows = catalogue.align(sources, anchor="a")
    for style, lines in sources.items():
        assert [row[style] for row in rows if style in row] == list(range(len(lines))), style
    row_of = {(s, i): r for r, row in enumerate(rows) for s, i in row.items()}
    assert row_of["a", 0] == row_of["b", 0]  # class M:
    assert row_of["a", 3] == row_of["b", 5]  # def f(self, v):
    assert row_of["a", 4] == row_of["b", 6]  # return self.x(v)
    assert row_of["a", 1] == row_of["b", 4]  # x = nn.Dense(3) / x = eqx.nn.Linear(3)


def test_differs_from_reference_is_what_a_line_diff_leaves_unmatched():
    reference = ["import jax", "", "def f(x):", "    return x"]
    lines = ["import jax", "import flax", "", "class F:", "    return x"]
    assert catalogue.differs_from_reference(lines, reference) == {1, 3}


def columns(line: str, width: int, n: int) -> list[str]:
    column = (width - 3 * (n - 1)) // n
    return [line[k * (column + 3):k * (column + 3) + column] for k in range(n)]


def test_show_puts_styles_side_by_side_within_the_width(capsys):
    width = 150
    assert main(["show", "cnn", "--styles", "flax,equinox", "--width", str(width), "--color", "never"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(len(line) <= width for line in out)
    assert "Flax Linen: zoo/flax/cnn.py" in out[0] and "Equinox: zoo/equinox/cnn.py" in out[0]
    seen = {"flax": [], "equinox": []}
    for line in out[2:]:
        for style, cell in zip(seen, columns(line.ljust(width), width, 2)):
            match = GUTTER.match(cell)
            if match:
                seen[style].append(int(match.group(1)))
    for style, numbers in seen.items():
        assert numbers == list(range(1, len(file_lines("cnn", style)) + 1)), style
    # The same layer sits on the same row in both columns.
    [row] = [line for line in out if "self.conv1 = nn.Conv(" in line]
    assert "self.conv1 = eqx.nn.Conv2d(" in row
    assert "\x1b[" not in "\n".join(out)


def test_show_stacks_styles_when_the_terminal_is_narrow(capsys):
    width = 80
    assert main(["show", "vae", "--styles", "jax,haiku,nnx", "--width", str(width), "--color", "never"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert all(len(line) <= width for line in out)
    heads = [i for i, line in enumerate(out) if line.startswith("──")]
    assert [re.search(r"zoo/(\w+)/vae\.py", out[i]).group(1) for i in heads] == ["jax", "haiku", "nnx"]
    for style, start, end in zip(("jax", "haiku", "nnx"), heads, heads[1:] + [len(out)]):
        numbers = [int(m.group(1)) for m in map(GUTTER.match, out[start + 1:end]) if m]
        assert numbers == list(range(1, len(file_lines("vae", style)) + 1)), style
        longest = max(file_lines("vae", style), key=len)
        assert len(longest) > width - 4  # so wrapping was needed, and kept every character:
        text = "".join(line[4:].strip() for line in out[start + 1:end])
        assert longest.strip().replace(" ", "") in text.replace(" ", "")


def test_show_colours_only_when_asked(capsys):
    main(["show", "mlp", "--styles", "jax", "--width", "100", "--color", "always"])
    assert "\x1b[" in capsys.readouterr().out
    main(["show", "mlp", "--styles", "jax", "--width", "100"])  # auto: capsys is not a terminal
    assert "\x1b[" not in capsys.readouterr().out


def test_copy_refuses_to_overwrite_without_force(tmp_path, capsys):
    target = tmp_path / "cnn.py"
    target.write_text("my own cnn\n")
    assert main(["copy", "cnn", "--style", "flax", str(tmp_path), "--no-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--force" in err, err
    assert target.read_text() == "my own cnn\n"
    assert main(["copy", "cnn", "--style", "flax", str(tmp_path), "--no-check", "--force"]) == 0
    assert target.read_bytes() == (ROOT / "zoo" / "flax" / "cnn.py").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["cnn.py"], "a temporary file was left behind"


def test_copy_destinations(tmp_path, capsys):
    assert main(["copy", "mlp", "--style", "haiku", str(tmp_path / "new" / "my_mlp.py"), "--no-check"]) == 0
    assert (tmp_path / "new" / "my_mlp.py").read_bytes() == (ROOT / "zoo" / "haiku" / "mlp.py").read_bytes()
    (tmp_path / "notes.txt").write_text("x")
    assert main(["copy", "mlp", "--style", "haiku", str(tmp_path / "notes.txt"), "--no-check"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["copy", "mlp", "--style", "pytorch", str(tmp_path)])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("style", STYLES)
def test_copied_models_run_without_the_repository(style, tmp_path):
    dest = tmp_path / "my_project"
    for model in MODELS:
        assert main(["copy", model, "--style", style, str(dest), "--no-check"]) == 0
        assert (dest / f"{model}.py").read_bytes() == (ROOT / "zoo" / style / f"{model}.py").read_bytes()
    report = catalogue.check_copies(style, [(dest / f"{m}.py", m) for m in MODELS])
    assert report["found"] == {"zoo": False, "shared": False}, "import zoo / import shared worked there"
    assert report["cwd"] == str(dest.resolve()) and not report["repo_on_path"] and not report["loaded"]
    assert report["hidden"] > 0
    shapes = {m: entry["shapes"] for m, entry in zip(MODELS, report["items"])}
    latents = registry.MODELS["vae"].resolve(registry.MODELS["vae"].small)["latents"]  # the check's small size
    length = registry.TOKENS_EXAMPLE[0]  # a language model's check: 9 tokens, logits over 10 for each
    expected = {m: {"vae": [[2, 64], [2, latents], [2, latents]], "lm": [[2, length, 10]]}.get(
        registry.MODELS[m].kind, [[2, 10]]) for m in MODELS}
    assert shapes == expected
    assert all(entry["finite"] and entry["file"] == str((dest / f"{m}.py").resolve())
               for m, entry in zip(MODELS, report["items"]))


def test_copy_command_checks_the_copy(tmp_path, capsys):
    assert main(["copy", "vae", "--style", "equinox", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "import zoo and import shared fail there" in out
    assert "outputs (2, 64), (2, 4), (2, 4)" in out  # the registry's small VAE: 4 latents
    # The checking Python imported the copy without writing bytecode beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae.py"]


def test_the_check_catches_a_copy_that_needs_more_than_its_framework(tmp_path):
    for model in ("mlp", "cnn"):
        catalogue.copy_model(model, "jax", tmp_path)
    mlp, cnn = tmp_path / "mlp.py", tmp_path / "cnn.py"
    mlp.write_text(mlp.read_text().replace("import jax\n", "import jax\nfrom shared import styles\n", 1))
    cnn.write_text(cnn.read_text().replace("import jax\n", "import jax\nimport optax\n", 1))
    with pytest.raises(catalogue.CopyCheckError) as error:
        catalogue.check_copies("jax", [(mlp, "mlp"), (cnn, "cnn")])
    message = str(error.value)
    assert "mlp.py: ModuleNotFoundError: No module named 'shared'" in message
    assert "cnn.py: ModuleNotFoundError: No module named 'optax'" in message
