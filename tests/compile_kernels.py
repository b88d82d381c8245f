"""Compiles the Triton kernels for real GPUs (no interpreter, no GPU needed) and prints
what their PTX shows as JSON: ``{"sm_90/update_bf16": {"ld_v4": true, "st_v4": true}, ...}``.

Run by ``tests/test_triton_ops.py`` in a subprocess without ``TRITON_INTERPRET``: the test
session itself imported the kernels under the interpreter, where they cannot be compiled.
"""
from __future__ import annotations

import json
import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_kernels.py must run without TRITON_INTERPRET")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from misa_kernels.ops import triton_kernels as kernels  # noqa: E402

SCALARS = ["one_minus_beta1", "beta2", "one_minus_beta2", "bc2", "eps", "step_size", "decay"]
UPDATE_TYPES = {"table": "*i64", "skip": "*u8", "coefs": "*fp32", "n_rows": "i32", "n_iters": "i32",
                **{name: "fp32" for name in SCALARS}}
UPDATE_VARIANTS = {  # name: (PARAM, GRAD, HAS_MASTER, MOMENTUM, PER_TENSOR, ALIGNED)
    "update_bf16_master": (tl.bfloat16, tl.bfloat16, True, False, False, True),
    "update_bf16_master_per_tensor_steps": (tl.bfloat16, tl.bfloat16, True, False, True, True),
    "update_fp32": (tl.float32, tl.float32, False, False, True, True),
    "momentum_fp32": (tl.float32, tl.float32, False, True, True, True),
    "momentum_fp16_master": (tl.float16, tl.float32, True, True, False, True),
    # Without the alignment hint nothing vectorises: shows the PTX check can fail.
    "update_fp32_unaligned": (tl.float32, tl.float32, False, False, True, False),
}


def ptx(kernel, types: dict, constexprs: dict, capability: int) -> str:
    signature = {**types, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": 8, "enable_fp_fusion": False})
    return compiled.asm["ptx"]


def accesses(code: str) -> dict:
    return {"ld_v4": bool(re.search(r"ld\.global\S*\.v4\.b32", code)),
            "st_v4": bool(re.search(r"st\.global\S*\.v4\.b32", code))}


def main() -> None:
    found = {}
    for capability in (80, 90):
        for name, (param, grad, master, momentum, per_tensor, aligned) in UPDATE_VARIANTS.items():
            constexprs = dict(PARAM=param, GRAD=grad, HAS_MASTER=master, MOMENTUM=momentum,
                              PER_TENSOR=per_tensor, ALIGNED=aligned, BLOCK=4096)
            found[f"sm_{capability}/{name}"] = accesses(ptx(kernels.update_kernel, UPDATE_TYPES, constexprs, capability))
        norm_types = {"table": "*i64", "partials": "*fp32", "n_rows": "i32", "n_iters": "i32"}
        found[f"sm_{capability}/sq_norm_bf16"] = accesses(ptx(
            kernels.sq_norm_partials_kernel, norm_types,
            dict(GRAD=tl.bfloat16, ACC=tl.float32, ALIGNED=True, BLOCK=4096), capability))
        found[f"sm_{capability}/segment_sum_fp64"] = accesses(ptx(
            kernels.segment_sum_kernel, {"partials": "*fp64", "segments": "*i64", "out": "*fp64"},
            dict(BLOCK=1024), capability))
    print(json.dumps(found))


if __name__ == "__main__":
    main()
