"""pytest-benchmark microbenchmarks of the fused update, for GPU runners.

Run with ``python -m pytest bench/test_kernel_microbench.py`` on a CUDA machine; the
timings are reported by pytest-benchmark and never asserted. Skipped without CUDA.
"""
from __future__ import annotations

import pytest
import torch

from bench_fused_step import HYPER, STEP, active_set_shapes, make_active_set

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIZES_M = [16, 128]


def _synchronised(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("millions", SIZES_M)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fused_update(benchmark, millions, backend):
    from misa_kernels.ops.backend import resolve_backend

    ops = resolve_backend(backend, torch.device("cuda"))
    active = make_active_set(active_set_shapes(millions * 2**20), torch.bfloat16, torch.device("cuda"))
    norms = torch.empty(len(active.grads), device="cuda")

    def step():
        ops.squared_norms_(active.grads, norms)
        ops.adam_update_(active.params, active.grads, active.masters, active.exp_avgs, active.exp_avg_sqs,
                         active.skip, step=STEP, **HYPER)

    benchmark(_synchronised(step))


@pytest.mark.parametrize("millions", SIZES_M)
def test_adamw_fused_baseline(benchmark, millions):
    active = make_active_set(active_set_shapes(millions * 2**20), torch.bfloat16, torch.device("cuda"))
    grads = [g.float() for g in active.grads]
    for master, grad in zip(active.masters, grads):
        master.grad = grad
    opt = torch.optim.AdamW(active.masters, lr=HYPER["lr"], eps=HYPER["eps"], weight_decay=HYPER["weight_decay"],
                            fused=True)

    def step():
        for grad in active.grads:
            torch.linalg.vector_norm(grad, dtype=torch.float32)
        opt.step()
        torch._foreach_copy_(active.params, active.masters)

    benchmark(_synchronised(step))
