"""Choosing the implementation of the inner-loop update.

A backend is a namespace with three functions of the same signatures as
:mod:`misa_kernels.ops.torch_adam`: ``squared_norms_``, ``adam_update_`` and
``momentum_step_``. ``"torch"`` is the plain-PyTorch twin; ``"triton"`` the fused
multi-tensor kernels; ``"auto"`` picks Triton for CUDA tensors when it is importable.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when the Triton kernels can be imported (a Triton install is present)."""
    try:
        importlib.import_module("misa_kernels.ops.triton_adam")
    except ImportError:
        return False
    return True


def validate_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(name: str, device: torch.device, dtypes: frozenset = frozenset()) -> ModuleType:
    """The module implementing ``name`` for tensors of ``dtypes`` on ``device``.

    ``"auto"`` takes Triton only on CUDA and for fp32/bf16/fp16 weights (the kernels keep
    fp32 states; fp64 models stay on the PyTorch twin).
    """
    validate_backend(name)
    if name == "auto":
        fused_ok = device.type == "cuda" and torch.float64 not in dtypes
        name = "triton" if fused_ok and triton_available() else "torch"
    if name == "torch":
        return importlib.import_module("misa_kernels.ops.torch_adam")
    try:
        return importlib.import_module("misa_kernels.ops.triton_adam")
    except ImportError as err:
        raise RuntimeError(
            "backend='triton' needs the Triton kernels, which could not be imported "
            f"({err}). Install triton or use backend='torch'."
        ) from err
