"""Convergence: pre-training from scratch and fine-tuning, each method with an LR sweep.

- Pre-training (paper Table 6 in miniature): full AdamW, MISA (``mode="pretrain"``,
  delta=25%) and GaLore train the same seeded model from scratch on ``python-reference``
  with linear warm-up and cosine decay. The best AdamW model becomes the base model.
- Fine-tuning (paper Fig. 3/4 style): copies of the base model are fine-tuned on
  ``python-docstrings`` at a constant learning rate by full AdamW, MISA with each sampling
  strategy (misa, uniform, topk, bottomk), MISA with the proof's momentum step
  (``momentum_step="proof"``), BAdam, LoRA and GaLore. All runs see the same
  batches in the same order.

Gradients are clipped to norm ``max_grad_norm`` (1.0) before every step, as the Hugging
Face Trainer does by default. Every method runs once per learning rate of its grid; the run with the lowest final
validation loss is reported (a run whose loss is not finite is never picked). Validation
loss is measured ``eval_points`` times; the wall time beside it counts training only.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .common import (
    FINETUNE_CORPUS, PRETRAIN_CORPUS, ConvergenceSettings, batch_stream, build_model, corpus_rows, evaluate,
    finite_or_none, lm_loss, synchronize,
)
from .peers import MethodSpec, PeerUnavailable, make_method

STRATEGIES = ("misa", "uniform", "topk", "bottomk")


# ---------------------------------------------------------------------------- the methods
def finetune_specs(cs: ConvergenceSettings) -> list[MethodSpec]:
    """Fine-tuning rows: AdamW, MISA per strategy and with the proof's momentum step
    (``beta1 / (1 - beta1)``, against the default ``beta1``), then the peers."""
    misa = [MethodSpec(f"misa δ={cs.delta:.0%} ({strategy})", "misa",
                       dict(delta=cs.delta, inner_steps=cs.inner_steps, strategy=strategy))
            for strategy in STRATEGIES]
    misa.append(MethodSpec(f"misa δ={cs.delta:.0%} (misa, momentum step proof)", "misa",
                           dict(delta=cs.delta, inner_steps=cs.inner_steps, momentum_step="proof")))
    return [
        MethodSpec("adamw", "adamw"), *misa,
        MethodSpec(f"badam (switch every {cs.peers.badam_switch_every})", "badam"),
        MethodSpec(f"lora r={cs.peers.lora_rank}", "lora", dict(rank=cs.peers.lora_rank)),
        MethodSpec(f"galore r={cs.peers.galore_rank}", "galore", dict(rank=cs.peers.galore_rank)),
    ]


def pretrain_specs(cs: ConvergenceSettings) -> list[MethodSpec]:
    """Pre-training rows (paper Table 6): AdamW, MISA with delta=25%, GaLore."""
    return [
        MethodSpec("adamw", "adamw"),
        MethodSpec(f"misa δ={cs.pretrain_delta:.0%}", "misa",
                   dict(delta=cs.pretrain_delta, inner_steps=cs.inner_steps)),
        MethodSpec(f"galore r={cs.peers.galore_rank}", "galore", dict(rank=cs.peers.galore_rank)),
    ]


# ---------------------------------------------------------------------------- schedules
def warmup_cosine(steps: int, warmup_fraction: float = 0.05, floor: float = 0.1) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine decay to ``floor``."""
    warmup = max(1, int(steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def constant(step: int) -> float:
    """LR multiplier of fine-tuning: the learning rate as given."""
    return 1.0


def eval_steps(steps: int, points: int) -> list[int]:
    """The steps after which validation loss is measured, evenly spread, the last included."""
    return sorted({max(1, round(steps * (i + 1) / points)) for i in range(points)})


# ---------------------------------------------------------------------------- one run
def train_run(method, data: tuple[Tensor, Tensor], steps: int, cs: ConvergenceSettings, device: str,
              schedule: Callable[[int], float], progress: bool = False, desc: str = "") -> dict[str, Any]:
    """Train ``method`` for ``steps`` steps; its validation curve ``[[step, train_seconds, loss]]``.

    Stops early when the training loss is not finite (``diverged``)."""
    train, val = data
    stream = batch_stream(train, cs.batch_size, device, seed=cs.seed + 1)
    sched = torch.optim.lr_scheduler.LambdaLR(method.optimizer, schedule)
    curve = [[0, 0.0, evaluate(method.model, val, cs.batch_size, device)]]
    checkpoints, losses, seconds, diverged = set(eval_steps(steps, cs.eval_points)), [], 0.0, False
    synchronize(device)
    tick = time.perf_counter()
    for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, leave=False):
        loss = lm_loss(method.model, next(stream))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(method.model.parameters(), cs.max_grad_norm)
        method.step()
        sched.step()
        method.zero_grad()
        losses.append(loss.detach())
        if step in checkpoints:
            synchronize(device)
            seconds += time.perf_counter() - tick
            train_loss = torch.stack(losses).float().mean().item()
            val_loss = evaluate(method.model, val, cs.batch_size, device)
            curve.append([step, seconds, val_loss])
            if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
                diverged = True
                break
            losses, tick = [], time.perf_counter()
    final = curve[-1][2]
    return dict(
        final_val_loss=finite_or_none(final), diverged=diverged or not math.isfinite(final),
        curve=[[s, t, finite_or_none(v)] for s, t, v in curve], train_seconds=seconds,
        ms_per_step=1000 * seconds / max(1, curve[-1][0]), details=method.details(),
    )


# ---------------------------------------------------------------------------- the sweep
def best_index(runs: list[dict[str, Any]]) -> Optional[int]:
    """Index of the run with the lowest finite final validation loss; ``None`` if all diverged."""
    finite = [(run["final_val_loss"], i) for i, run in enumerate(runs)
              if not run.get("diverged") and run.get("final_val_loss") is not None]
    return min(finite)[1] if finite else None


def sweep(run_one: Callable[[float], tuple[dict[str, Any], Any]], lrs: tuple[float, ...]) -> tuple[dict[str, Any], Any]:
    """Run ``run_one(lr)`` (-> ``(result, artefact)``) for each lr; the summary and the best
    run's artefact (e.g. its trained model), the others dropped as the sweep goes."""
    runs, best_artefact, best = [], None, None
    for lr in lrs:
        result, artefact = run_one(lr)
        runs.append(dict(result, lr=lr))
        index = best_index(runs)
        if index == len(runs) - 1:
            best_artefact = artefact
        best = index
        del artefact
    summary = dict(lrs=list(lrs), runs=runs, best_lr=None if best is None else lrs[best])
    if best is not None:
        chosen = runs[best]
        summary.update(val_loss_before=chosen["curve"][0][2], val_loss_after=chosen["final_val_loss"],
                       curve=chosen["curve"], train_seconds=chosen["train_seconds"],
                       ms_per_step=chosen["ms_per_step"], details=chosen["details"])
    return summary, best_artefact


def method_row(spec: MethodSpec, lrs: tuple[float, ...],
               make_run: Callable[[float], tuple[dict, Any]]) -> tuple[dict, Any]:
    """One table row: the sweep of ``spec``, or a row whose status says why it is empty."""
    row: dict[str, Any] = dict(method=spec.label, kind=spec.kind, options=spec.options)
    try:
        summary, artefact = sweep(make_run, lrs)
    except PeerUnavailable as err:
        return dict(row, status=str(err)), None
    status = "ok" if summary["best_lr"] is not None else "diverged at every learning rate"
    return dict(row, status=status, **summary), artefact


# ---------------------------------------------------------------------------- the sections
def pretrain_rows(cs: ConvergenceSettings, device: str,
                  progress: bool = True) -> tuple[list[dict], Optional[nn.Module]]:
    """Pre-train from scratch with each method (and its LR sweep); the rows and the best
    AdamW model (the base model for fine-tuning)."""
    data = corpus_rows(PRETRAIN_CORPUS, cs.seq_len, cs.eval_rows)
    rows, base = [], None
    for spec in tqdm(pretrain_specs(cs), desc="pre-train", disable=not progress):
        def run(lr: float, spec=spec) -> tuple[dict, nn.Module]:
            model = build_model(cs.shape, cs.dtype, device, seed=cs.seed, max_len=cs.seq_len)
            method = make_method(spec, model, lr, peers=cs.peers, mode="pretrain", seed=cs.seed)
            result = train_run(method, data, cs.pretrain_steps, cs, device, warmup_cosine(cs.pretrain_steps),
                               progress, desc=f"{spec.label} lr={lr:g}")
            return result, (method.model if spec.kind == "adamw" else None)

        row, model = method_row(spec, cs.pretrain_lrs[spec.kind], run)
        rows.append(dict(row, corpus=PRETRAIN_CORPUS, steps=cs.pretrain_steps))
        if spec.kind == "adamw":
            base = model
    return rows, base


def pretrain_base(cs: ConvergenceSettings, device: str, progress: bool = True) -> nn.Module:
    """A base model when the pre-training section is skipped: AdamW at its grid's middle lr."""
    lrs = cs.pretrain_lrs["adamw"]
    model = build_model(cs.shape, cs.dtype, device, seed=cs.seed, max_len=cs.seq_len)
    method = make_method(MethodSpec("adamw", "adamw"), model, lrs[len(lrs) // 2], peers=cs.peers, mode="pretrain")
    data = corpus_rows(PRETRAIN_CORPUS, cs.seq_len, cs.eval_rows)
    train_run(method, data, cs.pretrain_steps, cs, device, warmup_cosine(cs.pretrain_steps), progress, "base model")
    return model


def finetune_rows(base: nn.Module, cs: ConvergenceSettings, device: str, progress: bool = True) -> list[dict]:
    """Fine-tune copies of ``base`` with each method (and its LR sweep)."""
    data = corpus_rows(FINETUNE_CORPUS, cs.seq_len, cs.eval_rows)
    base.zero_grad(set_to_none=True)
    rows = []
    for spec in tqdm(finetune_specs(cs), desc="fine-tune", disable=not progress):
        def run(lr: float, spec=spec) -> tuple[dict, None]:
            method = make_method(spec, copy.deepcopy(base), lr, peers=cs.peers, mode="finetune", seed=cs.seed)
            return train_run(method, data, cs.finetune_steps, cs, device, constant, progress,
                             desc=f"{spec.label} lr={lr:g}"), None

        row, _ = method_row(spec, cs.finetune_lrs[spec.kind], run)
        rows.append(dict(row, corpus=FINETUNE_CORPUS, steps=cs.finetune_steps))
    return rows
