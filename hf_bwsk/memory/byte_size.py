"""Byte sizes as people write them: `800MB`, `1.5 GiB`, `1048576`."""

from __future__ import annotations

import re

from ..errors import BWSKError

_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_byte_size(value: int | str) -> int:
    """`1048576`, `"512MB"`, `"1.5 GiB"` -> a byte count (decimal units are powers of 10, `*iB` of 2)."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if unit not in _BYTE_UNITS:
            raise BWSKError(
                f"cannot read {value!r} as a byte size: write a number with an optional unit, e.g. 800MB or 2GiB"
            )
        size = int(float(match.group(1)) * _BYTE_UNITS[unit])
    if size <= 0:
        raise BWSKError(f"a byte size must be positive, got {value!r}: pass e.g. 800MB")
    return size
