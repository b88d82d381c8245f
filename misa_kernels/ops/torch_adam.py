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

from typing import Optional, Sequence

import torch
from torch import Tensor


def bias_corrections(step: int, beta1: float, beta2: float) -> tuple[float, float]:
    """``(1 - beta1^t, 1 - beta2^t)`` for inner step ``t >= 1``."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    return 1.0 - beta1**step, 1.0 - beta2**step


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
    step: int,
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
    whose gradient is not finite, without a host synchronisation.
    """
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    for i, (param, grad, master, m, v) in enumerate(zip(params, grads, masters, exp_avgs, exp_avg_sqs)):
        keep = skip[i]
        weight = _weights(param, master)
        g = grad.to(m.dtype)
        new_m = torch.lerp(m, g, 1.0 - beta1)
        new_v = v * beta2 + (1.0 - beta2) * g * g
        denom = (new_v / bc2).sqrt_().add_(eps)
        new_w = weight * (1.0 - lr * weight_decay) - lr * (new_m / bc1) / denom
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
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """The extra step at the end of an inner loop (Alg. 1 line 16), in place:
    ``theta <- theta - lr * beta1 * m_hat / (sqrt(v_hat) + eps)`` with the moments at ``t = step``.
    """
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    for param, master, m, v in zip(params, masters, exp_avgs, exp_avg_sqs):
        weight = _weights(param, master)
        denom = (v / bc2).sqrt_().add_(eps)
        weight.addcdiv_(m, denom, value=-lr * beta1 / bc1)
        if master is not None:
            param.copy_(master)
