"""The fused Triton kernels against their plain-PyTorch twin.

Without CUDA the kernels run on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``),
so sizes stay small. Triton reads the variable when ``@triton.jit`` decorates the kernels,
i.e. when ``misa_kernels.ops.triton_adam`` is imported; if another test module imported it
first, it is reloaded here.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from dataclasses import dataclass, fields  # noqa: E402
from typing import Optional  # noqa: E402

import pytest  # noqa: E402
import triton  # noqa: E402

from misa_kernels.ops import torch_adam as twin  # noqa: E402
from misa_kernels.ops import triton_adam as fused  # noqa: E402
from misa_kernels.ops import triton_kernels  # noqa: E402

if triton_kernels.INTERPRET != bool(triton.knobs.runtime.interpret):
    importlib.reload(triton_kernels)
    fused = importlib.reload(fused)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
SHAPES = [(1,), (7,), (1003,), (13, 17), (0,), (64, 65)]
LOW = (torch.bfloat16, torch.float16)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass
class State:
    """The operands of one update, one entry per tensor of the active set."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    masters: list[Optional[torch.Tensor]]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]

    def clone(self) -> "State":
        return State(*([None if t is None else t.clone() for t in getattr(self, f.name)]
                       for f in fields(self)))

    def momentum_args(self) -> tuple:
        return self.params, self.masters, self.exp_avgs, self.exp_avg_sqs


def make_state(shapes, param_dtypes, grad_dtypes, seed=0) -> State:
    """Random non-zero operands; low-precision params get an fp32 master equal to them."""
    gen = torch.Generator().manual_seed(seed)
    state = State([], [], [], [], [])
    for shape, pdt, gdt in zip(shapes, param_dtypes, grad_dtypes):
        weight = torch.randn(shape, generator=gen).to(pdt)
        state.params.append(weight.to(DEVICE))
        state.masters.append(weight.float().to(DEVICE) if pdt in LOW else None)
        state.grads.append(torch.randn(shape, generator=gen).to(gdt).to(DEVICE))
        state.exp_avgs.append((0.1 * torch.randn(shape, generator=gen)).to(DEVICE))
        state.exp_avg_sqs.append((0.01 * torch.rand(shape, generator=gen) + 1e-4).to(DEVICE))
    return state


def new_grads(state: State, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for i, g in enumerate(state.grads):
        state.grads[i] = torch.randn(g.shape, generator=gen).to(g.dtype).to(DEVICE)


def assert_states_close(ours: State, ref: State) -> None:
    """fp32 weights and moments to ~1e-6 relative; a low-precision param is exactly its
    master rounded (the twin's master may differ by an ulp, so its rounding could too)."""
    for i, (p, m) in enumerate(zip(ours.params, ours.masters)):
        weight, ref_weight = (p, ref.params[i]) if m is None else (m, ref.masters[i])
        torch.testing.assert_close(weight, ref_weight, rtol=1e-6, atol=1e-7,
                                   msg=lambda s: f"weight {i}: {s}")
        if m is not None:
            torch.testing.assert_close(p, m.to(p.dtype), rtol=0, atol=0,
                                       msg=lambda s: f"param {i}: {s}")
    # m's atol: (1 - beta1) (g - m) is rounded at |g| ~ 1, i.e. ~1e-8 absolute.
    for name, atol in (("exp_avgs", 5e-8), ("exp_avg_sqs", 1e-12)):
        for i, (a, b) in enumerate(zip(getattr(ours, name), getattr(ref, name))):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=atol,
                                       msg=lambda s: f"{name}[{i}]: {s}")


def no_skip(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.bool, device=DEVICE)


def run_adam(state: State, impl, skip, step: int, weight_decay: float = 0.1) -> None:
    impl.adam_update_(state.params, state.grads, state.masters, state.exp_avgs,
                      state.exp_avg_sqs, skip, step=step, weight_decay=weight_decay, **HYPER)


def run_momentum(state: State, impl, step: int) -> None:
    impl.momentum_step_(*state.momentum_args(), step=step, **HYPER)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 32 elements, so that small tensors span many tiles and table rows."""
    monkeypatch.setattr(fused, "_BLOCK", 32)


# --------------------------------------------------------------------------- adam_update_


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_adam_update_matches_twin_over_steps(param_dtype, grad_dtype):
    n = len(SHAPES)
    ours = make_state(SHAPES, [param_dtype] * n, [grad_dtype] * n)
    ref = ours.clone()
    for step in (1, 2, 5):
        new_grads(ours, seed=step)
        ref.grads = [g.clone() for g in ours.grads]
        run_adam(ours, fused, no_skip(n), step)
        run_adam(ref, twin, no_skip(n), step)
        assert_states_close(ours, ref)


def test_adam_update_mixed_dtypes_in_one_call():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    pdts = [f32, bf16, f16, bf16, f32, f16]
    gdts = [bf16, f32, bf16, bf16, f32, f16]
    ours = make_state(SHAPES, pdts, gdts, seed=3)
    # A contiguous view at a 4-byte offset: the kernels must drop their alignment hint.
    storage = torch.randn(1 + 1003, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    ours.params[2], ours.masters[2] = storage[1:], None
    ref = ours.clone()
    run_adam(ours, fused, no_skip(len(SHAPES)), step=3, weight_decay=0.01)
    run_adam(ref, twin, no_skip(len(SHAPES)), step=3, weight_decay=0.01)
    assert_states_close(ours, ref)


def test_low_precision_param_without_master_is_updated_in_place():
    n = len(SHAPES)
    ours = make_state(SHAPES, [torch.bfloat16] * n, [torch.bfloat16] * n, seed=12)
    ours.masters = [None] * n
    ref = ours.clone()
    run_adam(ours, fused, no_skip(n), step=2)
    run_adam(ref, twin, no_skip(n), step=2)
    for a, b in zip(ours.params, ref.params):  # the twin rounds one more time: bf16 tolerance
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-5)
    for a, b in zip(ours.exp_avg_sqs, ref.exp_avg_sqs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_skipped_nonfinite_tensor_is_bit_unchanged(param_dtype):
    n = len(SHAPES)
    ours = make_state(SHAPES, [param_dtype] * n, [torch.bfloat16] * n, seed=4)
    ours.grads[3][2, 5] = float("inf")
    ours.grads[3][0, 0] = float("nan")
    before = ours.clone()
    ref = ours.clone()
    norms = fused.squared_norms_(ours.grads, torch.empty(n, device=DEVICE))
    skip = ~torch.isfinite(norms)  # decided on the device, as the optimizer does
    run_adam(ours, fused, skip, step=2)
    run_adam(ref, twin, skip, step=2)
    for name in ("params", "masters", "exp_avgs", "exp_avg_sqs"):
        kept, orig = getattr(ours, name)[3], getattr(before, name)[3]
        assert kept is None or torch.equal(kept, orig), name
    for state in (ours, ref):
        for name in ("params", "grads", "masters", "exp_avgs", "exp_avg_sqs"):
            del getattr(state, name)[3]
    assert_states_close(ours, ref)


def test_many_tensors_span_many_tiles(small_tiles):
    gen = torch.Generator().manual_seed(5)
    shapes = [(int(k),) for k in torch.randint(0, 300, (40,), generator=gen)] + [(9, 31)]
    n = len(shapes)
    ours = make_state(shapes, [torch.bfloat16] * n, [torch.float32] * n, seed=5)
    ref = ours.clone()
    skip = torch.arange(n, device=DEVICE) % 7 == 3
    run_adam(ours, fused, skip, step=1)
    run_adam(ref, twin, skip, step=1)
    assert_states_close(ours, ref)
    run_momentum(ours, fused, step=1)
    run_momentum(ref, twin, step=1)
    assert_states_close(ours, ref)
    out, ref_out = torch.empty(n, device=DEVICE), torch.empty(n, device=DEVICE)
    fused.squared_norms_(ours.grads, out)
    twin.squared_norms_(ours.grads, ref_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=0)


def test_adam_update_copies_noncontiguous_grads():
    ours = make_state([(17, 13), (5, 6)], [torch.float32, torch.bfloat16], [torch.float32] * 2)
    gen = torch.Generator().manual_seed(13)
    ours.grads[0] = torch.randn(13, 17, generator=gen).to(DEVICE).t()
    ours.grads[1] = torch.randn(5, 12, generator=gen).to(torch.bfloat16).to(DEVICE)[:, ::2]
    assert not any(g.is_contiguous() for g in ours.grads)
    ref = ours.clone()
    ref.grads = list(ours.grads)
    run_adam(ours, fused, no_skip(2), step=2)
    run_adam(ref, twin, no_skip(2), step=2)
    assert_states_close(ours, ref)


@pytest.mark.parametrize("name", ["params", "masters", "exp_avgs", "exp_avg_sqs"])
def test_noncontiguous_updated_tensor_is_refused(name):
    state = make_state([(4,), (6, 4)], [torch.bfloat16] * 2, [torch.float32] * 2)
    tensors = getattr(state, name)
    tensors[1] = tensors[1].t().contiguous().t()
    with pytest.raises(ValueError, match=rf"{name}\[1\] is not contiguous"):
        run_adam(state, fused, no_skip(2), step=1)


def test_invalid_arguments_are_refused():
    state = make_state([(4,), (5,)], [torch.float32] * 2, [torch.float32] * 2)
    with pytest.raises(ValueError, match="same length"):
        fused.adam_update_(state.params, state.grads[:1], state.masters, state.exp_avgs,
                           state.exp_avg_sqs, no_skip(2), step=1, weight_decay=0.0, **HYPER)
    with pytest.raises(ValueError, match="skip has 3 entries"):
        run_adam(state, fused, no_skip(3), step=1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        run_adam(state, fused, no_skip(2), step=0)
    with pytest.raises(ValueError, match="params\\[0\\] has dtype torch.float64"):
        fused.momentum_step_([state.params[0].double()], [None], state.exp_avgs[:1],
                             state.exp_avg_sqs[:1], step=1, **HYPER)
    exp_avg = state.exp_avgs[1]
    state.exp_avgs[1] = exp_avg.to(torch.bfloat16)
    with pytest.raises(ValueError, match="exp_avgs\\[1\\] has dtype"):
        run_adam(state, fused, no_skip(2), step=1)
    state.exp_avgs[1] = exp_avg
    state.grads[0] = state.grads[0][:3]
    with pytest.raises(ValueError, match="grads\\[0\\] has shape"):
        run_adam(state, fused, no_skip(2), step=1)


def test_empty_lists_are_a_no_op():
    fused.adam_update_([], [], [], [], [], no_skip(0), step=1, weight_decay=0.0, **HYPER)
    fused.momentum_step_([], [], [], [], step=1, **HYPER)
    out = torch.empty(0, device=DEVICE)
    assert fused.squared_norms_([], out) is out


# --------------------------------------------------------------------------- momentum_step_


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("step", [1, 5])
def test_momentum_step_matches_twin(param_dtype, step):
    n = len(SHAPES)
    ours = make_state(SHAPES, [param_dtype] * n, [torch.float32] * n, seed=6)
    ref = ours.clone()
    run_momentum(ours, fused, step)
    run_momentum(ref, twin, step)
    assert_states_close(ours, ref)


# --------------------------------------------------------------------------- per-tensor step counts


def _one_by_one(state: State, steps: list, run) -> None:
    """The twin called once per tensor with that tensor's own int step: the reference."""
    for i, t in enumerate(steps):
        single = State(*([getattr(state, f.name)[i]] for f in fields(state)))
        run(single, t)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_per_tensor_steps_match_one_call_per_tensor(param_dtype):
    """A device tensor of step counts gives each tensor its own bias corrections."""
    n = len(SHAPES)
    steps = [3, 1, 7, 2, 1, 12]
    ours = make_state(SHAPES, [param_dtype] * n, [torch.bfloat16] * n, seed=15)
    twin_state, ref = ours.clone(), ours.clone()
    counts = torch.tensor(steps, dtype=torch.float32, device=DEVICE)
    run_adam(ours, fused, no_skip(n), counts)
    run_adam(twin_state, twin, no_skip(n), counts)
    _one_by_one(ref, steps, lambda single, t: run_adam(single, twin, no_skip(1), t))
    assert_states_close(ours, ref)
    assert_states_close(twin_state, ref)
    run_momentum(ours, fused, counts)
    run_momentum(twin_state, twin, counts)
    _one_by_one(ref, steps, lambda single, t: run_momentum(single, twin, t))
    assert_states_close(ours, ref)
    assert_states_close(twin_state, ref)


def test_per_tensor_steps_below_one_stay_finite():
    """A tensor skipped since its activation has count 0; its (zero) moments move nothing."""
    n = 2
    state = make_state([(5,), (3, 4)], [torch.float32] * n, [torch.float32] * n, seed=16)
    for impl in (fused, twin):
        run = state.clone()
        run.exp_avgs = [torch.zeros_like(m) for m in run.exp_avgs]
        before = run.clone()
        impl.momentum_step_(*run.momentum_args(), step=torch.zeros(n, device=DEVICE), **HYPER)
        for a, b in zip(run.params, before.params):
            assert torch.equal(a, b)


@pytest.mark.parametrize("coefficient", [None, 0.9 / (1 - 0.9)])
def test_momentum_coefficient(coefficient):
    """``coefficient`` c scales the extra step: theta - lr c m_hat / (sqrt(v_hat) + eps)."""
    n = len(SHAPES)
    ours = make_state(SHAPES, [torch.float32] * n, [torch.float32] * n, seed=17)
    ref = ours.clone()
    fused.momentum_step_(*ours.momentum_args(), step=4, coefficient=coefficient, **HYPER)
    c = HYPER["beta1"] if coefficient is None else coefficient
    for w, m, v in zip(ref.params, ref.exp_avgs, ref.exp_avg_sqs):  # written out in fp64
        bc1, bc2 = 1 - HYPER["beta1"] ** 4, 1 - HYPER["beta2"] ** 4
        step = HYPER["lr"] * c * (m.double() / bc1) / ((v.double() / bc2).sqrt() + HYPER["eps"])
        w.copy_(w.double() - step)
    assert_states_close(ours, ref)


def test_step_tensor_of_the_wrong_length_is_refused():
    state = make_state([(4,), (5,)], [torch.float32] * 2, [torch.float32] * 2)
    for impl in (fused, twin):
        with pytest.raises(ValueError, match="step has 3 entries for 2 tensors"):
            run_adam(state, impl, no_skip(2), torch.ones(3, device=DEVICE))


# --------------------------------------------------------------------------- squared_norms_


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_squared_norms_match_twin_and_fp64(grad_dtype):
    gen = torch.Generator().manual_seed(7)
    shapes = SHAPES + [(4096 * 2 + 5,)]
    grads = [torch.randn(s, generator=gen).to(grad_dtype).to(DEVICE) for s in shapes]
    grads[1] = torch.randn(9, 7, generator=gen).to(grad_dtype).to(DEVICE).t()
    out, ref = torch.full((len(grads),), 5.0, device=DEVICE), torch.empty(len(grads), device=DEVICE)
    assert fused.squared_norms_(grads, out) is out
    twin.squared_norms_(grads, ref)
    exact = torch.stack([g.double().square().sum() for g in grads]).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(out, exact, rtol=2e-6, atol=0)
    assert out[4] == 0  # the empty tensor


def test_squared_norms_mixed_grad_dtypes_in_fp64():
    gen = torch.Generator().manual_seed(8)
    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float64]
    shapes = [(5,), (300,), (0,), (1, 5000)]
    grads = [torch.randn(s, generator=gen).to(d).to(DEVICE) for s, d in zip(shapes, dtypes)]
    out = torch.empty(4, dtype=torch.float64, device=DEVICE)
    ref = torch.empty_like(out)
    fused.squared_norms_(grads, out)
    twin.squared_norms_(grads, ref)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)


def test_squared_norms_refuses_bad_out():
    grads = [torch.randn(3, device=DEVICE)]
    with pytest.raises(ValueError, match="out has 2 entries for 1 grads"):
        fused.squared_norms_(grads, torch.empty(2, device=DEVICE))
    with pytest.raises(ValueError, match="fp32 or fp64"):
        fused.squared_norms_(grads, torch.empty(1, dtype=torch.bfloat16, device=DEVICE))


# --------------------------------------------------------------------------- compiled code


def test_kernels_compile_for_gpu_with_vector_accesses():
    """Catches what the interpreter cannot: code that does not compile for sm_80 / sm_90, and
    full tiles whose loads and stores do not vectorise to 128 bits (the kernels are
    bandwidth-bound). Compiled in a fresh process without the interpreter: this one
    decorated the kernels under ``TRITON_INTERPRET=1``."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton build has no CUDA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("compile_kernels.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for capability in (80, 90):
        for name in ("update_bf16_master", "update_bf16_master_per_tensor_steps", "update_fp32",
                     "momentum_fp32", "momentum_fp16_master"):
            assert found[f"sm_{capability}/{name}"] == {"ld_v4": True, "st_v4": True}, name
        assert found[f"sm_{capability}/sq_norm_bf16"]["ld_v4"]
        assert found[f"sm_{capability}/update_fp32_unaligned"] == {"ld_v4": False, "st_v4": False}
        assert f"sm_{capability}/segment_sum_fp64" in found


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_tensors_match_twin(param_dtype):
    shapes = [(1024, 1000), (4096 * 3 + 1,), (333, 777), (1,)]
    n = len(shapes)
    ours = make_state(shapes, [param_dtype] * n, [torch.bfloat16] * n, seed=9)
    ref = ours.clone()
    for step in (1, 2):
        run_adam(ours, fused, no_skip(n), step)
        run_adam(ref, twin, no_skip(n), step)
    assert_states_close(ours, ref)
    run_momentum(ours, fused, step=2)
    run_momentum(ref, twin, step=2)
    assert_states_close(ours, ref)


@pytest.mark.gpu
@requires_cuda
def test_gpu_no_host_synchronisation():
    n = len(SHAPES)
    state = make_state(SHAPES, [torch.bfloat16] * n, [torch.bfloat16] * n, seed=10)
    out = torch.empty(n, device=DEVICE)
    fused.squared_norms_(state.grads, out)  # compiles outside the checked region
    run_adam(state, fused, no_skip(n), step=1)
    run_momentum(state, fused, step=1)
    fresh = make_state(SHAPES, [torch.bfloat16] * n, [torch.bfloat16] * n, seed=11)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # new data pointers: the tables are built and copied inside the checked region
        norms = fused.squared_norms_(fresh.grads, torch.empty(n, device=DEVICE))
        for step in (1, 2):
            run_adam(fresh, fused, ~torch.isfinite(norms), step=step)
        run_momentum(fresh, fused, step=2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
