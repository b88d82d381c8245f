"""Plain-PyTorch twin of the fused MISA update kernels.

These functions define the semantics every fast path must reproduce. They work on
*lists* of tensors (one entry per parameter tensor of the active set) so that a
multi-tensor kernel can replace them one-for-one.

Symbols follow the paper (Alg. 1, lines 10-12 and 16):
``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``,
``theta <- theta - lr * (m_hat / (sqrt(v_hat) + eps) + wd * theta)`` with
``m_hat = m / (1 - beta1^t)`` and ``v_hat = v / (1 - beta2^t)``.
Weight decay is decoupled (AdamW).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

Step = Union[int, Tensor]
"""An Adam step count ``t``: one ``int`` for every tensor, or a device tensor of ``n``
counts, one per tensor (each tensor's own number of applied updates; never read on the host)."""


def bias_corrections(step: Step, beta1: float, beta2: float) -> tuple:
    """``(1 - beta1^t, 1 - beta2^t)``: floats for an ``int`` step ``t >= 1``; for a tensor of
    per-tensor counts, float64 tensors on its device (counts below 1, those of tensors never
    updated, are taken as 1: their moments are zero, so only finiteness matters)."""
    if isinstance(step, Tensor):
        t = step.to(torch.float64).clamp(min=1.0)
        return 1.0 - torch.pow(beta1, t), 1.0 - torch.pow(beta2, t)
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return 1.0 - beta1**step, 1.0 - beta2**step


def check_step(step: Step, n: int) -> None:
    """A tensor ``step`` must hold one count per tensor."""
    if isinstance(step, Tensor) and step.numel() != n:
        raise ValueError(f"step has {step.numel()} entries for {n} tensors")


def _entry(values, i: int, dtype: torch.dtype):
    """Tensor ``i``'s value of a bias correction (a float, or one entry of a tensor)."""
    return values[i].to(dtype) if isinstance(values, Tensor) else values


def squared_norms_(grads: Sequence[Tensor], out: Tensor) -> Tensor:
    """``out[i] = ||grads[i]||_F^2``, reduced in ``out.dtype`` (fp32, or fp64 for fp64 models)."""
    if len(grads) != out.numel():
        raise ValueError(f"out has {out.numel()} entries for {len(grads)} grads")
    for i, grad in enumerate(grads):
        out[i] = torch.linalg.vector_norm(grad, dtype=out.dtype).square()
    return out


def _weights(param: Tensor, master: Optional[Tensor]) -> Tensor:
    return master if master is not None else param


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
    """One AdamW step (Alg. 1 lines 10-12) over every tensor, in place.

    ``masters[i]`` is the fp32 master of a low-precision ``params[i]`` (or ``None`` when
    ``params[i]`` is itself fp32 and is updated in place). ``skip[i]`` (bool, on device)
    leaves tensor ``i``'s weights and moments untouched: the caller sets it for modules
    whose gradient is not finite, without a host synchronisation. ``step`` is ``t``, or
    one ``t`` per tensor (see :data:`Step`).
    """
    check_step(step, len(params))
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    for i, (param, grad, master, m, v) in enumerate(zip(params, grads, masters, exp_avgs, exp_avg_sqs)):
        keep = skip[i]
        weight = _weights(param, master)
        g = grad.to(m.dtype)
        new_m = torch.lerp(m, g, 1.0 - beta1)
        new_v = v * beta2 + (1.0 - beta2) * g * g
        denom = (new_v / _entry(bc2, i, m.dtype)).sqrt_().add_(eps)
        new_w = weight * (1.0 - lr * weight_decay) - lr * (new_m / _entry(bc1, i, m.dtype)) / denom
        m.copy_(torch.where(keep, m, new_m))
        v.copy_(torch.where(keep, v, new_v))
        weight.copy_(torch.where(keep, weight, new_w))
        if master is not None:
            param.copy_(master)


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
    """The extra step at the end of an inner loop (Alg. 1 line 16), in place:
    ``theta <- theta - lr * c * m_hat / (sqrt(v_hat) + eps)`` with the moments at ``t = step``
    and ``c = coefficient`` (default ``beta1``; the proof's variable transform gives
    ``beta1 / (1 - beta1)``).
    """
    check_step(step, len(params))
    c = beta1 if coefficient is None else coefficient
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    for i, (param, master, m, v) in enumerate(zip(params, masters, exp_avgs, exp_avg_sqs)):
        weight = _weights(param, master)
        denom = (v / _entry(bc2, i, m.dtype)).sqrt_().add_(eps)
        if isinstance(bc1, Tensor):  # a 0-dim device step size: no host read
            weight.addcmul_(m / denom, (-lr * c / bc1[i]).to(m.dtype))
        else:
            weight.addcdiv_(m, denom, value=-lr * c / bc1)
        if master is not None:
            param.copy_(master)
