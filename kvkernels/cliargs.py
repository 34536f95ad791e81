"""Argument types shared by the `kvkernels` subcommands, so every option parses sizes the same way
and a bad value is reported by argparse as `argument --name: ...` (exit status 2).

Sizes are whole numbers with an optional k or m suffix (binary: 4k = 4096, 1m = 1048576).
"""

from __future__ import annotations

import argparse
import math
import re

_SUFFIX = {"": 1, "k": 1024, "m": 1024 ** 2}


def parse_size(text: str, minimum: int = 0) -> int:
    """'4096', '32k', '1.5k', '1m' -> int. ValueError (saying what was expected) for anything else,
    including a value below `minimum`."""
    t = str(text).strip().lower()
    m = re.fullmatch(r"(-?[0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([km]?)", t)
    if not m:
        raise ValueError(f"{text!r} is not a size: expected a whole number, optionally with a k or m "
                         f"suffix (4k = 4096)")
    value = float(m.group(1)) * _SUFFIX[m.group(2)]
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"{text!r} is not a whole number")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{text!r} must be >= {minimum}")
    return value


def parse_sizes(text, minimum: int = 0) -> list[int]:
    """'1,16,4k' -> [1, 16, 4096]; a list of ints passes through (checked against minimum)."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [x for x in str(text).split(",") if x.strip()]
    if not items:
        raise ValueError("expected at least one value")
    return [parse_size(x, minimum) if isinstance(x, str) else _checked_int(x, minimum) for x in items]


def _checked_int(x, minimum):
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ValueError(f"{x!r} must be an int >= {minimum}")
    return x


def _argparse_type(parser, name: str, minimum: int):
    """parser(text, minimum) as an argparse type named `name` (its errors become usage errors)."""
    def parse(text):
        try:
            return parser(text, minimum)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = name
    return parse


def size(minimum: int = 0):
    """argparse type: one size >= minimum."""
    return _argparse_type(parse_size, "size", minimum)


def sizes(minimum: int = 0):
    """argparse type: a comma-separated list of sizes >= minimum."""
    return _argparse_type(parse_sizes, "sizes", minimum)


def positive_int(text):
    """argparse type: an int >= 1 (k/m suffixes allowed)."""
    return size(1)(text)


def plural(n: int, word: str) -> str:
    """plural(1, 'token') -> '1 token'; plural(3, 'token') -> '3 tokens'."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"
