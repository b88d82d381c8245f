"""The ``@triton.jit`` kernels of the MISA inner loop; launched by :mod:`.triton_adam`.

Symbols follow the paper (Alg. 1 lines 10-12 and 16):
``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``,
``theta <- theta (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``.

**Multi-tensor table.** Every kernel reads an int64 table with one row per non-empty tensor::

    (param, grad, master, exp_avg, exp_avg_sq, numel, tile0, index)

holding data pointers, the element count, the global index of the tensor's first tile
(a running sum of ``ceil(numel / BLOCK)``) and the tensor's position in the caller's lists
(the entry of ``skip`` and of the per-tensor coefficients it reads). The grid is flat, one
program per ``BLOCK``-element tile; a program finds its row by binary search over
``tile0`` and casts the pointers with ``tl.load(row + col).to(tl.pointer_type(dtype))``.
Full tiles run unmasked so that loads and stores vectorise; only the last tile of a tensor
is masked. Offsets are int64, so tensors above ``2**31`` elements are fine.

Triton reads ``TRITON_INTERPRET`` when this module is imported (at ``@triton.jit``):
CPU tensors work only under the interpreter.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable themselves
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Kernels are decorated at import, so this is the mode they run in.
INTERPRET = _interpreting()

# Columns of a table row; NCOL is the row stride.
NCOL: tl.constexpr = tl.constexpr(8)
COL_PARAM: tl.constexpr = tl.constexpr(0)
COL_GRAD: tl.constexpr = tl.constexpr(1)
COL_MASTER: tl.constexpr = tl.constexpr(2)
COL_EXP_AVG: tl.constexpr = tl.constexpr(3)
COL_EXP_AVG_SQ: tl.constexpr = tl.constexpr(4)
COL_NUMEL: tl.constexpr = tl.constexpr(5)
COL_TILE0: tl.constexpr = tl.constexpr(6)
COL_INDEX: tl.constexpr = tl.constexpr(7)
POINTER_COLUMNS = tuple(c.value for c in (COL_PARAM, COL_GRAD, COL_MASTER, COL_EXP_AVG, COL_EXP_AVG_SQ))
# Bytes: pointer alignment that lets full tiles use 128-bit loads and stores.
ALIGN: tl.constexpr = tl.constexpr(16)


@triton.jit
def _find_row(table, n_rows, n_iters, tile):
    """Pointer to the row whose tiles hold global ``tile``: the last row with ``tile0 <= tile``."""
    lo = tile * 0
    hi = lo + n_rows - 1
    for _ in range(n_iters):
        mid = (lo + hi + 1) // 2
        right = tl.load(table + mid * NCOL + COL_TILE0) <= tile
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    return table + lo * NCOL


@triton.jit
def _column_ptr(row, col, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, ALIGN)
    return ptr


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)`` rounding to nearest even, like ``Tensor.to``.

    Spelt out for bf16 because Triton's interpreter truncates fp32 -> bf16, while the bf16
    weight must equal its fp32 master rounded, bit for bit, on CPU and GPU alike.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _update_tile(
    row, offs, mask,
    one_minus_beta1, beta2, one_minus_beta2, bc2, eps, step_size, decay,
    PARAM: tl.constexpr, GRAD: tl.constexpr, HAS_MASTER: tl.constexpr,
    MOMENTUM: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One tile of Alg. 1 lines 10-12 (or line 16 when ``MOMENTUM``), read once, written once."""
    m_ptr = _column_ptr(row, COL_EXP_AVG, tl.float32, ALIGNED)
    v_ptr = _column_ptr(row, COL_EXP_AVG_SQ, tl.float32, ALIGNED)
    p_ptr = _column_ptr(row, COL_PARAM, PARAM, ALIGNED)
    w_ptr = p_ptr
    if HAS_MASTER:
        w_ptr = _column_ptr(row, COL_MASTER, tl.float32, ALIGNED)
    w = tl.load(w_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, eviction_policy="evict_first")
    v = tl.load(v_ptr + offs, mask=mask, eviction_policy="evict_first")
    if not MOMENTUM:
        g_ptr = _column_ptr(row, COL_GRAD, GRAD, ALIGNED)
        g = tl.load(g_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
        m = m + one_minus_beta1 * (g - m)
        v = v * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + eps
    w = w * decay - step_size * tl.div_rn(m, denom)
    if HAS_MASTER:
        tl.store(w_ptr + offs, w, mask=mask)
    tl.store(p_ptr + offs, _round(w, PARAM), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "n_iters"])
def update_kernel(
    table, skip, coefs, n_rows, n_iters,
    one_minus_beta1, beta2, one_minus_beta2, bc2, eps, step_size, decay,
    PARAM: tl.constexpr, GRAD: tl.constexpr, HAS_MASTER: tl.constexpr,
    MOMENTUM: tl.constexpr, PER_TENSOR: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Multi-tensor AdamW step (or extra momentum step): one program per ``BLOCK`` tile.

    With ``PER_TENSOR`` each tensor has its own Adam step count: ``coefs[2 i]`` is its
    ``step_size`` and ``coefs[2 i + 1]`` its ``bc2``, replacing the scalar arguments."""
    tile = tl.program_id(0).to(tl.int64)
    row = _find_row(table, n_rows, n_iters, tile)
    numel = tl.load(row + COL_NUMEL)
    start = (tile - tl.load(row + COL_TILE0)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if PER_TENSOR:
        index = tl.load(row + COL_INDEX)
        step_size = tl.load(coefs + 2 * index)
        bc2 = tl.load(coefs + 2 * index + 1)
    skipped = 0
    if not MOMENTUM:
        skipped = tl.load(skip + tl.load(row + COL_INDEX))
    if skipped == 0:
        if start + BLOCK <= numel:
            _update_tile(row, offs, None, one_minus_beta1, beta2, one_minus_beta2, bc2, eps,
                         step_size, decay, PARAM, GRAD, HAS_MASTER, MOMENTUM, ALIGNED)
        else:
            _update_tile(row, offs, offs < numel, one_minus_beta1, beta2, one_minus_beta2, bc2,
                         eps, step_size, decay, PARAM, GRAD, HAS_MASTER, MOMENTUM, ALIGNED)


@triton.jit
def _sum(x):
    return tl.sum(x, 0)


@triton.jit
def _tile_sq_sum(g_ptr, offs, mask, ACC: tl.constexpr):
    if mask is None:
        g = tl.load(g_ptr + offs, eviction_policy="evict_first").to(ACC)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    return _sum(g * g)


@triton.jit(do_not_specialize=["n_rows", "n_iters"])
def sq_norm_partials_kernel(
    table, partials, n_rows, n_iters,
    GRAD: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """``partials[tile] = sum(g^2)`` over one tile of one gradient, accumulated in ``ACC``."""
    tile = tl.program_id(0).to(tl.int64)
    row = _find_row(table, n_rows, n_iters, tile)
    numel = tl.load(row + COL_NUMEL)
    start = (tile - tl.load(row + COL_TILE0)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    g_ptr = _column_ptr(row, COL_GRAD, GRAD, ALIGNED)
    if start + BLOCK <= numel:
        total = _tile_sq_sum(g_ptr, offs, None, ACC)
    else:
        total = _tile_sq_sum(g_ptr, offs, offs < numel, ACC)
    tl.store(partials + tile, total)


@triton.jit
def segment_sum_kernel(partials, segments, out, BLOCK: tl.constexpr):
    """``out[i] = sum(partials[first_i : first_i + count_i])`` in a fixed order (deterministic)."""
    i = tl.program_id(0).to(tl.int64)
    first = tl.load(segments + 2 * i)
    count = tl.load(segments + 2 * i + 1)
    acc = tl.full([BLOCK], 0, dtype=out.dtype.element_ty)
    for k in range(0, count, BLOCK):
        idx = k + tl.arange(0, BLOCK)
        acc += tl.load(partials + first + idx, mask=idx < count, other=0.0)
    tl.store(out + i, _sum(acc))
