"""The byte accounting of ``bench_fused_step.py``: what each side moves per element, from the
real dtypes, each operand counted once per kernel that touches it (the GB/s and % of copy
bandwidth of its tables come from these counts)."""
from __future__ import annotations

from typing import Iterator

import torch

from bench.fused_step_sets import ActiveSet


def ours_bytes_per_element(param_dtype: torch.dtype, grad_dtype: torch.dtype, has_master: bool,
                           with_norm: bool) -> int:
    """Device-memory bytes our kernels move per element, each operand once per kernel: a fp32
    master read and written plus the low-precision weight written (the kernel reads the
    master, not the weight), or a fp32 weight read and written; fp32 m and v read and
    written; the gradient read by the update, and once more by the separate norm pass."""
    weights = 2 * 4 + param_dtype.itemsize if has_master else 2 * param_dtype.itemsize
    return weights + 2 * 4 + 2 * 4 + grad_dtype.itemsize * (2 if with_norm else 1)


def adamw_bytes_per_element(param_dtype: torch.dtype, grad_dtype: torch.dtype, has_master: bool,
                            full: bool) -> int:
    """Bytes per element of the AdamW baseline: ``step()`` on fp32 weights reads and writes
    the weight, reads the ready fp32 gradient and reads and writes m and v (28); the ``full``
    step adds the copy fp32 master -> low-precision weight (when there is a master) and the
    norm pass over the model's gradients (``grad_dtype``)."""
    step = 2 * 4 + 4 + 2 * 4 + 2 * 4
    if not full:
        return step
    copy_back = 4 + param_dtype.itemsize if has_master else 0
    return step + copy_back + grad_dtype.itemsize


def _elements(active: ActiveSet) -> Iterator[tuple[int, torch.dtype, torch.dtype, bool]]:
    """Per tensor: elements, weight dtype, gradient dtype, whether it has a fp32 master."""
    for p, g, master in zip(active.params, active.grads, active.masters):
        yield p.numel(), p.dtype, g.dtype, master is not None


def ours_bytes(active: ActiveSet, with_norm: bool) -> int:
    """Bytes our update (and, ``with_norm``, the norm pass) moves over the whole set."""
    return sum(n * ours_bytes_per_element(p, g, m, with_norm) for n, p, g, m in _elements(active))


def adamw_bytes(active: ActiveSet, full: bool) -> int:
    """Bytes the AdamW baseline (``full``: with copy-back and norm pass) moves over the set."""
    return sum(n * adamw_bytes_per_element(p, g, m, full) for n, p, g, m in _elements(active))


def bytes_per_param(active: ActiveSet, with_norm: bool) -> float:
    """Bytes our kernels read and write per parameter (each byte once per kernel)."""
    return ours_bytes(active, with_norm) / active.numel
