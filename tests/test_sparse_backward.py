"""MISA driving the sparse backward (``sparse_backward=True`` / ``step_in_backward=True``):
gradients, saved activations, GEMMs, gradient memory and the model left untouched."""
from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

import misa_kernels as mk
from conftest import enable_checkpointing, random_batch, saved_activation_bytes, tiny_gpt2, tiny_llama
from misa_kernels.ops import sparse_linear as sl

PATHS = {"autograd": {}, "sparse": {"sparse_backward": True}, "step_in_backward": {"step_in_backward": True}}


def _model(arch: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = tiny_llama(dtype=dtype) if arch == "llama" else tiny_gpt2().to(dtype)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # the compared runs must see the same masks
    return model.train()


def _misa(model: nn.Module, path: str, **overrides) -> mk.MISA:
    kwargs = dict(lr=3e-3, delta=0.3, inner_steps=3, backend="torch", seed=0, **PATHS[path])
    return mk.MISA(model, **{**kwargs, **overrides})


def _close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def _unit_params(opt: mk.MISA) -> list[nn.Parameter]:
    return [p for u in opt.units for p in u.params]


def _active_params(opt: mk.MISA, model: nn.Module) -> list[nn.Parameter]:
    return [p for name in opt.active_modules for p in model.get_submodule(name).parameters()]


# ---------------------------------------------------------------------- same training
@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "non_reentrant", "reentrant"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["sparse", "step_in_backward"])
def test_sparse_paths_train_like_autograd(path, arch, checkpointing):
    """fp32: the same active sets, gradients and weights as plain autograd, across switches."""
    reference = _model(arch)
    model = copy.deepcopy(reference)
    ref_opt, opt = _misa(reference, "autograd"), _misa(model, path)
    for module in (reference, model):
        enable_checkpointing(module, checkpointing)
    for step in range(9):
        batch = random_batch(seed=step)
        reference(**batch).loss.backward()
        model(**batch).loss.backward()
        assert opt.active_modules == ref_opt.active_modules
        if path == "sparse":
            for p, q in zip(_active_params(opt, model), _active_params(ref_opt, reference)):
                _close(opt.gradient(p), q.grad, 1e-5)
        ref_opt.step(), opt.step()
        ref_opt.zero_grad(), opt.zero_grad()
    assert len({m for u in ref_opt.units for m in u.module_names if ref_opt.sample_counts[u.name]}) > 2
    assert opt.scores == pytest.approx(ref_opt.scores, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_gradients_accumulate_in_fp32_outside_grad(device):
    """On CUDA this runs the native op's bf16 x bf16 -> fp32 GEMM (addmm out_dtype)."""
    reference = _model("llama", torch.bfloat16).to(device)
    model = copy.deepcopy(reference)
    ref_opt, opt = _misa(reference, "autograd"), _misa(model, "sparse")
    batch = {k: v.to(device) for k, v in random_batch(seed=3).items()}
    reference(**batch).loss.backward()
    model(**batch).loss.backward()
    active, ref_active = _active_params(opt, model), _active_params(ref_opt, reference)
    for p, q in zip(active, ref_active):
        assert p.grad is None and opt.gradient(p).dtype == torch.float32
        _close(opt.gradient(p), q.grad, 2e-2)
    assert opt.memory_report()["gradients"] == 4 * sum(p.numel() for p in active)
    ref_opt.step(), opt.step()
    assert all(opt.gradient(p) is None for p in active)  # given back to the arena by the step
    for p, q in zip(active, ref_active):
        _close(p.detach(), q.detach(), 1e-2)


def test_gradient_accumulation_adds_micro_batches_in_fp32():
    reference = _model("llama")
    model = copy.deepcopy(reference)
    ref_opt, opt = _misa(reference, "autograd"), _misa(model, "sparse")
    for step in range(4):
        for micro in range(2):
            batch = random_batch(seed=10 * step + micro)
            (reference(**batch).loss / 2).backward()
            (model(**batch).loss / 2).backward()
        ref_opt.step(), opt.step()
        ref_opt.zero_grad(), opt.zero_grad()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- clipping
def test_torch_clipping_sees_fp32_buffers():
    """fp32 weights: the buffer is also ``.grad``, so torch's own clipping works."""
    reference = _model("llama")
    model = copy.deepcopy(reference)
    ref_opt, opt = _misa(reference, "autograd"), _misa(model, "sparse")
    for step in range(6):
        batch = random_batch(seed=step)
        norms = []
        for module, optimizer in ((reference, ref_opt), (model, opt)):
            module(**batch).loss.backward()
            norms.append(torch.nn.utils.clip_grad_norm_(module.parameters(), 0.05))
            optimizer.step(), optimizer.zero_grad()
        assert float(norms[0]) > 0.05  # clipping really scaled the step
        torch.testing.assert_close(norms[1], norms[0], rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_misa_clipping_of_bf16_buffers_matches_torch_clipping():
    reference = _model("llama", torch.bfloat16)
    model = copy.deepcopy(reference)
    ref_opt, opt = _misa(reference, "autograd"), _misa(model, "sparse")
    assert ref_opt.active_modules == opt.active_modules  # the same modules get gradients
    batch = random_batch(seed=5)
    reference(**batch).loss.backward()
    model(**batch).loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    norm = opt.clip_grad_norm_(0.05)
    assert float(ref_norm) > 0.05
    torch.testing.assert_close(norm, ref_norm.float(), rtol=2e-2, atol=0)
    clipped = torch.linalg.vector_norm(torch.stack([opt.gradient(p).norm() for p in _active_params(opt, model)]))
    torch.testing.assert_close(clipped, torch.tensor(0.05), rtol=1e-4, atol=0)


# ---------------------------------------------------------------------- saved activations
def _saved_linear_inputs(model: nn.Module, batch: dict, linears: dict[str, nn.Module]) -> dict[str, bool]:
    """Which routed Linear layers kept their input for backward."""
    outputs: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _a, out, name=name: outputs.__setitem__(name, out))
             for name, m in linears.items()]
    model(**batch)
    for hook in hooks:
        hook.remove()
    return {name: out.grad_fn.saved_tensors[0] is not None for name, out in outputs.items()}


@pytest.mark.parametrize("kind", ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"])
def test_activating_one_module_saves_exactly_its_input(kind):
    """Paper Table 15: the extra activation memory of one active module is its input X
    (b*s*h, or b*s*intermediate for the down projection); frozen Linears save no input."""
    model = _model("llama")
    model.enable_input_require_grads()  # frozen layers still build a graph
    target = f"model.layers.1.{kind}"
    opt = mk.MISA(model, delta=1.0, backend="torch", sparse_backward=True,
                  module_filter=lambda name, _m: name == target)
    assert opt.active_modules == [target]
    batch, (b, s) = random_batch(batch=2, seq=16), (2, 16)
    active_bytes = saved_activation_bytes(model, batch)
    target_params = list(model.get_submodule(target).parameters())
    for p in target_params:
        p.requires_grad_(False)
    frozen_bytes = saved_activation_bytes(model, batch)
    for p in target_params:
        p.requires_grad_(True)

    expected = b * s * model.get_submodule(target).in_features * 4
    assert abs((active_bytes - frozen_bytes) - expected) <= 0.05 * expected
    kept = _saved_linear_inputs(model, batch, {target: model.get_submodule(target)})
    assert kept == {target: True}


def test_frozen_modules_save_no_input():
    model = _model("llama")
    model.enable_input_require_grads()
    opt = _misa(model, "sparse", delta=0.1)
    linears = {name: model.get_submodule(name) for u in opt.units for name in u.module_names}
    kept = _saved_linear_inputs(model, random_batch(), linears)
    assert {name for name, saved in kept.items() if saved} == set(opt.active_modules)
    assert len(kept) == len(linears) > len(opt.active_modules)


# ---------------------------------------------------------------------- GEMMs
@pytest.fixture(params=["native", "fallback"])
def linear_ops(request, monkeypatch) -> str:
    if request.param == "fallback":
        monkeypatch.setenv(sl.ENV_NO_EXT, "1")
    elif not sl.native_available():
        pytest.skip("the native extension could not be built here")
    return request.param


@pytest.mark.parametrize("granularity", ["module", "layer"])
def test_weight_gradient_gemms_equal_the_active_modules(linear_ops, granularity):
    model = _model("llama")
    opt = _misa(model, "sparse", delta=0.4, inner_steps=2, granularity=granularity)
    counts, active = [], []
    for step in range(8):
        sl.reset_weight_grad_gemm_count()
        model(**random_batch(seed=step)).loss.backward()
        counts.append(sl.weight_grad_gemm_count())
        active.append(len(opt.active_modules))
        opt.step(), opt.zero_grad()
    assert counts == active
    assert max(active) < len([m for u in opt.units for m in u.module_names])


# ---------------------------------------------------------------------- gradient memory
def _module_bytes(model: nn.Module, names: list[str]) -> list[int]:
    return [4 * sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names]


@pytest.mark.parametrize("path", ["sparse", "step_in_backward"])
def test_gradient_arena_is_fixed_for_an_inner_loop(path):
    """One fp32 arena per active set: the whole set's gradients (step_in_backward: the
    largest module's, reused by each module in turn), at the same address for every step of
    the inner loop, zero between steps, and a new one after a switch."""
    model = _model("llama")
    opt = _misa(model, path, delta=0.4, inner_steps=3, sweep=False)
    backward = opt._backward
    arenas = []
    for step in range(6):
        opt.reset_peak_gradient_bytes()
        model(**random_batch(seed=step)).loss.backward()
        arena = backward.arena
        sizes = _module_bytes(model, opt.active_modules)
        assert len(sizes) >= 2
        expected = max(sizes) if path == "step_in_backward" else sum(sizes)
        assert arena.nbytes == expected  # the tiny model's sizes need no alignment padding
        assert opt.peak_gradient_bytes == backward.live_bytes == arena.nbytes
        arenas.append(arena.flat.data_ptr())
        active = _active_params(opt, model)
        opt.step(), opt.zero_grad()
        assert all(opt.gradient(p) is None for p in active)
        assert not arena.flat.any()  # zeroed for the next backward
        if opt.inner_step:  # held for the inner loop
            assert backward.arena is arena and opt.memory_report()["gradients"] == arena.nbytes
        else:  # a switch: the next backward builds the new set's
            assert backward.arena is None and opt.memory_report()["gradients"] == 0
    assert arenas[0] == arenas[1] == arenas[2] and arenas[3] == arenas[4] == arenas[5]


def test_arena_views_are_disjoint_and_aligned():
    from misa_kernels.grad_arena import ALIGN_ELEMENTS, GradArena
    shapes = {"a": (torch.Size([3, 5]), torch.Size([3])), "b": (torch.Size([7]), None), "c": (torch.Size([0]), None)}
    arena = GradArena(shapes, torch.device("cpu"))
    views = {name: arena.take(name) for name in shapes}
    flat = [v for vs in views.values() for v in vs if v is not None]
    assert [tuple(v.shape) for v in flat] == [(3, 5), (3,), (7,), (0,)]
    assert all(v.storage_offset() % ALIGN_ELEMENTS == 0 for v in flat)
    for i, v in enumerate(flat):
        v.fill_(i + 1.0)
    assert [float(v.sum()) for v in flat] == [15.0, 6.0, 21.0, 0.0]  # nothing overlaps
    arena.give_back("a")
    assert not views["a"][0].any() and views["b"][0].eq(3.0).all()  # partial give-back zeroes its own
    arena.give_back("b"), arena.give_back("c")
    assert not arena.flat.any()
    shared = GradArena(shapes, torch.device("cpu"), shared=True)
    assert shared.take("a") is not None and shared.take("b") is None  # held by "a"
    shared.give_back("a")
    assert shared.take("b")[0].data_ptr() == shared.flat.data_ptr()


def test_step_in_backward_refuses_accumulation_and_clipping():
    model = _model("llama")
    opt = _misa(model, "step_in_backward")
    model(**random_batch(seed=0)).loss.backward()
    with pytest.raises(RuntimeError, match="clip_grad_norm_"):
        opt.clip_grad_norm_(1.0)
    with pytest.raises(RuntimeError, match="gradient accumulation"):
        model(**random_batch(seed=1)).loss.backward()


def test_step_in_backward_needs_linear_modules():
    model = _model("llama")
    embed = lambda name, m: name.endswith("embed_tokens") or name.endswith("q_proj")  # noqa: E731
    with pytest.raises(ValueError, match="step_in_backward.*embed_tokens"):
        mk.MISA(model, step_in_backward=True, module_filter=embed)
    with pytest.raises(TypeError, match="^sparse_backward must be a bool"):
        mk.MISA(model, sparse_backward=1)


# ---------------------------------------------------------------------- no trace on the model
def _instance_forwards(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_eval_saving_and_detach_see_plain_modules(tmp_path, arch):
    model = _model(arch)
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with _misa(model, "sparse") as opt:
        assert _instance_forwards(model)
        for step in range(4):
            model(**random_batch(seed=step)).loss.backward()
            opt.step(), opt.zero_grad()
        assert list(model.state_dict()) == keys
        plain.load_state_dict(model.state_dict())
        batch = random_batch(seed=9)
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, plain.eval()(**batch).logits)
        model.save_pretrained(tmp_path)
        reloaded = type(model).from_pretrained(tmp_path)
        for (name, p), q in zip(model.named_parameters(), reloaded.parameters()):
            assert torch.equal(p, q), name
        model.train()
    assert _instance_forwards(model) == []
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert torch.equal(model(**batch).logits, plain.train()(**batch).logits)


# ---------------------------------------------------------------------- HF Trainer
def _trainer_run(tmp_path, make_opt: Callable[[nn.Module], mk.MISA], **overrides) -> nn.Module:
    from transformers import Trainer, TrainingArguments

    model = _model("llama")
    opt = make_opt(model)
    data = [{"input_ids": ids, "labels": ids} for ids in random_batch(batch=8, seed=7)["input_ids"]]
    args = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[], use_cpu=True,
                save_strategy="no", seed=0, disable_tqdm=True, max_grad_norm=0.05)
    args = TrainingArguments(**{**args, **overrides})
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    return model


@pytest.mark.parametrize("overrides", [{}, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}],
                         ids=["plain", "grad_accumulation"])
def test_hf_trainer_with_sparse_backward_matches_autograd(tmp_path, overrides):
    reference = _trainer_run(tmp_path / "ref", lambda m: _misa(m, "autograd", inner_steps=2), **overrides)
    model = _trainer_run(tmp_path / "sparse", lambda m: _misa(m, "sparse", inner_steps=2), **overrides)
    before = _model("llama")
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
