"""Markdown tables of the benchmark results, and the ``bench/RESULTS.md`` updater."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Optional

REFERENCE = "adamw"  # ratios are to full AdamW


def mib(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


def ratio(value: Optional[float], reference: Optional[float]) -> str:
    if value is None or not reference:
        return ""
    return f" ({value / reference:.2f}x)"


def _reference(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    return next((r for r in rows if r.get("kind") == REFERENCE and r.get("status") == "ok"), None)


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(cells) + " |" for cells in lines]


def _empty_row(row: dict[str, Any], width: int) -> list[str]:
    return [row["method"], row["status"]] + [""] * (width - 2)


def environment_lines(env: dict[str, Any], settings: dict[str, Any], wall_seconds: Optional[float]) -> list[str]:
    """Device, versions, commit, date and the run's wall time."""
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items())
    lines = [
        f"- device: {env['device']} ({env['device_name']})",
        f"- versions: python {env['python']}, {versions}",
        f"- commit: {env['commit']}, date: {env['date']}, preset: `{settings['preset']}`",
    ]
    if wall_seconds is not None:
        lines.append(f"- wall time of the whole run: {wall_seconds:.0f} s")
    return lines


def latency_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """Paper Table 8 style: forward / backward / optimizer / total ms, ratio to AdamW beside."""
    s = settings["latency"]
    shape = s["shape"]
    ref = _reference(rows) or {}
    params = next((r["model_params"] for r in rows if r.get("model_params")), None)
    lines = [
        f"Step latency, median of {s['repeats']} steps after {s['warmup']} warm-up steps; model: LLaMA-style, "
        f"{shape['layers']} layers, hidden {shape['hidden']}, {'?' if params is None else f'{params:,}'} params, "
        f"{s['dtype']}; batch {s['batch_size']} x {s['seq_len']} tokens. MISA and BAdam switch their active set "
        f"every {s['inner_steps']} steps (MISA without its start-up sweep). In brackets: ratio to full AdamW.",
        "",
    ]
    body = []
    for row in rows:
        if row["status"] != "ok":
            body.append(_empty_row(row, 7))
            continue
        keys = ("forward_ms", "backward_ms", "optimizer_ms", "total_ms")
        cells = [f"{row[k]:.1f}{ratio(row[k], ref.get(k))}" for k in keys]
        body.append([row["method"], "ok", *cells, f"{row['total_mean_ms']:.1f}"])
    header = ["method", "status", "forward ms", "backward ms", "optimizer ms", "total ms", "mean total ms"]
    return lines + _table(header, body)


def memory_table(rows: list[dict[str, Any]]) -> list[str]:
    """Master weights + optimizer state + gradients per method (and GPU peak)."""
    ref = _reference(rows) or {}
    ref_total = ref.get("memory", {}).get("total")
    lines = ["Training memory beyond the weights (largest step): fp32 master copies, optimizer state "
             "(moments, projections, scores) and gradients; peak = allocated memory on CUDA.", ""]
    body = []
    for row in rows:
        if row["status"] != "ok":
            body.append(_empty_row(row, 8))
            continue
        m = row["memory"]
        share = row["trained_params"] / row["model_params"]
        body.append([row["method"], "ok", mib(m["master_weights"]), mib(m["optimizer_state"]), mib(m["gradients"]),
                     mib(m["total"]) + ratio(m["total"], ref_total), mib(row.get("peak_bytes")),
                     f"{row['trained_params']:,} ({share:.1%})"])
    header = ["method", "status", "master weights", "optimizer state", "gradients", "total", "peak",
              "params with grad"]
    return lines + _table(header, body)


def _loss(value: Optional[float]) -> str:
    return "diverged" if value is None else f"{value:.3f}"


def _sweep_cell(row: dict[str, Any]) -> str:
    return ", ".join(f"{run['lr']:g}: {_loss(run['final_val_loss'])}" for run in row["runs"])


def pretrain_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """Paper Table 6 in miniature: validation loss and perplexity after pre-training."""
    c = settings["convergence"]
    lines = [f"Pre-training from scratch on `{rows[0]['corpus'] if rows else ''}`, {c['pretrain_steps']} steps, "
             f"batch {c['batch_size']} x {c['seq_len']} bytes, warm-up + cosine; best of each LR sweep.", ""]
    body = []
    for row in rows:
        if row["status"] != "ok":
            body.append(_empty_row(row, 7))
            continue
        loss = row["val_loss_after"]
        body.append([row["method"], "ok", f"{row['best_lr']:g}", f"{loss:.3f}", f"{math.exp(loss):.2f}",
                     f"{row['ms_per_step']:.1f}", _sweep_cell(row)])
    header = ["method", "status", "best lr", "val loss", "val perplexity", "ms/step", "sweep (lr: final val loss)"]
    return lines + _table(header, body)


def finetune_table(rows: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    """Fine-tuning: validation loss before/after at the best learning rate of each method."""
    c = settings["convergence"]
    lines = [f"Fine-tuning the pre-trained AdamW model on `{rows[0]['corpus'] if rows else ''}`, "
             f"{c['finetune_steps']} steps, batch {c['batch_size']} x {c['seq_len']} bytes, constant lr; "
             f"MISA inner_steps={c['inner_steps']}; best of each LR sweep.", ""]
    body = []
    for row in rows:
        if row["status"] != "ok":
            body.append(_empty_row(row, 7))
            continue
        body.append([row["method"], "ok", f"{row['best_lr']:g}", f"{row['val_loss_before']:.3f}",
                     f"{row['val_loss_after']:.3f}", f"{row['ms_per_step']:.1f}", _sweep_cell(row)])
    header = ["method", "status", "best lr", "val loss before", "val loss after", "ms/step",
              "sweep (lr: final val loss)"]
    return lines + _table(header, body)


def memory_seq_table(records: list[dict[str, Any]]) -> list[str]:
    """Memory vs sequence length (from ``bench.bench_memory``): total (and peak) per method."""
    seq_lens = sorted({r["seq_len"] for r in records})
    lines = ["Memory vs sequence length: `total_bytes` as `bench/bench_memory.py` counts it (see its "
             "docstring); peak allocated memory on CUDA in brackets.", ""]
    body = []
    for method in dict.fromkeys(r["method"] for r in records):
        cells = []
        for seq in seq_lens:
            r = next((x for x in records if x["method"] == method and x["seq_len"] == seq), None)
            cell = "" if r is None else mib(r.get("total_bytes"))
            if r is not None and r.get("peak_bytes") is not None:
                cell += f" ({mib(r['peak_bytes'])})"
            cells.append(cell)
        body.append([method, *cells])
    return lines + _table(["method", *(f"seq {s}" for s in seq_lens)], body)


def full_report(results: dict[str, Any]) -> str:
    """Every section present in ``results`` as one Markdown document body."""
    settings = results["settings"]
    out = environment_lines(results["environment"], settings, results.get("wall_seconds"))
    sections = [
        ("latency", "Step latency", lambda r: latency_table(r, settings)),
        ("latency", "Memory", memory_table),
        ("memory_vs_seq", "Memory vs sequence length", memory_seq_table),
        ("pretrain", "Pre-training", lambda r: pretrain_table(r, settings)),
        ("finetune", "Fine-tuning", lambda r: finetune_table(r, settings)),
    ]
    for key, title, render in sections:
        if results.get(key):
            out += ["", f"#### {title}", "", *render(results[key])]
    for note in results.get("notes", []):
        out += ["", f"Note: {note}"]
    return "\n".join(out)


# ---------------------------------------------------------------------------- RESULTS.md
def _markers(key: str) -> tuple[str, str]:
    return f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"


def update_results_md(path: Path, key: str, body: str) -> bool:
    """Replace the text between the ``key`` markers of ``path`` with ``body``.

    Returns False (and leaves the file alone) when the markers are missing."""
    start, end = _markers(key)
    text = path.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    path.write_text(pattern.sub(lambda _: f"{start}\n{body}\n{end}", text, count=1))
    return True
