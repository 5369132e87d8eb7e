"""``zoo bench``: what each style costs against plain JAX, measured side by side.

For every model and style this times the train step two ways:

- **fast**: exactly what the shared loop runs, ``jax.jit(make_train_step(...))``
  on the :class:`~shared.styles.Model` adapter (NNX split/merge, Equinox
  partition/combine, all under plain ``jax.jit``);
- **idiomatic**: what each framework's documentation shows, where that differs:
  ``nnx.Optimizer`` + ``@nnx.jit`` + ``nnx.value_and_grad`` for NNX,
  ``@eqx.filter_jit`` + ``eqx.filter_value_and_grad`` + ``eqx.apply_updates``
  for Equinox. Plain JAX and Haiku are idiomatically ``jax.jit`` over
  params/opt_state, which *is* the fast pattern; Linen's ``TrainState`` is a
  ``flax.struct`` pytree of the same params and optax state under the same
  ``jax.jit``, with ``apply_gradients`` doing ``optimizer.update`` +
  ``optax.apply_updates``: the same traced computation. Those three are
  measured once and marked ``idiomatic_is_fast``;
- **guided**: what each framework's performance documentation recommends
  against dispatch overhead: ``nnx.cached_partial`` over the ``nnx.jit`` step
  (Flax's "Performance considerations" guide) and ``eqx.filter_jit`` over the
  flattened leaves of the model and optimizer state (Equinox's "Low-overhead
  training loops" trick). For plain JAX, Linen and Haiku the documented
  pattern is the fast one: their rows say ``same_as: "fast"`` and carry its
  measurement.

Every step computes the same thing as :func:`shared.train.make_train_step`
(same per-step key, same loss from :func:`shared.tasks.per_example`, same
optimizer, same finite flags), so XLA's cost analysis of the compiled steps
must report the same FLOPs as the plain-JAX reference. A difference means the
style computes something else and is reported as a failure (exit status 1),
unless it is made of dtype conversions alone (XLA counts a FLOP per converted
element; :func:`convert_elements` counts them in the compiled HLO): that is the
same arithmetic with casts in other places, and the row says so.

Timing (own code: pyperf runs each benchmark in its own worker processes and
pytest-benchmark times one callable at a time; neither interleaves): ahead-of-time
``lower().compile()`` (timed as the compile), warm-up, then rounds in which
every case of one model and batch size runs in a freshly shuffled order, so
drift of the machine hits every style alike. In each round a case runs ``K``
chained steps with one ``block_until_ready`` at the end (``step_ms``: the
asynchronous throughput the training loop sees) and ``K`` steps blocking after
every call (``step_ms_blocking``), recording when each call returned control to
Python and whether its result was already computed by then
(``ready_on_return``: 1.0 means the call waited for the step to finish, so the
next step's Python work cannot overlap this step's computation). Medians over
rounds; the garbage collector is off while timing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import gzip
import importlib
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import equinox as eqx
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from shared import data as data_lib
from shared import files
from shared import generate as generate_lib
from shared import parallel
from shared import styles as styles_lib
from shared import tasks
from shared.args import choice_list, path_arg, positive_int, seed
from shared.data import add_data_args
from shared.errors import ZooError
from shared.files import atomic_path, write_json, write_text
from shared.registry import MODELS, NAMES, STYLES
from shared.styles import Model
from shared.train import (TrainConfig, TrainState, count_params, make_mesh, make_optimizer, make_train_step,
                          placed_step)

PATTERNS = ("fast", "idiomatic", "guided")
# Styles whose documented idiom is plain jax.jit over params and optimizer state: the fast pattern.
IDIOMATIC_IS_FAST = ("jax", "flax", "haiku")
API = {
    ("jax", "fast"): "jax.jit(make_train_step)",
    ("flax", "fast"): "jax.jit(make_train_step); = TrainState + jax.jit",
    ("nnx", "fast"): "nnx.split/merge + jax.jit",
    ("haiku", "fast"): "hk.transform + jax.jit",
    ("equinox", "fast"): "eqx.partition/combine + jax.jit",
    ("nnx", "idiomatic"): "nnx.Optimizer + nnx.jit",
    ("equinox", "idiomatic"): "eqx.filter_jit",
    ("nnx", "guided"): "nnx.cached_partial(nnx.jit step)",
    ("equinox", "guided"): "eqx.filter_jit on flat leaves",
}
# An HLO instruction converting dtypes: "%c = bf16[128,64]{1,0} convert(%p), ...".
_CONVERT = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+convert\(")
_LINEAR = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+(convolution|dot)\(")
_DEFINED = re.compile(r"(%[\w.\-]+)\s*=\s*\w+\[([\d,]*)\]")
_DOT = re.compile(r"=\s*\w+\[([\d,]*)\]\S*\s+dot\((%[\w.\-]+),.*?lhs_contracting_dims=\{([\d,]*)\}")
DEFAULT_BATCH_SIZES = (128, 8)
DEFAULT_OUT = Path("runs/bench")
ROW_KEYS = ("model", "style", "pattern", "batch_size", "precision", "step_ms", "step_ratio", "compile_s",
            "flops", "flops_equal")


@dataclasses.dataclass
class Case:
    """One way of running one model's train step, ready to be called repeatedly.

    ``fn(*args)`` runs a step; ``advance(args, out)`` gives the next call's
    arguments (the new state for functional patterns, the same objects for
    NNX's in-place one); ``loss(out)`` is the step's loss.
    """

    model: str
    style: str
    pattern: str
    batch_size: int
    precision: str
    fn: Callable[..., Any]
    args: tuple
    advance: Callable[[tuple, Any], tuple]
    loss: Callable[[Any], jax.Array]
    params: int
    # What compile_case lowers, when ``fn`` itself cannot be lowered (nnx.cached_partial
    # returns a plain function over the same nnx.jit step).
    lower: Callable[[], Any] | None = None
    # Matrix work this style does beyond the reference's by design of its layers (the registry's
    # ``extra_work``): (multiply-adds in the compiled step, why).
    extra_work: tuple[int, str] | None = None
    # The compiled step's HLO text, kept by compile_case for time_by_kind.
    hlo: str | None = None

    @property
    def label(self) -> str:
        return self.style if self.pattern == "fast" else f"{self.style} ({self.pattern})"

    def run(self, steps: int) -> tuple:
        """``steps`` chained steps without blocking; returns the last output."""
        args, out = self.args, None
        for _ in range(steps):
            out = self.fn(*args)
            args = self.advance(args, out)
        self.args = args
        return out


# --------------------------------------------------------------------------- the steps


def bench_config(batch_size: int, seed: int = 0) -> TrainConfig:
    """The training configuration every benchmarked step uses: the loop's defaults."""
    return TrainConfig(batch_size=batch_size, seed=seed)


def fast_case(model: Model, params: Any, model_state: Any, batch: dict[str, jax.Array], config: TrainConfig,
              key: jax.Array) -> Case:
    """The pattern the shared loop runs: ``jax.jit`` on :func:`make_train_step`."""
    optimizer = make_optimizer(config, 10_000, None)
    step = jax.jit(make_train_step(model, optimizer, config, key))
    state = jax.device_put(TrainState(jnp.zeros((), jnp.int32), params, model_state, optimizer.init(params), None))
    return Case(model.name, model.style, "fast", config.batch_size, model.precision, step, (state, batch),
                lambda args, out: (out[0], args[1]), lambda out: out[1], count_params(params))


def idiomatic_case(model: Model, params: Any, model_state: Any, batch: dict[str, jax.Array],
                   config: TrainConfig, key: jax.Array, pattern: str = "idiomatic") -> Case:
    """The step as the framework's documentation writes it (NNX and Equinox).

    ``pattern="guided"``: the same step the way the framework's performance
    documentation recommends calling it.
    """
    builders = {("nnx", "idiomatic"): _nnx_idiomatic, ("equinox", "idiomatic"): _equinox_idiomatic,
                ("nnx", "guided"): _nnx_guided, ("equinox", "guided"): _equinox_guided}
    if (model.style, pattern) not in builders:
        raise ZooError(f"{model.style}'s {pattern} step is the fast pattern; use fast_case")
    optimizer = make_optimizer(config, 10_000, None)
    fn, args, advance, loss, *lower = builders[model.style, pattern](model, params, model_state, batch,
                                                                      optimizer, key)
    return Case(model.name, model.style, pattern, config.batch_size, model.precision, fn, args,
                advance, loss, count_params(params), *lower)


def _finite(grads: Any, params: Any) -> Any:
    return jax.tree.map(lambda g, p: jnp.isfinite(g).all() & jnp.isfinite(p).all(), grads, params)


def _compute_dtype(model: Model) -> Any:
    """What the idiomatic Equinox step casts the module and the pixels to (Equinox's layers
    do not promote mixed dtypes): bfloat16 for mixed precision, float64 for float64 runs."""
    return {"bfloat16": jnp.bfloat16, "float64": jnp.float64}.get(model.precision)


def _nnx_step(model: Model, params: Any, model_state: Any, optimizer: Any,
              key: jax.Array) -> tuple[Callable, Any, Any]:
    """NNX's documented train step: ``nnx.Optimizer``, ``@nnx.jit``, ``nnx.value_and_grad``."""
    spec = model.spec
    net = model.as_module(params, model_state, True)
    net.train()  # NNX's default; BatchNorm then updates its statistics in place
    opt = nnx.Optimizer(net, optimizer, wrt=nnx.Param)

    @nnx.jit
    def train_step(net, opt, batch):
        step_key = jax.random.fold_in(key, opt.step[...])

        def loss_fn(net):
            args = (batch["image"],) + ((batch["label"],) if spec.labels else ())
            outputs = net(*args, **({"rngs": nnx.Rngs(**{spec.rng: step_key})} if spec.rng else {}))
            return tasks.per_example(model.kind, styles_lib.widen_to_float32(outputs), batch)["loss"].mean()

        loss, grads = nnx.value_and_grad(loss_fn)(net)
        opt.update(net, grads)
        return loss, _finite(grads, nnx.state(net, nnx.Param))

    return train_step, net, opt


def _nnx_idiomatic(model: Model, params: Any, model_state: Any, batch: dict[str, jax.Array], optimizer: Any,
                   key: jax.Array) -> tuple[Callable, tuple, Callable, Callable]:
    train_step, net, opt = _nnx_step(model, params, model_state, optimizer, key)
    return train_step, (net, opt, batch), lambda args, out: args, lambda out: out[0]


def _nnx_guided(model: Model, params: Any, model_state: Any, batch: dict[str, jax.Array], optimizer: Any,
                key: jax.Array) -> tuple[Callable, tuple, Callable, Callable, Callable]:
    """``nnx.cached_partial``: the graph traversal of the model and optimizer is done once."""
    train_step, net, opt = _nnx_step(model, params, model_state, optimizer, key)
    cached = nnx.cached_partial(train_step, net, opt)
    return cached, (batch,), lambda args, out: args, lambda out: out[0], lambda: train_step.lower(net, opt, batch)


def _equinox_step(model: Model, params: Any, model_state: Any, optimizer: Any,
                  key: jax.Array) -> tuple[Callable, Any, Any]:
    """Equinox's documented train step on the module: ``eqx.filter_value_and_grad``, ``eqx.apply_updates``.

    ``step(net, model_state, opt_state, batch, step) -> (net, model_state,
    opt_state, step + 1, loss, finite)``, not yet jitted; the model state is
    an ``eqx.nn.State`` (or None).
    """
    spec = model.spec
    net, model_state = model.as_module(params, model_state, True)
    compute = _compute_dtype(model)

    def cast(tree):
        if compute is None:
            return tree
        return jax.tree.map(lambda x: x.astype(compute) if eqx.is_inexact_array(x) else x, tree)

    def train_step(net, model_state, opt_state, batch, step):
        step_key = jax.random.fold_in(key, step)

        def loss_fn(net):
            outputs, new_state = styles_lib.equinox_batch(spec, cast(net), cast(batch["image"]), batch["label"],
                                                          model_state, step_key)
            loss = tasks.per_example(model.kind, styles_lib.widen_to_float32(outputs), batch)["loss"].mean()
            return loss, new_state

        (loss, model_state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(net)
        updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(net, eqx.is_array))
        net = eqx.apply_updates(net, updates)
        return net, model_state, opt_state, step + 1, loss, _finite(grads, eqx.filter(net, eqx.is_array))

    return train_step, net, model_state


def _equinox_idiomatic(model: Model, params: Any, model_state: Any, batch: dict[str, jax.Array],
                       optimizer: Any, key: jax.Array) -> tuple[Callable, tuple, Callable, Callable]:
    """``@eqx.filter_jit`` on the step over the module itself."""
    train_step, net, model_state = _equinox_step(model, params, model_state, optimizer, key)
    opt_state = optimizer.init(eqx.filter(net, eqx.is_array))
    args = (net, model_state, opt_state, batch, jnp.zeros((), jnp.int32))
    return (eqx.filter_jit(train_step), args, lambda args, out: (out[0], out[1], out[2], args[3], out[3]),
            lambda out: out[4])


def _equinox_guided(model: Model, params: Any, model_state: Any, batch: dict[str, jax.Array],
                    optimizer: Any, key: jax.Array) -> tuple[Callable, tuple, Callable, Callable]:
    """Equinox's "low-overhead training loops": ``eqx.filter_jit`` over the flattened leaves.

    The model, its state and the optimizer state cross the jit boundary as
    flat lists of leaves, unflattened inside, so nothing is flattened node by
    node on each call.
    """
    train_step, net, model_state = _equinox_step(model, params, model_state, optimizer, key)
    opt_state = optimizer.init(eqx.filter(net, eqx.is_array))
    flat, treedef = jax.tree_util.tree_flatten((net, model_state, opt_state))

    @eqx.filter_jit
    def flat_step(flat, batch, step):
        net, model_state, opt_state = jax.tree_util.tree_unflatten(treedef, flat)
        net, model_state, opt_state, step, loss, finite = train_step(net, model_state, opt_state, batch, step)
        return jax.tree_util.tree_leaves((net, model_state, opt_state)), step, loss, finite

    args = (flat, batch, jnp.zeros((), jnp.int32))
    return flat_step, args, lambda args, out: (out[0], args[1], out[1]), lambda out: out[2]


def make_cases(name: str, styles: Sequence[str], batch: dict[str, np.ndarray], *, in_shape: tuple[int, ...],
               num_classes: int, precision: str = "float32", patterns: Sequence[str] = PATTERNS,
               seed: int = 0, **hparams: Any) -> list[Case]:
    """Every (style, pattern) case of one model at one batch, the plain-JAX reference first.

    Every case starts from the same canonical parameters (the reference's
    initialiser) and the same per-step key, as in ``zoo compare``.
    """
    batch_size = len(batch["label"])
    config = bench_config(batch_size, seed)
    init_key, train_key = jax.random.split(jax.random.key(seed))
    device_batch = jax.device_put(batch)
    cases = []
    canonical = None
    for style in dict.fromkeys(("jax", *styles)):
        model = styles_lib.build(name, style, in_shape=in_shape, num_classes=num_classes,
                                 precision=precision, **hparams)
        if canonical is None:
            start_params, start_state = model.init(init_key)
            canonical = model.to_canonical(start_params), model.state_to_canonical(start_state)
        params = jax.device_put(model.from_canonical(canonical[0]))
        model_state = jax.device_put(model.state_from_canonical(canonical[1], 0))
        added = len(cases)
        if "fast" in patterns or style == "jax":
            cases.append(fast_case(model, params, model_state, device_batch, config, train_key))
        for pattern in ("idiomatic", "guided"):
            if pattern in patterns and style not in IDIOMATIC_IS_FAST:
                cases.append(idiomatic_case(model, params, model_state, device_batch, config, train_key, pattern))
        if style in model.spec.extra_work:
            why, macs = model.spec.extra_work[style]
            for case in cases[added:]:
                case.extra_work = (macs(batch_size, tuple(in_shape), model.hparams), why)
    return cases


# --------------------------------------------------------------------------- measuring


def compile_case(case: Case) -> dict[str, Any]:
    """Ahead-of-time compile of the step: its time, XLA's cost analysis and memory analysis.

    The executable is cached, so the calls that follow do not compile again.
    """
    start = time.perf_counter()
    compiled = (case.lower() if case.lower is not None else case.fn.lower(*case.args)).compile()
    compile_s = time.perf_counter() - start
    compiled = getattr(compiled, "compiled", compiled)  # Equinox wraps jax's Compiled
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    memory = compiled.memory_analysis()
    try:
        hlo = case.hlo = compiled.as_text()
        converts: float | None = float(convert_elements(hlo))
        linear: list | None = linear_algebra(hlo)
        macs: int | None = dot_macs(hlo)
        loops: int | None = hlo.count(" while(")
    except Exception:  # no HLO text from this backend: differences stay unexplained
        converts, linear, macs, loops = None, None, None, None
    info: dict[str, Any] = {
        "compile_s": compile_s,
        "flops": _number(cost.get("flops")),
        "convert_flops": converts,
        "linear_ops": linear,
        "dot_macs": macs,
        "while_loops": loops,
        "transcendentals": _number(cost.get("transcendentals")),
        "bytes_accessed": _number(cost.get("bytes accessed")),
        "memory": None, "peak_bytes": None,
    }
    if memory is not None:
        sizes = {name: int(getattr(memory, f"{name}_size_in_bytes", 0) or 0)
                 for name in ("argument", "output", "temp", "alias", "generated_code")}
        info["memory"] = sizes
        # XLA's static estimate of what is live during the step: inputs, outputs, scratch.
        info["peak_bytes"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return info


def convert_elements(hlo: str) -> int:
    """Elements converted from one dtype to another in an HLO module's text.

    XLA's cost analysis counts one FLOP per converted element, so two steps that
    do the same arithmetic but cast in different places (an int32 step counter
    against a uint32 one; a mixed-precision recipe casting parameters before or
    inside a layer) differ in FLOPs by exactly this much.
    """
    return sum(math.prod(int(d) for d in dims.split(",") if d) for dims in _CONVERT.findall(hlo))


def linear_algebra(hlo: str) -> list[list]:
    """The convolutions and matrix products of an HLO module: ``[op, output elements, count]``, sorted.

    Layout-blind (an NCHW and an NHWC convolution of the same sizes count
    alike), so two steps with the same list run the same linear algebra and
    differ at most in elementwise and reduction work.
    """
    counts: dict[tuple[str, int], int] = {}
    for dims, op in _LINEAR.findall(hlo):
        key = (op, math.prod(int(d) for d in dims.split(",") if d))
        counts[key] = counts.get(key, 0) + 1
    return [[op, size, n] for (op, size), n in sorted(counts.items())]


def dot_macs(hlo: str) -> int:
    """Multiply-adds of an HLO module's matrix products, each counted once as written.

    Output elements times the contracted size. Two steps with the same total do
    the same matrix arithmetic even if they group it differently: one
    ``(in + hidden, 4 * hidden)`` product for an LSTM's four gates (Haiku)
    against eight per-gate products, or per-example products under ``vmap``.
    """
    shapes = {name: [int(d) for d in dims.split(",") if d] for name, dims in _DEFINED.findall(hlo)}
    total = 0
    for out_dims, lhs, contracting in _DOT.findall(hlo):
        lhs_shape = shapes.get(lhs, [])
        inner = math.prod(lhs_shape[int(i)] for i in contracting.split(",") if i) if lhs_shape else 0
        total += math.prod(int(d) for d in out_dims.split(",") if d) * inner
    return total


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


def pytree_us(case: Case, repeats: int = 300) -> float | None:
    """Microseconds to flatten a fast step's arguments and rebuild its result.

    ``jax.jit`` does both on every call, in Python for pytree nodes registered
    in Python (``nnx.State``, Equinox modules), so it is the part of dispatch
    that differs between the fast patterns. None for the idiomatic patterns,
    whose wrappers walk their own object graphs instead.
    """
    if case.pattern != "fast":
        return None
    out = jax.block_until_ready(case.fn(*case.args))
    out_leaves, out_def = jax.tree_util.tree_flatten(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.tree_util.tree_flatten(case.args)
        jax.tree_util.tree_unflatten(out_def, out_leaves)
        times.append(time.perf_counter() - start)
    case.args = case.advance(case.args, out)
    return 1e6 * float(np.median(times))


# --------------------------------------------------------------------------- where the time goes

KINDS = ("convolution", "matmul", "reduction", "layout", "random bits", "elementwise")
# "%name = shape opcode(" (a tuple shape in brackets), and a computation's "name (...) -> ... {" block.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(?:\(.*?\)|\S+)\s+([a-z][\w\-]*)\(.*$", re.M)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s[^\n]*\{\n(.*?)\n\}", re.M | re.S)
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Not kernels: loops and calls (their bodies' kernels are timed themselves), and what no kernel runs.
_NOT_KERNELS = ("while", "conditional", "call", "parameter", "constant", "tuple", "get-tuple-element", "bitcast")
PROFILE_STEPS = 10  # steps traced per case by --profile
_RANDOM = ("threefry", "random_bits", "_uniform", "_bernoulli")  # in jax.random's op names


def kernels(hlo: str) -> dict[str, tuple[str, str]]:
    """Each HLO instruction that runs as a kernel, by name: what kind of work it does, and the
    ``op_name``s of the JAX operations it was made from (where layers name their scopes, such as
    ``vmap(eqx.nn.BatchNorm)`` or Linen's ``stem_bn``, they say whose work it is).

    A fusion is judged by the instructions it fuses: a convolution or a matrix
    product, whatever is fused around it; random bits where its ops come from
    ``jax.random`` (the threefry hash, with whatever XLA fused into it: a
    dropout's mask is often drawn and applied in one kernel); a
    reduction; a change of layout (a transpose or copy, with whatever
    elementwise work XLA fused into it: the strided reads are its cost); else
    elementwise arithmetic. Loops and calls are left out: their bodies'
    kernels are counted instead.
    """
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo)}
    found = {}
    for m in _INSTRUCTION.finditer(hlo):
        name, opcode, line = m.group(1), m.group(2), m.group(0)
        if opcode in _NOT_KERNELS:
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = bodies.get(called.group(1), "") if called else ""
        ops = {opcode, *(fused for _, fused in _INSTRUCTION.findall(body))}
        names = " ".join(_OP_NAME.findall(line + body))
        if "convolution" in ops:
            kind = "convolution"
        elif "dot" in ops:
            kind = "matmul"
        elif any(r in names for r in _RANDOM) or "rng-bit-generator" in ops:
            kind = "random bits"
        elif ops & {"reduce", "reduce-window"}:
            kind = "reduction"
        elif ops & {"transpose", "copy"}:
            kind = "layout"
        else:
            kind = "elementwise"
        found[name] = kind, names
    return found


def instruction_kinds(hlo: str) -> dict[str, str]:
    """Each kernel's kind (:func:`kernels`), by instruction name."""
    return {name: kind for name, (kind, _) in kernels(hlo).items()}


def kernel_times(run: Callable[[], Any], hlo: str) -> dict[str, float] | None:
    """Microseconds of kernel time by kind while ``run()`` executes the program ``hlo`` is the text of.

    XLA's CPU runtime reports each kernel (thunk) it runs to ``jax.profiler``
    under its HLO instruction's name; summed per kind. Kernels may overlap on
    several threads, so the sum can exceed the wall time. None where the
    trace names none of the program's instructions (another backend's kernels).
    """
    kinds = instruction_kinds(hlo)
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            run()
        traces = sorted(Path(folder).rglob("*.trace.json.gz"))
        events = json.loads(gzip.decompress(traces[0].read_bytes())) if traces else {}
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    times = dict.fromkeys(KINDS, 0.0)
    seen = False
    for event in events:
        kind = kinds.get(event.get("name")) if event.get("ph") == "X" else None
        if kind is not None:
            times[kind] += float(event.get("dur", 0.0))
            seen = True
    return times if seen else None


def time_by_kind(case: Case, steps: int = PROFILE_STEPS) -> dict[str, float] | None:
    """Kernel microseconds per step by kind (:func:`kernel_times`) for a case compile_case compiled."""
    if case.hlo is None:
        return None
    jax.block_until_ready(case.run(1))
    times = kernel_times(lambda: jax.block_until_ready(case.run(steps)), case.hlo)
    return None if times is None else {kind: us / steps for kind, us in times.items()}


def device_peak_bytes() -> int | None:
    """The device's own peak-memory counter; CPU backends report none."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # backends without the counter raise or return None
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _median_blocking(case: Case, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(case.run(1))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_cases(cases: Sequence[Case], *, rounds: int, steps: int | None, seed: int = 0,
               warmup: int = 3, target_s: float = 0.02,
               on_round: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Interleaved timing of ``cases`` (already compiled), one dict per case.

    ``steps`` per round and mode; None picks it so that a round of the first
    case (the reference) takes about ``target_s``.
    """
    for case in cases:
        jax.block_until_ready(case.run(warmup))
    if steps is None:
        reference = _median_blocking(cases[0], 5)
        steps = int(min(200, max(10, math.ceil(target_s / max(reference, 1e-6)))))
    rng = random.Random(seed)
    order = list(range(len(cases)))
    chained: list[list[float]] = [[] for _ in cases]
    blocking: list[list[float]] = [[] for _ in cases]
    returned: list[list[float]] = [[] for _ in cases]
    ready: list[list[bool]] = [[] for _ in cases]
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            for index in order:
                case = cases[index]
                start = time.perf_counter()
                jax.block_until_ready(case.run(steps))
                chained[index].append((time.perf_counter() - start) / steps)
                for _ in range(steps):
                    start = time.perf_counter()
                    out = case.fn(*case.args)
                    back = time.perf_counter()
                    ready[index].append(case.loss(out).is_ready())
                    jax.block_until_ready(out)
                    done = time.perf_counter()
                    case.args = case.advance(case.args, out)
                    returned[index].append(back - start)
                    blocking[index].append(done - start)
            if on_round is not None:
                on_round()
    finally:
        if was_enabled:
            gc.enable()
    return [{
        "step_ms": 1e3 * float(np.median(chained[i])),
        "step_ms_blocking": 1e3 * float(np.median(blocking[i])),
        "return_ms": 1e3 * float(np.median(returned[i])),
        "ready_on_return": float(np.mean(ready[i])),
        "rounds": rounds, "steps_per_round": steps,
        # Per round, in round order, for ratios paired with the reference's same round.
        "round_ms": [1e3 * t for t in chained[i]],
        "round_ms_blocking": [1e3 * float(np.median(blocking[i][r * steps:(r + 1) * steps]))
                              for r in range(rounds)],
    } for i in range(len(cases))]


def loader_throughput(split: data_lib.Split, batch_size: int, *, transfer: bool = False, seed: int = 0,
                      min_s: float = 0.2, repeats: int = 3) -> float:
    """Examples per second the data pipeline delivers, a new shuffled epoch after each.

    ``train_batches(...)[i]`` (a grain MapDataset gathering with numpy
    indexing), and with ``transfer`` also the ``jax.device_put`` the loop does
    next in the same Python thread. Median of ``repeats`` runs of ``min_s``.
    """
    rates = []
    for _ in range(repeats):
        examples, epoch, last = 0, 0, None
        start = time.perf_counter()
        while time.perf_counter() - start < min_s:
            batches = data_lib.train_batches(split, batch_size, seed, epoch)
            for index in range(len(batches)):
                last = jax.device_put(batches[index]) if transfer else batches[index]
                examples += batch_size
            epoch += 1
        jax.block_until_ready(last)
        rates.append(examples / (time.perf_counter() - start))
    return float(np.median(rates))


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0]
    accel = "no GPU" if device.platform == "cpu" else f"{len(jax.devices())}x {device.device_kind}"
    return f"{cpu}, {os.cpu_count()} CPU cores, {accel}; jax {jax.__version__} ({device.platform} backend)"


def _framework_version(style: str) -> str:
    module = {"jax": "jax", "flax": "flax", "nnx": "flax", "haiku": "haiku", "equinox": "equinox"}[style]
    return f"{module} {importlib.import_module(module).__version__}"


def measure_group(cases: Sequence[Case], *, dataset: data_lib.Dataset, data_examples_per_s: float,
                  feed_examples_per_s: float, rounds: int, steps: int | None, seed: int = 0,
                  on_round: Callable[[], None] | None = None, profile: bool = False) -> list[dict[str, Any]]:
    """Compile and time the cases of one model at one batch size (interleaved); one row each.

    With ``profile``, each row also has ``time_by_kind_us`` (:func:`time_by_kind`,
    traced after the timing so the profiler does not slow it), else None.
    The rows have no ratios yet: :func:`compare_to_reference` adds them.
    """
    where = machine()
    compiled = [{**compile_case(case), "pytree_us": pytree_us(case)} for case in cases]
    timings = time_cases(cases, rounds=rounds, steps=steps, seed=seed, on_round=on_round)
    if profile and cases:
        time_by_kind(cases[0], steps=1)  # a throwaway trace: the profiler's first session starts slowly
    kernels = [time_by_kind(case) if profile else None for case in cases]
    return [{
        "model": case.model, "style": case.style, "pattern": case.pattern,
        "idiomatic_is_fast": case.style in IDIOMATIC_IS_FAST,
        "api": API.get((case.style, case.pattern), ""),
        "batch_size": case.batch_size, "precision": case.precision,
        **timing, **info, "params": case.params, "device_peak_bytes": device_peak_bytes(),
        "data_examples_per_s": data_examples_per_s, "feed_examples_per_s": feed_examples_per_s,
        "dataset": dataset.name,
        "in_shape": list(dataset.in_shape), "device": where, "load_avg": os.getloadavg()[0],
        "framework": _framework_version(case.style),
        "tokens_per_s": (case.batch_size * math.prod(dataset.in_shape) / (timing["step_ms"] / 1000)
                         if dataset.kind == "tokens" else None),
        "extra_macs": case.extra_work[0] if case.extra_work else 0,
        "extra_work": case.extra_work[1] if case.extra_work else None,
        "time_by_kind_us": by_kind,
    } for case, info, timing, by_kind in zip(cases, compiled, timings, kernels)]


def bench(models: Sequence[str] = NAMES, styles: Sequence[str] = STYLES, *,
          batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, precision: str = "float32",
          dataset: data_lib.Dataset | Mapping[str, data_lib.Dataset], patterns: Sequence[str] = PATTERNS,
          rounds: int = 15, steps: int | None = None, seed: int = 0, progress: bool = True, loader_s: float = 0.2,
          hparams: dict[str, dict[str, Any]] | None = None, profile: bool = False) -> list[dict[str, Any]]:
    """Measure every model x style x pattern x batch size; rows with ratios to plain JAX.

    ``dataset``: one for every model, or one per model name (images for some, tokens for others).
    ``profile``: also trace where each step's kernel time goes (:func:`time_by_kind`).
    """

    hparams = hparams or {}
    datasets = dataset if isinstance(dataset, Mapping) else {name: dataset for name in models}
    for name in models:
        for size in batch_sizes:
            if size > len(datasets[name].train):
                raise ZooError(f"batch size {size} is larger than the {len(datasets[name].train)} training "
                               f"examples of {datasets[name].name}")
    distinct = {id(d): d for d in datasets.values()}
    loader = {(key, size): loader_throughput(d.train, size, seed=seed, min_s=loader_s)
              for key, d in distinct.items() for size in dict.fromkeys(batch_sizes)}
    feed = {(key, size): loader_throughput(d.train, size, transfer=True, seed=seed, min_s=loader_s)
            for key, d in distinct.items() for size in dict.fromkeys(batch_sizes)}
    rows: list[dict[str, Any]] = []
    groups = [(m, b) for m in models for b in batch_sizes]
    bar = tqdm(total=len(groups) * rounds, disable=not progress, desc="bench", unit="round", leave=False,
               dynamic_ncols=True)
    try:
        for name, size in groups:
            bar.set_description(f"bench {name} batch {size}")
            dataset = datasets[name]
            batch = data_lib.train_batches(dataset.train, size, seed, 0)[0]
            settings = dict(in_shape=dataset.in_shape, num_classes=dataset.num_classes, precision=precision,
                            seed=seed, **hparams.get(name, {}))
            # A throwaway compile first: jitted helpers every style shares (optax, jax.nn, the
            # PRNG) are lowered once per process, and the first case timed would pay for them.
            compile_case(make_cases(name, (), batch, patterns=("fast",), **settings)[0])
            cases = make_cases(name, styles, batch, patterns=patterns, **settings)
            rows += guided_aliases(measure_group(cases, dataset=dataset,
                                                 data_examples_per_s=loader[id(dataset), size],
                                                 feed_examples_per_s=feed[id(dataset), size], rounds=rounds,
                                                 steps=steps,
                                                 seed=seed, on_round=lambda: bar.update(1),
                                                 profile=profile), patterns)
            del cases
    finally:
        bar.close()
    return compare_to_reference(rows)


def guided_aliases(rows: list[dict[str, Any]], patterns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows, and a ``guided`` row beside each fast row of a style whose guided pattern is the fast one.

    Plain JAX's, Linen's and Haiku's documentation recommend nothing beyond
    ``jax.jit`` over the parameter and optimizer-state pytrees, which is the
    fast pattern: the guided row is that measurement, with ``same_as: "fast"``.
    """
    out = []
    for row in rows:
        out.append({**row, "same_as": None})
        if "guided" in patterns and row["pattern"] == "fast" and row["style"] in IDIOMATIC_IS_FAST:
            out.append({**row, "pattern": "guided", "same_as": "fast"})
    return out


def compare_to_reference(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each row's ratios to the plain-JAX fast row of the same model, batch and precision."""
    reference = {(r["model"], r["batch_size"], r["precision"]): r for r in rows
                 if r["style"] == "jax" and r["pattern"] == "fast"}
    for row in rows:
        ref = reference.get((row["model"], row["batch_size"], row["precision"]))
        if ref is None:
            raise ZooError(f"no plain-JAX reference row for {row['model']} at batch {row['batch_size']}")
        # Paired by round, so drift of the machine between rounds cancels out.
        ratios = np.asarray(row["round_ms"]) / np.asarray(ref["round_ms"])
        row["step_ratio"] = float(np.median(ratios))
        row["step_ratio_iqr"] = [float(q) for q in np.percentile(ratios, [25, 75])]
        row["blocking_ratio"] = float(np.median(
            np.asarray(row["round_ms_blocking"]) / np.asarray(ref["round_ms_blocking"])))
        row["extra_ms"] = row["step_ms"] - ref["step_ms"]
        row["extra_ms_blocking"] = row["step_ms_blocking"] - ref["step_ms_blocking"]
        row["compile_ratio"] = row["compile_s"] / ref["compile_s"]
        row["flops_equal"] = row["flops"] is not None and row["flops"] == ref["flops"]
        row["flops_diff"] = None if row["flops"] is None or ref["flops"] is None else row["flops"] - ref["flops"]
        row["flops_note"] = None
        if not row["flops_equal"] and None not in (row["flops_diff"], row["convert_flops"], ref["convert_flops"]):
            converts = row["convert_flops"] - ref["convert_flops"]
            if converts == row["flops_diff"]:
                row["flops_note"] = (f"only dtype conversions differ ({converts:+,.0f} converted elements): "
                                     "the same arithmetic, cast in other places")
        why = MODELS[row["model"]].elementwise_work
        if (not row["flops_equal"] and row["flops_note"] is None and why
                and row.get("linear_ops") is not None and row["linear_ops"] == ref.get("linear_ops")
                and row.get("dot_macs") == ref.get("dot_macs")):
            # The framework's own layers (BatchNorm's statistics kept and debiased otherwise,
            # a LayerNorm that takes its mean twice, dropout by multiplication) do other elementwise
            # work around the same linear algebra, op for op; the registry says which. That they
            # compute the same function is the parity tests' job (zoo/test_parity.py).
            ops = sum(n for _, _, n in row["linear_ops"])
            row["flops_note"] = (f"the same {ops} convolutions and matrix products; the other "
                                 f"{row['flops_diff']:+,.0f} FLOPs are elementwise work around them ({why})")
        convolutions = [op for op in row.get("linear_ops") or [] if op[0] == "convolution"]
        if (not row["flops_equal"] and row["flops_note"] is None and row.get("dot_macs")
                and row["style"] not in MODELS[row["model"]].bitwise
                and ref.get("dot_macs") and row["dot_macs"] - ref["dot_macs"] == row.get("extra_macs", 0)
                and row.get("linear_ops") is not None and row["linear_ops"] != ref.get("linear_ops")
                and convolutions == [op for op in ref.get("linear_ops") or [] if op[0] == "convolution"]):
            # A style that sums in another order (not bitwise for this model, says the registry)
            # and whose matrix products are grouped otherwise (Equinox's per-example products
            # under vmap, Haiku's one LSTM matmul for four gates): the same multiply-adds, plus
            # exactly the extra work the registry predicts for it. That the function is the same
            # is the parity tests' job (zoo/test_parity.py).
            dots = sum(n for op, _, n in row["linear_ops"] if op == "dot")
            ref_dots = sum(n for op, _, n in ref["linear_ops"] if op == "dot")
            extra = (f", plus {row['extra_macs']:,} predicted exactly: {row['extra_work']}"
                     if row.get("extra_macs") else "")
            row["flops_note"] = (f"the same {ref['dot_macs']:,} multiply-adds in its matrix products, grouped "
                                 f"as {dots} products against the reference's {ref_dots}{extra}; the rest of "
                                 f"the {row['flops_diff']:+,.0f} FLOPs is elementwise work around them")
        row["bytes_ratio"] = (row["bytes_accessed"] / ref["bytes_accessed"]
                              if row["bytes_accessed"] and ref["bytes_accessed"] else None)
        row["examples_per_s"] = row["batch_size"] / (row["step_ms"] / 1e3)
        row["data_headroom"] = row["data_examples_per_s"] / row["examples_per_s"]
        row["feed_headroom"] = row["feed_examples_per_s"] / row["examples_per_s"]
    return rows


def flops_failures(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per row whose compiled step does not do the reference's FLOPs, unexplained."""
    reference = {(r["model"], r["batch_size"], r["precision"]): r["flops"] for r in rows
                 if r["style"] == "jax" and r["pattern"] == "fast"}
    return [f"{r['model']} {r['style']} ({r['pattern']}) batch {r['batch_size']}: {r['flops']:,.0f} FLOPs, "
            f"plain JAX {reference[(r['model'], r['batch_size'], r['precision'])]:,.0f}"
            for r in rows if not r["flops_equal"] and not r.get("flops_note")]


# --------------------------------------------------------------------------- a language model's own measures

DEFAULT_CONTEXTS = (64, 256)  # decode: tokens of context, the model's block for the measure
DEFAULT_DEPTHS = (2, 6, 12)  # compile time of the train step, scanned against unrolled


def decode_ms(model: Model, params: Any, context: int, *, cached: bool, repeats: int, seed: int) -> float:
    """Milliseconds per generated token, one sequence from a one-token prompt to ``context`` tokens
    (``shared.generate``), median over ``repeats`` runs after a first that compiles."""
    prompt = np.zeros((1, 1), np.int32)
    run = generate_lib.generator(model, context - 1, cached=cached)
    key = jax.random.key(seed)
    jax.block_until_ready(run(params, prompt, key))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(params, prompt, key))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000 / (context - 1)


def lm_measures(name: str, styles: Sequence[str], *, dataset: data_lib.Dataset,
                contexts: Sequence[int] = DEFAULT_CONTEXTS, depths: Sequence[int] = DEFAULT_DEPTHS,
                precision: str = "float32", repeats: int = 5, seed: int = 0, hparams: dict[str, Any] | None = None,
                progress: bool = True) -> dict[str, list[dict[str, Any]]]:
    """A language model's generation and compile measures, per style.

    ``decode``: milliseconds per token with the key/value cache and without it (each step recomputing
    the whole prefix), at each context length (the model built with that many positions).
    ``compile``: seconds to compile the train step (batch 8), at each depth, unrolled and scanned.
    """
    hparams = dict(hparams or {})
    styles = tuple(dict.fromkeys(("jax", *styles)))
    decode_rows, compile_rows = [], []
    init_key = jax.random.key(seed)
    bar = tqdm(total=len(contexts) * len(styles) + 2 * len(depths), disable=not progress, desc=f"bench {name}",
               leave=False, dynamic_ncols=True)
    try:
        for context in contexts:
            canonical = None
            for style in styles:
                bar.set_description(f"bench {name} decode, context {context}, {style}")
                model = styles_lib.build(name, style, in_shape=(context,), num_classes=dataset.num_classes,
                                         precision=precision, **hparams)
                if canonical is None:
                    canonical = model.to_canonical(model.init(init_key)[0])
                params = model.from_canonical(canonical)
                cached = decode_ms(model, params, context, cached=True, repeats=repeats, seed=seed)
                full = decode_ms(model, params, context, cached=False, repeats=repeats, seed=seed)
                decode_rows.append({"model": name, "style": style, "context": context, "cached_ms": cached,
                                    "recompute_ms": full, "speedup": full / cached, "precision": precision})
                bar.update(1)
        batch = data_lib.train_batches(dataset.train, min(8, len(dataset.train)), seed, 0)[0]
        for depth in depths:
            for scan in (False, True):
                bar.set_description(f"bench {name} compile, depth {depth}{', scanned' if scan else ''}")
                cases = make_cases(name, styles, batch, in_shape=dataset.in_shape, num_classes=dataset.num_classes,
                                   precision=precision, patterns=("fast",), seed=seed,
                                   **{**hparams, "depth": depth, "scan_layers": scan})
                for case in cases:
                    compile_rows.append({"model": name, "style": case.style, "depth": depth, "scan_layers": scan,
                                         "compile_s": compile_case(case)["compile_s"], "precision": precision})
                del cases
                bar.update(1)
    finally:
        bar.close()
    return {"decode": decode_rows, "compile": compile_rows, "device": machine()}


def format_lm(measures: dict[str, list[dict[str, Any]]], train_rows: Sequence[dict[str, Any]] = ()) -> str:
    """The language model's measures as Markdown: training tokens per second, decode, compile."""
    lines = []
    lm_rows = [r for r in train_rows if r.get("tokens_per_s") and not r.get("same_as")]
    if lm_rows:
        lines += ["Training throughput (the train step above, tokens a second):", "",
                  "| model | batch | style | pattern | tokens/s | × jax |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['batch_size']} | {r['style']} | {r['pattern']} | {r['tokens_per_s']:,.0f} "
                  f"| {1 / r['step_ratio']:.2f} |" for r in lm_rows]
        lines.append("")
    decode = measures.get("decode", [])
    if decode:
        lines += ["Generation, milliseconds per token, one sequence from a one-token prompt to the context "
                  "length (the cache's or the model's block), greedy, the whole loop one jitted `lax.scan`:", "",
                  "| model | context | style | cached ms/token | recomputing ms/token | recompute / cached |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['context']} | {r['style']} | {r['cached_ms']:.3f} | {r['recompute_ms']:.3f} "
                  f"| {r['speedup']:.1f}× |" for r in decode]
        lines.append("")
    compiles = measures.get("compile", [])
    if compiles:
        depths = sorted({r["depth"] for r in compiles})
        lines += ["Compile seconds of the train step (batch 8) by depth, unrolled and scanned (`--scan-layers`):",
                  "", "| model | style | " + " | ".join(f"depth {d} unrolled | depth {d} scanned" for d in depths)
                  + " |", "|---|---|" + "---|---|" * len(depths)]
        for model, style in dict.fromkeys((r["model"], r["style"]) for r in compiles):
            cells = {(r["depth"], r["scan_layers"]): r["compile_s"] for r in compiles
                     if (r["model"], r["style"]) == (model, style)}
            lines.append(f"| {model} | {style} | " + " | ".join(
                f"{cells.get((d, False), float('nan')):.2f} | {cells.get((d, True), float('nan')):.2f}"
                for d in depths) + " |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reporting


def format_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with the machine and a summary under it."""
    if not rows:
        return "(no rows)\n"
    first = rows[0]
    shown = dict.fromkeys(f"{r['dataset']} {'x'.join(map(str, r['in_shape']))}" for r in rows)
    lines = [f"Measured on {first['device']}; dataset{'s' if len(shown) > 1 else ''} {', '.join(shown)}, "
             f"precision {first['precision']}, "
             f"{first['rounds']} interleaved rounds; 1-minute load average "
             f"{min(r['load_avg'] for r in rows):.1f} to {max(r['load_avg'] for r in rows):.1f}.", "",
             "Step time as a ratio to plain JAX (median over rounds of the same round's ratio):", "",
             ratio_table(rows),
             "| model | batch | style | pattern | step ms | × jax | flatten µs | blocking ms | × jax "
             "| returns after ms | ready on return | compile s | MFLOP | = jax | MB accessed | peak MB | params "
             "| data × | data+put × |",
             "|" + "---|" * 19]
    for r in rows:
        if r.get("same_as"):
            continue  # the fast row's label says so
        pattern = r["pattern"]
        if r["idiomatic_is_fast"]:
            guided = any(g.get("same_as") == "fast" and (g["model"], g["style"], g["batch_size"])
                         == (r["model"], r["style"], r["batch_size"]) for g in rows)
            pattern = "fast = idiomatic = guided" if guided else "fast = idiomatic"
        lines.append(
            f"| {r['model']} | {r['batch_size']} | {r['style']} | {pattern} | {r['step_ms']:.3f} "
            f"| {r['step_ratio']:.2f} ({r['step_ratio_iqr'][0]:.2f}–{r['step_ratio_iqr'][1]:.2f}) "
            f"| {'' if r.get('pytree_us') is None else format(r['pytree_us'], '.0f')} "
            f"| {r['step_ms_blocking']:.3f} | {r['blocking_ratio']:.2f} "
            f"| {r['return_ms']:.3f} | {r['ready_on_return']:.0%} | {r['compile_s']:.2f} "
            f"| {_fmt(r['flops'], 1e6)} | {_flops_cell(r)} "
            f"| {_fmt(r['bytes_accessed'], 1e6)} | {_fmt(r['peak_bytes'], 1e6)} | {r['params']:,} "
            f"| {r['data_headroom']:.0f} | {r['feed_headroom']:.1f} |")
    lines.append("")
    lines.append("`step ms`: median over rounds of K chained steps with one `block_until_ready` at the end; "
                 "`× jax`: median over rounds of the ratio to plain JAX's time in the same round (in brackets "
                 "the quartiles of those ratios: the noise); `flatten µs`: what flattening a fast step's "
                 "arguments and rebuilding its result costs per call, measured alone (jax.jit does both on "
                 "every call); "
                 "`blocking ms`: median step when blocking after every call; `returns after`: median time "
                 "until the call gives control back to Python; `ready on return`: share of calls whose "
                 "result was already computed when they returned (100% = the call waits for the step); "
                 "`MFLOP`, `MB accessed`: XLA's cost analysis of the compiled step; `peak MB`: XLA's "
                 "memory analysis (arguments + outputs + temporaries); `data ×`: examples/s the data "
                 "pipeline (`train_batches`) delivers over examples/s the step consumes; `data+put ×`: the "
                 "same with the loop's `jax.device_put` of every batch.")
    for line in summary(rows):
        lines.append(f"- {line}")
    if any(r.get("time_by_kind_us") for r in rows):
        lines += ["", "Where each step's time goes: kernel microseconds per step by kind, from XLA's own "
                  f"per-kernel trace (`zoo bench --profile`: one traced run of {PROFILE_STEPS} steps, noisier "
                  "than the timing; a fusion counts as its heaviest op, and kernels on several threads may "
                  "overlap):",
                  "", kernel_table(rows)]
    return "\n".join(lines) + "\n"


def kernel_table(rows: Sequence[dict[str, Any]]) -> str:
    """The profiled rows' kernel time per step by kind, as a Markdown table."""
    lines = ["| model | batch | style | pattern | all kernels µs | " + " | ".join(KINDS) + " |",
             "|" + "---|" * (5 + len(KINDS))]
    for r in rows:
        by_kind = r.get("time_by_kind_us")
        if by_kind and not r.get("same_as"):
            lines.append(f"| {r['model']} | {r['batch_size']} | {r['style']} | {r['pattern']} "
                         f"| {sum(by_kind.values()):.0f} | " + " | ".join(f"{by_kind[k]:.0f}" for k in KINDS) + " |")
    return "\n".join(lines) + "\n"


def kernel_excess(row: dict[str, Any], reference: dict[str, Any]) -> str | None:
    """The kinds of kernel time a row spends beyond the reference's, largest first (profiled rows)."""
    mine, ref = row.get("time_by_kind_us"), reference.get("time_by_kind_us")
    if not mine or not ref:
        return None
    extra = sorted(((mine[k] - ref[k], k) for k in KINDS), reverse=True)
    return ", ".join(f"{kind} {us:+.0f} µs" for us, kind in extra if us > 0) or "none"


def ratio_table(rows: Sequence[dict[str, Any]]) -> str:
    """A small Markdown table: per style and pattern, each model's step-time ratio to plain JAX, per batch size."""
    rows = [r for r in rows if not r.get("same_as") and r["style"] != "jax"]
    sizes = sorted({r["batch_size"] for r in rows}, reverse=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["| style | pattern | " + " | ".join(f"batch {b}: {', '.join(models)}" for b in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for style, pattern in dict.fromkeys((r["style"], r["pattern"]) for r in rows):
        cells = []
        for size in sizes:
            ratio = {r["model"]: r["step_ratio"] for r in rows
                     if (r["style"], r["pattern"], r["batch_size"]) == (style, pattern, size)}
            cells.append(" / ".join(f"{ratio[m]:.2f}" if m in ratio else "–" for m in models))
        label = "fast = idiomatic = guided" if style in IDIOMATIC_IS_FAST and pattern == "fast" else pattern
        lines.append(f"| {style} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The findings a reader wants first: the slowest fast pattern, idiom costs, FLOPs, loader."""
    out = []
    for size in sorted({r["batch_size"] for r in rows}, reverse=True):
        at = [r for r in rows if r["batch_size"] == size]
        fast = [r for r in at if r["pattern"] == "fast" and r["style"] != "jax"]
        if fast:
            worst = max(fast, key=lambda r: r["step_ratio"])
            ref = next(r for r in at if r["model"] == worst["model"] and r["style"] == "jax")
            out.append(f"batch {size}: slowest fast pattern {worst['model']}/{worst['style']} at "
                       f"{worst['step_ratio']:.2f}x plain JAX (quartiles {worst['step_ratio_iqr'][0]:.2f} to "
                       f"{worst['step_ratio_iqr'][1]:.2f}; {worst['extra_ms']:+.3f} ms); flattening its "
                       f"arguments and rebuilding its result takes {worst['pytree_us']:.0f} us per call, "
                       f"plain JAX's {ref['pytree_us']:.0f} us")
            excess = kernel_excess(worst, ref)
            if excess:
                out.append(f"batch {size}: {worst['model']}/{worst['style']}'s kernel time per step beyond "
                           f"plain JAX's, by kind: {excess}")
        for r in at:
            if r["pattern"] in ("idiomatic", "guided") and not r.get("same_as"):
                out.append(f"batch {size}: {r['model']}/{r['style']} {r['pattern']} ({r['api']}) "
                           f"{r['extra_ms']:+.3f} ms per step chained, {r['extra_ms_blocking']:+.3f} ms "
                           f"blocking, ready on return {r['ready_on_return']:.0%}")
        fastest = min(at, key=lambda r: r["step_ms"] / r["batch_size"])
        out.append(f"batch {size}: the data pipeline delivers {fastest['data_examples_per_s']:,.0f} "
                   f"examples/s, {fastest['data_headroom']:.0f}x what the fastest step "
                   f"({fastest['model']}/{fastest['style']}) consumes; with the loop's device_put "
                   f"{fastest['feed_examples_per_s']:,.0f} examples/s, {fastest['feed_headroom']:.1f}x")
        out.extend(scan_costs(at))
    rows = [r for r in rows if not r.get("same_as")]  # an alias repeats the row it names
    failures = flops_failures(rows)
    notes = list(dict.fromkeys(r["flops_note"] for r in rows if r.get("flops_note")))
    for note in notes:
        which = ", ".join(f"{r['model']}/{r['style']} ({r['pattern']}) batch {r['batch_size']}"
                          for r in rows if r.get("flops_note") == note)
        out.append(f"FLOPs differ from the reference, investigated: {which}: {note}")
    out.append(f"compiled FLOPs equal the reference's in every {'other ' if notes else ''}row" if not failures
               else "FLOPs differ from the reference (the style computes something else): "
               + "; ".join(failures))
    return out


def scan_costs(rows: Sequence[dict[str, Any]]) -> list[str]:
    """For a model whose reference step scans (the registry's ``scans``: a recurrent ``lax.scan``),
    what each style's own scan idiom costs against it (``nn.RNN``, ``nnx.RNN``,
    ``hk.dynamic_unroll``: see the porting table), as measured fast-pattern ratios; above the
    noise (the lower quartile over 1), with what the compiled steps show: their loops and the
    bytes they move."""
    out = []
    for ref in (r for r in rows if r["style"] == "jax" and r["pattern"] == "fast" and MODELS[r["model"]].scans):
        styles = [r for r in rows if r["model"] == ref["model"] and r["pattern"] == "fast" and r["style"] != "jax"]
        cells = []
        for r in styles:
            cell = f"{r['style']} {r['step_ratio']:.2f}x ({r['step_ratio_iqr'][0]:.2f}-{r['step_ratio_iqr'][1]:.2f})"
            if r["step_ratio_iqr"][0] > 1.0:
                cell += (f": {r['extra_ms']:+.3f} ms, {r['while_loops']} loops against {ref['while_loops']}, "
                         f"{r['bytes_ratio']:.2f}x the bytes accessed" if r.get("bytes_ratio") else "")
            cells.append(cell)
        above = [r["style"] for r in styles if r["step_ratio_iqr"][0] > 1.0]
        out.append(f"batch {ref['batch_size']}: {ref['model']} scans ({ref['while_loops']} loops in plain JAX's "
                   f"compiled step); each style's own scan idiom against lax.scan: {'; '.join(cells)}; "
                   + (f"above the noise: {', '.join(above)}" if above else "none above the noise"))
    return out


def _flops_cell(row: dict[str, Any]) -> str:
    if row["flops_equal"]:
        return "yes"
    if row.get("flops_note"):
        return f"{row['flops_diff']:+,.0f} (see notes)"
    return "**NO**"


def _fmt(value: float | None, scale: float) -> str:
    return "n/a" if value is None else f"{value / scale:,.2f}"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Step-time ratios to plain JAX: bars for chained steps, dots for blocking every call.

    Bars grow from 1.0 on a log axis, so 2x slower and 2x faster look alike
    and the few-percent differences stay visible beside the large ones.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    rows = [r for r in rows if not r.get("same_as")]  # an alias is the bar of the pattern it names
    sizes = sorted({r["batch_size"] for r in rows}, reverse=True)
    models = list(dict.fromkeys(r["model"] for r in rows))
    labels = list(dict.fromkeys((r["style"], r["pattern"]) for r in rows))
    fig, axes = plt.subplots(len(sizes), 1, figsize=(11, 3.3 * len(sizes)), squeeze=False)
    width = 0.84 / len(labels)
    for ax, size in zip(axes[:, 0], sizes):
        values = [1.0]
        for j, (style, pattern) in enumerate(labels):
            xs, bars, dots, low, high = [], [], [], [], []
            for i, model in enumerate(models):
                match = [r for r in rows if (r["model"], r["style"], r["pattern"], r["batch_size"])
                         == (model, style, pattern, size)]
                if match:
                    xs.append(i + (j - (len(labels) - 1) / 2) * width)
                    bars.append(match[0]["step_ratio"])
                    dots.append(match[0]["blocking_ratio"])
                    low.append(bars[-1] - match[0]["step_ratio_iqr"][0])
                    high.append(match[0]["step_ratio_iqr"][1] - bars[-1])
            name = style if pattern == "fast" else f"{style} ({pattern})"
            hatch = {"idiomatic": "//", "guided": ".."}.get(pattern)
            ax.bar(xs, [b - 1 for b in bars], width, bottom=1, label=name, color=f"C{j}",
                   hatch=hatch, edgecolor="white" if hatch else None, linewidth=0)
            ax.errorbar(xs, bars, yerr=[low, high], fmt="none", ecolor="dimgrey", elinewidth=0.8, capsize=1.5,
                        label="quartiles over rounds" if j == len(labels) - 1 else None)
            ax.plot(xs, dots, "o", color="black", markersize=3, label="blocking every call" if j == 0 else None)
            for x, bar, dot, up in zip(xs, bars, dots, high):
                ax.annotate(f"{bar:.2f}", (x, max(bar + up, dot, 1.0)), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=6.5, rotation=90)
            values += bars + dots
        ax.set_yscale("log")
        ax.set_ylim(min(values) / 1.15, max(values) * 1.6)
        ticks = [t for t in (0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16)
                 if min(values) / 1.15 <= t <= max(values) * 1.6]
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_yticklabels([f"{t:g}x" for t in ticks])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.05, color="grey", lw=0.6, ls="--")
        ax.set_xticks(range(len(models)), models)
        ax.set_ylabel("step time / plain JAX")
        ax.set_title(f"batch {size}", fontsize=10)
    axes[0, 0].legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    first = rows[0]
    fig.suptitle(f"train step time vs plain JAX ({first['precision']}, {first['dataset']}; dashed: 1.05x): "
                 f"{first['device'].split(';')[0]}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


# --------------------------------------------------------------------------- several devices

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")


def sharding_rows(name: str, styles: Sequence[str], *, dataset: data_lib.Dataset, mesh: tuple[tuple[str, int], ...],
                  batch_size: int = 128, precision: str = "float32", seed: int = 0, devices: int | None = None,
                  hparams: dict[str, Any] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Per strategy and style, on ``mesh``: the bytes of the collectives in the compiled train step (read from
    its HLO: what each device receives per step, the same on any machine) and the bytes of parameters plus
    optimiser state that each device holds. Nothing is timed: on fake CPU devices a time would mean nothing.
    The plain-JAX reference is always measured."""
    rows = []
    batch = data_lib.train_batches(dataset.train, batch_size, seed, 0)[0]
    styles = tuple(dict.fromkeys(("jax", *styles)))
    models = {style: styles_lib.build(name, style, in_shape=dataset.in_shape, num_classes=dataset.num_classes,
                                      precision=precision, **(hparams or {})) for style in styles}
    grid = make_mesh(devices, mesh)
    parallel.check_batch({"batch_size": batch_size}, dict(grid.shape))
    cases = [(strategy, style) for strategy in parallel.STRATEGIES for style in styles]
    for strategy, style in tqdm(cases, disable=not progress, desc=f"bench {name} sharded", leave=False,
                                dynamic_ncols=True):
        model = models[style]
        config = TrainConfig(batch_size=batch_size, seed=seed, devices=devices, mesh=mesh, strategy=strategy)
        parallel.check_divides(model, strategy, dict(grid.shape))  # before the initialiser compiles
        optimizer = make_optimizer(config, 1000, None)
        params, model_state = model.init(jax.random.key(seed))
        begin = TrainState(jnp.zeros((), jnp.int32), params, model_state, optimizer.init(params), None)
        state, step = placed_step(model, optimizer, config, jax.random.key(seed + 1), begin, grid)
        placed = jax.device_put(batch, jax.sharding.NamedSharding(grid, jax.sharding.PartitionSpec("data")))
        ops = parallel.collectives(step.lower(state, placed).compile().as_text())
        held = parallel.bytes_per_device((state.params, state.opt_state))
        whole = sum(leaf.nbytes for leaf in jax.tree.leaves((state.params, state.opt_state)))
        rows.append({"model": name, "style": style, "strategy": strategy,
                     "mesh": {axis: int(size) for axis, size in grid.shape.items()}, "batch_size": batch_size,
                     "collective_bytes": {kind: ops.get(kind, {}).get("bytes", 0) for kind in COLLECTIVES},
                     "collective_count": {kind: ops.get(kind, {}).get("count", 0) for kind in COLLECTIVES},
                     "held_bytes": max(held.values()), "whole_bytes": whole})
    return rows


def format_sharding(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`sharding_rows`: per strategy and style, the collectives' bytes per step
    and each device's share of the parameters and optimiser state."""
    if not rows:
        return ""
    mesh = " x ".join(f"{axis}={size}" for axis, size in rows[0]["mesh"].items())
    kinds = [k for k in COLLECTIVES if any(r["collective_bytes"][k] for r in rows)]
    lines = [f"### {rows[0]['model']} sharded over {mesh} (batch {rows[0]['batch_size']})", "",
             "Collective bytes each device receives per train step, from the compiled HLO (the same on any "
             "machine), and the parameters plus optimiser state each device holds.", "",
             "| strategy | style | " + " | ".join(kinds) + " | held per device | share |",
             "|---|---|" + "---:|" * len(kinds) + "---:|---:|"]
    for r in rows:
        cells = [f"{r['collective_bytes'][k]:,} ({r['collective_count'][k]})" for k in kinds]
        lines.append(f"| {r['strategy']} | {r['style']} | " + " | ".join(cells)
                     + f" | {r['held_bytes']:,} | {r['held_bytes'] / r['whole_bytes']:.1%} |")
    return "\n".join(lines) + "\n"


def _models(text: str) -> str:
    if text not in NAMES:
        raise argparse.ArgumentTypeError(f"unknown model {text!r}; choose from {', '.join(NAMES)}")
    return text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="time every style's train step against plain JAX",
                       description="Compile time, step time (batch 128 and a tiny batch), dispatch, FLOPs, "
                                   "memory and loader throughput of every style, as ratios to plain JAX.")
    p.add_argument("models", nargs="*", type=_models, metavar="MODEL",
                   help=f"models to measure (default: all of {', '.join(NAMES)})")
    p.add_argument("--styles", type=choice_list(STYLES, "style"), default=STYLES,
                   help="comma separated (default: all; plain JAX is always measured as the reference)")
    p.add_argument("--patterns", type=choice_list(PATTERNS, "pattern"), default=PATTERNS,
                   help="fast,idiomatic,guided (default: all three)")
    p.add_argument("--batch-size", type=positive_int, nargs="+", default=list(DEFAULT_BATCH_SIZES),
                   help="batch sizes: a realistic one and a tiny one where dispatch dominates "
                        "(default: 128 8)")
    p.add_argument("--precision", choices=styles_lib.PRECISIONS, default="float32")
    add_data_args(p)
    p.add_argument("--repeats", type=positive_int, default=15,
                   help="interleaved rounds; the medians are over these (default: 15)")
    p.add_argument("--steps", type=positive_int,
                   help="steps per case per round (default: enough for ~20 ms of the reference, 10-200)")
    p.add_argument("--seed", type=seed, default=0, help="initial parameters, batch and round order")
    p.add_argument("--out", type=path_arg, default=str(DEFAULT_OUT),
                   help="folder for bench.json, bench.md, bench.png (default: runs/bench)")
    p.add_argument("--json", type=path_arg, metavar="FILE",
                   help="write the JSON rows here instead of OUT/bench.json")
    p.add_argument("--profile", action="store_true",
                   help="also trace each step's kernels with jax.profiler and report where the time goes: "
                        "convolutions, matrix products, reductions, layout changes, random bits, elementwise")
    p.add_argument("--contexts", type=positive_int, nargs="+", default=list(DEFAULT_CONTEXTS),
                   help="a language model's decode measure: context lengths (default: 64 256)")
    p.add_argument("--depths", type=positive_int, nargs="+", default=list(DEFAULT_DEPTHS),
                   help="a language model's compile measure: depths, each unrolled and scanned (default: 2 6 12)")
    p.add_argument("--mesh", type=parallel.mesh_arg, metavar="data=D,model=M",
                   help="instead of timing, compile each style's train step sharded over this mesh with every "
                        "strategy (dp, fsdp, tp, fsdp+tp) and report its collectives' bytes per step and each "
                        "device's parameters plus optimiser state (sharding.json, bench.md)")
    p.add_argument("--devices", type=positive_int, help="with --mesh: the devices the mesh spans (default: all)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--force", action="store_true", help="replace the files of an earlier bench in --out (and --json)")
    p.set_defaults(handler=run)



def run(args: argparse.Namespace) -> int:
    styles_lib.use_precision(args.precision)
    if args.mesh is not None:
        return run_sharded(args)
    if args.devices is not None:
        raise ZooError("--devices goes with --mesh: the timed bench runs on one device")
    out = files.output_dir(args.out, "--out")
    json_path = files.output_file(args.json, "--json", ".json") if args.json else out / "bench.json"
    models = tuple(dict.fromkeys(args.models)) or NAMES
    # --dataset for the models that read its kind (images, tokens); each other model its own default.
    names = {m: args.dataset if args.dataset in (data_lib.TOKEN_DATASETS if MODELS[m].kind == "lm"
                                                 else data_lib.IMAGE_DATASETS) else MODELS[m].dataset
             for m in models}
    if args.dataset is not None and args.dataset not in names.values():
        data_lib.check_kind(args.dataset, MODELS[models[0]].kind == "lm", models[0])
    for name in dict.fromkeys(names.values()):
        data_lib.check_dirs(name, args.data_dir, args.manual_dir, **data_lib.options(args))
    with contextlib.ExitStack() as claims:
        lms = [m for m in models if MODELS[m].kind == "lm"]
        claims.enter_context(files.claimed(out, "--out", force=args.force,
                                           writes=["bench.md", "bench.png"] + ([] if args.json else ["bench.json"])
                                           + (["lm.json"] if lms else [])))
        if args.json:
            claims.enter_context(files.claimed(json_path, "--json", force=args.force))
        loaded = {name: data_lib.load(name, args.data_dir, args.manual_dir, **data_lib.options(args))
                  for name in dict.fromkeys(names.values())}
        rows = bench(models, args.styles, batch_sizes=tuple(dict.fromkeys(args.batch_size)),
                     precision=args.precision, dataset={m: loaded[names[m]] for m in models},
                     patterns=args.patterns, rounds=args.repeats,
                     steps=args.steps, seed=args.seed, progress=not args.no_progress, profile=args.profile)
        table = format_markdown(rows)
        measured = {}
        for name in lms:
            measured[name] = lm_measures(name, args.styles, dataset=loaded[names[name]], contexts=args.contexts,
                                         depths=args.depths, precision=args.precision, seed=args.seed,
                                         progress=not args.no_progress)
            table += "\n" + format_lm(measured[name], [r for r in rows if r["model"] == name])
        if measured:
            write_json(out / "lm.json", measured)
        write_json(json_path, rows)
        write_text(out / "bench.md", table)
        plot(rows, out / "bench.png")
    print(table)
    print(f"wrote {json_path}, {out / 'bench.md'} and {out / 'bench.png'}")
    if args.profile and not any(r["time_by_kind_us"] for r in rows):
        print(f"zoo bench: --profile found none of the steps' kernels in jax.profiler's trace (it reads XLA's "
              f"CPU runtime's kernel names; this backend is {jax.default_backend()}), so time_by_kind_us is "
              f"null in every row", file=sys.stderr)
    failures = flops_failures(rows)
    if failures:
        print("zoo bench: compiled FLOPs differ from plain JAX (the style computes something else):",
              file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


def run_sharded(args: argparse.Namespace) -> int:
    """``zoo bench --mesh``: :func:`sharding_rows` for each model that names its parameters' axes."""
    models = tuple(dict.fromkeys(args.models)) or tuple(n for n in NAMES if MODELS[n].parallel)
    for name in models:
        if not MODELS[name].parallel:
            parallel.refuse_strategy(name, "fsdp, tp or fsdp+tp")
    parallel.mesh_shape(args.mesh, args.devices or len(jax.devices()))
    out = files.output_dir(args.out, "--out")
    json_path = files.output_file(args.json, "--json", ".json") if args.json else out / "sharding.json"
    names = {m: MODELS[m].dataset for m in models}
    for name in dict.fromkeys(names.values()):
        data_lib.check_dirs(name, args.data_dir, args.manual_dir, **data_lib.options(args))
    with contextlib.ExitStack() as claims:
        claims.enter_context(files.claimed(out, "--out", force=args.force,
                                           writes=["bench.md"] + ([] if args.json else ["sharding.json"])))
        if args.json:
            claims.enter_context(files.claimed(json_path, "--json", force=args.force))
        rows, table = [], ""
        for name in models:
            dataset = data_lib.load(names[name], args.data_dir, args.manual_dir, **data_lib.options(args))
            found = sharding_rows(name, args.styles, dataset=dataset, mesh=args.mesh,
                                  batch_size=args.batch_size[0], precision=args.precision, seed=args.seed,
                                  devices=args.devices, progress=not args.no_progress)
            rows += found
            table += format_sharding(found) + "\n"
        write_json(json_path, rows)
        write_text(out / "bench.md", table)
    print(table.rstrip())
    print(f"wrote {json_path} and {out / 'bench.md'}")
    return 0
