"""Sizes: parse ``256M``/``256MiB``/``1G``/``4096`` and print them back."""

from __future__ import annotations

import re
from fractions import Fraction

from ublkmig.errors import UserError

# As coreutils (truncate, dd): K and KiB are 1024, KB is 1000.
_POWERS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([KMGTP])(i?B|i)?|B)?", re.IGNORECASE)
_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``4096``, ``4096B``, ``512K``, ``256M``, ``256MiB``, ``1.5G``, ``1GB``.

    Raises :class:`UserError` on anything else or on a fractional byte count.
    """
    m = _SIZE_RE.fullmatch(text.strip())
    if not m:
        raise UserError(f"not a size: {text!r} (expected e.g. 4096, 512K, 256M, 1G)")
    number, prefix, suffix = m.group(1), (m.group(2) or "").upper(), m.group(3) or ""
    base = 1000 if suffix.upper() == "B" else 1024
    value = Fraction(number) * base ** _POWERS[prefix]
    if value.denominator != 1:
        raise UserError(f"not a whole number of bytes: {text!r}")
    return int(value)


def format_size(n: int) -> str:
    """``268435456`` -> ``256 MiB``; ``1536`` -> ``1.5 KiB``; ``100`` -> ``100 B``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if value < 1024 or unit == _UNITS[-1]:
            break
    return f"{value:.1f}".removesuffix(".0") + " " + unit


def parse_rate(text: str) -> int:
    """Bytes per second in ``text``: a size, optionally ending in ``/s`` (``100M``, ``1.5G/s``,
    ``64MiB/s``).  Raises :class:`UserError` on anything else."""
    body = text.strip()
    if body.lower().endswith("/s"):
        body = body[:-2]
    try:
        return parse_size(body)
    except UserError:
        raise UserError(f"not a speed: {text!r} (expected e.g. 100M or 100M/s)") from None


def format_rate(n: float) -> str:
    """``33554432`` -> ``32 MiB/s``."""
    return format_size(round(n)) + "/s"


def format_duration(seconds: float) -> str:
    """``0.0042`` -> ``4.2 ms``; ``3.25`` -> ``3.2 s``; ``75`` -> ``1m15s``; ``3725`` -> 1h02m."""
    if seconds < 1:
        return f"{seconds * 1000:.1f}".removesuffix(".0") + " ms"
    if seconds < 60:
        return f"{seconds:.1f}".removesuffix(".0") + " s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
