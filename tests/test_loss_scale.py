"""MISA under torch.amp.GradScaler: scores and draws free of the loss scale, the scaler's
skipped steps, and the combinations that cannot work refused.

The scale is a power of two, so a scaled run is the unscaled run times ``S`` exactly: the
two must agree bit for bit."""
from __future__ import annotations

import pytest
import torch

import misa_kernels as mk
from conftest import random_batch, tiny_llama

SCALE = 2.0**14


def _run(scaler: bool, steps: int = 10, unscale: bool = False, clip: str = "", attach: bool = False, **overrides):
    model = tiny_llama(dtype=overrides.pop("dtype", torch.float32))
    opt = mk.MISA(model, **{**dict(lr=1e-2, delta=0.1, inner_steps=2, seed=1, backend="torch"), **overrides})
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=10**6) if scaler else None
    if attach:
        opt.grad_scaler = grad_scaler
    draws = []
    for step in range(steps):
        draws.append(tuple(opt.active_modules))
        loss = model(**random_batch(seed=step)).loss
        (grad_scaler.scale(loss) if scaler else loss).backward()
        if unscale:
            grad_scaler.unscale_(opt)
        if clip == "misa":
            opt.clip_grad_norm_(1e-3)
        elif clip == "torch":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        if scaler:
            grad_scaler.step(opt)
            grad_scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    return model, opt, draws


@pytest.mark.parametrize("overrides", [{}, dict(mode="pretrain"), dict(sparse_backward=True), dict(eta=3.0)])
def test_scores_draws_and_training_do_not_depend_on_the_loss_scale(overrides):
    plain_model, plain, plain_draws = _run(False, **overrides)
    scaled_model, scaled, scaled_draws = _run(True, **overrides)
    assert scaled_draws == plain_draws and len(set(plain_draws)) > 3
    assert scaled.scores == plain.scores
    assert any(s > 0 for s in plain.scores.values())
    for a, b in zip(scaled_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("clip", ["", "misa"])
def test_unscale_then_misa_clipping_keeps_unclipped_unscaled_scores(clip):
    """The AMP recipe (scaler.unscale_, clip, scaler.step) with opt.clip_grad_norm_, or
    unscale_ alone: scores as without a scaler, from the unclipped gradients (the
    scaler's unscale_ changes no version counter, so backward's records cannot tell)."""
    plain_model, plain, plain_draws = _run(False, clip=clip)
    scaled_model, scaled, scaled_draws = _run(True, unscale=True, clip=clip)
    assert scaled_draws == plain_draws
    assert scaled.scores == plain.scores
    for a, b in zip(scaled_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_unscale_then_torch_clipping_with_the_scaler_attached_keeps_unclipped_scores():
    """The HF Trainer's fp16 path (scaler.unscale_, torch's clip_grad_norm_, scaler.step):
    with ``opt.grad_scaler`` set, backward's records are divided by that scaler's S^2."""
    plain_model, plain, plain_draws = _run(False, clip="torch")
    scaled_model, scaled, scaled_draws = _run(True, unscale=True, clip="torch", attach=True)
    assert scaled_draws == plain_draws and scaled.scores == plain.scores
    for a, b in zip(scaled_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_unscale_then_torch_clipping_scores_what_step_sees():
    """Documented limit: after the user's scaler.unscale_ the scaler hands MISA no scale,
    so without ``opt.grad_scaler`` the scores come from the gradients at step(), i.e. after
    torch's clipping. They are still free of the scale (not S^2 times too large)."""
    _, plain, _ = _run(False, steps=1, inner_steps=1, clip="torch")
    _, scaled, _ = _run(True, steps=1, inner_steps=1, unscale=True, clip="torch")
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-2, delta=0.1, inner_steps=1, seed=1, backend="torch")
    model(**random_batch(seed=0)).loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    units = {u.name: u for u in opt.units}
    for name in opt.active_modules:
        clipped = sum(float(p.grad.double().square().sum()) for p in units[name].params) / units[name].numel
        assert scaled.scores[name] == pytest.approx(clipped, rel=1e-4)
        assert plain.scores[name] > 100 * scaled.scores[name]  # without a scaler: unclipped


def test_an_overflowing_step_changes_nothing():
    model = tiny_llama()
    opt = mk.MISA(model, lr=1e-2, delta=0.1, inner_steps=4, sweep=False, backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaler.scale(model(**random_batch(seed=0)).loss).backward()
    scaler.step(opt), scaler.update(), opt.zero_grad()
    before = [p.detach().clone() for p in model.parameters()]
    states = {p: {k: v.clone() for k, v in s.items() if v is not None} for p, s in opt.state.items()}
    scaler.scale(model(**random_batch(seed=1)).loss).backward()
    next(p for p in model.parameters() if p.grad is not None).grad[0, 0] = float("inf")
    scaler.step(opt), scaler.update(), opt.zero_grad()
    assert scaler.get_scale() == SCALE / 2  # the scaler saw the overflow
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for p, saved in states.items():
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())  # step counts included
    assert opt.skipped_steps == 0  # the scaler's skip, not a module's non-finite gradient
    assert opt.inner_step == 2  # the call counts towards T
    scaler.scale(model(**random_batch(seed=2)).loss).backward()
    scaler.step(opt)
    assert {float(s["step"]) for s in opt.state.values()} == {2.0}  # one skipped of three


def test_combinations_that_cannot_be_unscaled_are_refused():
    with pytest.raises(RuntimeError, match="GradScaler with fp16 weights"):
        _run(True, steps=1, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="sparse_backward=True with bf16/fp16 weights"):
        _run(True, steps=1, sparse_backward=True, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="step_in_backward=True .* GradScaler"):
        _run(True, steps=1, step_in_backward=True)
