"""The three products of a Linear's backward, in the native ops ``torch.ops.misa.*``
(``csrc/misa_linear.cpp``, JIT-built on first use) or in their PyTorch twin with the same
semantics (when the build fails or ``MISA_KERNELS_NO_EXT=1``):

* ``dX = dY W`` (:func:`linear_input_grad`);
* ``dW = dY^T X`` in the operands' dtype (:func:`linear_weight_grad`);
* ``grad_buffer += dY^T X`` and ``bias_buffer += sum_rows dY`` into fp32 buffers, with
  fp32 accumulation (:func:`linear_weight_grad_accumulate_`).

Fake (meta) implementations are registered with the native ops, so ``torch.compile`` can
trace them. On CUDA, bf16/fp16 operands go into the fp32 buffer through addmm's
``out_dtype`` overload, which needs torch >= 2.9 (:data:`OUT_DTYPE_GEMM_TORCH`); older
torch upcasts both operands to fp32 first (fp32 temporaries of the activations), and
:func:`low_precision_gemm_note` says so.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

ENV_NO_EXT = "MISA_KERNELS_NO_EXT"
EXTENSION_NAME = "misa_kernels_C"
OUT_DTYPE_GEMM_TORCH = (2, 9)
_SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "misa_linear.cpp"

_load_lock = threading.Lock()
_native_loaded: Optional[bool] = None
_fakes_registered = False
_count_lock = threading.Lock()
_fallback_gemms = 0


# ---------------------------------------------------------------------- loading
def _ops_registered() -> bool:
    try:
        torch.ops.misa.linear_weight_grad_accumulate_
    except (AttributeError, RuntimeError):
        return False
    return True


def _build() -> None:
    """Register ``torch.ops.misa``: a prebuilt ``misa_kernels._C`` if installed, else a
    JIT build of ``csrc/misa_linear.cpp`` cached in the torch extensions directory."""
    try:
        importlib.import_module("misa_kernels._C")
    except (ImportError, OSError):
        pass
    if _ops_registered():
        return
    if not _SOURCE.is_file():
        raise FileNotFoundError(f"{_SOURCE} is not shipped with this install")
    from torch.utils.cpp_extension import load

    load(name=EXTENSION_NAME, sources=[str(_SOURCE)], extra_cflags=["-O3"], verbose=False,
         is_python_module=False)


def _try_load() -> bool:
    if not _ops_registered():
        try:
            _build()
        except Exception as err:  # any build failure means the fallback, never a crash
            reason = f"{type(err).__name__}: {str(err).strip()[-400:]}"
            warnings.warn(f"misa_kernels: the native sparse-linear ops could not be built ({reason}); "
                          "using the PyTorch fallback, which has the same semantics", RuntimeWarning, stacklevel=4)
            return False
    if _ops_registered():
        _register_fakes()
        return True
    return False


def _register_fakes() -> None:
    """Shapes without data for ``torch.compile`` (``linear_input_grad`` is composite: it
    decomposes into ``matmul`` and needs none)."""
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    @torch.library.register_fake("misa::linear_weight_grad")
    def _weight_grad(grad_out: Tensor, inputs: Tensor) -> Tensor:
        return grad_out.new_empty((grad_out.shape[-1], inputs.shape[-1]))

    @torch.library.register_fake("misa::linear_weight_grad_accumulate_")
    def _accumulate(grad_buffer: Tensor, grad_out: Tensor, inputs: Tensor, bias_buffer: Optional[Tensor]) -> None:
        return None


def _load_native() -> bool:
    global _native_loaded
    if _native_loaded is None:
        with _load_lock:
            if _native_loaded is None:
                _native_loaded = _try_load()
    return _native_loaded


def _forced_fallback() -> bool:
    return os.environ.get(ENV_NO_EXT, "") not in ("", "0")


def native_available() -> bool:
    """True when the native ops are in use: built (or loaded) and not disabled by
    ``MISA_KERNELS_NO_EXT=1``. The first call may compile the extension."""
    return not _forced_fallback() and _load_native()


def low_precision_gemm_note(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why accumulating ``dtype`` gradients into fp32 buffers on ``device`` costs fp32
    copies of the operands here (torch before 2.9 on CUDA), or ``None``."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and version < OUT_DTYPE_GEMM_TORCH:
        return (f"torch {torch.__version__} has no fp32-output GEMM for {dtype} operands (torch >= 2.9 has), "
                "so the sparse backward upcasts dY and X to fp32 for each active module")
    return None


# ---------------------------------------------------------------------- ops
def rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _count_fallback_gemm() -> None:
    global _fallback_gemms
    with _count_lock:
        _fallback_gemms += 1


def weight_grad_gemm_count() -> int:
    """Weight-gradient GEMMs run so far by the native ops and the fallback together."""
    native = torch.ops.misa.weight_grad_gemm_count() if _native_loaded else 0
    return int(native) + _fallback_gemms


def reset_weight_grad_gemm_count() -> None:
    global _fallback_gemms
    if _native_loaded:
        torch.ops.misa.reset_weight_grad_gemm_count()
    with _count_lock:
        _fallback_gemms = 0


def linear_input_grad(grad_out: Tensor, weight: Tensor) -> Tensor:
    """``dX = dY W`` for ``W`` in (out, in) layout; keeps the leading dims of ``dY``."""
    if native_available():
        return torch.ops.misa.linear_input_grad(grad_out, weight)
    return torch.matmul(grad_out, weight)


def linear_weight_grad(grad_out: Tensor, inputs: Tensor) -> Tensor:
    """``dW = dY^T X`` over flattened rows, in the operands' dtype."""
    if native_available():
        return torch.ops.misa.linear_weight_grad(grad_out, inputs)
    _count_fallback_gemm()
    return torch.mm(rows(grad_out).t(), rows(inputs))


def linear_weight_grad_accumulate_(grad_buffer: Tensor, grad_out: Tensor, inputs: Tensor,
                                   bias_buffer: Optional[Tensor] = None) -> None:
    """``grad_buffer += dY^T X`` (out x in) and ``bias_buffer += sum_rows dY``, both fp32
    buffers, with fp32 accumulation whatever the dtype of ``dY`` and ``X``."""
    if native_available():
        torch.ops.misa.linear_weight_grad_accumulate_(grad_buffer, grad_out, inputs, bias_buffer)
        return
    check_fp32(grad_buffer, "grad_buffer")
    dy = rows(grad_out)
    _count_fallback_gemm()
    grad_buffer.addmm_(dy.t().float(), rows(inputs).float())
    if bias_buffer is not None:
        check_fp32(bias_buffer, "bias_buffer")
        bias_buffer.add_(dy.sum(0, dtype=torch.float32))


def check_fp32(buffer: Tensor, name: str) -> None:
    if buffer.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {buffer.dtype}")
