"""``torch.compile`` with MISA: ``compile_friendly=True`` keeps one graph across switches of
the active set (Dynamo's counters), trains the same parameters as eager, and its custom
ops have working fake implementations."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import misa_kernels as mk
from misa_kernels.ops import static_linear  # noqa: F401  (registers misa::static_linear*)
from misa_kernels.ops.sparse_linear import reset_weight_grad_gemm_count, weight_grad_gemm_count
from conftest import random_batch, tiny_gpt2, tiny_llama

STEPS = 20


def _train(model, opt, steps: int = STEPS, compile_backend=None) -> list[frozenset[str]]:
    run = torch.compile(model, backend=compile_backend) if compile_backend else model
    active = []
    for step in range(steps):
        active.append(frozenset(opt.active_modules))
        loss = run(**random_batch(seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return active


def _compiled_and_eager(make_model, backend: str, **options):
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for compile_backend in (backend, None):
        model = make_model()
        opt = mk.MISA(model, lr=1e-2, delta=0.1, inner_steps=1, compile_friendly=True, **options)
        runs.append((model, _train(model, opt, compile_backend=compile_backend)))
    return runs


@pytest.mark.parametrize("options", [{}, dict(step_in_backward=True)], ids=["step", "step_in_backward"])
def test_switching_the_active_set_compiles_one_graph(options):
    (compiled, active), (eager, eager_active) = _compiled_and_eager(tiny_llama, "aot_eager", **options)
    assert len(set(active)) >= 10, "the active set hardly switched: the test would prove nothing"
    assert active == eager_active
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


def _gpt2_for_inductor():
    """No dropout: inductor draws its own random numbers, so only a dropout-free model can
    match eager; ``loss_type`` set, or transformers' warning about it breaks the graph."""
    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model.loss_type = "ForCausalLM"
    return model


def test_gpt2_conv1d_compiles_one_graph_with_inductor():
    (compiled, active), (eager, eager_active) = _compiled_and_eager(_gpt2_for_inductor, "inductor")
    assert len(set(active)) >= 5  # of GPT-2's 8 modules
    assert active == eager_active
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["graph_break"].values()) == 0
    # Inductor's kernels round differently; Adam turns that into up to ~2e-4 here (as it does
    # for torch's Adam alone); a module trained on wrong gradients is off by ~lr = 1e-2
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3, msg=name)


def test_compile_friendly_matches_the_sparse_backward_and_runs_weight_gemms_for_active_modules_only():
    base = tiny_llama()
    models = [copy.deepcopy(base) for _ in range(2)]
    opts = [mk.MISA(m, lr=1e-2, delta=0.1, inner_steps=2, sparse_backward=True, **extra)
            for m, extra in zip(models, ({}, dict(compile_friendly=True)))]
    assert all(p.requires_grad for n, p in models[1].named_parameters() if "proj" in n)  # nothing toggled
    reset_weight_grad_gemm_count()
    batch = random_batch()
    opts[1].zero_grad()
    models[1](**batch).loss.backward()
    assert weight_grad_gemm_count() == len(opts[1].active_modules)
    frozen = [p for n, p in models[1].named_parameters() if "proj" in n and n.rsplit(".", 1)[0] not in
              opts[1].active_modules]
    assert frozen and all(p.grad is None for p in frozen)
    opts[1].zero_grad()
    for model, opt in zip(models, opts):
        _train(model, opt, steps=8)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(p, q), name


def test_detach_restores_the_frozen_flags_and_the_forwards():
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    opt = mk.MISA(model, compile_friendly=True)
    assert model.model.embed_tokens.weight.requires_grad is False  # non-module parameters are frozen
    opt.detach()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_the_static_ops_pass_torch_library_opcheck():
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64)
    route = static_linear.StaticRoute("probe", mk.ops.sparse_linear.GradSlot("probe"))
    key = static_linear.register(route)
    try:
        token = torch.zeros((), requires_grad=True)
        torch.library.opcheck(torch.ops.misa.static_linear.default, (x, w, b, token, key, False),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
        grad = torch.randn(3, 5, 6, dtype=torch.float64)
        torch.library.opcheck(torch.ops.misa.static_linear_backward.default, (grad, x.detach(), w.detach(), True,
                                                                             key, False, True),
                              test_utils=("test_schema", "test_faketensor"))
        out = torch.ops.misa.static_linear(x, w, b, token, key, False)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b))
        out.sum().backward()
        torch.testing.assert_close(x.grad, torch.ones(3, 5, 6, dtype=torch.float64) @ w.detach())
        assert w.grad is None  # a frozen route: no weight gradient at all
    finally:
        static_linear.unregister(key)


def test_compile_friendly_refuses_fused_experts():
    from arch_configs import tiny_causal_lm

    with pytest.raises(ValueError, match="compile_friendly=True routes nn.Linear/Conv1D modules only"):
        mk.MISA(tiny_causal_lm("mixtral", 0), compile_friendly=True)

