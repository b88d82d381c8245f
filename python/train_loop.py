#!/usr/bin/env python
"""Fine-tune with MISA in a plain PyTorch training loop.

A small LLaMA-style model is pre-trained briefly with AdamW on the Python language
reference, then fine-tuned with ``misa_kernels.MISA`` on the standard library's docstrings:
``loss.backward(); clip; opt.step(); sched.step(); opt.zero_grad()``, as with any optimizer.
Prints the validation loss, the modules MISA sampled most and the optimizer's memory, and
saves a loss plot (``runs/train_loop/loss.png``). CPU: about a minute.

    python python/train_loop.py
    python python/train_loop.py --steps 600 --delta 0.05 --inner-steps 50
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from example_utils import (
    RUNS, batch_stream, default_device, evaluate, pretrain_briefly, save_loss_plot, text_rows, tiny_llama,
)

import misa_kernels as mk  # after example_utils, which finds it in a plain checkout too


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="MISA fine-tuning steps")
    p.add_argument("--pretrain-steps", type=int, default=200, help="AdamW steps that make the base model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--delta", type=float, default=0.1, help="active parameters / all parameters")
    p.add_argument("--inner-steps", type=int, default=25, help="Adam steps per sampled set of modules")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", type=Path, default=RUNS / "train_loop")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = default_device()
    model = tiny_llama(seq_len=args.seq_len, device=device)
    base_loss = pretrain_briefly(model, args.pretrain_steps, args.batch_size, args.seq_len)
    print(f"base model: validation loss {base_loss:.3f} on python-reference")

    train, val = text_rows("python-docstrings", args.seq_len)
    opt = mk.MISA(model, lr=args.lr, delta=args.delta, inner_steps=args.inner_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)  # any scheduler works
    stream = batch_stream(train, args.batch_size, device, seed=1)
    curve = [(0, evaluate(model, val, args.batch_size, device))]
    peak_memory = 0
    bar = tqdm(range(1, args.steps + 1), desc="fine-tune (MISA, python-docstrings)")
    for step in bar:
        ids = next(stream)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        peak_memory = max(peak_memory, opt.memory_report()["total"])  # before zero_grad: gradients count
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val, args.batch_size, device)))
            bar.set_postfix(val_loss=f"{curve[-1][1]:.3f}")

    print(f"validation loss on python-docstrings: {curve[0][1]:.3f} -> {curve[-1][1]:.3f}")
    top = sorted(opt.sample_counts.items(), key=lambda kv: -kv[1])[:5]
    print("most sampled modules: " + ", ".join(f"{name} x{count}" for name, count in top))
    print(f"optimizer memory (master + moments + gradients + scores), largest step: {peak_memory / 2**20:.2f} MiB")
    save_loss_plot({"MISA (validation)": curve}, args.out / "loss.png", "MISA fine-tuning, plain PyTorch loop")


if __name__ == "__main__":
    main()
