"""Benchmark of the fused MISA step (Alg. 1 lines 10-12 plus the block norms of eq. 4).

For active sets of ``--sizes`` million parameters, split into LLaMA-7B-shaped modules
(4096x4096 attention, 11008x4096 MLP), times on one device in one run:

* ours: ``adam_update_`` alone, and ``squared_norms_ + adam_update_`` (what MISA runs per
  inner step): bf16 weights with fp32 master, m and v, bf16 gradients;
* ``torch.optim.AdamW(fused=True)`` on the fp32 masters (given ready fp32 gradients, which
  favours it), plus the copy master -> bf16 weight and a separate per-tensor
  ``torch.linalg.vector_norm`` pass on the bf16 gradients;
* the same with ``AdamW(foreach=True)``;
* the device's copy bandwidth (a large ``Tensor.copy_``), to report our achieved bandwidth
  (bytes moved per parameter x parameters / time) as a percentage of it.

Times are medians over ``--repeats`` (CUDA events, after ``--warmup`` runs). Prints a
Markdown table; ``--json PATH`` also writes the raw numbers. Needs a CUDA GPU; without one
it says so and exits 0. ``--device cpu --backend torch --sizes 0.01`` is a smoke run of the
same code with the PyTorch twin.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# One LLaMA-7B decoder layer: q, k, v, o, then gate, up, down.
LAYER_SHAPES = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
HYPER = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
STEP = 10  # any t >= 1: bias corrections are runtime scalars


@dataclass
class ActiveSet:
    """The operands of one fused step, one entry per module."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    masters: list[Optional[torch.Tensor]]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    skip: torch.Tensor

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def active_set_shapes(n_params: int) -> list[tuple[int, ...]]:
    """Whole LLaMA-7B modules in layer order while they fit, then 4096-wide remainder pieces."""
    shapes, left = [], n_params
    for shape in itertools.cycle(LAYER_SHAPES):
        if shape[0] * shape[1] > left:
            break
        shapes.append(shape)
        left -= shape[0] * shape[1]
    if left >= 4096:
        shapes.append((left // 4096, 4096))
    if left % 4096:
        shapes.append((left % 4096,))
    return shapes


def make_active_set(shapes, dtype: torch.dtype, device: torch.device) -> ActiveSet:
    low = dtype != torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(shape, scale=1.0):
        return torch.randn(shape, generator=gen, device=device).mul_(scale)

    masters = [randn(s, 0.02) for s in shapes]
    return ActiveSet(
        params=[m.to(dtype) for m in masters] if low else masters,
        grads=[randn(s, 1e-3).to(dtype) for s in shapes],
        masters=masters if low else [None] * len(shapes),
        exp_avgs=[randn(s, 1e-4) for s in shapes],
        exp_avg_sqs=[randn(s, 1e-4).square_() for s in shapes],
        skip=torch.zeros(len(shapes), dtype=torch.bool, device=device),
    )


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int, warmup: int, repeats: int) -> float:
    """Device-to-device ``copy_`` bandwidth, counting the read and the write."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, repeats)
    return 2 * src.numel() * 4 / ms / 1e6


def bytes_per_param(active: ActiveSet, with_norm: bool) -> float:
    """Bytes our kernels read and write per parameter (each byte once per kernel)."""
    total = 0
    for p, g, master in zip(active.params, active.grads, active.masters):
        weight = 2 * 4 + p.element_size() if master is not None else 2 * p.element_size()
        moments = 2 * 4 + 2 * 4  # m and v, read and written
        grad = g.element_size() * (2 if with_norm else 1)
        total += p.numel() * (weight + moments + grad)
    return total / active.numel


def bench_ours(active: ActiveSet, ops, device, warmup: int, repeats: int) -> dict:
    norms = torch.empty(len(active.params), dtype=torch.float32, device=device)

    def update():
        ops.adam_update_(active.params, active.grads, active.masters, active.exp_avgs,
                         active.exp_avg_sqs, active.skip, step=STEP, **HYPER)

    def norm_and_update():
        ops.squared_norms_(active.grads, norms)
        update()

    return {
        "ours_update_ms": time_ms(update, device, warmup, repeats),
        "ours_norm_update_ms": time_ms(norm_and_update, device, warmup, repeats),
    }


def bench_adamw(active: ActiveSet, flavour: str, device, warmup: int, repeats: int) -> dict:
    """``AdamW(fused|foreach)`` on the fp32 weights, plus bf16 copy-back and a norm pass."""
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

    result = {
        f"adamw_{flavour}_step_ms": time_ms(opt.step, device, warmup, repeats),
        f"adamw_{flavour}_norm_step_ms": time_ms(full_step, device, warmup, repeats),
    }
    del opt, params
    return result


def bench_size(millions: float, args, ops) -> dict:
    device = torch.device(args.device)
    shapes = active_set_shapes(int(millions * 1e6))
    active = make_active_set(shapes, DTYPES[args.dtype], device)
    row = {"size_m": millions, "params": active.numel, "tensors": len(shapes)}
    row.update(bench_ours(active, ops, device, args.warmup, args.repeats))
    for flavour in ("fused", "foreach"):
        row.update(bench_adamw(active, flavour, device, args.warmup, args.repeats))
    row["bytes_per_param"] = bytes_per_param(active, with_norm=True)
    row["ours_gbs"] = row["bytes_per_param"] * active.numel / row["ours_norm_update_ms"] / 1e6
    del active
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def environment(args) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton_version,
            "commit": commit, "dtype": args.dtype, "backend": args.backend}


def markdown(env: dict, copy_gbs: float, rows: list[dict]) -> str:
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}; weights {env['dtype']} (+fp32 master, m, v); "
        f"backend {env['backend']}; copy bandwidth {copy_gbs:.0f} GB/s",
        "",
        "| params (M) | tensors | ours update ms | ours norm+update ms | bytes/param "
        "| ours GB/s | % copy BW | AdamW fused+norm ms | AdamW foreach+norm ms "
        "| speedup vs fused | speedup vs foreach |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['params'] / 1e6:.2f} | {r['tensors']} | {r['ours_update_ms']:.3f} "
            f"| {r['ours_norm_update_ms']:.3f} | {r['bytes_per_param']:.1f} | {r['ours_gbs']:.0f} "
            f"| {100 * r['ours_gbs'] / copy_gbs:.1f} | {r['adamw_fused_norm_step_ms']:.3f} "
            f"| {r['adamw_foreach_norm_step_ms']:.3f} "
            f"| {r['adamw_fused_norm_step_ms'] / r['ours_norm_update_ms']:.2f}x "
            f"| {r['adamw_foreach_norm_step_ms'] / r['ours_norm_update_ms']:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 16, 64, 256, 512],
                        help="active-set sizes in millions of parameters")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16",
                        help="weight and gradient dtype (masters and moments are fp32)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--backend", choices=["triton", "torch"], default="triton",
                        help="our implementation: the Triton kernels or the PyTorch twin")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--copy-mib", type=int, default=1024,
                        help="size of the tensor copied to measure bandwidth")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_fused_step: no CUDA GPU available; nothing measured "
              "(use --device cpu --backend torch for a smoke run).")
        return 0
    from misa_kernels.ops.backend import resolve_backend

    ops = resolve_backend(args.backend, torch.device(args.device))
    env = environment(args)
    device = torch.device(args.device)
    copy_gbs = copy_bandwidth_gbs(device, args.copy_mib << 20, args.warmup, args.repeats)
    rows = [bench_size(m, args, ops) for m in args.sizes]
    print(markdown(env, copy_gbs, rows))
    if args.json:
        args.json.write_text(json.dumps({**env, "copy_gbs": copy_gbs, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
