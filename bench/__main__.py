"""``python -m bench``: MISA against full AdamW, BAdam, LoRA and GaLore.

Run from the repository root::

    python -m bench --quick                  # CPU, a few minutes: tiny models
    python -m bench                          # full mode: the GPU when there is one (>= 1B model, bf16)
    python -m bench --quick --sections latency,finetune --no-plots
    python -m bench --quick --results-md     # also put the tables into bench/RESULTS.md

Prints Markdown tables; writes ``<out>/*.json`` and ``<out>/report.md`` (default
``bench/results/``) and PNG plots under ``<out>/plots/``. Peers come from the ``bench``
extra (``pip install -e .[bench]``); a missing one gets a "not installed" row.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Optional

from .common import RESULTS_DIR, BenchSettings, resolve_settings, write_json
from .convergence import finetune_rows, pretrain_base, pretrain_rows
from .env import environment
from .latency import latency_rows
from .plots import matplotlib_available, plot_curves, plot_memory_vs_seq, plot_sampling_heatmap
from .report import full_report, update_results_md

SECTIONS = ("latency", "memory", "pretrain", "finetune")
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models on the CPU, a few minutes")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU with --quick, else CUDA when available")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for JSON, report.md and plots/")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--results-md", nargs="?", const=RESULTS_MD, type=Path, metavar="PATH",
                        help="replace this run's section of RESULTS.md (default bench/RESULTS.md)")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    return args


def run_memory_vs_seq(s: BenchSettings, notes: list[str]) -> list[dict[str, Any]]:
    """Fig. 2 data from ``bench.bench_memory`` when that module is there; else a note."""
    try:
        from bench.bench_memory import measure_memory
    except ImportError as err:
        notes.append(f"memory vs sequence length skipped: bench.bench_memory is not available ({err})")
        return []
    try:
        return measure_memory(list(s.memory_seq_lens), quick=s.preset == "quick")
    except Exception as err:  # a failing section must not lose the others
        notes.append(f"memory vs sequence length failed: {type(err).__name__}: {err}")
        return []


def misa_sample_counts(rows: list[dict[str, Any]]) -> Optional[dict[str, int]]:
    """Sampling counts of the best run of plain MISA (strategy "misa", default momentum step)."""
    for row in rows:
        options = row.get("options", {})
        plain = options.get("strategy", "misa") == "misa" and options.get("momentum_step") is None
        if row.get("kind") == "misa" and row.get("status") == "ok" and plain:
            return row["details"].get("sample_counts")
    return None


def make_plots(results: dict[str, Any], folder: Path, notes: list[str]) -> dict[str, str]:
    """Every plot whose data is in ``results``; name -> path of the PNG."""
    if not matplotlib_available():
        notes.append("plots skipped: matplotlib is not installed (pip install -e .[bench])")
        return {}
    if not results.get("memory_vs_seq"):
        notes.append("memory vs sequence length plot skipped: no data")
    jobs = {
        "finetune_loss": lambda: plot_curves(results.get("finetune", []), folder / "finetune_loss.png", "fine-tuning"),
        "pretrain_loss": lambda: plot_curves(results.get("pretrain", []), folder / "pretrain_loss.png", "pre-training"),
        "memory_vs_seq": lambda: plot_memory_vs_seq(results.get("memory_vs_seq", []), folder / "memory_vs_seq.png"),
    }
    for section in ("finetune", "pretrain"):
        counts = misa_sample_counts(results.get(section, []))
        if counts:
            path = folder / f"misa_sampling_{section}.png"
            jobs[f"misa_sampling_{section}"] = lambda c=counts, p=path, t=section: plot_sampling_heatmap(
                c, p, f"MISA module sampling ({t})")
    written = {name: job() for name, job in jobs.items()}
    return {name: str(path) for name, path in written.items() if path is not None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested section; the results as one JSON-ready dict (also written to ``args.out``)."""
    start = time.perf_counter()
    s = resolve_settings(args.quick, args.device, progress=not args.no_progress)
    sections = args.sections.split(",")
    notes: list[str] = []
    results: dict[str, Any] = dict(environment=environment(s.device), settings=s.as_dict(), notes=notes)
    if "latency" in sections:
        results["latency"] = latency_rows(s.latency, s.device, s.progress)
    if "memory" in sections:
        results["memory_vs_seq"] = run_memory_vs_seq(s, notes)
    base = None
    if "pretrain" in sections:
        results["pretrain"], base = pretrain_rows(s.convergence, s.device, s.progress)
    if "finetune" in sections:
        if base is None:
            base = pretrain_base(s.convergence, s.device, s.progress)
        results["finetune"] = finetune_rows(base, s.convergence, s.device, s.progress)
    if not args.no_plots:
        results["plots"] = make_plots(results, args.out / "plots", notes)
    results["wall_seconds"] = time.perf_counter() - start
    return results


def write_outputs(results: dict[str, Any], out: Path) -> list[Path]:
    """One JSON file per section (each with environment and settings), all.json and report.md."""
    header = {key: results[key] for key in ("environment", "settings")}
    paths = [write_json(out / f"{key}.json", dict(header, rows=results[key]))
             for key in ("latency", "memory_vs_seq", "pretrain", "finetune") if key in results]
    paths.append(write_json(out / "all.json", results))
    report = out / "report.md"
    report.write_text(full_report(results) + "\n")
    return paths + [report]


def results_md_key(results: dict[str, Any]) -> str:
    """The RESULTS.md section of this run: ``cpu-quick``, ``cpu-full`` or ``cuda-full``."""
    settings = results["settings"]
    return f"{settings['device']}-{'quick' if settings['preset'] == 'quick' else 'full'}"


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    results = run(args)
    print("\n" + full_report(results) + "\n")
    for path in write_outputs(results, args.out):
        print(f"wrote {path}")
    for name, path in results.get("plots", {}).items():
        print(f"plot {name}: {path}")
    if args.results_md is not None:
        key = results_md_key(results)
        if update_results_md(args.results_md, key, full_report(results)):
            print(f"updated section {key!r} of {args.results_md}")
        else:
            print(f"{args.results_md} has no markers for section {key!r}; left unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
