"""Small wording helpers for messages, shared by the library and the CLI (a base module)."""

from __future__ import annotations


def plural(n: int, word: str) -> str:
    """`1 item`, `2 items`: a count with its noun (English plural in -s)."""
    return f"{n:,} {word}{'s' * (n != 1)}"
