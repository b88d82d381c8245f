"""The MISA optimizer's contract: arguments, budget, precision, non-finite gradients,
memory, resume, modes."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

import misa_kernels as mk
from conftest import random_batch, tiny_llama


def _train(model, opt, steps, seed=0, batch=2, seq=12, clip=None):
    losses = []
    for i in range(steps):
        loss = model(**random_batch(batch, seq, seed=seed + i)).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(delta=0.0), "delta"), (dict(delta=1.5), "delta"), (dict(eta=-1.0), "eta"),
        (dict(eta=float("nan")), "eta"), (dict(inner_steps=0), "inner_steps"), (dict(inner_steps=2.5), "inner_steps"),
        (dict(lr=-1e-3), "lr"), (dict(lr=float("nan")), "lr"), (dict(eps=-1e-8), "eps"),
        (dict(strategy="random"), "strategy"), (dict(mode="train"), "mode"), (dict(granularity="block"), "granularity"),
        (dict(backend="cuda"), "backend"), (dict(betas=(0.9, 1.0)), "betas"), (dict(score_beta=1.0), "score_beta"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(lr=float("inf")), "lr"), (dict(eps=float("inf")), "eps"), (dict(weight_decay=float("inf")), "weight_decay"),
        (dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(seed=1.5), "seed"), (dict(sweep_steps=0), "sweep_steps"),
        (dict(momentum_step="paper"), "momentum_step"), (dict(max_logit=0.0), "max_logit"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        mk.MISA(tiny_llama(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(lr="fast"), "lr"), (dict(inner_steps=True), "inner_steps"), (dict(seed=True), "seed"),
        (dict(seed="0"), "seed"), (dict(delta=True), "delta"), (dict(sweep=1), "sweep"),
        (dict(keep_states="yes"), "keep_states"), (dict(module_filter="q_proj"), "module_filter"),
        (dict(betas=(0.9, None)), "betas"),
    ],
)
def test_wrong_type_is_a_type_error(kwargs, name):
    with pytest.raises(TypeError, match=rf"^{name} "):
        mk.MISA(tiny_llama(), **kwargs)


def test_budget_is_never_exceeded():
    model = tiny_llama(layers=3)
    opt = mk.MISA(model, lr=1e-3, delta=0.07, inner_steps=2)
    budget = 0.07 * sum(p.numel() for p in model.parameters())
    seen = set()
    for i in range(30):
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert 0 < trained <= budget
        seen.add(tuple(opt.active_modules))
        _train(model, opt, 1, seed=i)
    assert len(seen) > 5


def test_single_module_fallback_warns_once():
    model = tiny_llama()
    smallest = min(u.numel for u in mk.discover_modules(model))
    delta = 0.5 * smallest / sum(p.numel() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="delta") as record:
        opt = mk.MISA(model, lr=1e-3, delta=delta, inner_steps=1)
        _train(model, opt, 4)
    assert sum("delta" in str(w.message) for w in record) == 1
    assert len(opt.active_modules) == 1


def test_only_active_modules_change_and_frozen_parameters_get_no_grad():
    model = tiny_llama()
    before = copy.deepcopy(model)
    opt = mk.MISA(model, lr=1e-2, delta=0.1, inner_steps=5, sweep=False)
    active = set(opt.active_modules)
    model(**random_batch()).loss.backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == any(name.startswith(a + ".") for a in active), name
    opt.step()
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        changed = not torch.equal(p, q)
        assert changed == any(name.startswith(a + ".") for a in active), name


def test_bf16_model_keeps_fp32_master_and_moments_for_active_modules_only():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=4, sweep=False)
    _train(model, opt, 2)
    active_params = {p for u in opt.units if u.name in opt.active_modules for p in u.params}
    assert set(opt.state) == active_params
    for p, state in opt.state.items():
        assert state["master"].dtype == torch.float32
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(p, state["master"].to(torch.bfloat16))
    report = opt.memory_report()
    n_active = sum(p.numel() for p in active_params)
    assert report["master_weights"] == 4 * n_active
    assert report["moments"] == 8 * n_active


def test_bf16_master_accumulates_updates_smaller_than_bf16_resolution():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = mk.MISA(model, lr=1e-5, delta=0.1, inner_steps=50, sweep=False)
    _train(model, opt, 3)
    moved = [not torch.equal(s["master"], p.float()) for p, s in opt.state.items()]
    assert any(moved)  # the master holds progress that bf16 cannot represent


def _active_params(model):
    return {p for p in model.parameters() if p.requires_grad}


def test_states_are_freed_at_each_switch_and_held_from_activation():
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=3, sweep=False)
    assert set(opt.state) == _active_params(model)  # allocated on activation, before any step
    _train(model, opt, 2)
    first = set(opt.state)
    _train(model, opt, 1)  # third step closes the inner loop
    assert opt.inner_step == 0
    assert set(opt.state) == _active_params(model)  # exactly the new set's
    assert all(p not in opt.state and p.grad is None for p in first - _active_params(model))
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())


def test_memory_report_is_right_before_the_first_step():
    model = tiny_llama(dtype=torch.bfloat16)
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=3, sweep=False)
    n_active = sum(p.numel() for p in _active_params(model))
    report = opt.memory_report()
    assert (report["master_weights"], report["moments"], report["gradients"]) == (4 * n_active, 8 * n_active, 0)


def test_nonfinite_gradient_skips_only_that_module():
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-2, delta=0.1, inner_steps=4, sweep=False)
    _train(model, opt, 1)
    active = [u for u in opt.units if u.name in opt.active_modules]
    assert len(active) >= 2
    bad, good = active[0], active[1]
    snapshot = {p: (p.clone(), {k: v.clone() for k, v in opt.state[p].items() if v is not None}) for u in active
                for p in u.params}
    model(**random_batch(seed=99)).loss.backward()
    bad.params[0].grad[0, 0] = float("nan")
    opt.step()
    opt.zero_grad()
    for p in bad.params:
        assert torch.equal(p, snapshot[p][0])
        for key, value in snapshot[p][1].items():
            assert torch.equal(opt.state[p][key], value)
    assert not torch.equal(good.params[0], snapshot[good.params[0]][0])
    assert opt.skipped_steps == 1
    score_before = opt.scores[bad.name]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        _train(model, opt, 2)  # closes the inner loop: skip is reported
    assert all(math.isfinite(s) for s in opt.scores.values())
    assert opt.skipped_steps == 1
    assert opt.scores[bad.name] != score_before  # its two finite steps were still scored


def test_a_skipped_step_does_not_advance_the_bias_correction():
    """A module whose gradient is non-finite at its first step keeps counting from zero:
    its next two updates equal AdamW's first two on the same gradients (a review found the
    skipped step counted, so bias corrections of t=2, 3 were applied to moments of 1, 2 steps)."""
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-2, delta=0.1, inner_steps=5, sweep=False, backend="torch")
    module = next(u for u in opt.units if u.name in opt.active_modules)
    weight = module.params[0]
    reference = torch.nn.Parameter(weight.detach().clone())
    adamw = torch.optim.AdamW([reference], lr=1e-2, betas=opt.defaults["betas"], eps=1e-8, weight_decay=0.0)
    for step in range(3):
        model(**random_batch(seed=step)).loss.backward()
        if step == 0:
            weight.grad[0, 0] = float("inf")
        else:
            reference.grad = weight.grad.clone()
            adamw.step()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(weight, reference, rtol=1e-6, atol=1e-7)
    assert float(opt.state[weight]["step"]) == 2


def test_memory_report_counts_gradients():
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=4)
    model(**random_batch()).loss.backward()
    report = opt.memory_report()
    n_active = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report["gradients"] == 4 * n_active
    assert report["total"] == sum(v for k, v in report.items() if k != "total")


def test_peak_state_bytes_remember_the_states_a_switch_freed():
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=3, sweep=False)
    _train(model, opt, 2)
    held = opt.memory_report()["moments"]
    assert held == 8 * sum(p.numel() for p in _active_params(model))  # fp32 m and v
    _train(model, opt, 1, seed=2)  # the switching step frees them and allocates the next set's
    now = opt.memory_report()["moments"]
    assert now == 8 * sum(p.numel() for p in _active_params(model))
    assert opt.peak_state_bytes == max(held, now)
    opt.reset_peak_state_bytes()
    assert opt.peak_state_bytes == now


def test_fallback_draws_count_the_draws_where_nothing_fitted_the_budget():
    model = tiny_llama()
    with pytest.warns(RuntimeWarning, match="activating one unit at a time"):
        opt = mk.MISA(model, lr=1e-3, delta=1e-4, inner_steps=2, sweep=False)
    _train(model, opt, 6)
    assert opt.fallback_draws == 4  # the first draw and one per outer iteration of 2 steps
    roomy = mk.MISA(tiny_llama(), lr=1e-3, delta=0.5, inner_steps=2, sweep=False)
    assert roomy.fallback_draws == 0
    roomy.load_state_dict(opt.state_dict())
    assert roomy.fallback_draws == 4


def _save(opt, model):
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_resume_mid_inner_loop_is_bit_identical(dtype, mode):
    kwargs = dict(lr=3e-3, delta=0.1, inner_steps=4, weight_decay=0.01, mode=mode, seed=5)
    model = tiny_llama(dtype=dtype)
    opt = mk.MISA(model, **kwargs)
    _train(model, opt, 10)
    while opt.inner_step != 2:  # save in the middle of an inner loop, after the sweep
        _train(model, opt, 1, seed=50)
    assert min(opt.sample_counts.values()) > 0
    saved = _save(opt, model)
    _train(model, opt, 20, seed=100)

    fresh = tiny_llama(dtype=dtype, seed=123)
    fresh.load_state_dict(saved["model"])
    resumed = mk.MISA(fresh, **{**kwargs, "seed": 999})
    resumed.load_state_dict(saved["opt"])
    _train(fresh, resumed, 20, seed=100)

    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    assert resumed.active_modules == opt.active_modules
    assert resumed.scores == opt.scores
    assert resumed.sample_counts == opt.sample_counts


def test_load_state_dict_rejects_another_model():
    opt = mk.MISA(tiny_llama(layers=2))
    other = mk.MISA(tiny_llama(layers=3))
    with pytest.raises(ValueError, match="state_dict"):
        other.load_state_dict(opt.state_dict())


def test_pretrain_mode_trains_embeddings_head_and_norms_every_step():
    model = tiny_llama()
    before = copy.deepcopy(model)
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=3, mode="pretrain")
    _train(model, opt, 2)
    changed = {n for (n, p), q in zip(model.named_parameters(), before.parameters()) if not torch.equal(p, q)}
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert name in changed
    dense = [p for n, p in model.named_parameters() if "proj" not in n]
    report = opt.memory_report()
    assert report["dense_moments"] == 8 * sum(p.numel() for p in dense)  # beside delta's modules
    assert report["moments"] == 8 * sum(p.numel() for n, p in model.named_parameters() if "proj" in n and p.requires_grad)
    assert opt.trained_parameters["dense"] == sum(p.numel() for p in dense)


@pytest.mark.parametrize("tied", [False, True])
def test_dense_embeddings_train_embeddings_and_head_every_step_but_not_norms(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    before = copy.deepcopy(model)
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=3, dense_embeddings=True)
    _train(model, opt, 2)
    changed = {n for (n, p), q in zip(model.named_parameters(), before.parameters()) if not torch.equal(p, q)}
    assert "model.embed_tokens.weight" in changed and (tied or "lm_head.weight" in changed)
    assert not {n for n in changed if "norm" in n}
    embeddings = {id(model.model.embed_tokens.weight): model.model.embed_tokens.weight,
                  id(model.lm_head.weight): model.lm_head.weight}
    assert len(embeddings) == (1 if tied else 2)
    assert opt.trained_parameters["dense"] == sum(p.numel() for p in embeddings.values())
    assert opt.memory_report()["dense_moments"] == 8 * opt.trained_parameters["dense"]


def test_dense_embeddings_need_the_embedding_accessors_and_no_lora():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(2))

    with pytest.raises(ValueError, match="dense_embeddings=True.*get_input_embeddings"):
        mk.MISA(Plain(), dense_embeddings=True)
    with pytest.raises(TypeError, match="dense_embeddings must be a bool"):
        mk.MISA(tiny_llama(), dense_embeddings=1)
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoRA model needs mode='finetune' and dense_embeddings=False"):
        mk.MISA(lora, dense_embeddings=True)


def test_score_options_reach_the_sampler():
    opt = mk.MISA(tiny_llama(), score_normalization="raw", score_debias=False)
    assert opt._sampler.normalization == "raw" and opt._scores.debias is False
    with pytest.raises(ValueError, match="score_normalization must be one of"):
        mk.MISA(tiny_llama(), score_normalization="softmax")


def test_finetune_mode_freezes_embeddings_head_and_norms():
    model = tiny_llama()
    before = copy.deepcopy(model)
    opt = mk.MISA(model, lr=1e-2, delta=0.2, inner_steps=2)
    _train(model, opt, 8)
    for (name, p), q in zip(model.named_parameters(), before.parameters()):
        if "layers" not in name or p.dim() == 1:
            assert torch.equal(p, q), name


def test_lr_zero_changes_nothing():
    model = tiny_llama()
    before = copy.deepcopy(model)
    opt = mk.MISA(model, lr=0.0, delta=0.2, inner_steps=2)
    _train(model, opt, 5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))


def test_detach_restores_requires_grad():
    model = tiny_llama()
    flags = [p.requires_grad for p in model.parameters()]
    opt = mk.MISA(model)
    assert sum(p.requires_grad for p in model.parameters()) < len(flags)
    opt.detach()
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_inner_steps_do_not_synchronise_the_host(backend):
    model = tiny_llama(dtype=torch.bfloat16).cuda()
    opt = mk.MISA(model, lr=1e-3, delta=0.1, inner_steps=10, sweep=False, backend=backend)
    batch = {k: v.cuda() for k, v in random_batch().items()}
    for _ in range(3):
        model(**batch).loss.backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.zero_grad()
