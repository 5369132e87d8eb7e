"""zoo import and zoo export: the frameworks' own examples' checkpoints, brought in and sent back.

The two peer models are written here the way the frameworks' own MNIST examples
write them, with the names those frameworks generate: Flax's compact CNN
(``Conv_0``, ``Conv_1``, ``Dense_0``, ``Dense_1``; google/flax examples/mnist)
and Haiku's MLP (300, 100) (``hk.nets.MLP``: ``mlp/~/linear_0`` ...; and plain
``hk.Linear`` layers: ``linear``, ``linear_1``, ``linear_2``). Their freshly
initialised parameters are saved in the native formats, imported, and every
style's outputs on the real MNIST test images must agree with the original
module's.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import flax.linen as nn
import flax.serialization
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from shared import checkpoint, mnist
from shared.cli import main
from shared.registry import STYLES

REAL_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
# From the same parameters, the catalogue's styles agree with the original modules to float32
# rounding of the sums: logits of order 1, sums of up to 3136 products.
LOGIT_ATOL = 1e-5


class FlaxCNN(nn.Module):
    """The CNN of google/flax examples/mnist/train.py, as written there."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=256)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        return x


def haiku_nets_mlp(x):
    """dm-haiku examples/mnist.py: hk.nets.MLP([300, 100, 10]) on the flattened image."""
    return hk.nets.MLP([300, 100, 10])(hk.Flatten()(x))


def haiku_linears(x):
    """The same MLP from three hk.Linear modules: Haiku names them linear, linear_1, linear_2."""
    x = hk.Flatten()(x)
    x = jax.nn.relu(hk.Linear(300)(x))
    x = jax.nn.relu(hk.Linear(100)(x))
    return hk.Linear(10)(x)


@pytest.fixture(scope="module")
def real_mnist():
    images_path, labels_path = REAL_DIR / mnist.TEST_IMAGES, REAL_DIR / mnist.TEST_LABELS
    if not (images_path.is_file() and labels_path.is_file()):
        pytest.skip(f"the real MNIST test set is not in {REAL_DIR}")
    images, labels = mnist.read_split(images_path, labels_path)
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)  # (N, 28, 28, 1) in [0, 1]


def save_npz(path: Path, params) -> None:
    np.savez(path, **{f"{module}/{name}": np.asarray(v) for module, leaves in params.items()
                      for name, v in leaves.items()})


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """{name: (file, model, hparams, the original forward pass)}, saved the frameworks' way."""
    root = tmp_path_factory.mktemp("peers")
    x0 = jnp.zeros((1, 28, 28, 1))
    out = {}
    variables = FlaxCNN().init(jax.random.key(1), x0)
    (root / "cnn.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    out["flax-cnn"] = (root / "cnn.msgpack", "cnn", "flax", [], lambda x: FlaxCNN().apply(variables, x))
    saver = ocp.StandardCheckpointer()  # the other way Flax users save: an Orbax folder of the params
    saver.save((root / "cnn-orbax").absolute(), variables["params"])
    saver.wait_until_finished()
    out["flax-cnn-orbax"] = (root / "cnn-orbax", *out["flax-cnn"][1:])
    for name, fn, seed in (("haiku-nets-mlp", haiku_nets_mlp, 2), ("haiku-linears", haiku_linears, 3)):
        forward = hk.without_apply_rng(hk.transform(fn))
        params = forward.init(jax.random.key(seed), x0)
        save_npz(root / f"{name}.npz", params)
        out[name] = (root / f"{name}.npz", "mlp", "haiku", ["--hidden-sizes", "300,100"],
                     lambda x, forward=forward, params=params: forward.apply(params, x))
    return out


def zoo(*args) -> int:
    return main([str(a) for a in args])


@pytest.mark.parametrize("peer", ["flax-cnn", "flax-cnn-orbax", "haiku-nets-mlp", "haiku-linears"])
def test_a_peer_examples_checkpoint_imports_and_every_style_computes_the_same(peer, peers, real_mnist, tmp_path,
                                                                             capsys):
    file, model, source, flags, original = peers[peer]
    images, labels = real_mnist
    ckpt = tmp_path / "ckpt"
    assert zoo("import", file, "--model", model, "--from", source, *flags, "--out", ckpt) == 0
    table = capsys.readouterr().out
    expected = {"flax-cnn": ["Conv_0   ->  conv1", "Dense_1  ->  dense2"],
                "flax-cnn-orbax": ["Conv_0   ->  conv1", "Dense_1  ->  dense2"],
                "haiku-nets-mlp": ["mlp/~/linear_0  ->  layers_0", "mlp/~/linear_2  ->  layers_2"],
                "haiku-linears": ["linear    ->  layers_0", "linear_2  ->  layers_2"]}[peer]
    for row in expected:
        assert row in table, table
    want = np.concatenate([np.asarray(original(images[i:i + 2000])) for i in range(0, len(images), 2000)])
    for style in STYLES:
        net, params, state = checkpoint.load_variables(ckpt, style, expect_model=model)
        apply = jax.jit(lambda p, s, x, y: net.apply(p, s, x, y, jax.random.key(0), False)[0])
        got = np.concatenate([np.asarray(apply(params, state, images[i:i + 2000], labels[i:i + 2000]))
                              for i in range(0, len(images), 2000)])
        np.testing.assert_allclose(got, want, atol=LOGIT_ATOL, rtol=0, err_msg=style)
        assert (got.argmax(-1) == want.argmax(-1)).all(), f"{style}: a prediction differs"


FORMATS = [("jax", "npz"), ("flax", "msgpack"), ("flax", "npz"), ("nnx", "msgpack"), ("haiku", "npz"),
           ("equinox", "eqx"), ("equinox", "npz")]


@pytest.mark.parametrize("style,fmt", FORMATS, ids=[f"{s}-{f}" for s, f in FORMATS])
def test_export_then_import_is_bitwise_the_same_parameters(style, fmt, peers, tmp_path):
    ckpt, again = tmp_path / "ckpt", tmp_path / "again"
    file, model, source, flags, _ = peers["flax-cnn"]
    assert zoo("import", file, "--model", model, "--from", source, *flags, "--out", ckpt) == 0
    assert zoo("export", ckpt, "--style", style, "--format", fmt, "--out", tmp_path / "exported") == 0
    exported = tmp_path / f"exported.{fmt}"
    assert exported.is_file()
    assert zoo("import", exported, "--model", model, "--from", style, "--out", again) == 0
    assert checkpoint.read_meta(again, 0)["arrays"] == checkpoint.read_meta(ckpt, 0)["arrays"]  # CRC-32s too


def refused(capsys, *args) -> str:
    assert zoo(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("zoo: error: "), err
    return err


class Payload:
    """Unpickling this would create a file: a pickle runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_is_refused_without_being_loaded(tmp_path, capsys):
    marker = tmp_path / "the-pickle-ran"
    for name in ("params.pkl", "params.npz"):  # by its name, and by its first byte under another name
        (tmp_path / name).write_bytes(pickle.dumps({"layers_0": Payload(marker)}))
        err = refused(capsys, "import", tmp_path / name, "--model", "mlp", "--from", "haiku",
                      "--out", tmp_path / "out")
        assert "is a pickle" in err and "runs whatever code it holds" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_an_ambiguous_mapping_is_refused_and_map_settles_it(tmp_path, capsys):
    """Three Haiku-style modules where name order and network order disagree: the two hidden
    layers have the same shapes, so only the user can say which comes first."""
    rng = np.random.default_rng(0)
    shapes = {"a": (64, 10), "b": (64, 64), "c": (64, 64)}  # "a" is the output layer
    file = tmp_path / "odd.npz"
    np.savez(file, **{f"{m}/{leaf}": rng.standard_normal(s if leaf == "w" else s[1:]).astype(np.float32)
                      for m, s in shapes.items() for leaf in ("w", "b")})
    common = ["--model", "mlp", "--from", "haiku", "--in-shape", "8,8,1", "--hidden-sizes", "64,64"]
    err = refused(capsys, "import", file, *common, "--out", tmp_path / "out")
    assert "cannot tell which module of the file is layers_0" in err and "b and c all fit" in err
    (tmp_path / "map.json").write_text(json.dumps({"c": "layers_0", "b": "layers_1"}))
    assert zoo("import", file, *common, "--map", tmp_path / "map.json", "--out", tmp_path / "out") == 0
    _, params, _ = checkpoint.load_variables(tmp_path / "out", "jax")
    with np.load(file) as archive:
        np.testing.assert_array_equal(params["layers_0"]["kernel"], archive["c/w"])
        np.testing.assert_array_equal(params["layers_1"]["kernel"], archive["b/w"])
        np.testing.assert_array_equal(params["layers_2"]["kernel"], archive["a/w"])


def test_shapes_that_do_not_fit_are_refused_in_one_line(peers, tmp_path, capsys):
    file, _, _, _, _ = peers["haiku-nets-mlp"]
    err = refused(capsys, "import", file, "--model", "mlp", "--from", "haiku", "--out", tmp_path / "out")
    assert "cannot tell which module of the file is layers_0" in err  # (784, 128) fits none of them
    err = refused(capsys, "import", file, "--model", "cnn", "--from", "haiku", "--out", tmp_path / "out")
    assert "the file has 3 modules with parameters and the model 4" in err
    assert not (tmp_path / "out").exists()
