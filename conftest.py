"""Fixtures shared by the parity tests (zoo/) and the tests of shared/ (tests/)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
