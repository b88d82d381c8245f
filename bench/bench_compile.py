"""``python bench/bench_compile.py``: step time of ``torch.compile``d vs eager training, and
how many graphs the switches of MISA's active set cost.

Rows (MISA at delta=10%): MISA as users run it eagerly (autograd path, ``requires_grad``
toggled), the same model compiled (each switch fails Dynamo's guards), MISA
``compile_friendly=True`` eager and compiled (one graph), and full AdamW eager and compiled. Per row: median ms per step
after the warm-up steps (compile time excluded), seconds of the first steps (where the
compiling happens), unique graphs and recompilations (``torch._dynamo.utils.counters``),
and the ratio to the same optimizer's eager row.

    python bench/bench_compile.py --quick     # CPU, tiny model, a couple of minutes
    python bench/bench_compile.py             # the GPU when present (bf16), a larger model
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch._dynamo.utils import counters

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import misa_kernels as mk  # noqa: E402
from bench.common import ModelShape, build_model, resolve_device, synchronize, write_json  # noqa: E402
from bench.env import environment  # noqa: E402

ROWS = (("misa", False, {}), ("misa", True, {}), ("misa", False, dict(compile_friendly=True)),
        ("misa", True, dict(compile_friendly=True)), ("adamw", False, {}), ("adamw", True, {}))


@dataclass(frozen=True)
class CompileSettings:
    shape: ModelShape
    batch: int
    seq: int
    steps: int  # timed steps
    warmup: int  # untimed first steps (compiling)
    inner_steps: int  # MISA's T: a switch every T steps
    dtype: str
    backend: str


PRESETS = {
    "quick": CompileSettings(ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=344), batch=4,
                             seq=64, steps=20, warmup=10, inner_steps=2, dtype="float32", backend="inductor"),
    "cuda": CompileSettings(ModelShape(hidden=1024, layers=12, heads=16, kv_heads=4, intermediate=2816,
                                       vocab=32000), batch=8, seq=512, steps=50, warmup=20, inner_steps=5,
                            dtype="bfloat16", backend="inductor"),
}


def run_row(kind: str, compiled: bool, options: dict, s: CompileSettings, device: str) -> dict[str, Any]:
    """Train ``warmup + steps`` steps; times and Dynamo's counts for this row alone."""
    torch._dynamo.reset()
    counters.clear()
    model = build_model(s.shape, s.dtype, device)
    if kind == "misa":
        opt = mk.MISA(model, lr=1e-4, delta=0.1, inner_steps=s.inner_steps, **options)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda" or None)
    run = torch.compile(model, backend=s.backend) if compiled else model
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(s.warmup + s.steps):
        ids = torch.randint(0, s.shape.vocab, (s.batch, s.seq), generator=generator).to(device)
        synchronize(device)
        tick = time.perf_counter()
        run(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - tick)
    if kind == "misa":
        opt.detach()
    label = kind + (" compile_friendly" if options else "") + (" compiled" if compiled else " eager")
    return dict(row=label, kind=kind, compiled=compiled, options=options,
                ms_per_step=1000 * statistics.median(times[s.warmup:]), warmup_seconds=sum(times[:s.warmup]),
                unique_graphs=counters["stats"]["unique_graphs"], graph_breaks=sum(counters["graph_break"].values()))


def run_all(s: CompileSettings, device: str) -> list[dict[str, Any]]:
    rows = [run_row(kind, compiled, options, s, device) for kind, compiled, options in ROWS]
    eager = {(r["kind"], str(r["options"])): r["ms_per_step"] for r in rows if not r["compiled"]}
    for r in rows:
        r["vs_eager"] = r["ms_per_step"] / eager[(r["kind"], str(r["options"]))]
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| row | ms/step (median) | vs its eager row | first steps s | unique graphs | graph breaks |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['ms_per_step']:.1f} | {r['vs_eager']:.2f}x | {r['warmup_seconds']:.1f} | "
              f"{r['unique_graphs']} | {r['graph_breaks']} |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny model")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--backend", help="torch.compile backend (default: inductor)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "compile.json")
    args = parser.parse_args(argv)
    device = resolve_device("cpu" if args.quick and args.device == "auto" else args.device)
    s = PRESETS["quick" if args.quick or device == "cpu" else "cuda"]
    if args.backend:
        s = replace(s, backend=args.backend)
    rows = run_all(s, device)
    print(format_table(rows))
    write_json(args.out, dict(environment=environment(device), settings=asdict(s), rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
