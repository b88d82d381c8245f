"""TRL's ``SFTTrainer`` with ``optimizers=(MISA(...), scheduler)``: it tokenizes text
itself, and MISA trains exactly the modules it sampled, with the scheduler's rate."""
import math

import pytest
import torch
import trl  # in the test extra

import misa_kernels as mk
from conftest import tiny_llama
from test_integration import _active_recorder, changed_params, module_params, snapshot


def _char_tokenizer():
    """A character-level tokenizer built in memory (nothing downloaded), ids below the tiny vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{chr(c): c - 29 for c in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def test_sft_trainer_trains_exactly_the_sampled_modules(tmp_path):
    from datasets import Dataset

    model, max_steps = tiny_llama(), 12
    opt = mk.MISA(model, lr=5e-3, delta=0.2, inner_steps=4, sweep=False, seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * max_steps))
    before, stepped = snapshot(model), []
    config = trl.SFTConfig(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                           report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, seed=0,
                           disable_tqdm=True, max_length=32)
    texts = [f"def add_{k}(x):\n    return x + {k}\n" for k in range(16)]
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                             processing_class=_char_tokenizer(), optimizers=(opt, sched),
                             callbacks=[_active_recorder(opt, stepped)])
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == max_steps and all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < losses[0] - 0.1, losses
    assert len(stepped) == max_steps and len(set(stepped)) >= 2, "the active set never switched"
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3 * (1.0 - max_steps / (2 * max_steps)))
    sampled = {m for s in stepped for m in s}
    never = {n for u in opt.units for n in u.module_names} - sampled
    assert never, "every module was sampled: the frozen-module check would be empty"
    assert changed_params(model, before) == module_params(model, sampled)
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])
