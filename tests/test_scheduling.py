"""The test scheduler of conftest.py: which tests go to one worker together, how many workers a
plain `pytest` starts; and where its compile cache lives."""

import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import _ByModel, _cache_dir, pytest_cmdline_main


def scope(nodeid: str) -> str:
    return _ByModel._split_scope(object.__new__(_ByModel), nodeid)  # no xdist session needed


def test_a_model_s_tests_form_one_unit_and_the_others_stand_alone():
    assert scope("zoo/test_parity.py::test_gradients_match_reference[vit-flax]") == "model:vit"
    assert scope("tests/test_bench.py::test_idiomatic_steps_compute_what_the_loop_computes[vit]") == "model:vit"
    assert scope("zoo/test_features.py::test_bfloat16_forward_matches_reference[haiku-lstm]") == "model:lstm"
    assert scope("zoo/test_vit.py::test_how_the_mask_reaches_the_attention") == "model:vit"
    # Not a model: a style alone, or no parameters; each such test is its own unit.
    alone = "tests/test_checkpoint.py::test_init_from_takes_only_the_parameters_from_any_style[flax]"
    assert scope(alone) == alone
    assert scope("tests/test_data.py::test_digits_split") == "tests/test_data.py::test_digits_split"
    # The site's tests share one build behind a lock: one unit, whatever their model.
    assert scope("tests/test_site.py::test_every_style_is_rendered_in_chromium[mlp]") == "file:tests/test_site.py"
    assert scope("tests/test_site.py::test_tests_named_on_the_pages_exist") == "file:tests/test_site.py"


def test_the_compile_cache_is_the_user_s_unless_that_cannot_be_made(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cache_dir() == tmp_path / "zoo" / "jax" and (tmp_path / "zoo" / "jax").is_dir()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # no folder can be made beneath a file
    assert _cache_dir() == Path(__file__).resolve().parent.parent / ".jax_cache"


def test_a_plain_pytest_starts_a_worker_per_core_and_an_explicit_n_is_kept(monkeypatch):
    # Once through pytest itself, which proves the hook runs before xdist's (else no workers).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "XDIST_"))}
    env["PYTEST_XDIST_AUTO_NUM_WORKERS"] = "2"  # xdist's own override of the core count
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "tests/test_scheduling.py::test_a_model_s_tests_form_one_unit_and_the_others_stand_alone"],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "created: 2/2 workers" in done.stdout, done.stdout + done.stderr

    def workers(numprocesses, usepdb=False):
        config = SimpleNamespace(option=SimpleNamespace(numprocesses=numprocesses, usepdb=usepdb))
        pytest_cmdline_main(config)
        return config.option.numprocesses

    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    assert workers(None) == "auto"
    assert (workers(3), workers(0), workers(None, usepdb=True)) == (3, 0, None)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")  # a worker: it must not start workers itself
    assert workers(None) is None


@pytest.mark.parametrize("module", ["flax.linen.module", "flax.nnx", "haiku._src.pool", "equinox._module", "optax",
                                    "orbax.checkpoint", "jax._src.numpy", "jmp", "shared.styles", "zoo.harness"])
def test_a_deprecation_in_a_framework_or_in_our_code_fails_the_test(module):
    """pyproject.toml's filters: a DeprecationWarning attributed to a framework's module (raised in its
    code) or to ours (a framework warning at our call into it) is an error; no blanket ignore."""
    with pytest.raises(DeprecationWarning):
        warnings.warn_explicit("deprecated", DeprecationWarning, "x.py", 1, module=module)
    config = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert "ignore::DeprecationWarning" not in config
