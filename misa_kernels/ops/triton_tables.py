"""The multi-tensor tables the Triton kernels read (see :mod:`.triton_kernels`), and their
device cache.

A table is built on the host from data pointers and copied to the device once: tables are
cached by content, and the active set keeps its tensors for ``T`` steps, so a steady-state
step copies nothing to the device.
"""
from __future__ import annotations

from typing import Hashable, Optional, Sequence

import torch
from torch import Tensor

from .triton_kernels import ALIGN

TABLE_CACHE_SIZE = 32

_table_cache: dict[tuple, Tensor] = {}


def device_table(rows: list[tuple[int, ...]], device: torch.device) -> Tensor:
    """The rows as an int64 device tensor, copied asynchronously and cached by content."""
    key = (device, tuple(rows))
    table = _table_cache.get(key)
    if table is None:
        host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            # Pinned + non_blocking: no host synchronisation for the copy.
            table = host.pin_memory().to(device, non_blocking=True)
        else:
            table = host.to(device)
        if len(_table_cache) >= TABLE_CACHE_SIZE:
            _table_cache.pop(next(iter(_table_cache)))
        _table_cache[key] = table
    return table


def n_iters(n_rows: int) -> int:
    """Binary-search steps that narrow ``n_rows`` candidates down to one."""
    return (n_rows - 1).bit_length()


def n_tiles(numel: int, block: int) -> int:
    return -(-numel // block)


def aligned(rows: list[tuple[int, ...]], columns: Sequence[int]) -> bool:
    """Whether every pointer of ``columns`` allows 128-bit accesses."""
    return all(row[c] % ALIGN.value == 0 for row in rows for c in columns)


def groups(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices by key, in first-seen order."""
    found: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        found.setdefault(key, []).append(i)
    return found


def update_rows(
    indices: Sequence[int],
    params: Sequence[Tensor],
    grads: Optional[Sequence[Tensor]],
    masters: Sequence[Optional[Tensor]],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    block: int,
) -> tuple[list[tuple[int, ...]], int]:
    """Table rows of the non-empty tensors among ``indices`` and their total tile count."""
    rows, tiles = [], 0
    for i in indices:
        numel = params[i].numel()
        if numel == 0:
            continue
        master = masters[i]
        rows.append((
            params[i].data_ptr(),
            grads[i].data_ptr() if grads is not None else 0,
            master.data_ptr() if master is not None else 0,
            exp_avgs[i].data_ptr(),
            exp_avg_sqs[i].data_ptr(),
            numel,
            tiles,
            i,
        ))
        tiles += n_tiles(numel, block)
    return rows, tiles


def norm_rows(grads: Sequence[Tensor], indices: Sequence[int], tiles: Sequence[int]) -> tuple[list, int]:
    """Rows of ``grads[indices]`` for the squared-norm kernel (tiles counted for empty ones
    too, so that partial sums stay in order) and the tile count."""
    rows, total = [], 0
    for i in indices:
        if tiles[i]:
            rows.append((0, grads[i].data_ptr(), 0, 0, 0, grads[i].numel(), total, i))
        total += tiles[i]
    return rows, total
