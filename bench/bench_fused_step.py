"""Benchmark of the fused MISA step (Alg. 1 lines 10-12 plus the block norms of eq. 4).

Active sets come in three families (``--family``, default all):

* ``llama``: ``--sizes`` million parameters split into LLaMA-7B-shaped modules (4096x4096
  attention, 11008x4096 MLP), whole modules while they fit, then a remainder: 2 to 19
  large tensors for the default sizes (1M to 512M);
* ``many``: ``--modules`` N whole modules of a LLaMA of width ``--hidden`` (4096, i.e.
  LLaMA-7B, on CUDA) in layer order, each with a bias-sized vector, plus the two norm
  vectors of every layer begun: 20, 74 and 184 tensors (0.22, 0.88 and 2.28 billion
  parameters at width 4096) for the default 8, 32 and 80 modules, the mix MISA activates
  (it samples modules across layers);
* ``lora``: the rank-``--lora-rank`` A (r x in) and B (out x r) matrices of every module of
  ``--lora-layers`` layers: 14 tiny tensors a layer, 448 (40M parameters) for the default
  32 layers (LoRA + MISA), where launch and per-tensor overheads weigh most.

For each set it times:

* ours: ``adam_update_`` alone, and ``squared_norms_ + adam_update_`` (what MISA runs per
  inner step): ``--dtype`` weights (bf16 by default) with fp32 master, m and v, gradients in
  the weight dtype; ``step`` is a device tensor of per-tensor counts as MISA passes it
  (``--step int`` for one int);
* ``torch.optim.AdamW(fused=True)`` on the fp32 masters, given ready fp32 gradients (cast
  once, outside the timed region and not counted, which favours it), plus the copy
  master -> bf16 weight and a separate per-tensor ``torch.linalg.vector_norm`` pass on the
  bf16 gradients;
* the same with ``AdamW(foreach=True)``;
* the device's copy bandwidth (a large ``Tensor.copy_``), to report each side's achieved
  bandwidth as a percentage of it.

**Timing.** Each measured callable gets ``--warmup`` untimed calls first (at least one, so
Triton compilation, table caching and AdamW's lazy state stay out), then ``--repeats``
timed ones. Before each timed call, outside the timed region, the L2 is flushed: a buffer
of twice the device's L2 (``L2_cache_size``; 256 MiB when the device does not report it;
``--flush-mib`` overrides) is written, then a second one is read, so no operand starts in
the L2 and no dirty line of the flush is written back inside the timed call. GPU time is
taken by CUDA events recorded just around the call; host time by ``time.perf_counter`` and
``time.process_time`` around the launch calls alone, with no synchronisation inside
(launch overhead and Python cost); the host does not wait for the flush, so it starts
launching while the flush runs, as in training, where the step is queued behind the
backward pass. Reported numbers are medians.

**Bytes.** Each side's GB/s uses its own byte count per element, from the real dtypes, each
operand counted once per kernel that touches it. Ours (bf16 weight, fp32 master): master
read and written (8), bf16 weight written (2; the kernel reads the master, not the weight),
m and v read and written (16), bf16 gradient read by the update (2) and again by the
separate norm pass (2): 28 for the update, 30 with the norms. AdamW on the fp32 masters:
weight read and written (8), fp32 gradient read (4), m and v (16): 28 for ``step()``; with
the copy-back (4 read + 2 written) and the norm pass over the bf16 gradients (2): 36.
``foreach`` gets the fused count, so its GB/s is an effective rate (it really moves more).

Prints Markdown tables; ``--json PATH`` also writes the raw numbers. Needs a CUDA GPU for
measurements; without one it says so and exits 0. ``--device cpu --backend torch --sizes
0.01`` is a smoke run of the same code with the PyTorch twin (on the CPU ``--hidden``
defaults to 64, the copy to 64 MiB and the flush to 8 MiB: nothing there is a measurement).

This file holds the benchmarks and the command line; the active sets are in
``fused_step_sets.py``, the flush and timing in ``fused_step_timing.py``, the byte counts in
``fused_step_bytes.py`` and the tables in ``fused_step_report.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Union

import torch

# run as a script (or imported as `bench_fused_step` from bench/), the repository root may be off the
# path: the `bench.` imports below need it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fused_step_bytes import adamw_bytes, ours_bytes  # noqa: E402
from bench.fused_step_report import environment, markdown, over_copy_bandwidth  # noqa: E402
from bench.fused_step_sets import (DTYPES, FAMILIES, FAMILY_ALIASES, HIDDEN_7B, HYPER, STEP,  # noqa: E402
                                   ActiveSet, active_set_shapes, active_sets, make_active_set, make_step)
from bench.fused_step_timing import (L2Flush, Timing, copy_bandwidth_gbs, default_flush_bytes,  # noqa: E402
                                     l2_cache_bytes, time_call)

CPU_HIDDEN = 64
CPU_COPY_MIB = 64


# ------------------------------------------------------------------------------ benchmarks
def _fields(name: str, timing: Timing) -> dict:
    return {f"{name}_ms": timing.gpu_ms, f"{name}_host_ms": timing.host_ms, f"{name}_cpu_ms": timing.cpu_ms}


def bench_ours(active: ActiveSet, ops, device: torch.device, warmup: int, repeats: int,
               flush: Optional[Callable[[], None]] = None, step: Union[int, torch.Tensor] = STEP) -> dict:
    """Our ``adam_update_`` alone, and ``squared_norms_`` + ``adam_update_`` (a MISA inner step)."""
    norms = torch.empty(len(active.params), dtype=torch.float32, device=device)

    def update():
        ops.adam_update_(active.params, active.grads, active.masters, active.exp_avgs,
                         active.exp_avg_sqs, active.skip, step=step, **HYPER)

    def norm_and_update():
        ops.squared_norms_(active.grads, norms)
        update()

    return {
        **_fields("ours_update", time_call(update, device, warmup, repeats, flush)),
        **_fields("ours_norm_update", time_call(norm_and_update, device, warmup, repeats, flush)),
    }


def bench_adamw(active: ActiveSet, flavour: str, device: torch.device, warmup: int, repeats: int,
                flush: Optional[Callable[[], None]] = None) -> dict:
    """``AdamW(fused|foreach)`` on the fp32 weights, plus bf16 copy-back and a norm pass.

    Its fp32 gradients are made here, once, outside the timed region (a real bf16 model
    would have to cast them every step): this favours AdamW."""
    weights = [m if m is not None else p for p, m in zip(active.params, active.masters)]
    params = [torch.nn.Parameter(w) for w in weights]  # shares storage with the weights
    for p, g in zip(params, active.grads):
        p.grad = g.float()
    opt = torch.optim.AdamW(params, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"],
                            **{flavour: True})
    low = [p for p, m in zip(active.params, active.masters) if m is not None]
    masters = [m for m in active.masters if m is not None]

    def full_step():
        for g in active.grads:
            torch.linalg.vector_norm(g, dtype=torch.float32)
        opt.step()
        if low:
            torch._foreach_copy_(low, masters)

    return {  # opt, its states and the fp32 gradients go with this frame
        **_fields(f"adamw_{flavour}_step", time_call(opt.step, device, warmup, repeats, flush)),
        **_fields(f"adamw_{flavour}_norm_step", time_call(full_step, device, warmup, repeats, flush)),
    }


def bench_set(family: str, label: str, size_m: Optional[float], shapes: list, args: argparse.Namespace, ops,
              flush: Optional[Callable[[], None]] = None, copy_gbs: float = float("nan")) -> dict:
    """One row: the set's sizes, each variant's times, and its bytes, GB/s and % of ``copy_gbs``."""
    device = torch.device(args.device)
    active = make_active_set(shapes, DTYPES[args.dtype], device)
    numel = active.numel
    row = {"family": family, "label": label,
           "size_m": size_m if size_m is not None else numel / 1e6, "params": numel,
           "tensors": len(shapes), "largest_tensor": max(p.numel() for p in active.params),
           "smallest_tensor": min(p.numel() for p in active.params)}
    step = make_step(getattr(args, "step", "int"), len(shapes), device)
    row.update(bench_ours(active, ops, device, args.warmup, args.repeats, flush, step))
    moved = {"ours_update": ours_bytes(active, with_norm=False),
             "ours_norm_update": ours_bytes(active, with_norm=True)}
    for flavour in ("fused", "foreach"):
        row.update(bench_adamw(active, flavour, device, args.warmup, args.repeats, flush))
        moved[f"adamw_{flavour}_step"] = adamw_bytes(active, full=False)
        moved[f"adamw_{flavour}_norm_step"] = adamw_bytes(active, full=True)
    _add_rates(row, moved, numel, copy_gbs)
    del active
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _add_rates(row: dict, moved: dict[str, int], numel: int, copy_gbs: float) -> None:
    """Each variant's bytes per parameter, GB/s and % of the copy bandwidth, then the summary keys
    the older JSON had (ours with norms, AdamW fused with norm pass and copy-back)."""
    for name, nbytes in moved.items():
        gbs = nbytes / max(row[f"{name}_ms"], 1e-9) / 1e6
        row[f"{name}_bytes_per_param"] = nbytes / numel
        row[f"{name}_gbs"] = gbs
        row[f"{name}_pct_copy"] = 100 * gbs / copy_gbs
    row["bytes_per_param"] = row["ours_norm_update_bytes_per_param"]
    row["ours_gbs"] = row["ours_norm_update_gbs"]
    row["adamw_bytes_per_param"] = row["adamw_fused_norm_step_bytes_per_param"]


def bench_size(millions: float, args: argparse.Namespace, ops, flush: Optional[Callable[[], None]] = None,
               copy_gbs: float = float("nan")) -> dict:
    """A ``llama`` set of ``millions`` million parameters."""
    return bench_set("llama", f"{millions:g}M", millions, active_set_shapes(int(millions * 1e6)),
                     args, ops, flush, copy_gbs)


# ----------------------------------------------------------------------------- command line
def _families(names: list[str]) -> list[str]:
    """``--family`` names in order, ``all`` and aliases expanded, each family once."""
    chosen = []
    for name in names:
        for family in FAMILIES if name == "all" else [FAMILY_ALIASES.get(name, name)]:
            if family not in chosen:
                chosen.append(family)
    return chosen


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", default=["all"],
                        choices=["all", *FAMILIES, *FAMILY_ALIASES],
                        help="active-set families: llama (--sizes), many (--modules), lora "
                             "(--lora-layers); 'modules' is 'many'; default all")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64, 256, 512],
                        help="llama family: active-set sizes in millions of parameters")
    parser.add_argument("--modules", type=int, nargs="+", default=[8, 32, 80],
                        help="many family: numbers of whole modules (with biases and norms)")
    parser.add_argument("--lora-layers", type=int, nargs="+", default=[32],
                        help="lora family: numbers of layers with adapters (14 tensors a layer)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=None,
                        help="width of the modelled LLaMA for the many and lora families "
                             f"(default {HIDDEN_7B}, LLaMA-7B; {CPU_HIDDEN} on the CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="weight and gradient dtype (masters and moments are fp32)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", choices=["triton", "torch"], default="triton",
                        help="our implementation: the Triton kernels or the PyTorch twin")
    parser.add_argument("--step", choices=["tensor", "int"], default="tensor",
                        help="our step count: a device tensor of per-tensor counts (as MISA "
                             "passes it) or one int")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed calls before timing (at least 1: compilation stays out)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="size of the tensor copied to measure bandwidth "
                             f"(default 1024; {CPU_COPY_MIB} on the CPU)")
    parser.add_argument("--flush-mib", type=float, default=None,
                        help="bytes written (and as many read) to flush the L2 before each timed "
                             "call; default twice the device's L2 (256 MiB if unknown; 8 on the "
                             "CPU); 0 disables")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.family = _families(args.family)
    args.warmup = max(1, args.warmup)
    args.repeats = max(1, args.repeats)
    if args.hidden is None:
        args.hidden = CPU_HIDDEN if args.device == "cpu" else HIDDEN_7B
    if args.copy_mib is None:
        args.copy_mib = CPU_COPY_MIB if args.device == "cpu" else 1024
    return args


def run_environment(args: argparse.Namespace, device: torch.device, flush_bytes: int) -> dict:
    """:func:`environment` plus the run's settings and how it times (the JSON's top-level keys)."""
    env = environment(args)
    env.update({"families": args.family, "step": args.step, "hidden": args.hidden,
                "warmup": args.warmup, "repeats": args.repeats, "l2_cache_bytes": l2_cache_bytes(device),
                "flush_bytes": flush_bytes,
                "timing": "gpu_ms: median of device timers (CUDA events) recorded just around the "
                          "call, after an L2 flush outside them; host_ms / cpu_ms: medians of "
                          "time.perf_counter / time.process_time around the launch calls, no "
                          "synchronisation inside",
                "adamw_grads": "fp32, cast once outside the timed region and not counted"})
    return env


def main(argv: Optional[list[str]] = None) -> int:
    """Measure every set the arguments ask for; print the tables (and write ``--json``). Exit 0."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_fused_step: no CUDA GPU available; nothing measured "
              "(use --device cpu --backend torch for a smoke run).")
        return 0
    from misa_kernels.ops.backend import resolve_backend

    device = torch.device(args.device)
    ops = resolve_backend(args.backend, device)
    flush_bytes = default_flush_bytes(device) if args.flush_mib is None else int(args.flush_mib * 2**20)
    flush = L2Flush(device, flush_bytes)
    env = run_environment(args, device, flush_bytes)
    copy_gbs = copy_bandwidth_gbs(device, args.copy_mib << 20, args.warmup, args.repeats, flush)
    rows = [bench_set(family, label, size_m, shapes, args, ops, flush, copy_gbs)
            for family, label, size_m, shapes in active_sets(args)]
    warnings = over_copy_bandwidth(rows) if device.type == "cuda" else []
    print(markdown(env, copy_gbs, rows))
    for warning in warnings:
        print(f"warning: {warning}")
    if args.json:
        args.json.write_text(json.dumps({**env, "copy_gbs": copy_gbs, "warnings": warnings,
                                         "flush_calls": flush.calls, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
