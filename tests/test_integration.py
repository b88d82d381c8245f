"""MISA inside ordinary training loops: LR schedulers, gradient accumulation, gradient
clipping, the Hugging Face Trainer (with checkpoint/resume), Hugging Face gradient
checkpointing and GPT-2's Conv1D modules.

Everything runs on CPU with the tiny models of ``conftest`` and a few steps; the whole file
takes a few seconds. Every comparison is between two runs built from the same seeds, so
the tests are deterministic.
"""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import misa_kernels as mk
from conftest import VOCAB, assert_runs_agree, enable_checkpointing, random_batch, tiny_gpt2, tiny_llama

# --------------------------------------------------------------------------- helpers


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed_params(model, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def module_params(model, module_names) -> set[str]:
    """Qualified names of the parameters (weight and bias) owned by ``module_names``."""
    names = set()
    for module in module_names:
        for key, _ in model.get_submodule(module).named_parameters(recurse=False):
            names.add(f"{module}.{key}")
    return names


def train_step(model, opt, batch) -> float:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    return float(loss.detach())


# =========================================================================== 1. LR schedulers


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_lambda_lr_sets_the_step_size_of_every_inner_step(factory):
    """Each MISA step must be an AdamW step at the lr the scheduler put in the param
    groups (decoupled decay only on 2-D weights), plus the momentum step of Alg. 1 line 16
    at the last inner step, also at the scheduled lr."""
    torch.manual_seed(0)
    model = factory()
    model.eval()  # GPT-2 dropout off; irrelevant to the formula but keeps grads deterministic
    base_lr, wd, inner = 1e-2, 0.1, 3
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    opt = mk.MISA(model, lr=base_lr, delta=0.15, inner_steps=inner, weight_decay=wd, sweep=False,
                  seed=0, backend="torch")
    factor = lambda s: 0.5 ** s  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        names = {p: n for n, p in model.named_parameters()}
        switches = 0
        for step in range(2 * inner + 1):
            for group in opt.param_groups:
                assert group["lr"] == pytest.approx(base_lr * factor(step), rel=1e-12)
            model(**random_batch(seed=step)).loss.backward()
            active = [p for p in model.parameters() if p.grad is not None]
            assert active, "no active parameter received a gradient"
            t = opt.inner_step + 1
            last = t == inner
            expected = {}
            for p in active:
                group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
                state = opt.state.get(p) or {}
                g = p.grad.double()
                m = state["exp_avg"].double() if "exp_avg" in state else torch.zeros_like(g)
                v = state["exp_avg_sq"].double() if "exp_avg_sq" in state else torch.zeros_like(g)
                m = beta1 * m + (1 - beta1) * g
                v = beta2 * v + (1 - beta2) * g * g
                direction = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
                decay, lr = group["weight_decay"], group["lr"]
                assert lr == pytest.approx(base_lr * factor(step), rel=1e-12)
                assert decay == (wd if p.dim() >= 2 else 0.0), names[p]
                new = p.detach().double() * (1 - lr * decay) - lr * direction
                if last:  # Alg. 1 line 16 at the switch
                    new = new - lr * beta1 * direction
                expected[p] = new
            before_active = list(opt.active_modules)
            opt.step()
            opt.zero_grad()
            for p, new in expected.items():
                torch.testing.assert_close(p.detach().double(), new, rtol=1e-5, atol=1e-7, msg=names[p])
            if last:
                switches += 1
                assert opt.inner_step == 0
            else:
                assert opt.active_modules == before_active
            sched.step()
    assert switches == 2
    # the scheduler saw MISA's step() (its step counter patch works on the subclass)
    assert not [w for w in recorded if "lr_scheduler.step()" in str(w.message)]


def test_lr_scheduler_and_misa_state_dicts_resume_bit_identically():
    """Save model + MISA + LinearLR mid-run (through torch.save / weights_only load, as the
    HF Trainer does), restore into fresh objects and continue: identical to the original."""
    total, cut = 10, 5
    make_opt = lambda m: mk.MISA(m, lr=1e-2, delta=0.1, inner_steps=2, seed=7)  # noqa: E731
    make_sched = lambda o: torch.optim.lr_scheduler.LinearLR(  # noqa: E731
        o, start_factor=1.0, end_factor=0.1, total_iters=total)
    batches = [random_batch(seed=100 + s) for s in range(total)]

    model = tiny_llama()
    opt = make_opt(model)
    sched = make_sched(opt)
    for s in range(cut):
        train_step(model, opt, batches[s])
        sched.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    saved_lr = [g["lr"] for g in opt.param_groups]
    for s in range(cut, total):
        train_step(model, opt, batches[s])
        sched.step()

    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    resumed = tiny_llama(seed=1)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = make_opt(resumed)
    sched2 = make_sched(opt2)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert [g["lr"] for g in opt2.param_groups] == saved_lr
    assert sched2.last_epoch == cut
    for s in range(cut, total):
        train_step(resumed, opt2, batches[s])
        sched2.step()

    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.1)
    assert sched2.state_dict() == sched.state_dict()
    assert opt2.active_modules == opt.active_modules
    assert opt2.scores == opt.scores
    assert opt2.sample_counts == opt.sample_counts
    assert opt2.inner_step == opt.inner_step
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


# =========================================================================== 2. accumulation


@pytest.mark.parametrize("set_to_none", [True, False])
def test_gradient_accumulation_matches_the_full_batch(set_to_none):
    """Two micro-batches of 1 with loss / 2 then step() == one step on the batch of 2, over
    several steps and switches of the active set (the scores, hence the draws, agree too)."""
    full, accum = tiny_llama(), tiny_llama()
    kwargs = dict(lr=1e-2, delta=0.15, inner_steps=2, seed=3)
    opt_full, opt_accum = mk.MISA(full, **kwargs), mk.MISA(accum, **kwargs)
    frozen_before = {n: p for n, p in snapshot(accum).items() if "layers" not in n}
    active_sets = []
    for step in range(8):
        batch = random_batch(batch=2, seed=step)
        assert opt_full.active_modules == opt_accum.active_modules
        active_sets.append(tuple(opt_accum.active_modules))

        full(**batch).loss.backward()
        opt_full.step()
        opt_full.zero_grad(set_to_none=set_to_none)

        for i in range(2):
            micro = {k: v[i:i + 1] for k, v in batch.items()}
            (accum(**micro).loss / 2).backward()
        opt_accum.step()
        opt_accum.zero_grad(set_to_none=set_to_none)

        assert_runs_agree(accum.parameters(), full.parameters(), kwargs["lr"], f"step {step}")
    assert len(set(active_sets)) >= 3, "the active set never switched"
    assert opt_full.sample_counts == opt_accum.sample_counts
    for name, score in opt_full.scores.items():
        assert opt_accum.scores[name] == pytest.approx(score, rel=1e-4), name
    for n, p in accum.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), n


# =========================================================================== 3. clipping


def test_clip_grad_norm_scores_use_the_unclipped_gradient():
    """One-step outer iterations, with and without clip_grad_norm_(max_norm=1e-6): the scores
    after the switch are identical (recorded in the post-accumulate hook, before clipping),
    while the clipped update moved the parameters differently."""
    plain, clipped = tiny_llama(), tiny_llama()
    kwargs = dict(lr=1e-2, delta=0.1, inner_steps=1, sweep_steps=1, seed=0)
    opt_plain, opt_clipped = mk.MISA(plain, **kwargs), mk.MISA(clipped, **kwargs)
    batch = random_batch(seed=0)
    units = {u.name: u for u in opt_plain.units}
    active = list(opt_plain.active_modules)

    plain(**batch).loss.backward()
    clipped(**batch).loss.backward()
    unclipped_sq = {n: sum(float(p.grad.double().square().sum()) for p in units[n].params) for n in active}
    total = torch.nn.utils.clip_grad_norm_([p for p in clipped.parameters() if p.grad is not None], 1e-6)
    assert float(total) > 1e-3  # the clip is real: a factor of at least 1000
    opt_plain.step()
    opt_clipped.step()

    assert opt_clipped.scores == opt_plain.scores
    for name in active:  # one observation: debiased G_b = ||g_b||^2 / |b| of the raw gradient
        assert opt_clipped.scores[name] == pytest.approx(unclipped_sq[name] / units[name].numel, rel=1e-5)
    changed = [n for (n, p), q in zip(plain.named_parameters(), clipped.parameters()) if not torch.equal(p, q)]
    assert changed, "clipping had no effect on the update"
    assert all(torch.isfinite(p).all() for p in clipped.parameters())


def test_clip_grad_norm_multi_step_scores_average_the_unclipped_norms():
    """Several inner steps with clipping before each step(): after the switch the score of
    each unit is the mean over the inner loop of ||g_b||^2 / |b| BEFORE clipping."""
    model = tiny_llama()
    inner = 3
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=inner, sweep=False, seed=1)
    units = {u.name: u for u in opt.units}
    first = list(opt.active_modules)
    raw = {n: [] for n in first}
    clipped_norms = {n: [] for n in first}
    losses = []
    for step in range(inner):
        loss = model(**random_batch(seed=step)).loss
        loss.backward()
        losses.append(float(loss.detach()))
        for n in first:
            raw[n].append(sum(float(p.grad.double().square().sum()) for p in units[n].params))
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1e-4)
        for n in first:
            clipped_norms[n].append(sum(float(p.grad.double().square().sum()) for p in units[n].params))
        opt.step()
        opt.zero_grad()
    assert opt.inner_step == 0 and opt.sample_counts[first[0]] >= 1  # switched
    for n in first:
        expected = sum(raw[n]) / inner / units[n].numel
        clipped_value = sum(clipped_norms[n]) / inner / units[n].numel
        assert opt.scores[n] == pytest.approx(expected, rel=1e-5), n
        assert opt.scores[n] != pytest.approx(clipped_value, rel=1e-2), n
    assert all(math.isfinite(x) for x in losses)


# =========================================================================== 4. HF Trainer


def _trainer_dataset(n: int = 8, seq: int = 16) -> list[dict]:
    """Learnable sequences (arithmetic progressions), as a plain list of dicts."""
    data = []
    for k in range(n):
        ids = (torch.arange(seq) * (k % 2 + 1) + k) % VOCAB
        data.append({"input_ids": ids, "labels": ids.clone()})
    return data


def _make_trainer(model, opt, sched, output_dir, callbacks=(), **overrides):
    from transformers import Trainer, TrainingArguments

    args = dict(output_dir=str(output_dir), max_steps=12, per_device_train_batch_size=8, report_to=[],
                use_cpu=True, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True)
    args.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**args), train_dataset=_trainer_dataset(),
                   optimizers=(opt, sched), callbacks=list(callbacks))


def _active_recorder(opt, record: list):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            record.append(tuple(opt.active_modules))

    return Recorder()


def test_hf_trainer_trains_exactly_the_sampled_modules(tmp_path):
    model = tiny_llama()
    max_steps = 12
    opt = mk.MISA(model, lr=5e-3, delta=0.2, inner_steps=4, sweep=False, seed=0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * max_steps))
    before = snapshot(model)
    stepped: list[tuple[str, ...]] = []
    trainer = _make_trainer(model, opt, sched, tmp_path, callbacks=[_active_recorder(opt, stepped)],
                            max_steps=max_steps)
    trainer.train()

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == max_steps and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.1, losses
    assert len(stepped) == max_steps
    assert len(set(stepped)) >= 2, "the active set never switched"
    # the scheduler drove MISA's lr
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3 * (1.0 - max_steps / (2 * max_steps)))

    trained = module_params(model, {m for s in stepped for m in s})
    all_modules = {n for u in opt.units for n in u.module_names}
    never = all_modules - {m for s in stepped for m in s}
    assert never, "every module was sampled: the frozen-module check would be empty"
    assert changed_params(model, before) == trained
    frozen = set(before) - trained
    assert any("embed_tokens" in n for n in frozen) and any("norm" in n for n in frozen)
    assert module_params(model, never) <= frozen


def test_hf_trainer_resume_from_checkpoint_is_bit_identical(tmp_path):
    make_opt = lambda m: mk.MISA(m, lr=5e-3, delta=0.1, inner_steps=3, seed=0)  # noqa: E731
    make_sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 - s / 20)  # noqa: E731
    overrides = dict(max_steps=10, per_device_train_batch_size=2, save_strategy="steps", save_steps=5)

    model = tiny_llama()
    opt = make_opt(model)
    trainer = _make_trainer(model, opt, make_sched(opt), tmp_path, **overrides)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-5"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    resumed = tiny_llama(seed=1)  # weights must come from the checkpoint
    opt2 = make_opt(resumed)
    trainer2 = _make_trainer(resumed, opt2, make_sched(opt2), tmp_path, **overrides)
    trainer2.train(resume_from_checkpoint=str(checkpoint))
    losses2 = [h["loss"] for h in trainer2.state.log_history if "loss" in h]

    assert len(losses) == 10
    assert losses2 == losses  # history up to step 5 comes from trainer_state.json, the rest was re-run
    assert opt2.active_modules == opt.active_modules
    assert opt2.scores == opt.scores
    assert opt2.sample_counts == opt.sample_counts
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("variant", ["grad_accumulation", "reentrant_checkpointing"])
def test_hf_trainer_variants_match_the_plain_run(tmp_path, variant):
    """Trainer's own gradient accumulation (4 x 2 vs 8) and its activation checkpointing
    (reentrant) train the same modules to the same weights as the plain run."""

    def run(subdir, **overrides):
        model = tiny_llama()
        opt = mk.MISA(model, lr=5e-3, delta=0.1, inner_steps=3, seed=0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 12)
        _make_trainer(model, opt, sched, tmp_path / subdir, max_steps=6, **overrides).train()
        return model, opt

    if variant == "grad_accumulation":
        overrides = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    else:
        overrides = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    base, opt_base = run("base")
    other, opt_other = run("other", **overrides)
    assert opt_other.sample_counts == opt_base.sample_counts
    assert opt_other.active_modules == opt_base.active_modules
    for name, score in opt_base.scores.items():
        assert opt_other.scores[name] == pytest.approx(score, rel=1e-4), name
    for (n, p), q in zip(base.named_parameters(), other.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


# =========================================================================== 5. HF checkpointing


def _seed_with_active_layers(layers: int, delta: float, wanted: set[int]) -> int:
    """A seed whose first active set lies exactly in the blocks ``wanted``."""
    probe = tiny_llama(layers=layers)
    for seed in range(500):
        opt = mk.MISA(probe, delta=delta, seed=seed)
        got = {int(n.split(".")[2]) for n in opt.active_modules}
        opt.detach()
        if got == wanted:
            return seed
    raise AssertionError(f"no seed activates exactly blocks {wanted}")


def _reference_grads(model, batch) -> dict[str, torch.Tensor]:
    """Plain autograd without checkpointing on a copy with the same weights and the same
    requires_grad pattern."""
    ref = tiny_llama(layers=len(model.model.layers), seed=123)
    ref.load_state_dict(model.state_dict())
    ref.train()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        q.requires_grad_(p.requires_grad)
    ref(**batch).loss.backward()
    return {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}


def _check_grads_match(model, opt, batch):
    ref = _reference_grads(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # reentrant checkpoint: "None of the inputs..."
        model(**batch).loss.backward()
    active = module_params(model, opt.active_modules)
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == active == set(ref), (sorted(got), sorted(active))
    for n, p in model.named_parameters():
        if n in active:
            assert p.grad.abs().sum() > 0, n
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("disable_input_grads", [False, True], ids=["input_grads", "no_input_grads"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_grads_of_active_modules_only_in_layer_1(reentrant, disable_input_grads):
    seed = _seed_with_active_layers(3, delta=0.1, wanted={1})
    model = tiny_llama(layers=3)
    model.train()
    enable_checkpointing(model, reentrant)
    if disable_input_grads:
        model.disable_input_require_grads()  # the pre-4.35 situation: embedding output needs no grad
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=2, seed=seed)
    assert opt.active_modules and all(".layers.1." in n for n in opt.active_modules)
    _check_grads_match(model, opt, random_batch(seed=5))


@pytest.mark.parametrize("disable_input_grads", [False, True], ids=["input_grads", "no_input_grads"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_grads_match_across_switches(reentrant, disable_input_grads):
    """Whatever is active (sweep: a new set at every step, all blocks visited), the
    checkpointed gradients equal plain autograd's, and training with them matches too."""
    model = tiny_llama(layers=3)
    model.train()
    enable_checkpointing(model, reentrant)
    if disable_input_grads:
        model.disable_input_require_grads()
    opt = mk.MISA(model, lr=1e-3, delta=0.06, inner_steps=2, seed=0)
    seen_layers = set()
    for step in range(6):
        seen_layers |= {int(n.split(".")[2]) for n in opt.active_modules}
        _check_grads_match(model, opt, random_batch(seed=step))
        opt.step()
        opt.zero_grad()
    assert seen_layers == {0, 1, 2}


def test_reentrant_checkpointing_without_misa_hook_loses_the_gradients():
    """Sanity check that the scenario above is meaningful: with the same frozen pattern but
    no MISA, reentrant checkpointing without input grads gives the active block nothing."""
    model = tiny_llama(layers=3)
    model.train()
    enable_checkpointing(model, True)
    model.disable_input_require_grads()
    for n, p in model.named_parameters():
        p.requires_grad_(n == "model.layers.1.mlp.gate_proj.weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "None of the inputs have requires_grad=True"
        loss = model(**random_batch(seed=5)).loss
    assert not loss.requires_grad


def test_gradient_checkpointing_with_module_filter_reentrant_no_input_grads():
    model = tiny_llama(layers=3)
    model.train()
    enable_checkpointing(model, True)
    model.disable_input_require_grads()
    opt = mk.MISA(model, lr=1e-3, delta=0.1, seed=0, module_filter=lambda name, m: ".layers.1." in name)
    assert opt.active_modules and all(".layers.1." in n for n in opt.active_modules)
    _check_grads_match(model, opt, random_batch(seed=5))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_module_filter_with_input_grads(reentrant):
    """With HF's default (embedding output requires grad) a module_filter is fine."""
    model = tiny_llama(layers=3)
    model.train()
    enable_checkpointing(model, reentrant)
    opt = mk.MISA(model, lr=1e-3, delta=0.1, seed=0, module_filter=lambda name, m: ".layers.1." in name)
    _check_grads_match(model, opt, random_batch(seed=5))


# =========================================================================== 6. GPT-2 (Conv1D)


def test_gpt2_conv1d_modules_train_and_only_active_modules_change():
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    model.train()  # dropout on: seeded below
    opt = mk.MISA(model, lr=1e-2, delta=0.15, inner_steps=2, seed=0)
    assert {type(model.get_submodule(u.name)) for u in opt.units} == {Conv1D}
    assert all(len(u.params) == 2 for u in opt.units)  # weight and bias
    assert len(opt.units) == 4 * len(model.transformer.h)
    before = snapshot(model)
    torch.manual_seed(0)
    stepped, losses = [], []
    data = _trainer_dataset(n=4)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    for step in range(8):
        stepped.append(tuple(opt.active_modules))
        step_before = snapshot(model)
        losses.append(train_step(model, opt, batch))
        assert changed_params(model, step_before) <= module_params(model, stepped[-1])
        assert module_params(model, stepped[-1]) <= changed_params(model, step_before)
    assert all(math.isfinite(x) for x in losses)
    assert len(set(stepped)) >= 3
    trained = module_params(model, {m for s in stepped for m in s})
    assert any(n.endswith(".bias") for n in trained)
    assert changed_params(model, before) == trained
    for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight",
              "transformer.h.0.ln_1.weight", "transformer.h.1.ln_2.bias"):
        assert torch.equal(dict(model.named_parameters())[n], before[n]), n
