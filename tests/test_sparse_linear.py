"""Sparse backward for module Linear layers: the native ops (csrc/misa_linear.cpp) and
their PyTorch twin (misa_kernels/ops/sparse_linear.py), each test run on both paths."""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from conftest import enable_checkpointing, random_batch, saved_activation_bytes, tiny_gpt2, tiny_llama
from misa_kernels.ops import linear_ops
from misa_kernels.ops import sparse_linear as sl

LINEAR_NAMES = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}
ACTIVE = {  # a few modules per model, the lowest block included
    "llama": ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
              "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"),
    "gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"),
}


@pytest.fixture(params=["native", "fallback"])
def backend(request, monkeypatch) -> str:
    if request.param == "native":
        monkeypatch.delenv(sl.ENV_NO_EXT, raising=False)
        if not sl.native_available():
            pytest.skip("the native extension could not be built here")
    else:
        monkeypatch.setenv(sl.ENV_NO_EXT, "1")
    sl.reset_weight_grad_gemm_count()
    return request.param


# ---------------------------------------------------------------------- helpers
def _tol(dtype: torch.dtype) -> float:
    return 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-6


def _assert_close(actual: Tensor, expected: Tensor, rtol: float) -> None:
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def _make_model(arch: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = tiny_llama(dtype=dtype) if arch == "llama" else tiny_gpt2().to(dtype)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # routed and reference runs must see the same masks
    return model.train()


def _linears(model: nn.Module, arch: str) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if name.rsplit(".", 1)[-1] in LINEAR_NAMES[arch] and isinstance(m, (nn.Linear, Conv1D))}


def _set_active(model: nn.Module, arch: str, active: tuple[str, ...]) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for name, module in _linears(model, arch).items():
        if name in active:
            for param in module.parameters():
                param.requires_grad_(True)


def _slots(model: nn.Module, arch: str, active: tuple[str, ...], on_ready=None) -> dict[str, sl.GradSlot]:
    slots = {}
    for name, module in _linears(model, arch).items():
        slots[name] = sl.GradSlot(key=name, on_grad_ready=on_ready)
        if name in active:
            slots[name].allocate(module.weight, module.bias)
    return slots


def _embedding_grad_probe(model: nn.Module) -> list[Tensor]:
    """Makes the embedding output require grad (so frozen stacks still build a graph) and
    collects it, to compare the input gradient that reaches the bottom of the model."""
    model.enable_input_require_grads()
    captured: list[Tensor] = []

    def keep(_module, _args, output):
        output.retain_grad()
        captured.append(output)

    model.get_input_embeddings().register_forward_hook(keep)
    return captured


# ---------------------------------------------------------------------- op level
SHAPES = [((2, 5, 16), 12), ((7, 16), 12), ((3, 7, 13), 11), ("noncontiguous", 11)]


def _input(shape, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    if shape == "noncontiguous":
        x = torch.randn(13, 7, 3, generator=generator).permute(2, 1, 0)  # (3, 7, 13), strided
        assert not x.is_contiguous()
        return x.to(dtype)
    return torch.randn(*shape, generator=generator).to(dtype)


def _params(n_in: int, n_out: int, transposed: bool, dtype, generator) -> tuple[Tensor, Tensor]:
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    return torch.randn(*shape, generator=generator).to(dtype), torch.randn(n_out, generator=generator).to(dtype)


def _reference(x, weight, bias, grads, transposed):
    """Autograd through F.linear (Linear) or HF Conv1D's addmm, for each micro-batch."""
    x = x.detach().requires_grad_()
    weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
    x_grads = []
    for grad in grads:
        out = (torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)
               if transposed else F.linear(x, weight, bias))
        out.backward(grad.to(out.dtype))
        x_grads.append(x.grad.clone())
        x.grad = None
    return x_grads, weight.grad, bias.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("shape,n_out", SHAPES, ids=["3d", "2d", "odd", "noncontiguous"])
def test_op_matches_autograd(backend, shape, n_out, transposed, dtype):
    generator = torch.Generator().manual_seed(0)
    x = _input(shape, dtype, generator)
    weight, bias = _params(x.shape[-1], n_out, transposed, dtype, generator)
    grads = [torch.randn(*x.shape[:-1], n_out, generator=generator).to(dtype) for _ in range(2)]
    ref_dx, _, _ = _reference(x, weight, bias, grads, transposed)
    _, ref_dw, ref_db = _reference(x.double(), weight.double(), bias.double(), grads, transposed)

    weight, bias = nn.Parameter(weight), nn.Parameter(bias)
    slot = sl.GradSlot("m")
    slot.allocate(weight, bias)
    for grad, expected_dx in zip(grads, ref_dx):
        xi = x.detach().requires_grad_()
        sl.sparse_linear(xi, weight, bias, slot, transposed).backward(grad)
        _assert_close(xi.grad, expected_dx, _tol(dtype))
    assert weight.grad is None and bias.grad is None
    _assert_close(slot.weight_buffer, ref_dw, 1e-5)  # two micro-batches, summed in fp32
    _assert_close(slot.bias_buffer, ref_db, 1e-5)
    assert sl.weight_grad_gemm_count() == 2


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_frozen_weight_saves_no_input_and_runs_no_weight_gemm(backend, transposed):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 16, generator=generator, requires_grad=True)
    weight, bias = _params(16, 12, transposed, torch.float32, generator)
    out = sl.sparse_linear(x, weight, bias, sl.GradSlot("frozen"), transposed)
    saved_x, saved_w = out.grad_fn.saved_tensors
    assert saved_x is None and saved_w is weight
    grad = torch.randn(out.shape, generator=generator)
    out.backward(grad)
    _assert_close(x.grad, _reference(x, weight, bias, [grad], transposed)[0][0], 1e-6)
    assert sl.weight_grad_gemm_count() == 0


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_active_weight_without_input_grad_or_buffer(backend, transposed):
    """No input grad: W is not saved and dX not computed. No buffer: ordinary ``.grad``."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 16, generator=generator)
    weight, bias = (nn.Parameter(t) for t in _params(16, 12, transposed, torch.float32, generator))
    out = sl.sparse_linear(x, weight, bias, sl.GradSlot("plain"), transposed)
    saved_x, saved_w = out.grad_fn.saved_tensors
    assert saved_w is None and saved_x.data_ptr() == x.data_ptr()
    grad = torch.randn(out.shape, generator=generator)
    out.backward(grad)
    _, ref_dw, ref_db = _reference(x, weight, bias, [grad], transposed)
    _assert_close(weight.grad, ref_dw, 1e-6)
    _assert_close(bias.grad, ref_db, 1e-6)
    assert weight.grad.is_contiguous()


def test_native_and_fallback_agree_bitwise(monkeypatch):
    monkeypatch.delenv(sl.ENV_NO_EXT, raising=False)
    if not sl.native_available():
        pytest.skip("the native extension could not be built here")
    generator = torch.Generator().manual_seed(3)
    dy = torch.randn(4, 9, 12, generator=generator).bfloat16()
    x = torch.randn(4, 9, 16, generator=generator).bfloat16()
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv(sl.ENV_NO_EXT, flag)
        buffers = torch.zeros(12, 16), torch.zeros(12)
        sl.linear_weight_grad_accumulate_(buffers[0], dy, x, buffers[1])
        results.append(buffers + (sl.linear_input_grad(dy, x.reshape(-1, 16)[:12]),))
    for native, fallback in zip(*results):
        assert torch.equal(native, fallback)


def test_accumulate_rejects_low_precision_buffer(backend):
    with pytest.raises((TypeError, RuntimeError), match="float32"):
        sl.linear_weight_grad_accumulate_(torch.zeros(3, 4, dtype=torch.bfloat16), torch.randn(5, 3),
                                          torch.randn(5, 4))


# ---------------------------------------------------------------------- model level
def _train_micro_batches(model, batches):
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_buffers_match_autograd(backend, arch, checkpointing):
    model = _make_model(arch)
    active = ACTIVE[arch]
    _set_active(model, arch, active)
    reference = copy.deepcopy(model)
    ref_probe, probe = _embedding_grad_probe(reference), _embedding_grad_probe(model)
    batches = [random_batch(seed=1), random_batch(seed=2)]
    ref_losses = _train_micro_batches(reference, batches[:1])
    ref_first = {name: m.weight.grad.clone() for name, m in _linears(reference, arch).items() if name in active}
    ref_losses += _train_micro_batches(reference, batches[1:])

    ready: list[tuple[str, Tensor]] = []
    slots = _slots(model, arch, active, on_ready=lambda key: ready.append((key, slots[key].weight_buffer.clone())))
    enable_checkpointing(model, None if checkpointing is None else checkpointing == "reentrant")
    with sl.route_linears(_linears(model, arch), slots):
        losses = [_train_micro_batches(model, batches[:1])[0]]
        # GEMM count and callbacks: once per active module per backward, buffer complete.
        assert sl.weight_grad_gemm_count() == len(active)
        assert sorted(key for key, _ in ready) == sorted(active)
        for key, snapshot in ready:
            _assert_close(snapshot, ref_first[key], 1e-5)
        losses += _train_micro_batches(model, batches[1:])
    assert sl.weight_grad_gemm_count() == 2 * len(active)
    assert len(ready) == 2 * len(active)

    for loss, ref_loss in zip(losses, ref_losses):
        assert torch.equal(loss, ref_loss)
    for x, ref_x in zip(probe, ref_probe):
        _assert_close(x.grad, ref_x.grad, 1e-5)
    for name, module in _linears(reference, arch).items():
        routed = _linears(model, arch)[name]
        assert routed.weight.grad is None
        if name in active:
            _assert_close(slots[name].weight_buffer, module.weight.grad, 1e-5)
            if module.bias is not None:
                _assert_close(slots[name].bias_buffer, module.bias.grad, 1e-5)
        else:
            assert slots[name].weight_buffer is None and module.weight.grad is None


def test_model_bf16_under_autocast(backend):
    """CPU autocast: the routed Linear casts like F.linear; fp32 buffers vs autograd's grads."""
    model, arch = _make_model("llama"), "llama"
    active = ACTIVE[arch][:2]
    _set_active(model, arch, active)
    reference = copy.deepcopy(model)
    batch = random_batch(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = reference(**batch).loss
    ref_loss.backward()
    slots = _slots(model, arch, active)
    with sl.route_linears(_linears(model, arch), slots), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    assert torch.equal(loss, ref_loss)
    for name in active:
        _assert_close(slots[name].weight_buffer, _linears(reference, arch)[name].weight.grad, 1e-2)


# ---------------------------------------------------------------------- saved activations
def _frozen_llama(active: tuple[str, ...] = ()) -> nn.Module:
    model = _make_model("llama")
    _set_active(model, "llama", active)
    model.enable_input_require_grads()  # a graph even when every module is frozen
    return model


@pytest.mark.parametrize("kind", LINEAR_NAMES["llama"])
def test_one_active_module_saves_exactly_its_input(backend, kind):
    """Table 15: activating a module costs its input X, bsh (4bsh-like for W_2: b*s*inter)."""
    batch = random_batch(batch=2, seq=16)
    name = f"model.layers.1.{'mlp' if kind in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{kind}"

    def measure(active: tuple[str, ...], routed: bool) -> int:
        model = _frozen_llama(active)
        if not routed:
            return saved_activation_bytes(model, batch)
        with sl.route_linears(_linears(model, "llama"), _slots(model, "llama", active)):
            return saved_activation_bytes(model, batch)

    frozen, one = measure((), True), measure((name,), True)
    module = _linears(tiny_llama(), "llama")[name]
    expected = 2 * 16 * module.in_features * 4  # b * s * in_features fp32 elements
    assert abs((one - frozen) - expected) <= 0.05 * expected
    # Eager autograd already skips X for a frozen Linear: routing must match it exactly.
    assert frozen == measure((), False) and one == measure((name,), False)


def test_all_frozen_routed_linears_save_no_input(backend):
    model = _frozen_llama()
    outputs: list[tuple[Tensor, Tensor]] = []
    linears = _linears(model, "llama")
    handles = [m.register_forward_hook(lambda _m, args, out: outputs.append((args[0], out))) for m in linears.values()]
    with sl.route_linears(linears, _slots(model, "llama", ())):
        model(**random_batch())
    for handle in handles:
        handle.remove()
    assert len(outputs) == len(linears)
    params = {id(p) for p in model.parameters()}
    for inputs, out in outputs:
        assert type(out.grad_fn).__name__ == "SparseLinearFunctionBackward"
        saved_x, saved_w = out.grad_fn.saved_tensors
        assert saved_x is None and id(saved_w) in params
        assert saved_w.data_ptr() != inputs.data_ptr()


# ---------------------------------------------------------------------- routing
def _module_snapshot(model: nn.Module) -> dict[str, tuple]:
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_forward_hooks_with_kwargs", "_state_dict_hooks", "_load_state_dict_pre_hooks")
    return {name: (sorted(m.__dict__), tuple(len(getattr(m, h)) for h in hook_dicts))
            for name, m in model.named_modules()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_route_and_remove_leave_no_trace(backend, arch):
    model = _make_model(arch)
    _set_active(model, arch, ACTIVE[arch])
    plain = copy.deepcopy(model)
    batch = random_batch(seed=5)
    before = _module_snapshot(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters()}
    out_before = model(**batch).logits.detach()

    handle = sl.route_linears(_linears(model, arch), _slots(model, arch, ACTIVE[arch]))
    assert torch.equal(model(**batch).logits, out_before)  # routed training forward, bit-identical
    model(**batch).loss.backward()
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain.eval()(**batch).logits)
    model.train()
    with pytest.raises(TypeError, match="instance-level forward"):
        sl.route_linears(_linears(model, arch))
    handle.remove()
    handle.remove()  # idempotent

    assert _module_snapshot(model) == before
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(p is params[name] for name, p in model.named_parameters())
    assert torch.equal(model(**batch).logits, out_before)


def test_route_rejects_unsupported_modules():
    class Custom(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(TypeError, match="Custom"):
        sl.route_linears({"c": Custom(2, 2)})
    with pytest.raises(TypeError, match="Conv2d"):
        sl.route_linears({"c": nn.Conv2d(1, 1, 1)})
    with pytest.raises(ValueError, match="no module"):
        sl.route_linears({"a": nn.Linear(2, 2)}, {"b": sl.GradSlot("b")})


def test_slot_switching_needs_no_rerouting(backend):
    """Activation is driven by requires_grad and the slot, with routing left in place."""
    model = _make_model("llama")
    _set_active(model, "llama", ())
    model.enable_input_require_grads()
    linears = _linears(model, "llama")
    name = ACTIVE["llama"][1]
    module = linears[name]
    with sl.route_linears(linears) as handle:
        for active in (True, False, True):
            module.weight.requires_grad_(active)
            if active:
                handle.slots[name].allocate(module.weight)
            else:
                handle.slots[name].release()
            sl.reset_weight_grad_gemm_count()
            model(**random_batch()).loss.backward()
            assert sl.weight_grad_gemm_count() == int(active)
            assert module.weight.grad is None


# ---------------------------------------------------------------------- loading
def test_fallback_warns_once_when_build_fails(monkeypatch):
    monkeypatch.delenv(sl.ENV_NO_EXT, raising=False)
    monkeypatch.setattr(linear_ops, "_native_loaded", None)
    monkeypatch.setattr(linear_ops, "_ops_registered", lambda: False)

    def broken_build():
        raise RuntimeError("no compiler")

    monkeypatch.setattr(linear_ops, "_build", broken_build)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert sl.native_available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sl.native_available() is False
        x = torch.randn(3, 4, requires_grad=True)
        sl.sparse_linear(x, torch.randn(5, 4)).sum().backward()
    assert x.grad is not None


def test_fake_implementations_let_torch_compile_trace_the_ops(monkeypatch):
    """torch.library.opcheck (schema, fake tensors, aot dispatch) on every native op, in fp32
    and bf16, and a traced graph (aot_eager) that runs the real op."""
    monkeypatch.delenv(sl.ENV_NO_EXT, raising=False)
    if not sl.native_available():
        pytest.skip("the native extension could not be built here")
    generator = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        dy, x = torch.randn(3, 5, 6, generator=generator).to(dtype), torch.randn(3, 5, 4, generator=generator).to(dtype)
        torch.library.opcheck(torch.ops.misa.linear_weight_grad.default, (dy, x))
        torch.library.opcheck(torch.ops.misa.linear_weight_grad_accumulate_.default,
                              (torch.zeros(6, 4), dy, x, torch.zeros(6)))
        torch.library.opcheck(torch.ops.misa.linear_input_grad.default, (dy, torch.randn(6, 4).to(dtype)))

    def accumulate(buffer, bias, dy, x):
        torch.ops.misa.linear_weight_grad_accumulate_(buffer, dy, x, bias)
        return torch.ops.misa.linear_weight_grad(dy, x)

    dy, x = torch.randn(2, 7, 6, generator=generator), torch.randn(2, 7, 4, generator=generator)
    eager, traced = (torch.zeros(6, 4), torch.zeros(6)), (torch.zeros(6, 4), torch.zeros(6))
    expected = accumulate(*eager, dy, x)
    got = torch.compile(accumulate, backend="aot_eager", fullgraph=True)(*traced, dy, x)
    torch.testing.assert_close(got, expected)
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_fp32_output_gemm_into_a_transposed_buffer(monkeypatch, dtype):
    """The native CUDA path (addmm with out_dtype into the fp32 buffer) against the twin,
    into GPT-2 Conv1D's layout: an (in, out) buffer seen (out, in) through a transposed,
    non-contiguous view."""
    monkeypatch.delenv(sl.ENV_NO_EXT, raising=False)
    if not sl.native_available():
        pytest.skip("the native extension could not be built here")
    generator = torch.Generator().manual_seed(11)
    dy = torch.randn(4, 33, 48, generator=generator).to(dtype).cuda()
    x = torch.randn(4, 33, 40, generator=generator).to(dtype).cuda()
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv(sl.ENV_NO_EXT, flag)
        storage = torch.full((40, 48), 0.5, device="cuda")  # Conv1D: (in, out)
        bias = torch.full((48,), 0.25, device="cuda")
        view = storage.t()
        assert not view.is_contiguous()
        sl.linear_weight_grad_accumulate_(view, dy, x, bias)
        results.append((storage, bias))
    exact = 0.5 + (dy.double().reshape(-1, 48).t() @ x.double().reshape(-1, 40)).t()
    for native, twin in zip(*results):
        torch.testing.assert_close(native, twin, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(results[0][0].double(), exact, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("version, device, dtype, noted", [
    ("2.8.1+cu128", "cuda", torch.bfloat16, True), ("2.9.0", "cuda", torch.bfloat16, False),
    ("2.4.0", "cuda", torch.float32, False), ("2.4.0", "cpu", torch.bfloat16, False),
])
def test_the_supported_torch_range_of_the_fp32_output_gemm(monkeypatch, version, device, dtype, noted):
    monkeypatch.setattr(torch, "__version__", version)
    note = linear_ops.low_precision_gemm_note(torch.device(device), dtype)
    assert (note is not None) == noted
    assert note is None or "upcasts dY and X to fp32" in note


def test_env_var_forces_fallback(monkeypatch):
    monkeypatch.setenv(sl.ENV_NO_EXT, "1")
    assert sl.native_available() is False


def test_import_does_not_build_the_extension():
    code = ("import misa_kernels, misa_kernels.ops.linear_ops as s, torch; "
            "assert s._native_loaded is None; "
            "assert not hasattr(torch.ops.misa, 'linear_weight_grad_accumulate_')")
    subprocess.run([sys.executable, "-c", code], check=True)
