"""Byte units: ``GIB`` and :func:`parse_bytes` (``"24GiB"`` -> bytes).

Its own module because both :class:`~misa_kernels.estimate.methods.MemoryEstimate`
(``fits``/``headroom`` accept ``"24GiB"``) and the CLI read sizes: kept apart from
``cli.py`` so that the estimate does not import the command line."""
from __future__ import annotations

import re
from typing import Union

GIB = 2**30
_UNITS = {"": GIB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(value: Union[int, float, str]) -> int:
    """``"24GiB"``, ``"80GB"``, ``"40G"`` (binary), ``"24"`` (GiB) or an int (bytes) -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"gpu_memory must be > 0, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"gpu_memory: cannot read {value!r}; use e.g. 24GiB, 80GB or 40G")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
