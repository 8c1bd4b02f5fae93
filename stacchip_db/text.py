"""Small wording helpers for messages, shared by the library and the CLI (a base module)."""

from __future__ import annotations


def plural(n: int, word: str) -> str:
    """`1 item`, `2 items`: a count with its noun (English plural in -s)."""
    return f"{n:,} {word}{'s' * (n != 1)}"


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name when the message is empty
    (`str(exc).splitlines()[0]` raises IndexError there)."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__
