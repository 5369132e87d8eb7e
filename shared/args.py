"""argparse pieces shared by every subcommand: one-line errors and checked types.

Every subcommand module (train, compare, bench, site, show, copy, sample)
builds its parser from these; nothing here imports those modules back.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

# The largest count an option takes: steps and sizes are int32 on the device
# (the step counter, the schedules, the array dimensions).
MAX_COUNT = 2**31 - 1
# Seeds are numpy's and JAX's unsigned 32-bit seeds.
SEED_LIMIT = 2**32


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2, and options are never
    abbreviated (``--style`` is not taken for ``--styles``: a prefix that is unique today
    may not be once an option is added)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: str) -> str:
    """``message`` on one line: a newline or carriage return (in a path, say) shown escaped."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def int_at_least(minimum: int, meaning: str, maximum: int = MAX_COUNT) -> Callable[[str], int]:
    """An argparse type: an integer in ``[minimum, maximum]``, named ``meaning`` in errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {meaning}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {meaning}, got {value}")
        if value > maximum:
            shown = text if len(text) <= 30 else text[:12] + "..." + text[-6:]
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {shown}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")
seed = int_at_least(0, f"a seed from 0 to {SEED_LIMIT - 1}", SEED_LIMIT - 1)


# Every number option ends up in float32 (the parameters, the optimiser's arithmetic):
# beyond this it would be infinite there.
FLOAT32_MAX = 3.4028234663852886e38


def _number(text: str, meaning: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {meaning}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be {meaning}, got {text}")
    if abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"must be {meaning} that float32 can hold (at most {FLOAT32_MAX:.4g}), "
                                         f"got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, "a positive number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1): a dropout rate, a momentum or a moving-average decay."""
    value = _number(text, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def open_fraction(text: str) -> float:
    """A number in (0, 1): an EMA decay."""
    value = _number(text, "a number between 0 and 1 (e.g. 0.99)")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1 (e.g. 0.99), got {text}")
    return value


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits on one name and on a whole path, in bytes


def path_arg(text: str) -> str:
    """A file or folder name, with ``~`` expanded: anything but the empty string (which would
    mean the current folder, or nothing at all, depending on the option), and within the
    system's limits on lengths."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"a path cannot hold a NUL character, got {text!r}")
    text = os.path.expanduser(text)
    encoded = os.fsencode(text)
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise argparse.ArgumentTypeError(f"a file or folder name is at most {NAME_MAX} bytes, got one of "
                                         f"{len(longest)} ({os.fsdecode(longest[:20])}...)")
    if len(encoded) > PATH_MAX:
        raise argparse.ArgumentTypeError(f"a path is at most {PATH_MAX} bytes, got {len(encoded)}")
    return text


MAX_LIST = 100  # layers or stages: more would take minutes to trace, for no model anyone trains here


def int_list(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers: ``128,128``."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    if len(parts) > MAX_LIST:
        raise argparse.ArgumentTypeError(f"at most {MAX_LIST} sizes, got {len(parts)}")
    return tuple(positive_int(p) for p in parts)


def choice_list(choices: tuple[str, ...], what: str) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: a comma-separated list drawn from ``choices``."""

    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(","))
        if any(not v for v in values) and any(values):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}s, got {text!r} (an empty entry)")
        values = tuple(v for v in values if v)
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad)) or '(none)'}; choose from {', '.join(choices)}")
        return values

    return parse
