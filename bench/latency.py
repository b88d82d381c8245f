"""Step latency (paper Table 8) and training memory of every method on one model.

Each method gets a fresh copy of the same seeded model and the same batches of real text.
A step is timed in three parts: forward (to the loss), backward, and optimizer
(``step()`` plus ``zero_grad()``); the step's total is their sum. After ``warmup`` steps,
``repeats`` steps are timed and the median of each part and of the total is reported
(so periodic costs, MISA's switch or GaLore's SVD, are in the mean, not the median).
MISA runs without its start-up sweep (one step per module, once per training run) so that
the timed steps are the steady state of importance sampling.
On CUDA the parts are timed with CUDA events; on CPU with ``time.perf_counter``. The
median parts need not add up exactly to the median total (each is a median of its own).

Memory, read in the same steps: gradient bytes right after ``backward()`` (the peak for
gradients), master-weight and optimizer-state bytes right after ``step()``; the step with
the largest sum is kept. On CUDA also the peak allocated memory over the timed steps.
"""
from __future__ import annotations

import gc
import statistics
from time import perf_counter
from typing import Any, Iterator, Optional

import torch
from torch import Tensor
from tqdm import tqdm

from misa_kernels.data import lm_splits
from misa_kernels.ops.backend import triton_available

from .common import PRETRAIN_CORPUS, LatencySettings, batch_stream, build_model, lm_loss, n_params, nbytes
from .peers import MethodSpec, PeerUnavailable, make_method

PARTS = ("forward_ms", "backward_ms", "optimizer_ms")


def latency_specs(s: LatencySettings, device: str) -> list[MethodSpec]:
    """The rows of the latency table: AdamW first (the ratios' reference), then MISA per
    delta and backend, then the peers."""
    specs = [MethodSpec("adamw", "adamw")]
    for backend in ("torch", "triton"):
        for delta in s.deltas:
            specs.append(MethodSpec(f"misa δ={delta:.0%} ({backend})", "misa",
                                    dict(delta=delta, inner_steps=s.inner_steps, backend=backend, sweep=False)))
    specs += [
        MethodSpec(f"badam (switch every {s.peers.badam_switch_every})", "badam"),
        MethodSpec(f"lora r={s.peers.lora_rank}", "lora", dict(rank=s.peers.lora_rank)),
        MethodSpec(f"galore r={s.peers.galore_rank}", "galore", dict(rank=s.peers.galore_rank)),
    ]
    return specs


def unavailable_reason(spec: MethodSpec, device: str) -> Optional[str]:
    """Why ``spec`` cannot run on ``device`` (before importing any peer), or ``None``."""
    if spec.kind == "misa" and spec.options.get("backend") == "triton":
        if device != "cuda":
            return "skipped: the Triton kernels need CUDA"
        if not triton_available():
            return "skipped: triton not installed"
    return None


class StepClock:
    """Time marks within a step: CUDA events on a GPU, ``perf_counter`` otherwise."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(perf_counter())

    def intervals_ms(self, pairs: list[tuple[int, int]]) -> list[float]:
        """Milliseconds between marks ``(a, b)``; waits for the GPU first."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[a].elapsed_time(self.marks[b]) for a, b in pairs]
        return [1000 * (self.marks[b] - self.marks[a]) for a, b in pairs]


def timed_step(method, ids: Tensor, device: str, reading: dict[str, Any]) -> dict[str, float]:
    """One training step timed in parts; memory readings (untimed) go into ``reading``."""
    clock = StepClock(device)
    clock.mark()
    loss = lm_loss(method.model, ids)
    clock.mark()
    loss.backward()
    clock.mark()
    grads = [p.grad for p in method.model.parameters() if p.grad is not None]
    reading["gradients"] = sum(map(nbytes, grads))
    reading["trained_params"] = sum(g.numel() for g in grads)
    clock.mark()
    method.step()
    method.zero_grad()
    clock.mark()
    reading.update(method.state_bytes())
    forward, backward, optimizer = clock.intervals_ms([(0, 1), (1, 2), (3, 4)])
    return dict(forward_ms=forward, backward_ms=backward, optimizer_ms=optimizer,
                total_ms=forward + backward + optimizer)


def summarize(steps: list[dict[str, float]]) -> dict[str, float]:
    """Median of each part and of the total over the timed steps, plus the mean total."""
    summary = {key: statistics.median(step[key] for step in steps) for key in (*PARTS, "total_ms")}
    summary["total_mean_ms"] = statistics.fmean(step["total_ms"] for step in steps)
    return summary


def run_timed(method, stream: Iterator[Tensor], device: str, warmup: int, repeats: int,
              progress: bool = False) -> dict[str, Any]:
    """Warm up, then time ``repeats`` steps; timings, memory and (CUDA) peak bytes."""
    steps, memory = [], {"total": -1}
    for index in tqdm(range(warmup + repeats), desc=f"latency {method.spec.label}", disable=not progress, leave=False):
        if index == warmup and device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        reading: dict[str, Any] = {}
        times = timed_step(method, next(stream), device, reading)
        reading["total"] = reading["gradients"] + reading["master_weights"] + reading["optimizer_state"]
        memory = max(memory, reading, key=lambda m: m["total"])
        if index >= warmup:
            steps.append(times)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    trained = memory.pop("trained_params")
    return dict(**summarize(steps), memory=memory, peak_bytes=peak, trained_params=trained, steps=steps)


def measure_method(spec: MethodSpec, s: LatencySettings, rows: Tensor, device: str, seed: int = 0,
                   progress: bool = False) -> dict[str, Any]:
    """One row: ``status`` is ``"ok"`` with the timings and memory, or why the row is empty."""
    row: dict[str, Any] = dict(method=spec.label, kind=spec.kind, options=spec.options)
    reason = unavailable_reason(spec, device)
    if reason is not None:
        return dict(row, status=reason)
    model = build_model(s.shape, s.dtype, device, seed=seed, max_len=s.seq_len)
    row["model_params"] = n_params(model)
    try:
        method = make_method(spec, model, lr=1e-5, peers=s.peers, seed=seed)
    except PeerUnavailable as err:
        return dict(row, status=str(err))
    stream = batch_stream(rows, s.batch_size, device, seed=seed)
    try:
        result = dict(status="ok", **run_timed(method, stream, device, s.warmup, s.repeats, progress))
    except torch.cuda.OutOfMemoryError:  # one method too big for the GPU must not end the run
        result = dict(status="out of memory")
    del method, model, stream
    _free(device)
    return dict(row, **result)


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def latency_rows(s: LatencySettings, device: str, progress: bool = True, seed: int = 0,
                 specs: Optional[list[MethodSpec]] = None) -> list[dict[str, Any]]:
    """Every method of :func:`latency_specs` (or ``specs``) measured on the same model and batches."""
    rows = lm_splits(PRETRAIN_CORPUS, s.seq_len)[0]
    specs = specs if specs is not None else latency_specs(s, device)
    return [measure_method(spec, s, rows, device, seed, progress)
            for spec in tqdm(specs, desc="latency", disable=not progress)]
