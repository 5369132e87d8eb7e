"""Fixtures shared by the parity tests (zoo/) and the tests of shared/ (tests/)."""

import os
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
# the same machine starts warm (the whole suite on 2 cores: about 255 s warm, 620 to 800 s cold).
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

from shared.registry import NAMES  # noqa: E402 (after the cache settings: it imports jax)

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
