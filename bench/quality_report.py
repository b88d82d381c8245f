"""The quality benchmark's tables and plots, for one run or merged from several.

A long benchmark is run in pieces (``python -m bench.quality --methods ... --out ...``, one
folder each); ``python -m bench.quality_report`` merges their ``quality.json`` files into
one table per task, best first, with each method's learning-rate grid united over the
pieces, the ablations beside the misa-3% row they change, the loss curves and MISA's
sampling heatmap:

    python -m bench.quality_report bench/measured/quality_cpu_*.json bench/measured/round*.json \\
        --out bench/measured/quality_cpu_merged

Pieces merge only when they trained alike (steps, batch, sequence length, seeds, T, peer
settings, ...); a difference is an error naming the setting and both files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from .common import read_json, write_json
from .plots import matplotlib_available, plot_curves, plot_sampling_heatmap

# What may differ between merged pieces: what each piece chose to run, not how it trained.
PER_PIECE_SETTINGS = ("tasks", "methods", "lrs", "ablations", "ablation_lr")


# ---------------------------------------------------------------------------- one run
def _line(row: dict) -> str:
    if row.get("status") != "ok":
        return f"| {row['method']} | - | - | {row.get('status', '-')} | - | - |"
    return (f"| {row['method']} | {row['best_lr']:g} | {row['val_loss_before']:.3f} | {_mean_sd(row)} | "
            f"{row['state_bytes'] / 2**20:.1f} | {row['ms_per_step'] / 1000:.2f} |")


def _mean_sd(row: dict) -> str:
    spread = f" ± {row['std']:.3f}" if row["std"] is not None else ""
    return f"{row['mean']:.3f}{spread} (n={len(row['losses'])})"


def _header(settings: dict) -> str:
    s = settings
    return (f"SmolLM2-135M, {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens, {s['seeds']} seed(s), "
            f"{s['device']} {s['dtype']}")


def format_tables(results: dict[str, Any]) -> str:
    """Markdown: per task, one row per method (and ablation)."""
    lines = [_header(results["settings"])]
    for task, block in results["tasks"].items():
        lines += ["", f"#### {task} ({block['corpus']})", "",
                  "| method | best lr | val loss before | val loss after, mean ± sd | optimizer state MiB | s/step |",
                  "|---|---|---|---|---|---|"]
        lines += [_line(row) for row in block["rows"] + block["ablations"]]
    return "\n".join(lines)


def write_outputs(results: dict[str, Any], out: Path, plots: bool = True,
                  tables: Callable[[dict[str, Any]], str] = format_tables) -> list[Path]:
    """``quality.json``, ``quality.md`` (``tables(results)``) and, with ``plots``, per task
    the best-lr loss curves and misa-3%'s sampling heatmap as PNG."""
    paths = [write_json(out / "quality.json", results)]
    (out / "quality.md").write_text(tables(results) + "\n")
    paths.append(out / "quality.md")
    if plots and matplotlib_available():
        paths += _plots(results, out)
    return [p for p in paths if p is not None]


def _plots(results: dict[str, Any], out: Path) -> list[Optional[Path]]:
    paths = []
    for task, block in results["tasks"].items():
        rows = [r for r in block["rows"] if r.get("status") == "ok"]
        paths.append(plot_curves(rows, out / f"curves_{task}.png", f"SmolLM2-135M on {block['corpus']}"))
        misa = next((r for r in rows if r["method"] == "misa-3%" and r.get("sample_counts")), None)
        if misa:
            paths.append(plot_sampling_heatmap(misa["sample_counts"], out / f"heatmap_{task}.png",
                                               f"MISA delta=3% sampling ({task})"))
    return paths


# ---------------------------------------------------------------------------- merging
def merge_results(pieces: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One results dict from ``{source name: quality.json contents}``.

    Per task and method: the learning-rate sweeps (seed-0 losses) are united, and the row
    kept is the piece's whose best rate is best over the union (its seeds ran at that
    rate). Ablations are kept per label, the last piece's winning. Every row records its
    ``source``.
    """
    if not pieces:
        raise ValueError("merge_results: no results to merge")
    settings = _common_settings(pieces)
    tasks: dict[str, dict[str, Any]] = {}
    for source, results in pieces.items():
        for task, block in results["tasks"].items():
            merged = tasks.setdefault(task, dict(corpus=block["corpus"], rows={}, ablations={}))
            for row in block["rows"]:
                merged["rows"][row["method"]] = _merge_row(merged["rows"].get(row["method"]), dict(row, source=source))
            for row in block["ablations"]:
                merged["ablations"][row["method"]] = dict(row, source=source)
    for block in tasks.values():
        block["rows"] = sorted(block["rows"].values(), key=_rank)
        block["ablations"] = sorted(block["ablations"].values(), key=_rank)
    return dict(settings=settings, sources=list(pieces), tasks=tasks)


def _common_settings(pieces: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (first, results), *rest = pieces.items()
    reference = _training_settings(results["settings"])
    for source, other in rest:
        theirs = _training_settings(other["settings"])
        for key in sorted(reference.keys() | theirs.keys()):
            if reference.get(key) != theirs.get(key):
                raise ValueError(f"cannot merge {source} with {first}: setting {key!r} is {theirs.get(key)!r} "
                                 f"there and {reference.get(key)!r} here")
    return reference


def _training_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in PER_PIECE_SETTINGS}


def _merge_row(kept: Optional[dict], new: dict) -> dict:
    if new.get("status") != "ok":
        return kept or new
    if kept is None or kept.get("status") != "ok":
        return new
    sweep = {point["lr"]: point["final_val_loss"] for point in kept["sweep"] + new["sweep"]}
    winner = min((kept, new), key=_seed0_loss)
    return dict(winner, sweep=[dict(lr=lr, final_val_loss=loss) for lr, loss in sorted(sweep.items())])


def _seed0_loss(row: dict) -> float:
    return next(p["final_val_loss"] for p in row["sweep"] if p["lr"] == row["best_lr"])


def _rank(row: dict) -> tuple[bool, float]:
    ok = row.get("status") == "ok" and row.get("mean") is not None
    return (not ok, row["mean"] if ok else 0.0)


def format_merged(merged: dict[str, Any]) -> str:
    """Markdown: per task, the methods best first (with their lr grids), then the
    ablations with their difference to the misa-3% row at the same learning rate."""
    lines = [_header(merged["settings"]) + "; merged from " + ", ".join(merged["sources"])]
    for task, block in merged["tasks"].items():
        lines += ["", f"#### {task} ({block['corpus']}): methods, best first", "",
                  "| method | lr grid (seed 0 final loss) | best lr | val loss before | val loss after, mean ± sd "
                  "| optimizer state MiB | source |", "|---|---|---|---|---|---|---|"]
        lines += [_merged_line(row) for row in block["rows"]]
        if block["ablations"]:
            lines += _ablation_lines(block)
    return "\n".join(lines)


def _merged_line(row: dict) -> str:
    if row.get("status") != "ok":
        return f"| {row['method']} | - | - | - | {row.get('status', '-')} | - | {row['source']} |"
    grid = ", ".join(f"{p['lr']:g}: {_loss(p['final_val_loss'])}" for p in row["sweep"])
    return (f"| {row['method']} | {grid} | {row['best_lr']:g} | {row['val_loss_before']:.3f} | {_mean_sd(row)} | "
            f"{row['state_bytes'] / 2**20:.1f} | {row['source']} |")


def _loss(value: Optional[float]) -> str:
    return "diverged" if value is None else f"{value:.3f}"


def _ablation_lines(block: dict) -> list[str]:
    default = next((r for r in block["rows"] if r["method"] == "misa-3%" and r.get("status") == "ok"), None)
    lines = ["", "| ablation of misa-3% | lr | val loss after, mean ± sd | vs misa-3% at its best lr | source |",
             "|---|---|---|---|---|"]
    for row in block["ablations"]:
        same_lr = default is not None and row["best_lr"] == default["best_lr"]
        diff = f"{row['mean'] - default['mean']:+.3f}" if same_lr else "- (other lr)"
        lines.append(f"| {row['method'].removeprefix('misa-3% ')} | {row['best_lr']:g} | {_mean_sd(row)} | {diff} | "
                     f"{row['source']} |")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, metavar="quality.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for quality.md/json and the PNGs")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    pieces = {}
    names = [path.name for path in args.files]
    for path in args.files:
        results = read_json(path)
        if "tasks" not in results or "settings" not in results:
            parser.error(f"{path} is not a bench.quality result (no 'tasks'/'settings')")
        pieces[path.name if names.count(path.name) == 1 else str(path)] = results
    try:
        merged = merge_results(pieces)
    except ValueError as err:
        parser.error(str(err))
    print(format_merged(merged))
    for path in write_outputs(merged, args.out, plots=not args.no_plots, tables=format_merged):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
