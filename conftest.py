"""Fixtures shared by the parity tests (zoo/) and the tests of shared/ (tests/)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent XLA compilation cache for the whole run: both xdist workers and every `zoo`
# subprocess a test starts compile the same steps and initialisers again and again. A cached
# executable is the very program XLA would compile (keyed by the computation and the jax
# version), so nothing checked changes; only the waiting does. Set before jax is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parent / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

def pytest_collection_modifyitems(items):
    """The heavy tests first (a stable sort): xdist hands tests out in this order, and a
    minutes-long test handed out last would leave one worker idle while the other runs it."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


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
