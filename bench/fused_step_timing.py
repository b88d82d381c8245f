"""How ``bench_fused_step.py`` times a call: an L2 flush before each timed call, device markers
(CUDA events, or a host clock on the CPU) just around it, host wall and CPU time of its launch
calls, medians; and the device's copy bandwidth, the yardstick of every achieved rate."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

DEFAULT_FLUSH_BYTES = 256 << 20  # a CUDA device that does not report its L2 size
CPU_FLUSH_BYTES = 8 << 20  # smoke runs on the CPU: exercises the flush, not sized to its caches


# ------------------------------------------------------------------------------ L2 flush
def l2_cache_bytes(device: torch.device) -> int:
    """The device's L2 size in bytes (0 on the CPU or when the device does not report it)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)


def default_flush_bytes(device: torch.device) -> int:
    """Twice the L2 when known; 256 MiB on a CUDA device that does not say; 8 MiB on the CPU."""
    if device.type != "cuda":
        return CPU_FLUSH_BYTES
    l2 = l2_cache_bytes(device)
    return 2 * l2 if l2 > 0 else DEFAULT_FLUSH_BYTES


class L2Flush:
    """Evicts the timed operands from the L2 between timed calls.

    Writes one buffer of ``nbytes``, then reads a second one of ``nbytes``: the write
    evicts the operands (with ``nbytes`` at least twice the L2); the read then evicts the
    write's own dirty lines, whose write-back would otherwise land inside the next timed
    call. Call it outside the timed region. ``nbytes == 0`` disables it.
    """

    def __init__(self, device: torch.device, nbytes: int):
        self.nbytes = max(0, int(nbytes))
        self.calls = 0
        rows = -(-self.nbytes // 4096)  # fp32 rows of 1024 elements
        if rows:
            self._write = torch.empty((rows, 1024), dtype=torch.float32, device=device)
            self._read = torch.ones((rows, 1024), dtype=torch.float32, device=device)
            self._sink = torch.empty(1024, dtype=torch.float32, device=device)
        else:
            self._write = self._read = self._sink = None

    def __call__(self) -> None:
        self.calls += 1
        if self._write is not None:
            self._write.zero_()
            torch.sum(self._read, dim=0, out=self._sink)


# ------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    """Medians over the timed repeats, in milliseconds."""

    gpu_ms: float  # device time between markers recorded just around the call
    host_ms: float  # host wall time of the launch calls (time.perf_counter)
    cpu_ms: float  # host CPU time of the launch calls (time.process_time)


class _Marker:
    """A point on the device's timeline: a CUDA event, or a host clock reading on the CPU."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        self.seconds: Optional[float] = None

    def record(self) -> None:
        if self.event is not None:
            self.event.record()
        else:
            self.seconds = time.perf_counter()

    def elapsed_ms(self, end: "_Marker") -> float:
        """Milliseconds from this marker to ``end`` (waits for ``end`` on a GPU)."""
        if self.event is not None:
            end.event.synchronize()
            return self.event.elapsed_time(end.event)
        return (end.seconds - self.seconds) * 1e3


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              flush: Optional[Callable[[], None]] = None) -> Timing:
    """Time ``fn``: ``warmup`` untimed calls (at least one), then per repeat ``flush()``
    (outside the timed region), a start marker, ``fn()`` between host clock readings, an end
    marker, and a wait for it (never inside the timed region)."""
    for _ in range(max(1, warmup)):
        fn()
    _synchronize(device)
    gpu, host, cpu = [], [], []
    for _ in range(max(1, repeats)):
        if flush is not None:
            flush()
        start, end = _Marker(device), _Marker(device)
        start.record()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        fn()
        wall1, cpu1 = time.perf_counter(), time.process_time()
        end.record()
        gpu.append(start.elapsed_ms(end))
        host.append((wall1 - wall0) * 1e3)
        cpu.append((cpu1 - cpu0) * 1e3)
    return Timing(statistics.median(gpu), statistics.median(host), statistics.median(cpu))


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
            flush: Optional[Callable[[], None]] = None) -> float:
    """Median device time of ``fn`` in milliseconds (see :func:`time_call`)."""
    return time_call(fn, device, warmup, repeats, flush).gpu_ms


def copy_bandwidth_gbs(device: torch.device, nbytes: int, warmup: int, repeats: int,
                       flush: Optional[Callable[[], None]] = None) -> float:
    """Device-to-device ``copy_`` bandwidth, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, repeats, flush)
    return 2 * src.numel() * 4 / max(ms, 1e-9) / 1e6
