"""PNG plots of the benchmark results, with matplotlib (an optional extra).

- :func:`plot_curves`: validation loss vs step and vs training wall time, one line per
  method (paper Fig. 3/4 style);
- :func:`plot_memory_vs_seq`: memory vs sequence length per method (Fig. 2 style);
- :func:`plot_sampling_heatmap`: how often MISA sampled each module, layer x module
  (Fig. 11 style).

matplotlib is imported inside the plotting functions, so the data helpers here work
without it; :func:`matplotlib_available` tells whether plots can be drawn.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any, Optional

_LAYER_MODULE = re.compile(r"\.(\d+)\.(?:.*\.)?([^.]+)$")


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sampling_matrix(sample_counts: dict[str, int]) -> tuple[list[int], list[str], list[list[int]]]:
    """``sample_counts`` (``model.layers.3.self_attn.q_proj -> n``) as a layer x module table.

    Returns the layer indices, the module short names (in first-seen order) and the
    counts, ``matrix[i][j]`` for layer ``layers[i]`` and module ``modules[j]``. Names
    without a layer index are skipped.
    """
    cells: dict[tuple[int, str], int] = {}
    modules: list[str] = []
    for name, count in sample_counts.items():
        match = _LAYER_MODULE.search(name)
        if match is None:
            continue
        layer, module = int(match.group(1)), match.group(2)
        if module not in modules:
            modules.append(module)
        cells[(layer, module)] = cells.get((layer, module), 0) + count
    layers = sorted({layer for layer, _ in cells})
    matrix = [[cells.get((layer, module), 0) for module in modules] for layer in layers]
    return layers, modules, matrix


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> Optional[Path]:
    """Best-LR validation curves of the rows, vs step and vs wall time, side by side."""
    curves = [(row["method"], row["best_lr"], row["curve"]) for row in rows if row.get("status") == "ok"]
    if not curves:
        return None
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, lr, curve in curves:
        points = [(s, t, v) for s, t, v in curve if v is not None]
        name = f"{label} (lr {lr:g})"
        by_step.plot([p[0] for p in points], [p[2] for p in points], marker=".", label=name)
        by_time.plot([p[1] for p in points], [p[2] for p in points], marker=".", label=name)
    by_step.set(xlabel="step", ylabel="validation loss", title=f"{title}: loss vs step")
    by_time.set(xlabel="training wall time (s)", ylabel="validation loss", title=f"{title}: loss vs time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=7)
    return _save(fig, plt, path)


def plot_memory_vs_seq(records: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Memory per method vs sequence length: peak bytes on GPU, else the counted total."""
    if not records:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    peak = all(r.get("peak_bytes") is not None for r in records)
    key = "peak_bytes" if peak else "total_bytes"
    for method in dict.fromkeys(r["method"] for r in records):
        points = sorted((r["seq_len"], r[key]) for r in records if r["method"] == method and r.get(key) is not None)
        ax.plot([p[0] for p in points], [p[1] / 2**20 for p in points], marker="o", label=method)
    seq_lens = sorted({r["seq_len"] for r in records})
    ax.set_xscale("log", base=2)
    ax.set_xticks(seq_lens, [str(s) for s in seq_lens])
    ax.set(xlabel="sequence length", ylabel=f"{'peak' if peak else 'counted'} memory (MiB)",
           title="memory vs sequence length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_sampling_heatmap(sample_counts: dict[str, int], path: Path, title: str) -> Optional[Path]:
    """Heatmap of MISA's sampling counts, layers down, modules across."""
    layers, modules, matrix = sampling_matrix(sample_counts)
    if not matrix:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(modules), 1.2 + 0.35 * len(layers)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set(xlabel="module", ylabel="layer", title=title)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white", fontsize=7)
    fig.colorbar(image, ax=ax, label="times sampled")
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
