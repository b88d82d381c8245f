"""Checking the fused Triton kernels on the device before trusting them with a training run.

:func:`fused_kernels_problem` imports the kernels, compiles and launches them on a few
small tensors of the device (fp32 and bf16 weights with fp32 masters, odd sizes, a
skipped tensor) and compares them with the PyTorch twin. It returns ``None`` when they
agree, else a one-line reason; ``backend="auto"`` then falls back to the twin. An
out-of-memory error is not the kernels' fault: it propagates.
"""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Optional

import torch

from . import torch_adam as twin

TRITON_FLOOR = (3, 4)  # triton.knobs (the interpreter switch) and the kernels' APIs
_SHAPES = ((7,), (33, 5), (4096 + 3,))
_HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def import_fused():
    """The fused kernels' module; ``ImportError`` saying why it cannot be used."""
    try:
        import triton
    except ImportError as err:
        raise ImportError(f"triton is not installed ({err})") from err
    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version < TRITON_FLOOR:
        raise ImportError(f"triton {triton.__version__} is older than {'.'.join(map(str, TRITON_FLOOR))}, "
                          "the oldest the fused kernels support")
    try:
        return importlib.import_module("misa_kernels.ops.triton_adam")
    except ImportError:
        raise
    except Exception as err:  # an incompatible triton can fail in any way while decorating
        raise ImportError(f"importing the kernels failed: {type(err).__name__}: {err}") from err


def _operands(device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(shape, generator=gen).to(dtype) for shape in _SHAPES]
    return dict(
        params=[w.to(device) for w in weights],
        grads=[torch.randn(w.shape, generator=gen).to(dtype).to(device) for w in weights],
        masters=[w.float().to(device) if dtype != torch.float32 else None for w in weights],
        exp_avgs=[(0.1 * torch.randn(w.shape, generator=gen)).to(device) for w in weights],
        exp_avg_sqs=[(0.01 * torch.rand(w.shape, generator=gen) + 1e-4).to(device) for w in weights],
    )


def _run(module, ops: dict, device: torch.device) -> list[torch.Tensor]:
    skip = torch.tensor([False, True, False], device=device)
    norms = module.squared_norms_(ops["grads"], torch.empty(len(ops["grads"]), device=device))
    steps = torch.tensor([2.0, 1.0, 3.0], device=device)
    module.adam_update_(ops["params"], ops["grads"], ops["masters"], ops["exp_avgs"], ops["exp_avg_sqs"], skip,
                        step=steps, weight_decay=0.01, **_HYPER)
    module.momentum_step_(ops["params"], ops["masters"], ops["exp_avgs"], ops["exp_avg_sqs"], step=steps, **_HYPER)
    return [norms, *ops["params"], *ops["exp_avgs"], *ops["exp_avg_sqs"]]


def _compare(fused: list[torch.Tensor], reference: list[torch.Tensor]) -> Optional[str]:
    for i, (a, b) in enumerate(zip(fused, reference)):
        tolerance = dict(rtol=1e-5, atol=1e-6) if a.dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
        if not torch.allclose(a.float(), b.float(), **tolerance):
            worst = float((a.float() - b.float()).abs().max())
            return f"result {i} differs from the PyTorch twin by up to {worst:.3g}"
    return None


def check_fused(module, device: torch.device) -> Optional[str]:
    """``None`` if ``module``'s kernels match the twin on ``device``, else why not."""
    try:
        for seed, dtype in enumerate((torch.float32, torch.bfloat16)):
            fused_ops, twin_ops = _operands(device, dtype, seed), _operands(device, dtype, seed)
            problem = _compare(_run(module, fused_ops, device), _run(twin, twin_ops, device))
            if problem is not None:
                return f"{dtype}: {problem}"
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # compilation or launch: the fast path is unusable here
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
    return None


@lru_cache(maxsize=None)
def fused_kernels_problem(device: torch.device) -> Optional[str]:
    """Why the fused kernels cannot be used on ``device`` (cached per device), or ``None``."""
    try:
        module = import_fused()
    except ImportError as err:
        return str(err)
    return check_fused(module, device)
