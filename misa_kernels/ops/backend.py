"""Choosing the implementation of the inner-loop update.

A backend is a namespace with three functions of the same signatures as
:mod:`misa_kernels.ops.torch_adam`: ``squared_norms_``, ``adam_update_`` and
``momentum_step_``. ``"torch"`` is the plain-PyTorch twin; ``"triton"`` the fused
multi-tensor kernels, failing loudly when they cannot run; ``"auto"`` takes Triton on CUDA
only after the kernels passed a check against the twin on the device
(:mod:`.self_check`), and otherwise the twin, with one warning saying why.
"""
from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

from .self_check import fused_kernels_problem, import_fused

BACKENDS = ("auto", "torch", "triton")
_warned: set[str] = set()


def triton_available() -> bool:
    """True when the Triton kernels can be imported (a recent enough Triton is installed)."""
    try:
        import_fused()
    except ImportError:
        return False
    return True


def validate_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def _twin() -> ModuleType:
    return importlib.import_module("misa_kernels.ops.torch_adam")


def resolve_backend(name: str, device: torch.device, dtypes: frozenset = frozenset()) -> ModuleType:
    """The module implementing ``name`` for tensors of ``dtypes`` on ``device``.

    ``"auto"`` takes Triton only on CUDA, for fp32/bf16/fp16 weights (the kernels keep
    fp32 states; fp64 models stay on the PyTorch twin), and only if the kernels import,
    compile, launch and agree with the twin there.
    """
    validate_backend(name)
    if name == "torch" or (name == "auto" and (device.type != "cuda" or torch.float64 in dtypes)):
        return _twin()
    if name == "auto":
        problem = fused_kernels_problem(device)
        if problem is None:
            return import_fused()
        if problem not in _warned:
            _warned.add(problem)
            warnings.warn(f"backend='auto': the fused Triton kernels cannot be used on {device} ({problem}); "
                          "MISA uses the PyTorch twin, which has the same semantics", RuntimeWarning, stacklevel=3)
        return _twin()
    try:
        return import_fused()
    except ImportError as err:
        raise RuntimeError(f"backend='triton' needs the Triton kernels, which could not be imported ({err}). "
                           "Install triton>=3.4 or use backend='torch'.") from err
