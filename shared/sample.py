"""Samples from a trained VAE: a PNG grid with one row per class."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import numpy as np

from PIL import Image

from shared import checkpoint, files
from shared.args import int_at_least, path_arg, seed
from shared.errors import ZooError
from shared.files import atomic_path
from shared.registry import MODELS, STYLES
from shared.styles import Model


MAX_PER_CLASS = 1000  # a row of 1,000 images is a PNG 30,000 pixels wide


def sample_images(model: Model, params: Any, per_class: int = 10, seed: int = 0) -> np.ndarray:
    """``(num_classes, per_class, H, W, C)`` pixel probabilities for latents drawn from N(0, I)."""
    if model.generate is None:
        raise ZooError(f"{model.name} is not generative; only the vae can be sampled")
    latents = model.hparams["latents"]
    labels = np.repeat(np.arange(model.num_classes), per_class).astype(np.int32)
    z = jax.random.normal(jax.random.key(seed), (len(labels), latents))
    pixels = np.asarray(jax.jit(model.generate)(params, z, labels))
    return pixels.reshape(model.num_classes, per_class, *model.in_shape)


def write_grid(model: Model, params: Any, path: str | Path, per_class: int = 10, seed: int = 0,
               cell: int = 28) -> Path:
    """Write the grid as a PNG (atomically); each image is upscaled to ``cell`` pixels."""
    images = sample_images(model, params, per_class, seed)
    rows, cols, height, width, _ = images.shape
    scale = max(1, cell // height)
    pad = 2
    grid = np.ones((rows * (height * scale + pad) + pad, cols * (width * scale + pad) + pad), np.float32)
    for r in range(rows):
        for c in range(cols):
            tile = np.kron(images[r, c, :, :, 0], np.ones((scale, scale), np.float32))
            y, x = pad + r * (height * scale + pad), pad + c * (width * scale + pad)
            grid[y:y + height * scale, x:x + width * scale] = tile
    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.uint8(np.clip(grid, 0, 1) * 255)).save(tmp)
    return path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="write a PNG grid of VAE samples, one row per class")
    p.add_argument("model", choices=[name for name, spec in MODELS.items() if spec.kind == "vae"])
    p.add_argument("--style", required=True, choices=STYLES,
                   help="the style to sample with (any style can read any checkpoint)")
    p.add_argument("--checkpoint", type=path_arg, required=True,
                   help="a checkpoint folder written by zoo train --checkpoint-dir")
    p.add_argument("--per-class", type=int_at_least(1, "a positive integer", MAX_PER_CLASS), default=10,
                   help=f"samples per class, 1 to {MAX_PER_CLASS} (default: 10)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", type=path_arg, default="samples.png",
                   help="the PNG to write (.png is added to a name without an extension; default: samples.png)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    out = files.output_file(args.out, "--out", ".png")
    files.input_path(args.checkpoint, "--checkpoint")
    with files.claimed(out, "--out", force=args.force):
        model, params, _ = checkpoint.load_variables(args.checkpoint, args.style, expect_model=args.model)
        path = write_grid(model, params, out, args.per_class, args.seed)
    print(f"wrote {path}")
    return 0
