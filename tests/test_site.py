"""The HTML catalogue (``zoo site``): built once, then loaded in headless Chromium.

The browser checks read the DOM Chromium rendered (``--dump-dom``) with the
standard library's HTML parser, and look for every style's header colour in a
screenshot, so a column that is missing or pushed off screen fails. Copies of
the screenshots go to ``/tmp/zoo-site-screenshot-<model>.png`` for a person to
look at.
"""

from __future__ import annotations

import ast
import fcntl
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from shared import registry, site
from shared.cli import main
from shared.registry import NAMES as MODELS, STYLES

# One scheduling unit of about 100 s (the build, then the browser checks): handed out among the
# first, so that small units fill the other worker's time at the end. Handed out last, it left the
# other worker idle for 75 s of an 804 s run.
pytestmark = pytest.mark.heavy

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--force-color-profile=srgb", "--hide-scrollbars",
    # No network: every request that is not a local file goes to a closed port.
    "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
)
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


# --------------------------------------------------------------------------- helpers


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.parts: list[str | Node] = []  # text and children, in document order

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None, **attrs: str) -> list[Node]:
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def content(self) -> str:
        return "".join(p if isinstance(p, str) else p.content() for p in self.parts)


class TreeBuilder(HTMLParser):
    """A DOM-ish tree from the standard library's HTML parser."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        self.current.parts.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(node)
        self.current.parts.append(node)

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.parts.append(data)


def parse(html: str) -> Node:
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    proc = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def fake_runs(runs: Path) -> dict:
    """Results as zoo compare, zoo bench and zoo train write them: for cnn and vae, none for mlp."""
    from PIL import Image

    def png(path: Path, colour: tuple[int, int, int]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (60, 40), colour).save(path)

    rows = [{"style": s, "params": 87178, "train_loss": 0.05 + i / 100, "test_loss": 0.1,
             "test_accuracy": 0.9 + i / 100 + 0.0012, "step_ms": 5.0 + i, "step_ratio": 1 + i / 10,
             "max_param_diff": 0.0} for i, s in enumerate(STYLES)]
    (runs / "compare-cnn-digits.json").write_text(json.dumps(
        {"model": "cnn", "dataset": "digits", "precision": "float32",
         "config": {"epochs": 3, "batch_size": 128, "lr": 0.001}, "rows": rows}))
    bench = [{"model": "cnn", "style": s, "pattern": "fast", "batch_size": 128, "precision": "float32",
              "step_ms": 2.5 + i, "step_ratio": 1.0 + i / 7, "compile_s": 0.4, "flops_equal": True,
              "api": "jax.jit", "device": "cpu"} for i, s in enumerate(STYLES)]
    (runs / "bench").mkdir(parents=True)
    (runs / "bench" / "bench.json").write_text(json.dumps(bench))
    (runs / "bench" / "bench.md").write_text("| style | step ms |\n")
    png(runs / "bench" / "bench.png", (10, 200, 10))
    for model, style in (("cnn", "flax"), ("vae", "haiku")):
        folder = runs / f"{model}-{style}-digits"
        png(folder / "curves.png", (200, 10, 10))
        (folder / "metrics.json").write_text(json.dumps(
            {"model": model, "style": style, "dataset": "digits", "final": {"test_loss": 0.25}}))
    png(runs / "vae-haiku-digits" / "samples.png", (10, 10, 200))
    return {"compare": rows, "bench": bench}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The site, built once per test run: under xdist the workers share one build (a file lock)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, shared by its workers
    out, runs = base / "zoo-site", base / "zoo-site-runs"
    with open(base / "zoo-site.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "zoo-site.done").exists():
            shutil.rmtree(runs, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            runs.mkdir()
            expected = fake_runs(runs)
            assert main(["site", "--out", str(out), "--runs", str(runs)]) == 0
            (base / "zoo-site.done").write_text(json.dumps(expected))
    return out, runs, json.loads((base / "zoo-site.done").read_text())


# --------------------------------------------------------------------------- in the browser


@pytest.mark.parametrize("model", MODELS)
def test_every_style_is_rendered_in_chromium(built, model, tmp_path):
    from PIL import Image

    from shared import styles

    out, _, _ = built
    page = (out / f"{model}.html").resolve().as_uri()
    dom = parse(chromium("--dump-dom", page, profile=tmp_path / "profile").stdout)

    [code] = dom.find_all("table", cls="code")
    heads = {th.attrs["data-style"]: th for th in code.find_all("th", cls="src")}
    assert list(heads) == list(STYLES)
    for style in STYLES:
        # Every line of the file, once and in order, in its column.
        numbers = [int(td.attrs["data-line"]) for td in code.find_all("td", cls=f"s-{style}")
                   if "data-line" in td.attrs]
        lines = (ROOT / "zoo" / style / f"{model}.py").read_text().splitlines()
        assert numbers == list(range(1, len(lines) + 1)), style
        cells = [td for td in code.find_all("td", cls=f"s-{style}") if "data-line" in td.attrs]
        assert [td.content()[len(str(n)):].strip() for td, n in zip(cells, numbers)] == \
               [line.strip() for line in lines], f"{style}: the cells do not hold the file's lines"
        marked = [td for td in cells if "d-ref" in td.classes]
        assert (not marked) if style == "jax" else marked, style
    rows = code.find_all("tbody")[0].find_all("tr")
    assert all(len(tr.find_all("td")) == len(STYLES) for tr in rows), "a row is not padded to every style"

    # Lines the four class-based files share word for word sit on one row.
    row_of = {(td.attrs["class"].split()[1][2:], int(td.attrs["data-line"])): r
              for r, tr in enumerate(rows) for td in tr.find_all("td") if "data-line" in td.attrs}
    classes = ("flax", "nnx", "haiku", "equinox")
    text = {s: [l.strip() for l in (ROOT / "zoo" / s / f"{model}.py").read_text().splitlines()] for s in classes}
    shared = set.intersection(*({t for t in text[s] if len(t) > 12 and text[s].count(t) == 1} for s in classes))
    assert shared
    for line in shared:
        assert len({row_of[s, text[s].index(line) + 1] for s in classes}) == 1, line

    # One parameter table per style, one row per leaf, mapped to the reference's canonical paths.
    for style in STYLES:
        [table] = dom.find_all("table", cls="params", data_style=style)
        net = styles.build(model, style, in_shape=registry.example_shape(model, site.IN_SHAPE))
        got = [tr.attrs["data-canonical"] for tr in table.find_all("tr") if "data-canonical" in tr.attrs]
        assert got == [rule.canonical for rule in net.converter.rules]
        assert all(len(tr.find_all("td")) == 8 and tr.find_all("td")[6].content().strip()
                   for tr in table.find_all("tr") if "data-canonical" in tr.attrs)

    # Every style's header colour is on screen.
    shot = tmp_path / f"{model}.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,1000", page, profile=tmp_path / "profile")
    shutil.copyfile(shot, f"/tmp/zoo-site-screenshot-{model}.png")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 1000)
    counts = {colour: n for n, colour in image.getcolors(maxcolors=1 << 20)}
    for style in STYLES:
        colour = heads[style].attrs["style"].split("background:")[1].strip().rstrip(";")
        rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
        assert counts.get(rgb, 0) > 2000, f"{style}'s column header ({colour}) is not on the screenshot"


# --------------------------------------------------------------------------- the generated files


def test_tests_named_on_the_pages_exist(built):
    out, _, _ = built
    names = set()
    for page in out.glob("*.html"):
        dom = parse(page.read_text())
        refs = [a for a in dom.find_all("a") if "data-test" in a.attrs]
        assert refs, page.name
        ids = {n.attrs["id"] for n in dom.iter() if "id" in n.attrs}
        for a in refs:
            names.add(a.attrs["data-test"])
            assert a.attrs["href"].lstrip("#") in ids, f"{page.name}: {a.attrs['href']} goes nowhere"
    assert len(names) >= 6
    for name in names:
        path, _, function = name.partition("::")
        tree = ast.parse((ROOT / path).read_text())
        assert function in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name


def test_the_site_stands_alone_without_javascript(built):
    out, _, _ = built
    assert sorted(p.name for p in out.glob("*.html")) == sorted(["index.html", *(f"{m}.html" for m in MODELS)])
    for page in out.glob("*.html"):
        dom = parse(page.read_text())
        assert not dom.find_all("script"), page.name
        assert not [n for n in dom.iter() if any(k.startswith("on") for k in n.attrs)], page.name
        for node in dom.iter():
            link = node.attrs.get("href") or node.attrs.get("src")
            if link and not link.startswith("#"):
                assert "://" not in link and not link.startswith("/"), f"{page.name} links out: {link}"
                assert (out / link.split("#")[0]).is_file(), f"{page.name}: {link} is missing"


def test_results_are_shown_and_missing_ones_say_how_to_make_them(built):
    out, runs, expected = built
    cnn = parse((out / "cnn.html").read_text())
    [compare] = cnn.find_all("table", cls="compare")
    body = compare.find_all("tbody")[0].find_all("tr")
    assert len(body) == len(STYLES)
    for tr, row in zip(body, expected["compare"]):
        assert f"{100 * row['test_accuracy']:.2f}%" in tr.content()
    [bench] = cnn.find_all("table", cls="bench")
    assert [tr.find_all("td")[2].content() for tr in bench.find_all("tbody")[0].find_all("tr")] == \
           [f"{r['step_ms']:.3f}" for r in expected["bench"]]
    images = {img.attrs["src"] for img in cnn.find_all("img")}
    assert images == {"img/bench.png", "img/cnn-flax-digits-curves.png"}
    assert (out / "img/cnn-flax-digits-curves.png").read_bytes() == \
           (runs / "cnn-flax-digits" / "curves.png").read_bytes()

    vae = parse((out / "vae.html").read_text())
    assert "img/vae-haiku-digits-samples.png" in {img.attrs["src"] for img in vae.find_all("img")}
    assert "zoo compare vae" in " ".join(n.content() for n in vae.find_all("p", cls="missing"))

    notes = " ".join(n.content() for n in parse((out / "mlp.html").read_text()).find_all("p", cls="missing"))
    for command in ("zoo compare mlp", "zoo bench mlp", "zoo train mlp --style"):
        assert command in notes


def test_initialiser_labels_agree_with_the_documented_constants(built):
    from zoo.test_initialisers import BIAS_STD, KERNEL_STD, LAYERS as DOCUMENTED, TRUNCATED_STD

    assert site.truncated_normal_std(2.0) == pytest.approx(TRUNCATED_STD, rel=1e-12)
    spread = {k.name: k.spread for k in site.KNOWN_INITIALISERS} | {"zeros": 0.0}
    out, _, _ = built
    for model in MODELS:
        dom = parse((out / f"{model}.html").read_text())
        for style in STYLES:
            [table] = dom.find_all("table", cls="params", data_style=style)
            for tr in table.find_all("tr"):
                if "data-canonical" not in tr.attrs:
                    continue
                label = tr.find_all("td")[6].content().strip()
                if label.startswith(("the layer's own", "drawn", "too few draws")):
                    # An LSTM's or an attention's own initialiser, a class token: not the framework's
                    # dense/conv default, which the documented models must show everywhere.
                    assert model not in DOCUMENTED, (model, style, tr.attrs["data-canonical"], label)
                    continue
                if label.startswith("constant"):  # a normalisation layer's scale (1) or offset (0)
                    assert label == ("constant 1" if tr.attrs["data-canonical"].endswith("scale")
                                     else "constant 0"), (model, style, tr.attrs["data-canonical"], label)
                    continue
                documented = (KERNEL_STD if tr.attrs["data-canonical"].endswith("kernel") else BIAS_STD)[style]
                assert spread[label] == pytest.approx(documented, rel=1e-9), (model, style, label)
