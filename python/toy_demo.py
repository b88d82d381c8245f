#!/usr/bin/env python
"""Fine-tune a small LLaMA-style model with MISA and with full AdamW, and compare them.

1. Build a byte-level LLaMA-style model from a config (nothing is downloaded).
2. Pre-train it briefly with dense AdamW on the Python language reference
   (``misa_kernels.data`` corpus ``"python-reference"``): the base model.
3. Fine-tune two copies of the base on the standard library's docstrings
   (``"python-docstrings"``) with ``misa_kernels.MISA`` and with full ``torch.optim.AdamW``,
   same steps, same batches.
4. Print validation loss before/after, median time per step, optimizer memory and the
   parameters trained per step.

The demo's ``--toy`` fallback (no model wheel needed); run from the repository root::

    python python/finetune_demo.py --toy        # CPU: a few minutes; GPU (bf16) when present
    python python/toy_demo.py --quick           # seconds
    python python/toy_demo.py --json out.json

Tests import :func:`run_demo` from this file (see ``tests/test_demo.py``).

On CUDA the model is bf16: MISA keeps fp32 master weights and moments for its active
modules only, while ``torch.optim.AdamW`` updates the bf16 weights in place with bf16
moments (no master copy) - that is what plain AdamW on a bf16 model holds.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import example_utils  # noqa: E402,F401  (puts the repository on sys.path: misa_kernels, bench)

import misa_kernels as mk  # noqa: E402
from bench.common import batch_stream, corpus_rows, evaluate, lm_loss, nbytes, resolve_device, synchronize  # noqa: E402
from bench.convergence import eval_steps, warmup_cosine  # noqa: E402
from misa_kernels.data import VOCAB_SIZE  # noqa: E402

PRETRAIN_CORPUS = "python-reference"
FINETUNE_CORPUS = "python-docstrings"
METHODS = ("misa", "adamw")
RESULT_KEYS = ("settings", "model_params", "pretrain", "methods", "misa_top_modules", "wall_seconds")
METHOD_KEYS = (
    "lr", "val_loss_before", "val_loss_after", "val_curve", "ms_per_step", "optimizer_memory_bytes",
    "memory", "trained_params_per_step", "seconds",
)


@dataclass(frozen=True)
class Settings:
    """Every knob of one demo run, resolved from the command line and a device preset."""

    device: str
    dtype: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    seq_len: int
    batch_size: int
    pretrain_steps: int
    pretrain_lr: float
    steps: int
    lr: float
    adamw_lr: float
    delta: float
    inner_steps: int
    eval_rows: int
    eval_points: int
    seed: int
    progress: bool = True


# The learning rates come from a short sweep (same grid for both methods) on the CPU preset:
# block-coordinate MISA likes a few times the lr of full fine-tuning.
PRESETS: dict[str, Settings] = {
    "cpu": Settings(
        device="cpu", dtype="float32", hidden=128, layers=4, heads=4, kv_heads=2, intermediate=344,
        seq_len=128, batch_size=16, pretrain_steps=800, pretrain_lr=3e-3, steps=400, lr=1e-3,
        adamw_lr=3e-4, delta=0.1, inner_steps=25, eval_rows=128, eval_points=4, seed=0,
    ),
    "cuda": Settings(
        device="cuda", dtype="bfloat16", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1376,
        seq_len=256, batch_size=32, pretrain_steps=600, pretrain_lr=1e-3, steps=400, lr=1e-3,
        adamw_lr=3e-4, delta=0.1, inner_steps=50, eval_rows=256, eval_points=4, seed=0,
    ),
    "quick": Settings(
        device="cpu", dtype="float32", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=172,
        seq_len=64, batch_size=8, pretrain_steps=300, pretrain_lr=3e-3, steps=100, lr=1e-3,
        adamw_lr=1e-3, delta=0.1, inner_steps=10, eval_rows=32, eval_points=2, seed=0,
    ),
}


# ---------------------------------------------------------------------------- settings
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line; options left out take the device preset's value."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per method")
    parser.add_argument("--pretrain-steps", type=int, help="dense AdamW steps that make the base model")
    parser.add_argument("--seed", type=int, help="model init, batch order and MISA sampling")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--delta", type=float, help="MISA budget: active params / model params")
    parser.add_argument("--inner-steps", type=int, help="MISA: Adam steps per active set")
    parser.add_argument("--lr", type=float, help="MISA learning rate")
    parser.add_argument("--adamw-lr", type=float, help="full AdamW fine-tuning learning rate")
    parser.add_argument("--quick", action="store_true", help="tiny model and few steps (seconds)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    """The preset for the device (or ``--quick``), overridden by the options given."""
    device = resolve_device(getattr(args, "device", "auto"))
    preset = replace(PRESETS["quick" if getattr(args, "quick", False) else device], device=device)
    overrides = {
        field: value
        for field, option in (
            ("steps", "steps"), ("pretrain_steps", "pretrain_steps"), ("seed", "seed"),
            ("batch_size", "batch_size"), ("seq_len", "seq_len"), ("delta", "delta"),
            ("inner_steps", "inner_steps"), ("lr", "lr"), ("adamw_lr", "adamw_lr"),
        )
        if (value := getattr(args, option, None)) is not None
    }
    overrides["progress"] = not getattr(args, "no_progress", False)
    return replace(preset, **overrides)


# ---------------------------------------------------------------------------- model and data
def build_model(s: Settings) -> LlamaForCausalLM:
    """A fresh byte-level LLaMA-style model (seeded) on the run's device and dtype."""
    torch.manual_seed(s.seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.seq_len, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(device=s.device, dtype=getattr(torch, s.dtype))


# ---------------------------------------------------------------------------- pre-training
def pretrain(model: nn.Module, s: Settings) -> dict[str, Any]:
    """Dense AdamW on the pre-training corpus; returns its val loss before and after."""
    train, val = corpus_rows(PRETRAIN_CORPUS, s.seq_len, s.eval_rows)
    before = evaluate(model, val, s.batch_size, s.device)
    opt = torch.optim.AdamW(model.parameters(), lr=s.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(s.pretrain_steps))
    stream = batch_stream(train, s.batch_size, s.device, seed=s.seed)
    start = time.perf_counter()
    for _ in tqdm(range(s.pretrain_steps), desc=f"pre-train ({PRETRAIN_CORPUS})", disable=not s.progress):
        lm_loss(model, next(stream)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    synchronize(s.device)
    seconds = time.perf_counter() - start
    return dict(corpus=PRETRAIN_CORPUS, steps=s.pretrain_steps, lr=s.pretrain_lr,
                val_loss_before=before, val_loss_after=evaluate(model, val, s.batch_size, s.device), seconds=seconds)


# ---------------------------------------------------------------------------- fine-tuning
def make_optimizer(method: str, model: nn.Module, s: Settings) -> torch.optim.Optimizer:
    """MISA (fine-tune mode: embeddings, lm_head and norms frozen) or full AdamW."""
    if method == "misa":
        return mk.MISA(model, lr=s.lr, delta=s.delta, inner_steps=s.inner_steps, seed=s.seed)
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=s.adamw_lr, weight_decay=0.0)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def optimizer_memory(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, int]:
    """Bytes of master weights, Adam moments and gradients, read right after ``step()``."""
    if isinstance(opt, mk.MISA):
        report = opt.memory_report()  # fine-tuning: no dense_* parameters
        memory = {key: report[key] for key in ("master_weights", "moments", "gradients")}
    else:
        moments = sum(nbytes(st.get(k)) for st in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
        grads = sum(nbytes(p.grad) for p in model.parameters())
        # torch AdamW updates the weights in place: it keeps no master copy.
        memory = dict(master_weights=0, moments=moments, gradients=grads)
    memory["total"] = sum(memory.values())
    return memory


def trained_params(model: nn.Module) -> int:
    """Parameters that received a gradient in this step (frozen ones get none)."""
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


def finetune(base: nn.Module, method: str, data: tuple[Tensor, Tensor], s: Settings) -> tuple[dict, nn.Module, Any]:
    """Fine-tune a copy of ``base`` with ``method``; returns its metrics, model and optimizer."""
    train, val = data
    model = copy.deepcopy(base)
    opt = make_optimizer(method, model, s)
    # Same seed for both methods: both see exactly the same batches in the same order.
    stream = batch_stream(train, s.batch_size, s.device, seed=s.seed + 1)
    before = evaluate(model, val, s.batch_size, s.device)
    curve, times, trained, memory = [[0, before]], [], 0, {"total": -1}
    checkpoints = eval_steps(s.steps, s.eval_points)
    start = time.perf_counter()
    for step in tqdm(range(1, s.steps + 1), desc=f"fine-tune {method:5s} ({FINETUNE_CORPUS})", disable=not s.progress):
        ids = next(stream)
        synchronize(s.device)
        tick = time.perf_counter()
        lm_loss(model, ids).backward()
        opt.step()
        synchronize(s.device)
        times.append(time.perf_counter() - tick)
        trained = max(trained, trained_params(model))
        # MISA's peak: a switch step frees the states, so keep the largest reading.
        memory = max(memory, optimizer_memory(opt, model), key=lambda m: m["total"])
        opt.zero_grad(set_to_none=True)
        if step in checkpoints:
            curve.append([step, evaluate(model, val, s.batch_size, s.device)])
    metrics = dict(
        lr=s.lr if method == "misa" else s.adamw_lr, val_loss_before=before, val_loss_after=curve[-1][1],
        val_curve=curve, ms_per_step=1000 * statistics.median(times), optimizer_memory_bytes=memory["total"],
        memory=memory, trained_params_per_step=trained, seconds=time.perf_counter() - start,
    )
    return metrics, model, opt


# ---------------------------------------------------------------------------- the demo
def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Pre-train a base model, fine-tune it with MISA and with AdamW; the results as a dict.

    Keys: ``settings`` (every knob used), ``model_params``, ``pretrain`` (corpus, steps, lr,
    val_loss_before/after, seconds), ``methods`` (``"misa"`` and ``"adamw"``, each with the
    keys of :data:`METHOD_KEYS`), ``misa_top_modules`` (``[name, times sampled]``, most
    first) and ``wall_seconds``.
    """
    start = time.perf_counter()
    s = resolve_settings(args)
    torch.manual_seed(s.seed)
    base = build_model(s)
    pretrain_metrics = pretrain(base, s)
    data = corpus_rows(FINETUNE_CORPUS, s.seq_len, s.eval_rows)
    methods, misa_opt = {}, None
    for method in METHODS:
        methods[method], _, opt = finetune(base, method, data, s)
        if method == "misa":
            misa_opt = opt
    counts = sorted(misa_opt.sample_counts.items(), key=lambda item: (-item[1], item[0]))
    return dict(
        settings=asdict(s), model_params=sum(p.numel() for p in base.parameters()),
        pretrain=pretrain_metrics, methods=methods, misa_top_modules=[list(c) for c in counts[:8]],
        wall_seconds=time.perf_counter() - start,
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_report(results: dict[str, Any]) -> str:
    """The results as a Markdown table plus a few lines of context."""
    s, n = results["settings"], results["model_params"]
    pre = results["pretrain"]
    lines = [
        f"model: LLaMA-style, {s['layers']} layers, hidden {s['hidden']}, {n:,} params, {s['dtype']} on {s['device']}",
        f"pre-train ({pre['corpus']}, {pre['steps']} steps): val loss {pre['val_loss_before']:.3f} -> "
        f"{pre['val_loss_after']:.3f}",
        f"fine-tune ({FINETUNE_CORPUS}, {s['steps']} steps, batch {s['batch_size']} x {s['seq_len']} bytes), "
        f"MISA delta={s['delta']}, inner_steps={s['inner_steps']}",
        "",
        "| method | lr | val loss before | val loss after | ms/step (median) | optimizer memory | params trained/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, m in results["methods"].items():
        lines.append(
            f"| {method} | {m['lr']:g} | {m['val_loss_before']:.3f} | {m['val_loss_after']:.3f} | "
            f"{m['ms_per_step']:.1f} | {_mib(m['optimizer_memory_bytes'])} | "
            f"{m['trained_params_per_step']:,} ({m['trained_params_per_step'] / n:.1%}) |"
        )
    lines += ["", "val loss during fine-tuning (step: loss):"]
    for method, m in results["methods"].items():
        lines.append(f"  {method:5s} " + "  ".join(f"{step}: {loss:.3f}" for step, loss in m["val_curve"]))
    top = ", ".join(f"{name} x{count}" for name, count in results["misa_top_modules"])
    lines += ["", f"MISA's most-sampled modules: {top}", f"wall time: {results['wall_seconds']:.1f} s"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    results = run_demo(args)
    print("\n" + format_report(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
