"""A short fine-tuning run on real text: every strategy learns, and bottom-k is worst.

The base model is pre-trained in the test on the Python language reference; fine-tuning
is on standard-library docstrings, a different text (both ship with CPython). Results are
averaged over three sampling seeds so no single lucky draw decides.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import misa_kernels as mk
from misa_kernels.data import batches, lm_splits

SEQ = 64
SEEDS = (0, 1, 2)


@torch.no_grad()
def _val_loss(model, rows):
    model.eval()
    loss = float(model(input_ids=rows, labels=rows).loss)
    model.train()
    return loss


@pytest.fixture(scope="module")
def base_and_data():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    base = LlamaForCausalLM(config)
    pretrain, _ = lm_splits("python-reference", SEQ, max_tokens=200_000)
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    stream = batches(pretrain, 16, torch.Generator().manual_seed(0))
    for _ in range(150):
        ids = next(stream)
        base(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    train, val = lm_splits("python-docstrings", SEQ, max_tokens=200_000)
    return base, train, val[:64]


def _finetune(base, train, val, strategy, seed, steps=100):
    model = copy.deepcopy(base)
    opt = mk.MISA(model, lr=2e-3, delta=0.05, inner_steps=10, strategy=strategy, seed=seed)
    stream = batches(train, 8, torch.Generator().manual_seed(1))
    for _ in range(steps):
        ids = next(stream)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return _val_loss(model, val)


def test_every_strategy_learns_and_bottomk_is_worst(base_and_data):
    base, train, val = base_and_data
    before = _val_loss(base, val)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # single-module fallback for the MLP modules
        losses = {s: sum(_finetune(base, train, val, s, seed) for seed in SEEDS) / len(SEEDS)
                  for s in ("misa", "uniform", "topk", "bottomk")}
    for strategy, loss in losses.items():
        assert loss < before - 0.03, (strategy, before, losses)
    for strategy in ("misa", "uniform", "topk"):
        assert losses[strategy] < losses["bottomk"] - 0.005, losses
