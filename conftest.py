"""Fixtures shared by the parity tests (zoo/) and the tests of shared/ (tests/)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache: both xdist workers and every `zoo` subprocess a test
# starts compile the same steps and initialisers again and again, and so does the next run. A
# cached executable is the very program XLA would compile (keyed by the computation, the compile
# options, the jax version and the device; XLA:CPU refuses one built for other CPU features and
# compiles afresh), so nothing checked changes; only the waiting does. It lives at one fixed
# path in the user's cache folder, not in the checkout, so that a fresh clone or a CI checkout on
# the same machine starts warm (the whole suite on 2 cores: 552 s warm, 1,190 s cold, on 3c14a86).
# The key holds the folder's own path too (jax sets XLA's autotune-cache option beneath it): a
# copied or moved cache is a cold one. One state of the code writes about 55 MB; delete the
# folder to reclaim it (JAX's size cap, JAX_COMPILATION_CACHE_MAX_SIZE, rescans the whole
# folder under a lock on every write). Set before jax is imported.


def _cache_dir() -> Path:
    """The user's cache folder, or the checkout's where that cannot be written (a read-only home):
    a cache that fails to write would warn on the stderr of every `zoo` a test starts."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zoo" / "jax"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    return Path(__file__).resolve().parent / ".jax_cache"


if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # one the user set is kept, and ours is not made
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_cache_dir())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402 (after the cache settings)

from shared.registry import NAMES  # noqa: E402

@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns -n into workers
def pytest_cmdline_main(config):
    """A plain `pytest zoo` runs on every core (xdist's ``-n auto``): the checks are hundreds of
    independent compiles, about 90 s on 2 cores where one process takes about 145 s. An explicit
    ``-n N`` is kept (``-n 0`` runs in this process, as does ``--pdb``, which xdist cannot serve);
    the workers themselves never start workers."""
    if (getattr(config.option, "numprocesses", 0) is None and not config.option.usepdb
            and "PYTEST_XDIST_WORKER" not in os.environ):
        config.option.numprocesses = "auto"


def pytest_collection_modifyitems(items):
    """The heavy tests first (a stable sort): xdist hands tests out in this order, and a
    minutes-long test handed out last would leave one worker idle while the other runs it."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


class _ByModel(LoadScopeScheduling):
    """xdist's ``--dist load``, but the tests of one model go to one worker as one unit.

    They compile the same reference steps, initialisers and runs, which one
    worker compiles once and keeps (``functools.cache``, module fixtures, the
    persistent cache) where two workers would each compile them. A test's model
    is a registry name among its parameters (``[vit-flax]``), else its file's
    (``test_vit.py``); every other test is a unit of its own. The tests of a
    file in ``ONE_UNIT`` share one expensive build (the site, behind a file lock),
    so they stay together: split, one worker would wait for the other's build.
    Units go out in collection order, the heavy tests' first.
    """

    ONE_UNIT = ("tests/test_site.py",)

    def _split_scope(self, nodeid: str) -> str:
        path, _, name = nodeid.partition("::")
        if path in self.ONE_UNIT:
            return f"file:{path}"
        params = name.partition("[")[2].rstrip("]").split("-")
        named = [p for p in params if p in NAMES]
        stem = Path(path).stem.removeprefix("test_")
        return f"model:{named[0]}" if named else f"model:{stem}" if stem in NAMES else nodeid


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "load":  # -n without --dist; another --dist is left as asked
        config.option.loadscopereorder = False
        return _ByModel(config, log)
    return None


# The team's real MNIST test files, beside the project root (not the project's own shared/).
MNIST_DIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A TFDS data dir private to this test session."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def digits(data_dir):
    from shared import data

    return data.load("digits", data_dir)


@pytest.fixture(scope="session")
def addition(data_dir):
    """1-digit addition: a language model's smallest dataset (80 training and 20 test problems)."""
    from shared import data

    return data.load("addition", data_dir, digits=1)


@pytest.fixture(scope="session")
def two_hosts():
    """``run(args, devices)``: ``python -m shared.cli *args`` as two processes joined by jax.distributed
    over localhost (``--coordinator``, ``--num-processes 2``, ``--process-id``), each with ``devices``
    CPU devices; their ``(returncode, stdout, stderr)``, both killed if either hangs."""
    def run(args, devices: int = 2, timeout: float = 600):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        procs = [subprocess.Popen([sys.executable, "-m", "shared.cli", *map(str, args), "--coordinator",
                                   f"localhost:{port}", "--num-processes", "2", "--process-id", str(rank)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for rank in range(2)]
        try:
            outs = [proc.communicate(timeout=timeout) for proc in procs]
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outs)]
    return run


@pytest.fixture(autouse=True)
def _x64_restored():
    """A float64 run in this process turns on JAX's x64 mode for the whole process (the command line
    calls jax.config.update, which outlives a ``with jax.enable_x64`` block): put it back after each
    test, so that no test sees another's precision."""
    before = jax.config.jax_enable_x64
    yield
    if jax.config.jax_enable_x64 != before:
        jax.config.update("jax_enable_x64", before)


# --------------------------------------------------------------------------- the compile report
#
# ``pytest --compile-report`` (or ZOO_COMPILE_REPORT=1) lists the tests that compile the most
# XLA programs and the seconds they spend compiling, and each model's total against its budget
# (COMPILE_BUDGETS): the suite's time is mostly compiling, so this keeps it visible as models
# are added. Counted in the test's own process from JAX's monitoring events: a ``zoo`` started
# as a subprocess compiles in its own process and shows only in the test's wall time.

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # one per program, cache hit or not
CACHE_MISS = "/jax/compilation_cache/cache_misses"  # one per program compiled afresh (not in the cache)
# Programs each model's tests compile in their own processes (JAX's backend-compile events: one per
# program built, fresh or read from the persistent cache), the budget the report holds them to. A count,
# not seconds: it is the same cold and warm, on any machine and under any load (the seconds of one
# cold run swing by a third with what else the two cores are doing). Measured with README's test
# command on 82e43ff, cold and warm (`--compile-report`): mlp 320, cnn 264-270, vae 266, resnet 355-388,
# lstm 341, vit 378, gpt 436, other 1,160-1,216; the budgets are a tenth above. A model that goes over
# has added programs: share them or make them smaller. "other" is every test of no model.
COMPILE_BUDGETS = {"mlp": 350, "cnn": 300, "vae": 295, "resnet": 430, "lstm": 375, "vit": 415, "gpt": 480,
                   "other": 1340}
_compiles = {"count": 0, "misses": 0, "seconds": 0.0}


def _on_duration(event: str, duration: float, **_) -> None:
    if event == BACKEND_COMPILE:
        _compiles["count"] += 1
        _compiles["seconds"] += duration


def _on_event(event: str, **_) -> None:
    if event == CACHE_MISS:
        _compiles["misses"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


def pytest_addoption(parser):
    parser.addoption("--compile-report", type=int, nargs="?", const=15, default=None, metavar="N",
                     help="list the N tests (default 15) that compile the most XLA programs, and each "
                          "model's programs against its budget (also: ZOO_COMPILE_REPORT=N)")


def _report_size(config) -> int | None:
    given = config.getoption("compile_report")
    if given is None and os.environ.get("ZOO_COMPILE_REPORT"):
        given = int(os.environ["ZOO_COMPILE_REPORT"]) if os.environ["ZOO_COMPILE_REPORT"].isdigit() else 15
    return given


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.zoo_compile_mark = dict(_compiles)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "teardown":  # a test's last report: what its setup, call and teardown compiled
        mark = getattr(item, "zoo_compile_mark", {k: 0 for k in _compiles})
        outcome.get_result().user_properties.append(("zoo_compiles", {k: _compiles[k] - mark[k] for k in _compiles}))


def model_of(nodeid: str) -> str:
    """The model a test belongs to, as the scheduler groups them ("other" for none)."""
    scope = _ByModel._split_scope(object.__new__(_ByModel), nodeid)
    return scope.partition(":")[2] if scope.startswith("model:") else "other"


_seen: list[tuple[str, dict, float]] = []
_durations: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        counts = dict(report.user_properties).get("zoo_compiles")
        if counts is not None:
            _seen.append((report.nodeid, counts, _durations.pop(report.nodeid, 0.0) + report.duration))
    else:
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, config):
    size = _report_size(config)
    if size is None or not _seen or "PYTEST_XDIST_WORKER" in os.environ:
        return
    write = terminalreporter.write_line
    terminalreporter.section("XLA compiles per test")
    write(f"{'programs':>8} {'fresh':>6} {'compile s':>9} {'wall s':>7}  test")
    for nodeid, c, wall in sorted(_seen, key=lambda s: -s[1]["seconds"])[:size]:
        write(f"{c['count']:>8} {c['misses']:>6} {c['seconds']:>9.1f} {wall:>7.1f}  {nodeid}")
    totals: dict[str, list[float]] = {}
    for nodeid, c, wall in _seen:
        t = totals.setdefault(model_of(nodeid), [0, 0, 0.0, 0.0])
        t[0] += c["count"]
        t[1] += c["misses"]
        t[2] += c["seconds"]
        t[3] += wall
    write("")
    write(f"{'model':<8} {'programs':>8} {'budget':>6} {'fresh':>6} {'compile s':>9} {'wall s':>7}")
    for model, (count, misses, seconds, wall) in sorted(totals.items()):
        budget = COMPILE_BUDGETS.get(model)
        flag = "  over budget" if budget is not None and count > budget else ""
        write(f"{model:<8} {count:>8} {budget or '-':>6} {misses:>6} {seconds:>9.1f} {wall:>7.1f}{flag}")
    all_ = [sum(t[i] for t in totals.values()) for i in range(4)]
    write(f"{'all':<8} {all_[0]:>8} {'':>6} {all_[1]:>6} {all_[2]:>9.1f} {all_[3]:>7.1f}")
