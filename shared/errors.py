"""The one exception every layer raises for bad input from a user.

It sits at the bottom of ``shared``: it imports nothing of the project, so any
module can raise it without an import cycle, and the command line turns it into
one line on stderr with exit status 2.
"""

from __future__ import annotations


class ZooError(ValueError):
    """Bad input from a user: the message says what was wrong and how to fix it."""


def check_choice(what: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ZooError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")
