"""pytest-benchmark microbenchmarks of the fused update, for GPU runners.

Run with ``python -m pytest bench/test_kernel_microbench.py`` on a CUDA machine; the
timings are reported by pytest-benchmark and never asserted. Skipped without CUDA.

Each benchmark is ``benchmark.pedantic`` with ``WARMUP_ROUNDS`` untimed rounds first, so the
first call's Triton compilation, the kernel-table cache and AdamW's lazy state stay out of
the numbers; before every round its untimed ``setup`` flushes the L2 (see
``fused_step_timing.L2Flush``) and waits for the device. pytest-benchmark times on the host,
so each timed round ends with a synchronisation. Active sets: LLaMA-7B modules of 16M and
128M parameters, and the 448 rank-16 LoRA matrices of 32 LLaMA-7B layers.
"""
from __future__ import annotations

import pytest
import torch

from fused_step_sets import HYPER, active_set_shapes, lora_set_shapes, make_active_set, make_step
from fused_step_timing import L2Flush, default_flush_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEVICE = torch.device("cuda")
SETS = {
    "llama16M": lambda: active_set_shapes(16 * 2**20),
    "llama128M": lambda: active_set_shapes(128 * 2**20),
    "lora448": lambda: lora_set_shapes(32, rank=16),
}
WARMUP_ROUNDS = 3
ROUNDS = 20


def _pedantic(benchmark, step) -> None:
    """Time ``step`` (synchronised) after ``WARMUP_ROUNDS`` untimed rounds, flushing the L2
    outside the timed region before each round."""
    flush = L2Flush(DEVICE, default_flush_bytes(DEVICE))

    def setup():
        flush()
        torch.cuda.synchronize(DEVICE)

    def timed():
        step()
        torch.cuda.synchronize(DEVICE)

    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP_ROUNDS)


@pytest.mark.parametrize("active_set", sorted(SETS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_update(benchmark, active_set, backend):
    from misa_kernels.ops.backend import resolve_backend

    ops = resolve_backend(backend, DEVICE)
    shapes = SETS[active_set]()
    active = make_active_set(shapes, torch.bfloat16, DEVICE)
    norms = torch.empty(len(active.grads), device=DEVICE)
    steps = make_step("tensor", len(shapes), DEVICE)  # per-tensor counts, as MISA passes them

    def step():
        ops.squared_norms_(active.grads, norms)
        ops.adam_update_(active.params, active.grads, active.masters, active.exp_avgs, active.exp_avg_sqs,
                         active.skip, step=steps, **HYPER)

    _pedantic(benchmark, step)


@pytest.mark.parametrize("active_set", sorted(SETS))
def test_adamw_fused_baseline(benchmark, active_set):
    active = make_active_set(SETS[active_set](), torch.bfloat16, DEVICE)
    grads = [g.float() for g in active.grads]  # ready fp32 gradients, made outside the timing
    for master, grad in zip(active.masters, grads):
        master.grad = grad
    opt = torch.optim.AdamW(active.masters, lr=HYPER["lr"], betas=(HYPER["beta1"], HYPER["beta2"]),
                            eps=HYPER["eps"], weight_decay=HYPER["weight_decay"], fused=True)

    def step():
        for grad in active.grads:
            torch.linalg.vector_norm(grad, dtype=torch.float32)
        opt.step()
        torch._foreach_copy_(active.params, active.masters)

    _pedantic(benchmark, step)
