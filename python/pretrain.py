#!/usr/bin/env python
"""Pre-train from scratch with MISA (``mode="pretrain"``, delta=25%) and with full AdamW.

In pre-training mode MISA trains embeddings, lm_head and norms densely at every step and
samples the transformer-block matrices under the budget ``delta`` (paper Sec. 5.3). Both
runs start from the same seeded model and see the same batches of the Python language
reference, with linear warm-up and cosine decay. Prints validation loss, perplexity and
time per step; saves the loss curves to ``runs/pretrain/loss.png``. CPU: about a minute.

    python python/pretrain.py
    python python/pretrain.py --steps 1000 --delta 0.25 --misa-lr 3e-3 --adamw-lr 3e-3
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from example_utils import RUNS, batch_stream, default_device, evaluate, save_loss_plot, text_rows, tiny_llama

import misa_kernels as mk  # after example_utils, which finds it in a plain checkout too


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--delta", type=float, default=0.25)
    p.add_argument("--inner-steps", type=int, default=25)
    p.add_argument("--misa-lr", type=float, default=3e-3)
    p.add_argument("--adamw-lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=RUNS / "pretrain")
    return p.parse_args(argv)


def warmup_cosine(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return factor


def train(method: str, args: argparse.Namespace, device: str) -> tuple[list[tuple[int, float]], float]:
    """Pre-train a fresh model with ``method``; its validation curve and ms per step."""
    model = tiny_llama(seq_len=args.seq_len, device=device, seed=0)
    if method == "misa":
        opt = mk.MISA(model, lr=args.misa_lr, delta=args.delta, inner_steps=args.inner_steps, mode="pretrain")
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.adamw_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(args.steps, max(1, args.steps // 20)))
    train_rows, val = text_rows("python-reference", args.seq_len)
    stream = batch_stream(train_rows, args.batch_size, device, seed=0)
    curve, seconds = [(0, evaluate(model, val, args.batch_size, device))], 0.0
    bar = tqdm(range(1, args.steps + 1), desc=f"pre-train {method}")
    for step in bar:
        tick = time.perf_counter()
        ids = next(stream)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - tick
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val, args.batch_size, device)))
            bar.set_postfix(val_loss=f"{curve[-1][1]:.3f}")
    return curve, 1000 * seconds / args.steps


def main(argv=None) -> None:
    args = parse_args(argv)
    device = default_device()
    results = {method: train(method, args, device) for method in ("misa", "adamw")}
    for method, (curve, ms) in results.items():
        loss = curve[-1][1]
        print(f"{method:5s}: validation loss {curve[0][1]:.3f} -> {loss:.3f} (perplexity {math.exp(loss):.2f}), "
              f"{ms:.1f} ms/step")
    labels = {"misa": f"MISA delta={args.delta:g}", "adamw": "AdamW"}
    save_loss_plot({labels[m]: curve for m, (curve, _) in results.items()}, args.out / "loss.png",
                   "pre-training from scratch (python-reference)")


if __name__ == "__main__":
    main()
