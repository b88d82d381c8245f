"""The multi-tensor tables the Triton kernels read (see :mod:`.triton_kernels`), and their
device cache.

A table is built on the host from data pointers and copied to the device once: tables are
cached by content (least recently used out first), and within an inner loop the active
set's tensors keep their addresses (the sparse backward's gradients live in a
:class:`~misa_kernels.grad_arena.GradArena`), so a steady-state step builds nothing and
copies nothing. A table that is new (a switch, or autograd's ``.grad`` re-allocated
elsewhere) goes to the device through :class:`Staging`, a preallocated host buffer
(pinned on CUDA) reused as a ring: the copy is asynchronous and allocates no pinned memory.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

import torch
from torch import Tensor

from .triton_kernels import ALIGN

TABLE_CACHE_SIZE = 1024  # tables are a few hundred bytes; per-module steps in backward need one each
STAGING_ELEMENTS = 1 << 16  # int64 entries of the initial staging ring (512 KiB)


@dataclass
class TableStats:
    """Host work for tables since the last :meth:`reset`: ``builds`` (cache misses),
    ``copies`` (host-to-device copies), ``staging_allocations`` (staging buffers allocated,
    pinned on CUDA) and ``waits`` (a ring region still being copied had to be waited for)."""

    builds: int = 0
    copies: int = 0
    staging_allocations: int = 0
    waits: int = 0

    def reset(self) -> None:
        self.builds = self.copies = self.staging_allocations = self.waits = 0


stats = TableStats()


class Staging:
    """A host buffer for one device, used as a ring: each table is written into the next
    free region and copied to the device asynchronously; a region is written again only
    once the copy that read it has finished (a CUDA event, normally long done)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer: Optional[Tensor] = None
        self.offset = 0
        self._pending: deque = deque()  # (start, end, event) of copies in flight, oldest first

    def to_device(self, rows: list[tuple[int, ...]]) -> Tensor:
        """``rows`` as a new int64 device tensor, copied through the ring."""
        host = torch.tensor(rows, dtype=torch.int64)
        n = host.numel()
        start = self._region(n)
        self.buffer[start:start + n].copy_(host.view(-1))
        table = torch.empty(host.shape, dtype=torch.int64, device=self.device)
        table.view(-1).copy_(self.buffer[start:start + n], non_blocking=True)
        stats.copies += 1
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
            self._pending.append((start, start + n, event))
        self.offset = start + n
        return table

    def _region(self, n: int) -> int:
        """The start of ``n`` free entries, growing the ring if it is too small."""
        if self.buffer is None or n > self.buffer.numel():
            self._allocate(max(STAGING_ELEMENTS, 2 * n))
            return 0
        start = self.offset if self.offset + n <= self.buffer.numel() else 0
        self._wait_for(start, start + n)
        return start

    def _allocate(self, elements: int) -> None:
        # The pinned-memory allocator keeps an old block until copies reading it finish.
        self.buffer = torch.empty(elements, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        self.offset, self._pending = 0, deque()
        stats.staging_allocations += 1

    def _wait_for(self, start: int, end: int) -> None:
        still = deque()
        for begin, finish, event in self._pending:
            if event.query():
                continue
            if begin < end and start < finish:
                event.synchronize()
                stats.waits += 1
            else:
                still.append((begin, finish, event))
        self._pending = still


_table_cache: OrderedDict[tuple, Tensor] = OrderedDict()
_staging: dict[torch.device, Staging] = {}


def device_table(rows: list[tuple[int, ...]], device: torch.device) -> Tensor:
    """The rows as an int64 device tensor, cached by content."""
    key = (device, tuple(rows))
    table = _table_cache.get(key)
    if table is not None:
        _table_cache.move_to_end(key)
        return table
    stats.builds += 1
    staging = _staging.get(device)
    if staging is None:
        staging = _staging[device] = Staging(device)
    table = _table_cache[key] = staging.to_device(rows)
    if len(_table_cache) > TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return table


def clear_cache() -> None:
    """Forget every cached table and staging ring."""
    _table_cache.clear()
    _staging.clear()


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
