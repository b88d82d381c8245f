"""The output of ``bench_fused_step.py``: the run's environment, its Markdown tables (full step,
then update alone) and the rows whose rate exceeds the copy bandwidth (a broken flush or byte
count)."""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import torch


def environment(args: argparse.Namespace) -> dict:
    """Device, torch and triton versions, commit, weight dtype and backend of this run."""
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


def _speedup(theirs: float, ours: float) -> str:
    return f"{theirs / ours:.2f}x" if ours > 0 else "n/a"


def markdown(env: dict, copy_gbs: float, rows: list[dict]) -> str:
    """The run's header line and notes, then the full-step table and the update-alone table."""
    flush_mib = env.get("flush_bytes", 0) / 2**20
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}; weights {env['dtype']} (+fp32 master, m, v); "
        f"backend {env['backend']}; step {env.get('step', 'int')}; copy bandwidth {copy_gbs:.0f} GB/s",
        "",
        f"GPU ms: median of {env.get('repeats', '?')} calls after {env.get('warmup', '?')} warm-ups, "
        f"device timers around the call only, L2 flushed before each ({flush_mib:.0f} MiB written, "
        f"{flush_mib:.0f} MiB read; L2 {env.get('l2_cache_bytes', 0) / 2**20:.0f} MiB). host ms / cpu ms: "
        "perf_counter / process_time around the launch calls, no synchronisation inside. "
        "B/param: each side's own bytes per element; AdamW gets ready fp32 gradients (their cast "
        "is neither timed nor counted). foreach GB/s uses the fused count (effective rate).",
        "",
        "Full step (ours: norms + update; AdamW: norm pass + step + copy to bf16):",
        "",
        "| family | set | tensors | params (M) | ours ms | host ms | cpu ms | B/param | GB/s | % copy "
        "| fused ms | host ms | B/param | GB/s | % copy | foreach ms | host ms | GB/s "
        "| speedup vs fused | speedup vs foreach |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, f, e = "ours_norm_update", "adamw_fused_norm_step", "adamw_foreach_norm_step"
        lines.append(
            f"| {r.get('family', 'llama')} | {r.get('label', '')} | {r['tensors']} | {r['params'] / 1e6:.2f} "
            f"{_timing_cells(r, o, f, e)}"
            f"| {_speedup(r[f + '_ms'], r[o + '_ms'])} | {_speedup(r[e + '_ms'], r[o + '_ms'])} |")
    lines += [
        "",
        "Update alone (ours: adam_update_; AdamW: step() on the fp32 masters):",
        "",
        "| family | set | tensors | ours ms | host ms | cpu ms | B/param | GB/s | % copy "
        "| fused ms | host ms | B/param | GB/s | % copy | foreach ms | host ms | GB/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o, f, e = "ours_update", "adamw_fused_step", "adamw_foreach_step"
        lines.append(f"| {r.get('family', 'llama')} | {r.get('label', '')} | {r['tensors']} "
                     f"{_timing_cells(r, o, f, e)}|")
    return "\n".join(lines)


def _timing_cells(r: dict, ours: str, fused: str, foreach: str) -> str:
    """The cells both tables share: ours, AdamW fused and foreach, each by its row-key prefix."""
    return (f"| {r[ours + '_ms']:.3f} | {r[ours + '_host_ms']:.3f} | {r[ours + '_cpu_ms']:.3f} "
            f"| {r[ours + '_bytes_per_param']:.1f} | {r[ours + '_gbs']:.1f} | {r[ours + '_pct_copy']:.1f} "
            f"| {r[fused + '_ms']:.3f} | {r[fused + '_host_ms']:.3f} | {r[fused + '_bytes_per_param']:.1f} "
            f"| {r[fused + '_gbs']:.1f} | {r[fused + '_pct_copy']:.1f} "
            f"| {r[foreach + '_ms']:.3f} | {r[foreach + '_host_ms']:.3f} | {r[foreach + '_gbs']:.1f} ")


def over_copy_bandwidth(rows: list[dict]) -> list[str]:
    """Rows whose rate exceeds the copy bandwidth: the flush or the byte count is wrong."""
    return [f"{r.get('family', 'llama')} {r.get('label', '')}: {key[:-len('_pct_copy')]} at {r[key]:.1f}% "
            "of the copy bandwidth" for r in rows for key in r if key.endswith("_pct_copy") and r[key] > 100]
