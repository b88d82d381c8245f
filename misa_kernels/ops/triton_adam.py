"""Fused multi-tensor Triton update for the MISA inner loop: the launcher.

Same public functions, signatures and semantics as :mod:`misa_kernels.ops.torch_adam`
(the plain-PyTorch twin), so :mod:`misa_kernels.ops.backend` can swap the modules. The
kernels are in :mod:`.triton_kernels`, their tables and table cache in :mod:`.triton_tables`.

**Groups.** The element types are compile-time constants, so a call is split into groups
with the same (param dtype, grad dtype, has-master); each group is one launch. A usual MISA
active set (all bf16 with fp32 masters, or all fp32) is a single launch.

**Step counts.** ``step`` is one ``int`` for all tensors, or a device tensor with each
tensor's own count; the per-tensor bias corrections are then computed on the device and
read by the kernel, so nothing is read back on the host.

No function here synchronises with the host. CPU tensors work only under
``TRITON_INTERPRET=1``, which Triton reads when the kernels are imported (at ``@triton.jit``).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Optional, Sequence

import torch
from torch import Tensor

try:
    from . import triton_kernels as kernels
except ImportError as err:  # backend.py falls back to the twin on ImportError
    raise ImportError(f"misa_kernels.ops.triton_adam needs triton: {err}") from err

from . import triton_tables as tables
from .torch_adam import Step, bias_corrections, check_step

__all__ = ["squared_norms_", "adam_update_", "momentum_step_"]

_BLOCK = 4096  # elements per program; tests lower it to exercise many tiles
_NUM_WARPS = 8
_REDUCE_BLOCK = 1024  # partial sums summed per iteration of the per-tensor reduction

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NORM_DTYPES = (torch.float32, torch.float64)
_TL_DTYPES = {
    torch.float32: kernels.tl.float32,
    torch.bfloat16: kernels.tl.bfloat16,
    torch.float16: kernels.tl.float16,
    torch.float64: kernels.tl.float64,
}


def _check_lengths(**lists: Sequence) -> int:
    lengths = {name: len(seq) for name, seq in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all lists must have the same length, got {lengths}")
    return next(iter(lengths.values()), 0)


def _on_device(device: torch.device) -> ContextManager:
    """Launch context for ``device``: Triton launches on the current CUDA device."""
    if device.type != "cuda" and not kernels.INTERPRET:
        raise ValueError(
            f"the Triton kernels need CUDA tensors, got {device}; to run them on the CPU set "
            f"TRITON_INTERPRET=1 before importing {__name__}, or use backend='torch'"
        )
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_tensor(name: str, tensor: Tensor, like: Tensor, dtypes: Sequence[torch.dtype]) -> None:
    """``tensor`` (called ``name``) is an in-place operand matching ``like``."""
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {tensor.dtype}, expected one of {tuple(dtypes)}")
    if tensor.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(like.shape)}")
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device}, expected {like.device}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} is not contiguous; the fused kernels update tensors in place")


def _contiguous_grad(name: str, grad: Tensor, shape: Optional[torch.Size], device: torch.device) -> Tensor:
    """Gradients are only read, so a non-contiguous one is copied rather than refused."""
    if grad.dtype not in _GRAD_DTYPES:
        raise ValueError(f"{name} has dtype {grad.dtype}, expected one of {_GRAD_DTYPES}")
    if shape is not None and grad.shape != shape:
        raise ValueError(f"{name} has shape {tuple(grad.shape)}, expected {tuple(shape)}")
    if grad.device != device:
        raise ValueError(f"{name} is on {grad.device}, expected {device}")
    return grad.contiguous()


def _check_weights(i: int, param: Tensor, master: Optional[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    _check_tensor(f"params[{i}]", param, param, _PARAM_DTYPES)
    if master is not None:
        _check_tensor(f"masters[{i}]", master, param, (torch.float32,))
    _check_tensor(f"exp_avgs[{i}]", exp_avg, param, (torch.float32,))
    _check_tensor(f"exp_avg_sqs[{i}]", exp_avg_sq, param, (torch.float32,))


def _check_skip(skip: Tensor, n: int, device: torch.device) -> Tensor:
    """``skip`` as a uint8 view (a bool tensor is reinterpreted, not copied)."""
    if skip.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"skip must be a bool or uint8 tensor, got {skip.dtype}")
    if skip.numel() != n:
        raise ValueError(f"skip has {skip.numel()} entries for {n} tensors")
    if skip.device != device:
        raise ValueError(f"skip is on {skip.device}, expected {device}")
    return skip.contiguous().view(torch.uint8).reshape(-1)


def _coefficients(step: Step, n: int, scale: float, beta1: float, beta2: float, device) -> tuple:
    """``(step_size, bc2, per-tensor table)``: scalars for an ``int`` step (the table is
    ``None``), else an ``[n, 2]`` fp32 device tensor of ``(scale / bc1, bc2)`` per tensor."""
    check_step(step, n)
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    if not isinstance(step, Tensor):
        return scale / bc1, bc2, None
    if step.device != device:
        raise ValueError(f"step is on {step.device}, expected {device}")
    return 1.0, 1.0, torch.stack([scale / bc1, bc2], dim=1).to(torch.float32).contiguous()


def _check_grid(tiles: int) -> None:
    if tiles >= 2**31:
        raise ValueError(f"{tiles} tiles of {_BLOCK} elements exceed the CUDA grid limit")


def _launch_update(rows, tiles: int, skip: Optional[Tensor], coefs: Optional[Tensor], device, scalars,
                   *, param: torch.dtype, grad: torch.dtype, has_master: bool, momentum: bool) -> None:
    if not rows:
        return
    _check_grid(tiles)
    table = tables.device_table(rows, device)
    kernels.update_kernel[(tiles,)](
        # Pointers a variant never reads (skip for the momentum step, the per-tensor
        # coefficients for one step count) get the table as a stand-in.
        table, table if skip is None else skip, table if coefs is None else coefs,
        len(rows), tables.n_iters(len(rows)), *scalars,
        PARAM=_TL_DTYPES[param], GRAD=_TL_DTYPES[grad], HAS_MASTER=has_master,
        MOMENTUM=momentum, PER_TENSOR=coefs is not None,
        ALIGNED=tables.aligned(rows, kernels.POINTER_COLUMNS), BLOCK=_BLOCK,
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )


def _launch_sq_norm_partials(grads: Sequence[Tensor], indices: Sequence[int], tiles: Sequence[int],
                             partials: Tensor) -> None:
    """Squared sums of the tiles of ``grads[indices]`` (one dtype) into ``partials``, in order."""
    rows, n_tiles = tables.norm_rows(grads, indices, tiles)
    if not rows:
        return
    kernels.sq_norm_partials_kernel[(n_tiles,)](
        tables.device_table(rows, partials.device), partials, len(rows), tables.n_iters(len(rows)),
        GRAD=_TL_DTYPES[grads[indices[0]].dtype], ACC=_TL_DTYPES[partials.dtype],
        ALIGNED=tables.aligned(rows, (kernels.COL_GRAD.value,)), BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        enable_fp_fusion=False,
    )


def squared_norms_(grads: Sequence[Tensor], out: Tensor) -> Tensor:
    """``out[i] = ||g_i||_F^2`` (the block gradient norms behind the scores ``G_b`` of eq. 4),
    reduced in ``out.dtype`` (fp32, or fp64 for fp64 models).

    One launch per gradient dtype writes one partial sum per tile, then one launch sums each
    tensor's partials in a fixed order: deterministic, unlike atomics.
    """
    if len(grads) != out.numel():
        raise ValueError(f"out has {out.numel()} entries for {len(grads)} grads")
    if out.dtype not in _NORM_DTYPES or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 or fp64 tensor, got {out.dtype}")
    if not grads:
        return out
    with _on_device(out.device):
        grads = [_contiguous_grad(f"grads[{i}]", g, None, out.device) for i, g in enumerate(grads)]
        tiles = [tables.n_tiles(g.numel(), _BLOCK) for g in grads]
        _check_grid(sum(tiles))
        partials = torch.empty(sum(tiles), dtype=out.dtype, device=out.device)
        firsts, base = [0] * len(grads), 0
        for indices in tables.groups([g.dtype for g in grads]).values():
            _launch_sq_norm_partials(grads, indices, tiles, partials[base:])
            for i in indices:
                firsts[i], base = base, base + tiles[i]
        segments = tables.device_table(list(zip(firsts, tiles)), out.device)
        kernels.segment_sum_kernel[(len(grads),)](partials, segments, out, BLOCK=_REDUCE_BLOCK)
    return out


def adam_update_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    skip: Tensor,
    *,
    step: Step,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step (Alg. 1 lines 10-12) over every tensor, in place, fused.

    Per element: ``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``,
    ``theta <- theta (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``, computed in fp32.
    ``masters[i]`` is the fp32 master of a low-precision ``params[i]``: the kernel reads the
    master and writes both the master and the rounded param in the same pass; with ``None``
    ``params[i]`` itself is updated (a bf16/fp16 one is rounded once, from fp32, where the twin
    also rounds ``theta (1 - lr wd)``). ``grads`` may be any float dtype; moments are fp32.
    ``skip[i]`` (bool or uint8, on device) leaves tensor ``i`` entirely untouched.
    ``step`` (one ``t`` or a device tensor of per-tensor ``t``), ``lr`` and the betas are
    runtime arguments: changing them never recompiles. One launch per (param dtype, grad
    dtype, has-master) group.
    """
    n = _check_lengths(params=params, grads=grads, masters=masters, exp_avgs=exp_avgs,
                       exp_avg_sqs=exp_avg_sqs)
    if n == 0:
        bias_corrections(step, beta1, beta2)  # the same argument checks as a real call
        return
    device = params[0].device
    with _on_device(device):
        skip = _check_skip(skip, n, device)
        step_size, bc2, coefs = _coefficients(step, n, lr, beta1, beta2, device)
        for i in range(n):
            _check_weights(i, params[i], masters[i], exp_avgs[i], exp_avg_sqs[i])
        grads = [_contiguous_grad(f"grads[{i}]", g, params[i].shape, device) for i, g in enumerate(grads)]
        scalars = (1.0 - beta1, beta2, 1.0 - beta2, bc2, eps, step_size, 1.0 - lr * weight_decay)
        keys = [(p.dtype, g.dtype, m is not None) for p, g, m in zip(params, grads, masters)]
        for (param, grad, has_master), indices in tables.groups(keys).items():
            rows, tiles = tables.update_rows(indices, params, grads, masters, exp_avgs, exp_avg_sqs, _BLOCK)
            _launch_update(rows, tiles, skip, coefs, device, scalars, param=param, grad=grad,
                           has_master=has_master, momentum=False)


def momentum_step_(
    params: Sequence[Tensor],
    masters: Sequence[Optional[Tensor]],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    step: Step,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    coefficient: Optional[float] = None,
) -> None:
    """The extra step at the end of an inner loop (Alg. 1 line 16), in place, fused:
    ``theta <- theta - lr * c * m_hat / (sqrt(v_hat) + eps)`` with the moments at ``t = step``
    and ``c = coefficient`` (default ``beta1``).

    Moments are only read. Same master / low-precision write rule as :func:`adam_update_`;
    one launch per (param dtype, has-master) group.
    """
    n = _check_lengths(params=params, masters=masters, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if n == 0:
        bias_corrections(step, beta1, beta2)
        return
    device = params[0].device
    c = beta1 if coefficient is None else coefficient
    with _on_device(device):
        step_size, bc2, coefs = _coefficients(step, n, lr * c, beta1, beta2, device)
        for i in range(n):
            _check_weights(i, params[i], masters[i], exp_avgs[i], exp_avg_sqs[i])
        scalars = (1.0 - beta1, beta2, 1.0 - beta2, bc2, eps, step_size, 1.0)
        keys = [(p.dtype, m is not None) for p, m in zip(params, masters)]
        for (param, has_master), indices in tables.groups(keys).items():
            rows, tiles = tables.update_rows(indices, params, None, masters, exp_avgs, exp_avg_sqs, _BLOCK)
            _launch_update(rows, tiles, None, coefs, device, scalars, param=param,
                           grad=torch.float32, has_master=has_master, momentum=True)
