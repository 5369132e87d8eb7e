"""The ``zoo`` command line.

Every subcommand is a thin layer over the Python API in ``shared``: argument
parsing here, the work there. Bad input (unknown model, style or dataset, a
non-positive size, an unreadable checkpoint) is reported as one line on stderr
with exit status 2 and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import jax

from shared import (bench, catalogue, checkpoint, compare, data, files, generate, parallel, porting, registry,
                    sample, site, styles, train)
from shared.args import (Parser, choice_list, fraction, non_negative_float, non_negative_int, one_line,
                         open_fraction, path_arg, positive_float, positive_int, seed)
from shared.data import add_data_args
from shared.errors import ZooError
from shared.registry import MODELS, NAMES, STYLES

style_list = choice_list(STYLES, "style")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", choices=NAMES, help="which model")
    registry.add_hparam_flags(p)


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=positive_int, help="epochs (default: per model, "
                   + ", ".join(f"{m} {spec.epochs}" for m, spec in MODELS.items()) + ")")
    p.add_argument("--batch-size", type=positive_int, help="(default: per model, "
                   + ", ".join(f"{m} {spec.batch_size}" for m, spec in MODELS.items()) + ")")
    p.add_argument("--lr", type=positive_float, help="peak learning rate (default: per model, "
                   + ", ".join(f"{m} {spec.lr:g}" for m, spec in MODELS.items()) + ")")
    p.add_argument("--seed", type=seed, default=0,
                   help="seeds parameters, batch order and noise, 0 to 2**32 - 1 (default: 0)")
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    p.add_argument("--weight-decay", type=non_negative_float, default=1e-4,
                   help="adamw's decoupled weight decay, >= 0 (default: 1e-4)")
    p.add_argument("--momentum", type=fraction, default=0.9,
                   help="sgd momentum in [0, 1), 0 for none (default: 0.9)")
    p.add_argument("--schedule", choices=("constant", "warmup_cosine", "linear_warmup"),
                   help="learning-rate schedule (default: per model, "
                   + ", ".join(f"{m} {spec.schedule}" for m, spec in MODELS.items()) + ")")
    p.add_argument("--warmup-steps", type=non_negative_int,
                   help="(default: per model, " + ", ".join(f"{m} {spec.warmup_steps}" for m, spec in MODELS.items())
                   + ")")
    p.add_argument("--clip-norm", type=positive_float, help="clip gradients to this global norm first")
    p.add_argument("--ema", type=open_fraction, metavar="DECAY",
                   help="also keep and evaluate an EMA of the parameters, decay in (0, 1)")
    p.add_argument("--freeze", nargs="+", default=(), metavar="PATTERN",
                   help="freeze parameters whose canonical path matches, e.g. 'encoder*'")
    p.add_argument("--train-only", nargs="+", default=(), metavar="PATTERN",
                   help="train only parameters whose canonical path matches, e.g. 'dense2/*'")
    p.add_argument("--precision", choices=styles.PRECISIONS, default="float32",
                   help="float32; bfloat16 (the forward and backward pass, parameters stay float32); float64 "
                        "(parameters, optimiser state and data: JAX's x64 mode)")
    p.add_argument("--devices", type=positive_int, help="split each batch over this many devices (default: all)")
    p.add_argument("--mesh", type=parallel.mesh_arg, metavar="data=D,model=M",
                   help="arrange the devices as a (data, model) mesh whose sizes multiply to --devices "
                        "(default: every device on data)")
    p.add_argument("--strategy", choices=parallel.STRATEGIES, default="dp",
                   help="where the parameters and optimiser state live: dp (replicated), fsdp (split over "
                        "data), tp (attention heads and MLP units split over model), fsdp+tp; the batch is "
                        "always split over data (default: dp)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint-dir", type=path_arg, metavar="DIR",
                   help="save checkpoints here (any style can resume them); one run at a time")
    p.add_argument("--save-every", type=positive_int, metavar="STEPS",
                   help="save every STEPS steps (default: at the end of every epoch); always at the end")
    p.add_argument("--keep", type=positive_int, metavar="N", help="keep the newest N checkpoints (default: 3)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir; options not given are "
                        "taken from it")
    p.add_argument("--init-from", type=path_arg, metavar="CHECKPOINT",
                   help="start from these trained parameters (any style; fresh optimiser, step 0)")
    p.add_argument("--distributed", action="store_true",
                   help="one process of a multi-host run: calls jax.distributed.initialize() (found by itself "
                        "under SLURM, Open MPI, Kubernetes and on TPU pods; elsewhere give the next three)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, the same for every process")
    p.add_argument("--num-processes", type=positive_int, metavar="N", help="how many processes take part")
    p.add_argument("--process-id", type=non_negative_int, metavar="I", help="this process's rank, 0 to N-1")


def given_options(argv: list[str]) -> set[str]:
    """The destinations the command line really sets (not left at their defaults).

    Parses ``argv`` again with every default suppressed, so that ``--resume``
    can take the options the user left out from the checkpoint.
    """
    parser = build_parser()
    parsers = [parser]
    while parsers:
        current = parsers.pop()
        current._defaults.clear()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def build_parser() -> Parser:
    parser = Parser(prog="zoo", description="The same JAX models in five styles: train, compare, browse.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    sub.add_parser("list", help="models x styles")

    p = sub.add_parser("train", help="train one model in one style")
    add_model_args(p)
    p.add_argument("--style", required=True, choices=STYLES)
    add_data_args(p)
    add_train_args(p)
    p.add_argument("--out", type=path_arg, help="output folder (default: runs/MODEL-STYLE-DATASET)")
    p.add_argument("--force", action="store_true", help="replace an earlier run's metrics, curves and samples in --out")
    add_checkpoint_args(p)

    p = sub.add_parser("compare", help="train one model in every style from the same start and compare")
    add_model_args(p)
    p.add_argument("--styles", type=style_list, default=STYLES, help="comma separated (default: all)")
    add_data_args(p)
    add_train_args(p)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--out", type=path_arg,
                   help="also write the rows here as JSON (default: runs/compare-MODEL-DATASET.json)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--init-from", type=path_arg, metavar="CHECKPOINT",
                   help="start every style from these trained parameters (a checkpoint of any style)")
    p.add_argument("--no-noise-floor", action="store_true",
                   help="skip the extra reference run from parameters moved by one ulp, which measures how "
                        "far rounding alone moves the result, and the float64 runs that confirm a difference "
                        "above it as rounding (the noise_floor, float64 and parity columns)")

    for module in (sample, generate, bench, site, catalogue, porting):  # subcommands defined next to the code they drive
        module.register(sub)
    return parser


def hparams_from(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameters given on the command line for ``args.model`` (the rest take defaults)."""
    return registry.given_hparams(args.model, vars(args))


def config_from(args: argparse.Namespace):
    spec = MODELS[args.model]
    return train.TrainConfig(
        epochs=args.epochs or spec.epochs, batch_size=args.batch_size or spec.batch_size,
        lr=args.lr or spec.lr,
        seed=args.seed, optimizer=args.optimizer, weight_decay=args.weight_decay, momentum=args.momentum,
        schedule=args.schedule or spec.schedule,
        warmup_steps=spec.warmup_steps if args.warmup_steps is None else args.warmup_steps,
        clip_norm=args.clip_norm, ema=args.ema,
        freeze=tuple(args.freeze), train_only=tuple(args.train_only), devices=args.devices, mesh=args.mesh,
        strategy=args.strategy)


def check_parallel(args: argparse.Namespace, config: Any, hparams: dict[str, Any]) -> None:
    """The mesh and strategy against the devices and the model, before any data is read."""
    if config.mesh is None and config.strategy == "dp":
        return
    shape = parallel.mesh_shape(config.mesh, config.devices or len(jax.devices()))
    if config.strategy != "dp" and not MODELS[args.model].parallel:
        parallel.refuse_strategy(args.model, config.strategy)
    if config.strategy != "dp":  # the axes it splits do not depend on the data: any example shape will do
        reference = styles.build(args.model, "jax", in_shape=registry.example_shape(args.model, (28, 28, 1)),
                                 precision=args.precision, **hparams)
        parallel.check_divides(reference, config.strategy, shape)
    parallel.check_batch({"batch_size": config.batch_size, "eval_batch_size": config.eval_batch_size}, shape)


def cmd_list(args: argparse.Namespace) -> int:
    width = max(map(len, NAMES)) + 2
    print("model".ljust(width) + "  ".join(STYLES))
    for model in NAMES:
        cells = ["yes".ljust(len(s)) if (Path(__file__).parents[1] / "zoo" / s / f"{model}.py").exists()
                 else "-".ljust(len(s)) for s in STYLES]
        print(model.ljust(width) + "  ".join(cells))
    return 0


# TrainConfig fields that --resume takes from the checkpoint unless given; devices is the machine's.
RESUMED = ("epochs", "batch_size", "lr", "seed", "optimizer", "weight_decay", "momentum", "schedule",
           "warmup_steps", "clip_norm", "ema", "freeze", "train_only", "eval_batch_size")


def resume_from_checkpoint(args: argparse.Namespace) -> None:
    """Fill the options the command line left out from the checkpoint being resumed."""
    directory, step = checkpoint.resolve(args.checkpoint_dir)
    meta = checkpoint.read_meta(directory, step)
    if meta["model"] != args.model:
        raise ZooError(f"cannot resume from {directory / str(step)}: model {meta['model']} there, "
                       f"{args.model} here")
    given = given_options(args.argv)
    for name in ("dataset", "precision"):
        if name not in given:
            setattr(args, name, meta[name] if name in meta else getattr(args, name))
    if "dataset" not in given:  # the same data: its options too (a token dataset's digits or block size)
        for name, value in meta.get("dataset_options", {}).items():
            if name in data.OPTIONS and name not in given:
                setattr(args, name, value)
    for name, value in meta["hparams"].items():
        if name not in given:
            setattr(args, name, tuple(value) if isinstance(value, list) else value)
    stored = meta["config"]
    args.resumed_config = {name: tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
                           for name in RESUMED if name in stored and name not in given}


def start_distributed(args: argparse.Namespace) -> None:
    """Join the other processes before JAX touches a device: then jax.devices() lists them all."""
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
            raise ZooError(f"--coordinator {args.coordinator!r}: expected HOST:PORT with a port from 1 to 65535, "
                           "e.g. 10.0.0.1:1234")
    if args.num_processes is not None and args.process_id is not None and args.process_id >= args.num_processes:
        raise ZooError(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")
    try:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except Exception as error:  # noqa: BLE001  (jax raises ValueError, RuntimeError, IndexError, ...)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ZooError(f"could not join the distributed run ({first}); outside SLURM, Open MPI, Kubernetes "
                       "and TPU pods give --coordinator, --num-processes and --process-id") from None


def choose_dataset(args: argparse.Namespace) -> None:
    """``--dataset``'s default for the model (digits for images, addition for a language model), a
    dataset of the other kind refused in one line, and the model's sizes checked against the data's
    shape (a patch that does not divide the image, heads that do not divide the width) before any work."""
    spec = MODELS[args.model]
    if args.dataset is None:
        args.dataset = spec.dataset
    data.check_kind(args.dataset, spec.kind == "lm", args.model)
    spec.kwargs(data.in_shape(args.dataset, **data.options(args)), 10, hparams_from(args))


def check_train_paths(args: argparse.Namespace) -> Path:
    """Every path ``zoo train`` reads or writes, checked before any work; returns the output folder."""
    choose_dataset(args)
    out = files.output_dir(args.out or f"runs/{args.model}-{args.style}-{args.dataset}", "--out")
    if args.init_from:
        files.input_path(args.init_from, "--init-from")
    data.check_dirs(args.dataset, args.data_dir, args.manual_dir, **data.options(args))
    return out


def check_jax() -> None:
    """Start JAX's backend now, so that a misconfigured one (``JAX_PLATFORMS=cuda`` on a machine
    without CUDA) is one line before any work, not a traceback from inside it."""
    try:
        jax.devices()
    except Exception as error:  # noqa: BLE001  (RuntimeError, AssertionError, ... by platform)
        text = str(error).strip().splitlines()
        raise ZooError(f"JAX could not start ({type(error).__name__}: {text[0][:300] if text else ''}); check "
                       "JAX_PLATFORMS and that the accelerator's jaxlib plugin is installed") from None


# Subcommands that start JAX themselves, after checking their options (train joins a distributed run first).
STARTS_JAX_ITSELF = ("train",)
NEEDS_NO_JAX = ("list", "show", "copy")


def cmd_train(args: argparse.Namespace) -> int:
    if args.distributed or args.coordinator or args.num_processes or args.process_id is not None:
        start_distributed(args)
    check_jax()
    if args.resume and not args.checkpoint_dir:
        raise ZooError("--resume needs --checkpoint-dir DIR, the folder of the run to continue")
    if args.resume and args.init_from:
        raise ZooError("give either --resume (continue a run) or --init-from (start a new one from its "
                       "parameters), not both")
    for name in ("save_every", "keep"):
        if getattr(args, name) is not None and not args.checkpoint_dir:
            raise ZooError(f"--{name.replace('_', '-')} needs --checkpoint-dir DIR")
    if args.checkpoint_dir:
        files.output_dir(args.checkpoint_dir, "--checkpoint-dir")
    with contextlib.ExitStack() as held:
        if args.checkpoint_dir:  # one writer per checkpoint folder, from before its checkpoint is read to the end
            held.enter_context(checkpoint.locked(args.checkpoint_dir))
        resume = args.resume and checkpoint.resumable(args.checkpoint_dir)
        if args.resume and not resume:  # a first run of a command that is run again and again (preemption)
            print(f"nothing to resume in {args.checkpoint_dir} (no complete checkpoint yet): starting a new run")
        if resume:
            resume_from_checkpoint(args)
        styles.use_precision(args.precision)
        out = check_train_paths(args)
        if jax.process_index() == 0:  # on several hosts, process 0 writes the outputs
            writes = ["metrics.json", "curves.png"] + (["samples.png"] if MODELS[args.model].kind == "vae" else [])
            # A resumed run's outputs are the whole run's: they replace the interrupted one's, unasked.
            held.enter_context(files.claimed(out, "--out", force=args.force or resume, writes=writes))
        config = config_from(args)
        config = dataclasses.replace(config, **getattr(args, "resumed_config", {}))
        config.validate()
        hparams = hparams_from(args)
        check_parallel(args, config, hparams)
        dataset = data.load(args.dataset, args.data_dir, args.manual_dir, **data.options(args))
        model = styles.build(args.model, args.style, in_shape=dataset.in_shape, num_classes=dataset.num_classes,
                             precision=args.precision, **hparams)
        if resume and checkpoint.already_complete(args.checkpoint_dir, model, dataset, config):
            epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
            print(f"nothing to train: the newest checkpoint in {args.checkpoint_dir} already completes "
                  f"the {epochs} of this run; give a larger --epochs to train further")
            return 0
        init_params, init_state, init_updates = (checkpoint.read_variables(args.init_from, model)
                                                 if args.init_from else (None, None, 0))
        if args.checkpoint_dir:
            result = checkpoint.train(model, dataset, config, args.checkpoint_dir, save_every=args.save_every,
                                      keep=args.keep or checkpoint.DEFAULT_KEEP, resume=resume,
                                      init_params=init_params, init_state=init_state,
                                      init_updates=init_updates, out_dir=out, progress=not args.no_progress)
        else:
            result = train.train(model, dataset, config, init_params=init_params, init_state=init_state,
                                 out_dir=out, progress=not args.no_progress)
        saved = checkpoint.steps(args.checkpoint_dir) if args.checkpoint_dir else []  # every process: Orbax syncs
        if jax.process_index() > 0:
            return 0  # on several hosts, process 0 writes the outputs and reports
        final = result.final
        summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if k != "lr")
        timing = f"{result.step_ms:.2f} ms/step (median)" if result.step_ms is not None else "no step timed"
        print(f"{args.model}/{args.style} on {args.dataset}: {summary}; {timing}")
        if model.kind == "vae":
            # Host copies: on several hosts a computation on the global arrays would need every process.
            sample.write_grid(model, jax.device_get(result.params), out / "samples.png", seed=config.seed)
            print(f"samples: {out / 'samples.png'}")
    print(f"wrote {out / 'metrics.json'} and {out / 'curves.png'}")
    if args.checkpoint_dir:
        print(f"checkpoints: {args.checkpoint_dir} (steps {', '.join(map(str, saved))})")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    styles.use_precision(args.precision)
    config = config_from(args)
    config.validate()
    choose_dataset(args)
    out = files.output_file(args.out or f"runs/compare-{args.model}-{args.dataset}.json", "--out", ".json")
    if args.init_from:
        files.input_path(args.init_from, "--init-from")
    data.check_dirs(args.dataset, args.data_dir, args.manual_dir, **data.options(args))
    hparams = hparams_from(args)
    check_parallel(args, config, hparams)
    with files.claimed(out, "--out", force=args.force):
        dataset = data.load(args.dataset, args.data_dir, args.manual_dir, **data.options(args))
        init_canonical = init_state = None
        if args.init_from:
            init_canonical, init_state, _ = checkpoint.read_canonical(
                args.init_from, args.model, dataset.in_shape, dataset.num_classes, **hparams)
        rows, _ = compare.compare(args.model, dataset, config, args.styles, precision=args.precision,
                                  progress=not args.no_progress, hparams=hparams,
                                  init_canonical=init_canonical, init_canonical_state=init_state,
                                  noise_floor=not args.no_noise_floor)
        files.write_json(out, {"model": args.model, "dataset": args.dataset, "precision": args.precision,
                               "config": dataclasses.asdict(config), "rows": rows})
    if args.json:
        print(files.dumps(rows))
    else:
        print(f"{args.model} on {args.dataset}, {config.epochs} epochs, batch {config.batch_size}, "
              f"same initial parameters and batches for every style")
        print(compare.format_table(rows, MODELS[args.model].kind))
        for line in compare.explain(rows):
            print(line)
        print(f"wrote {out}")
    split = [r["style"] for r in rows if r.get("one_device_parity") == "DIFFERENT"]
    if split:
        print(f"zoo compare: {', '.join(split)} sharded ({config.strategy}) differ from the same style on one "
              "device beyond rounding", file=sys.stderr)
    different = [r["style"] for r in rows if r["parity"] == "DIFFERENT"]
    if split and not different:
        return 1
    if different:
        print(f"zoo compare: {', '.join(different)} differ from plain JAX beyond rounding: above the noise floor "
              "(the reference's drift from a one-ulp change of its start), and not shrinking when the same runs "
              "are repeated in float64", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"list": cmd_list, "train": cmd_train, "compare": cmd_compare}


def _stdout_to_nowhere() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail again on it."""
    with contextlib.suppress(OSError, ValueError):  # (a captured stdout has no file descriptor)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("stdout", "stderr"):  # started with a closed stream (zoo list >&-): write nowhere, not crash
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help (0) and usage errors (2): argparse has written to stdout or stderr
        try:
            sys.stdout.flush()
        except OSError as error:
            print(f"zoo: error: stdout: {error.strerror}", file=sys.stderr)
            _stdout_to_nowhere()
            return 1
        raise done
    args.argv = argv
    handler = COMMANDS.get(args.command) or args.handler
    try:
        if args.command not in (*STARTS_JAX_ITSELF, *NEEDS_NO_JAX):
            check_jax()
        status = handler(args)
        try:
            sys.stdout.flush()  # a full disk or a closed pipe under stdout is reported here, not at exit
        except OSError as error:
            if not isinstance(error, BrokenPipeError):
                error.filename = "stdout"
            raise
        return status
    except ZooError as error:
        print(f"zoo: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    except train.NonFiniteError as error:
        print(f"zoo: training stopped: {one_line(str(error))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout closed early (zoo show | head): stop quietly, as other tools do
        _stdout_to_nowhere()
        return 1
    except OSError as error:  # checked paths can still fail: a full disk, a folder removed meanwhile
        print(f"zoo: error: {one_line(files.describe(error))}", file=sys.stderr)
        _stdout_to_nowhere()  # stdout itself may be what failed
        return 1
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
