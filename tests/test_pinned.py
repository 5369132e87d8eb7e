"""Short runs pinned bitwise: a refactor of the loop, the adapters or the contract that changes
what the MLP, CNN or VAE compute shows up here.

The losses in ``pinned_losses.json`` are the 11 steps of one epoch on digits, each style from its
own initialiser, drawn by one compiled program (the file's note says which sets predate that, and
what they keep); the VAE since each framework draws its noise its own way (a set may lack a model
it was not measured for). They depend on the jax and
XLA build and on the processor: XLA's CPU code generation uses the vector extensions it finds
(AVX2, AVX-512), and other vector widths sum floats in another order. So each set of losses is
recorded with the machine's fingerprint:

- on a recorded machine the run must match its losses bitwise;
- elsewhere it must match one recorded set bitwise or stay within ``CROSS_MACHINE_RTOL`` of
  every set. Two machines' runs of the same code differ by at most 1.9e-7 relative (measured:
  an AVX2-only AMD EPYC against the first set's machine); 1e-6 leaves a factor of five for other
  processors and still catches any change of what is computed (a different draw, a different
  loss, a different order of steps moves a loss by 1e-3 or more).
"""

import json
from pathlib import Path

import jax
import jaxlib
import numpy as np
import pytest

from shared import styles
from shared.registry import STYLES
from shared.train import TrainConfig, train

PINNED = json.loads((Path(__file__).with_name("pinned_losses.json")).read_text())["machines"]
CROSS_MACHINE_RTOL = 1e-6
# The processor features that steer XLA's CPU code generation.
VECTOR_FEATURES = ("amx_tile", "avx", "avx2", "avx512_bf16", "avx512bw", "avx512f", "avx512vl", "avx_vnni",
                   "fma", "sse4_1", "sse4_2")


def fingerprint() -> str:
    """``jaxlib VERSION cpu FEATURES``: what decides the compiled code, hence the last bits."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    features = " ".join(f for f in VECTOR_FEATURES if f in flags) or "unknown"
    return f"jaxlib {jaxlib.__version__} {jax.default_backend()} {features}"


# Every style of the MLP (cheap to compile); for the CNN and the VAE the reference and Equinox,
# whose adapter changed most (one example under jax.vmap, its arrays in a flat dict). The parity
# tests tie the others to the reference.
CASES = [("mlp", style) for style in STYLES] + [(m, s) for m in ("cnn", "vae") for s in ("jax", "equinox")]


@pytest.mark.parametrize("model,style", CASES)
def test_a_short_run_trains_exactly_as_pinned(model, style, digits):
    net = styles.build(model, style, in_shape=digits.in_shape, num_classes=digits.num_classes)
    result = train(net, digits, TrainConfig(epochs=1, batch_size=128), progress=False)
    got = [float(x).hex() for x in result.step_losses]
    recorded = [m["losses"][f"{model}/{style}"] for m in PINNED if f"{model}/{style}" in m["losses"]]
    here = [m["losses"][f"{model}/{style}"] for m in PINNED
            if m["fingerprint"] == fingerprint() and f"{model}/{style}" in m["losses"]]
    assert recorded, f"{model}/{style} is pinned on no machine"
    if here:
        assert got == here[0], f"not bitwise equal to the losses recorded on this machine ({fingerprint()})"
        return
    if got in recorded:
        return
    losses = np.array([float.fromhex(x) for x in got])
    for pinned in recorded:
        np.testing.assert_allclose(losses, [float.fromhex(x) for x in pinned], rtol=CROSS_MACHINE_RTOL, atol=0,
                                   err_msg=f"an unrecorded machine ({fingerprint()}) beyond the cross-machine "
                                           "rounding")


def test_the_fingerprint_names_the_build_and_the_vector_extensions():
    """A recorded machine is recognised by its fingerprint, so its check is bitwise."""
    assert fingerprint().startswith(f"jaxlib {jaxlib.__version__} {jax.default_backend()} ")
    assert len({m["fingerprint"] for m in PINNED}) == len(PINNED)
