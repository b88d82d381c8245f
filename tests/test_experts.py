"""Mixture-of-experts models: every block matrix placed (33 tiny Hugging Face architectures),
experts as modules (slices of the fused 3-D parameters), states and updates only for the
active slices, weight gradients only for active experts, and the scores of an expert from
its own gradient."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import misa_kernels as mk
from arch_configs import ARCHITECTURES, MOE_ARCHITECTURES, tiny_causal_lm
from conftest import assert_runs_agree
from misa_kernels.ops import sparse_linear as sl

VOCAB = 128


def _batch(seed: int, batch: int = 2, seq: int = 16) -> dict:
    ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _misa(model: nn.Module, **overrides) -> mk.MISA:
    kwargs = dict(lr=1e-2, delta=0.3, inner_steps=100, sweep=False, backend="torch", seed=0)
    return mk.MISA(model, **{**kwargs, **overrides})


def _block_matrices(model: nn.Module) -> dict[int, int]:
    """id -> numel of every trainable block parameter with two or more dimensions."""
    _, blocks = mk.find_block_list(model)
    return {id(p): p.numel() for p in blocks.parameters() if p.dim() >= 2 and p.requires_grad}


def _covered(opt: mk.MISA, model: nn.Module) -> tuple[int, dict[int, int]]:
    """Numel of the model's matrices the units cover (fused tensors through their slices),
    in all and per parameter id."""
    ids = {id(p): p for p in model.parameters()}
    storages = {p.untyped_storage().data_ptr(): p for p in ids.values()}
    covered: dict[int, int] = {}
    for unit in opt.units:
        for p in unit.params:
            owner = ids[id(p)] if id(p) in ids else storages[p.untyped_storage().data_ptr()]
            if owner.dim() >= 2:
                covered[id(owner)] = covered.get(id(owner), 0) + p.numel()
    return sum(covered.values()), covered


def _snapshot(opt: mk.MISA) -> dict[str, list[torch.Tensor]]:
    return {u.name: [p.detach().clone() for p in u.params] for u in opt.units}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_modules_cover_every_block_matrix_and_one_step_changes_exactly_the_active(arch):
    torch.set_num_threads(1)
    model = tiny_causal_lm(arch)
    matrices = _block_matrices(model)
    opt = _misa(model)
    total, covered = _covered(opt, model)
    assert set(covered) >= set(matrices) and total == sum(matrices.values())  # 100%, nothing twice
    if arch in MOE_ARCHITECTURES:
        assert any("experts." in u.name and u.name.endswith("]") for u in opt.units)
    assert sum(u.numel for u in opt.units if u.name in opt.active_modules) <= opt.budget
    before = _snapshot(opt)
    model(**_batch(0)).loss.backward()
    with_grad = {u.name for u in opt.units if u.name in opt.active_modules
                 and all(opt.gradient(p) is not None for p in u.params)}
    # an active unit gets no gradient only when no token was routed to that expert
    assert all("experts." in name for name in set(opt.active_modules) - with_grad)
    # (PhiMoE's sparsemixer router passes no gradient to its weight: zero moves nothing)
    with_grad = {n for n in with_grad if any(opt.gradient(p).any() for p in opt_unit_params(opt, n))}
    opt.step()
    changed = {name for name, old in before.items()
               if any(not torch.equal(o, p) for o, p in zip(old, opt_unit_params(opt, name)))}
    assert changed == with_grad and changed


def opt_unit_params(opt: mk.MISA, name: str):
    return next(u.params for u in opt.units if u.name == name)


def test_expert_units_are_named_and_sized_by_slice():
    model = tiny_causal_lm("mixtral")
    layered = _misa(copy.deepcopy(model), granularity="layer", delta=0.6)
    opt = _misa(model)
    experts = model.model.layers[1].mlp.experts
    unit = next(u for u in opt.units if u.name == "model.layers.1.mlp.experts.gate_up_proj[3]")
    assert unit.layer == 1 and unit.numel == experts.gate_up_proj[3].numel()
    assert unit.params[0].data_ptr() == experts.gate_up_proj[3].data_ptr()  # a view, not a copy
    assert "model.layers.1.mlp.experts.down_proj[3]" in opt.scores and "model.layers.1.mlp.gate" in opt.scores
    assert not experts.gate_up_proj.requires_grad  # the fused tensor never gets a gradient
    assert len(layered.units) == 2  # a block's experts go with the rest of the block
    assert all(sum(1 for n in u.module_names if "experts." in n) == 8 for u in layered.units)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "llama4_text", "qwen2_moe"])
@pytest.mark.parametrize("path", ["autograd", "sparse", "step_in_backward"])
def test_expert_slices_train_like_adamw_on_the_fused_tensors(arch, path):
    """The reference is plain AdamW on the model's own parameters, the fused experts
    included, with the gradient of every inactive slice and module masked out: from fresh
    moments a zero gradient moves nothing (weight_decay=0), so only active slices train."""
    torch.set_num_threads(1)
    model = tiny_causal_lm(arch)
    reference = copy.deepcopy(model)
    opt = _misa(model, lr=3e-3, sparse_backward=path == "sparse", step_in_backward=path == "step_in_backward")
    masks = _active_masks(opt, model)
    assert any("experts." in n for n in opt.active_modules)
    ref_params = dict(reference.named_parameters())
    ref_opt = torch.optim.AdamW([ref_params[n] for n in masks], lr=3e-3, weight_decay=0.0)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(4):
        batch = _batch(step, batch=4)
        if path != "step_in_backward":
            model(**batch).loss.backward()
            assert all(opt.gradient(p) is not None for n in opt.active_modules for p in opt_unit_params(opt, n))
        else:
            model(**batch).loss.backward()
        reference(**batch).loss.backward()
        for name, p in ref_params.items():
            if name in masks:
                p.grad.mul_(masks[name])
            else:
                p.grad = None
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    assert opt.inner_step == 4  # one active set throughout
    assert_runs_agree(list(model.parameters()), list(reference.parameters()), lr=3e-3, what=arch)
    for name, p in model.named_parameters():
        frozen = masks[name] == 0 if name in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[frozen], initial[name][frozen]), name  # bit-identical where inactive
    assert any(not torch.equal(p, initial[n]) for n, p in model.named_parameters() if "experts" in n)


def _active_masks(opt: mk.MISA, model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter name -> 0/1 mask of the elements the active units cover."""
    by_storage = {p.untyped_storage().data_ptr(): (name, p) for name, p in model.named_parameters()}
    masks: dict[str, torch.Tensor] = {}
    for unit in opt.active_modules:
        for p in opt_unit_params(opt, unit):
            name, owner = by_storage[p.untyped_storage().data_ptr()]
            mask = masks.setdefault(name, torch.zeros_like(owner))
            offset = p.storage_offset() - owner.storage_offset()
            mask.view(-1)[offset:offset + p.numel()] = 1.0
    return masks


def test_frozen_experts_compute_no_weight_gradient():
    """Sparse backward: one weight-gradient GEMM per active module that received tokens,
    none for a frozen expert; the fused tensors never hold a gradient."""
    model = tiny_causal_lm("mixtral")
    opt = _misa(model, sparse_backward=True, inner_steps=2, delta=0.2)
    routed = [u.name for u in opt.units if "experts." in u.name or u.name.endswith(("proj",))]
    for step in range(6):
        sl.reset_weight_grad_gemm_count()
        model(**_batch(step)).loss.backward()
        expected = [n for n in opt.active_modules if n in routed
                    and opt.gradient(opt_unit_params(opt, n)[0]) is not None]
        assert sl.weight_grad_gemm_count() == len(expected) > 0
        assert sum("experts." in n for n in expected) > 0
        assert all(p.grad is None for n, p in model.named_parameters() if "experts." in n)  # fused: never
        opt.step(), opt.zero_grad()
    assert len({u for u in opt.sample_counts if opt.sample_counts[u]}) < len(opt.units)


def test_expert_scores_come_from_that_experts_gradient():
    """``inner_steps=1``: after one step a unit's score is its ``||g_b||^2 / |b|`` (the EMA
    corrected for its zero start), for an expert the norm of its own slice of the gradient."""
    model = tiny_causal_lm("mixtral")
    reference = copy.deepcopy(model)
    opt = _misa(model, inner_steps=1, delta=0.3)
    active = list(opt.active_modules)
    batch = _batch(0, batch=4)
    model(**batch).loss.backward()
    opt.step()
    reference(**batch).loss.backward()
    grads = dict(reference.named_parameters())
    for name in active:
        if "experts." in name:
            fused, expert = name[:-1].split("[")
            g = grads[fused].grad[int(expert)]
        else:
            g = grads[f"{name}.weight"].grad
        assert opt.scores[name] == pytest.approx(float(g.double().pow(2).sum()) / g.numel(), rel=1e-4), name


def test_a_block_matrix_misa_cannot_place_is_an_error():
    model = tiny_causal_lm("llama")

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Parameter(torch.randn(3, 4, 5))

    model.model.layers[0].mlp.odd = Odd()
    with pytest.raises(ValueError, match=r"cannot place 1 .*model\.layers\.0\.mlp\.odd\.table \[3, 4, 5\].*module_filter"):
        mk.MISA(model, backend="torch")
    model.model.layers[0].mlp.odd.table.requires_grad_(False)  # left out on purpose
    opt = mk.MISA(model, backend="torch")
    assert all("odd" not in u.name for u in opt.units)


def test_module_filter_sees_expert_matrices():
    model = tiny_causal_lm("qwen2_moe")
    opt = _misa(model, module_filter=lambda name, m: "experts.down_proj[" in name, delta=0.5)
    assert {u.name.rsplit(".", 1)[1] for u in opt.units} == {f"down_proj[{e}]" for e in range(4)}
    assert len(opt.units) == 8


def test_states_exist_for_active_slices_only_and_bf16_masters():
    model = tiny_causal_lm("mixtral").to(torch.bfloat16)
    opt = _misa(model, delta=0.2)
    active = [p for n in opt.active_modules for p in opt_unit_params(opt, n)]
    assert {id(p) for p in opt.state if opt.state[p]} == {id(p) for p in active}
    for p in active:
        state = opt.state[p]
        assert state["master"].dtype == torch.float32 and state["master"].shape == p.shape
    report = opt.memory_report()
    assert report["master_weights"] == 4 * sum(p.numel() for p in active)
    assert report["moments"] == 8 * sum(p.numel() for p in active)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(**_batch(1)).loss.backward()
    opt.step()
    masks = _active_masks(opt, model)
    for name, p in model.named_parameters():
        frozen = masks[name] == 0 if name in masks else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(p.detach()[frozen], before[name][frozen])


def test_resume_from_state_dict_is_bit_identical():
    def run(steps, resume_after=None):
        torch.manual_seed(0)
        model = tiny_causal_lm("gpt_oss")
        opt = _misa(model, inner_steps=3, sparse_backward=True)
        for step in range(steps):
            if step == resume_after:
                saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
                opt.detach()
                model = tiny_causal_lm("gpt_oss", seed=1)  # other weights: all must come from the checkpoint
                model.load_state_dict(saved[0])
                opt = _misa(model, inner_steps=3, sparse_backward=True)
                opt.load_state_dict(saved[1])
            model(**_batch(step)).loss.backward()
            opt.step(), opt.zero_grad()
        return [p.detach() for p in model.parameters()], opt.scores

    straight, resumed = run(8), run(8, resume_after=4)
    assert all(torch.equal(a, b) for a, b in zip(straight[0], resumed[0]))
    assert straight[1] == resumed[1]


def test_eval_detach_and_moving_the_model():
    model = tiny_causal_lm("mixtral")
    plain = copy.deepcopy(model).eval()
    opt = _misa(model)
    experts = model.model.layers[0].mlp.experts
    assert "forward" in vars(experts)
    with torch.no_grad():  # the class's own forward on the fused tensors
        torch.testing.assert_close(model.eval()(**_batch(2)).logits, plain(**_batch(2)).logits, rtol=0, atol=0)
    model.train()
    torch.testing.assert_close(model(**_batch(2)).logits, plain.train()(**_batch(2)).logits, rtol=1e-5, atol=1e-6)
    opt.detach()
    assert "forward" not in vars(experts) and experts.gate_up_proj.requires_grad
    opt = _misa(model)
    model.to(torch.float64)  # re-allocates the fused tensors behind the views
    with pytest.raises(RuntimeError, match="re-allocated after MISA was built"):
        model(**{k: v for k, v in _batch(3).items()})


def test_bench_memory_measures_moe_against_full_autograd():
    """bench_memory --moe: MISA's gradients and states cover its active slices only, and
    its per-expert backward saves less than full autograd over the fused experts."""
    from bench.bench_memory import QUICK_MOE, Setup, measure_one
    config = dict(QUICK_MOE, hidden_size=64, intermediate_size=64, num_hidden_layers=2)
    setup = Setup(config, torch.float32, torch.device("cpu"), 2, (32,), measured=1, moe=True)
    full, misa = measure_one("adamw", 32, setup), measure_one("misa-3%", 32, setup)
    n = sum(p.numel() for p in setup.build_model().parameters())
    assert full["gradient_bytes"] == 4 * n and 8 * n <= full["optimizer_bytes"] <= 8 * n + 1024  # + step counts
    assert 0 < misa["optimizer_bytes"] <= 8 * 0.03 * n  # fp32 model: m and v of <= delta n parameters
    assert 0 < misa["gradient_bytes"] <= 4 * 0.03 * n + 64 * 20  # the arena (alignment padding aside)
    assert misa["saved_activation_bytes"] < full["saved_activation_bytes"]


def test_per_expert_linear_layout_makes_each_linear_a_module():
    """The older layout (an ``nn.ModuleList`` of per-expert MLPs) needs no slicing."""
    model = tiny_causal_lm("llama")
    for layer in model.model.layers:
        layer.mlp.experts = nn.ModuleList(nn.Linear(64, 64, bias=False) for _ in range(3))
    opt = _misa(model)
    names = {u.name for u in opt.units}
    assert {f"model.layers.{l}.mlp.experts.{e}" for l in range(2) for e in range(3)} <= names


def test_sampling_heatmap_names_experts():
    from bench.plots import sampling_matrix
    model = tiny_causal_lm("mixtral")
    opt = _misa(model)
    layers, modules, matrix = sampling_matrix(opt.sample_counts)
    assert layers == [0, 1] and "gate_up_proj[3]" in modules and "down_proj[0]" in modules
    assert sum(map(sum, matrix)) == sum(opt.sample_counts.values()) > 0
