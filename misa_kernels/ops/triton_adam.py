"""Fused multi-tensor Triton kernels for the MISA inner loop.

Same public functions, signatures and semantics as :mod:`misa_kernels.ops.torch_adam`
(the plain-PyTorch twin), so :mod:`misa_kernels.ops.backend` can swap the modules.
Symbols follow the paper (Alg. 1 lines 10-12 and 16):
``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``,
``theta <- theta (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``.

**Multi-tensor table.** All tensors of one call go through one launch per dtype group.
The launcher writes one int64 row per non-empty tensor::

    (param, grad, master, exp_avg, exp_avg_sq, numel, tile0, index)

holding data pointers, the element count, the global index of the tensor's first tile
(a running sum of ``ceil(numel / BLOCK)``) and the tensor's position in the caller's lists
(the entry of ``skip`` it reads). The grid is flat, one program per ``BLOCK``-element
tile; a program finds its row by binary search over ``tile0`` and casts the pointers
with ``tl.load(row + col).to(tl.pointer_type(dtype))``. Full tiles run unmasked so that
loads and stores vectorise; only the last tile of a tensor is masked. Offsets are
int64, so tensors above ``2**31`` elements are fine. Tables are cached by content (the
active set is the same for ``T`` steps), so a steady-state step copies nothing to the device.

**Groups.** The element types are compile-time constants, so a call is split into groups
with the same (param dtype, grad dtype, has-master); each group is one launch. A usual MISA
active set (all bf16 with fp32 masters, or all fp32) is a single launch.

No function here synchronises with the host. CPU tensors work only under
``TRITON_INTERPRET=1``, which Triton reads when this module is imported (at ``@triton.jit``).
"""
from __future__ import annotations

import contextlib
from typing import ContextManager, Hashable, Optional, Sequence

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as err:  # backend.py falls back to the twin on ImportError
    raise ImportError(f"misa_kernels.ops.triton_adam needs triton: {err}") from err

from misa_kernels.ops.torch_adam import bias_corrections

__all__ = ["squared_norms_", "adam_update_", "momentum_step_"]

# Kernels are decorated at import, so this is the mode they run in.
_INTERPRET = bool(triton.knobs.runtime.interpret)

_BLOCK = 4096  # elements per program; tests lower it to exercise many tiles
_NUM_WARPS = 8
_REDUCE_BLOCK = 1024  # partial sums summed per iteration of the per-tensor reduction
_TABLE_CACHE_SIZE = 32

_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_NORM_DTYPES = (torch.float32, torch.float64)
_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}

# Columns of a table row; _NCOL is the row stride.
_NCOL: tl.constexpr = tl.constexpr(8)
_COL_PARAM: tl.constexpr = tl.constexpr(0)
_COL_GRAD: tl.constexpr = tl.constexpr(1)
_COL_MASTER: tl.constexpr = tl.constexpr(2)
_COL_EXP_AVG: tl.constexpr = tl.constexpr(3)
_COL_EXP_AVG_SQ: tl.constexpr = tl.constexpr(4)
_COL_NUMEL: tl.constexpr = tl.constexpr(5)
_COL_TILE0: tl.constexpr = tl.constexpr(6)
_COL_INDEX: tl.constexpr = tl.constexpr(7)
_POINTER_COLUMNS = tuple(
    c.value for c in (_COL_PARAM, _COL_GRAD, _COL_MASTER, _COL_EXP_AVG, _COL_EXP_AVG_SQ)
)
# Bytes: pointer alignment that lets full tiles use 128-bit loads and stores.
_ALIGN: tl.constexpr = tl.constexpr(16)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _find_row(table, n_rows, n_iters, tile):
    """Pointer to the row whose tiles hold global ``tile``: the last row with ``tile0 <= tile``."""
    lo = tile * 0
    hi = lo + n_rows - 1
    for _ in range(n_iters):
        mid = (lo + hi + 1) // 2
        right = tl.load(table + mid * _NCOL + _COL_TILE0) <= tile
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    return table + lo * _NCOL


@triton.jit
def _column_ptr(row, col, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, _ALIGN)
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
    m_ptr = _column_ptr(row, _COL_EXP_AVG, tl.float32, ALIGNED)
    v_ptr = _column_ptr(row, _COL_EXP_AVG_SQ, tl.float32, ALIGNED)
    p_ptr = _column_ptr(row, _COL_PARAM, PARAM, ALIGNED)
    w_ptr = p_ptr
    if HAS_MASTER:
        w_ptr = _column_ptr(row, _COL_MASTER, tl.float32, ALIGNED)
    w = tl.load(w_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, eviction_policy="evict_first")
    v = tl.load(v_ptr + offs, mask=mask, eviction_policy="evict_first")
    if not MOMENTUM:
        g_ptr = _column_ptr(row, _COL_GRAD, GRAD, ALIGNED)
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
def _update_kernel(
    table, skip, n_rows, n_iters,
    one_minus_beta1, beta2, one_minus_beta2, bc2, eps, step_size, decay,
    PARAM: tl.constexpr, GRAD: tl.constexpr, HAS_MASTER: tl.constexpr,
    MOMENTUM: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Multi-tensor AdamW step (or extra momentum step): one program per ``BLOCK`` tile."""
    tile = tl.program_id(0).to(tl.int64)
    row = _find_row(table, n_rows, n_iters, tile)
    numel = tl.load(row + _COL_NUMEL)
    start = (tile - tl.load(row + _COL_TILE0)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    skipped = 0
    if not MOMENTUM:
        skipped = tl.load(skip + tl.load(row + _COL_INDEX))
    if skipped == 0:
        if start + BLOCK <= numel:
            _update_tile(row, offs, None, one_minus_beta1, beta2, one_minus_beta2, bc2, eps,
                         step_size, decay, PARAM, GRAD, HAS_MASTER, MOMENTUM, ALIGNED)
        else:
            _update_tile(row, offs, offs < numel, one_minus_beta1, beta2, one_minus_beta2, bc2,
                         eps, step_size, decay, PARAM, GRAD, HAS_MASTER, MOMENTUM, ALIGNED)


@triton.jit
def _sum(x):
    # Not tl.sum: that is itself a @jit function, which the interpreter cannot call when
    # triton was imported before TRITON_INTERPRET was set; the interpreter recognises this
    # combine function and sums with numpy.
    return tl.reduce(x, 0, tl.standard._sum_combine)


@triton.jit
def _tile_sq_sum(g_ptr, offs, mask, ACC: tl.constexpr):
    if mask is None:
        g = tl.load(g_ptr + offs, eviction_policy="evict_first").to(ACC)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first").to(ACC)
    return _sum(g * g)


@triton.jit(do_not_specialize=["n_rows", "n_iters"])
def _sq_norm_partials_kernel(
    table, partials, n_rows, n_iters,
    GRAD: tl.constexpr, ACC: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """``partials[tile] = sum(g^2)`` over one tile of one gradient, accumulated in ``ACC``."""
    tile = tl.program_id(0).to(tl.int64)
    row = _find_row(table, n_rows, n_iters, tile)
    numel = tl.load(row + _COL_NUMEL)
    start = (tile - tl.load(row + _COL_TILE0)) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    g_ptr = _column_ptr(row, _COL_GRAD, GRAD, ALIGNED)
    if start + BLOCK <= numel:
        total = _tile_sq_sum(g_ptr, offs, None, ACC)
    else:
        total = _tile_sq_sum(g_ptr, offs, offs < numel, ACC)
    tl.store(partials + tile, total)


@triton.jit
def _segment_sum_kernel(partials, segments, out, BLOCK: tl.constexpr):
    """``out[i] = sum(partials[first_i : first_i + count_i])`` in a fixed order (deterministic)."""
    i = tl.program_id(0).to(tl.int64)
    first = tl.load(segments + 2 * i)
    count = tl.load(segments + 2 * i + 1)
    acc = tl.full([BLOCK], 0, dtype=out.dtype.element_ty)
    for k in range(0, count, BLOCK):
        idx = k + tl.arange(0, BLOCK)
        acc += tl.load(partials + first + idx, mask=idx < count, other=0.0)
    tl.store(out + i, _sum(acc))


# --------------------------------------------------------------------------- host side

_table_cache: dict[tuple, Tensor] = {}


def _device_table(rows: list[tuple[int, ...]], device: torch.device) -> Tensor:
    """The rows as an int64 device tensor, copied asynchronously and cached by content."""
    key = (device, tuple(rows))
    table = _table_cache.get(key)
    if table is None:
        host = torch.tensor(rows, dtype=torch.int64)
        if device.type == "cuda":
            # Pinned + non_blocking: no host synchronisation for the copy.
            table = host.pin_memory().to(device, non_blocking=True)
        else:
            table = host.to(device)
        if len(_table_cache) >= _TABLE_CACHE_SIZE:
            _table_cache.pop(next(iter(_table_cache)))
        _table_cache[key] = table
    return table


def _n_iters(n_rows: int) -> int:
    """Binary-search steps that narrow ``n_rows`` candidates down to one."""
    return (n_rows - 1).bit_length()


def _n_tiles(numel: int) -> int:
    return -(-numel // _BLOCK)


def _aligned(rows: list[tuple[int, ...]], columns: Sequence[int]) -> bool:
    return all(row[c] % _ALIGN.value == 0 for row in rows for c in columns)


def _groups(keys: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Indices by key, in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _check_lengths(**lists: Sequence) -> int:
    lengths = {name: len(seq) for name, seq in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"all lists must have the same length, got {lengths}")
    return next(iter(lengths.values()), 0)


def _on_device(device: torch.device) -> ContextManager:
    """Launch context for ``device``: Triton launches on the current CUDA device."""
    if device.type != "cuda" and not _INTERPRET:
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


def _contiguous_grad(
    name: str, grad: Tensor, shape: Optional[torch.Size], device: torch.device
) -> Tensor:
    """Gradients are only read, so a non-contiguous one is copied rather than refused."""
    if grad.dtype not in _GRAD_DTYPES:
        raise ValueError(f"{name} has dtype {grad.dtype}, expected one of {_GRAD_DTYPES}")
    if shape is not None and grad.shape != shape:
        raise ValueError(f"{name} has shape {tuple(grad.shape)}, expected {tuple(shape)}")
    if grad.device != device:
        raise ValueError(f"{name} is on {grad.device}, expected {device}")
    return grad.contiguous()


def _check_weights(
    i: int, param: Tensor, master: Optional[Tensor], exp_avg: Tensor, exp_avg_sq: Tensor
) -> None:
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


def _update_rows(
    indices: Sequence[int],
    params: Sequence[Tensor],
    grads: Optional[Sequence[Tensor]],
    masters: Sequence[Optional[Tensor]],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
) -> tuple[list[tuple[int, ...]], int]:
    """Table rows of the non-empty tensors among ``indices`` and their total tile count."""
    rows, tiles = [], 0
    for i in indices:
        numel = params[i].numel()
        if numel == 0:
            continue
        master = masters[i]
        rows.append((
            params[i].data_ptr(),
            grads[i].data_ptr() if grads is not None else 0,
            master.data_ptr() if master is not None else 0,
            exp_avgs[i].data_ptr(),
            exp_avg_sqs[i].data_ptr(),
            numel,
            tiles,
            i,
        ))
        tiles += _n_tiles(numel)
    return rows, tiles


def _check_grid(tiles: int) -> None:
    if tiles >= 2**31:
        raise ValueError(f"{tiles} tiles of {_BLOCK} elements exceed the CUDA grid limit")


def _launch_update(
    rows: list[tuple[int, ...]],
    tiles: int,
    skip: Optional[Tensor],
    device: torch.device,
    scalars: tuple[float, ...],
    *,
    param: torch.dtype,
    grad: torch.dtype,
    has_master: bool,
    momentum: bool,
) -> None:
    if not rows:
        return
    _check_grid(tiles)
    table = _device_table(rows, device)
    _update_kernel[(tiles,)](
        # The momentum step never reads skip: the table stands in for the pointer.
        table, table if skip is None else skip, len(rows), _n_iters(len(rows)), *scalars,
        PARAM=_TL_DTYPES[param], GRAD=_TL_DTYPES[grad], HAS_MASTER=has_master,
        MOMENTUM=momentum, ALIGNED=_aligned(rows, _POINTER_COLUMNS), BLOCK=_BLOCK,
        num_warps=_NUM_WARPS, enable_fp_fusion=False,
    )


def _launch_sq_norm_partials(
    grads: Sequence[Tensor], indices: Sequence[int], tiles: Sequence[int], partials: Tensor
) -> None:
    """Squared sums of the tiles of ``grads[indices]`` (one dtype) into ``partials``, in order."""
    rows, n_tiles = [], 0
    for i in indices:
        if tiles[i]:
            rows.append((0, grads[i].data_ptr(), 0, 0, 0, grads[i].numel(), n_tiles, i))
        n_tiles += tiles[i]
    if not rows:
        return
    _sq_norm_partials_kernel[(n_tiles,)](
        _device_table(rows, partials.device), partials, len(rows), _n_iters(len(rows)),
        GRAD=_TL_DTYPES[grads[indices[0]].dtype], ACC=_TL_DTYPES[partials.dtype],
        ALIGNED=_aligned(rows, (_COL_GRAD.value,)), BLOCK=_BLOCK, num_warps=_NUM_WARPS,
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
        tiles = [_n_tiles(g.numel()) for g in grads]
        _check_grid(sum(tiles))
        partials = torch.empty(sum(tiles), dtype=out.dtype, device=out.device)
        firsts, base = [0] * len(grads), 0
        for indices in _groups([g.dtype for g in grads]).values():
            _launch_sq_norm_partials(grads, indices, tiles, partials[base:])
            for i in indices:
                firsts[i], base = base, base + tiles[i]
        segments = _device_table(list(zip(firsts, tiles)), out.device)
        _segment_sum_kernel[(len(grads),)](partials, segments, out, BLOCK=_REDUCE_BLOCK)
    return out


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
    """One AdamW step (Alg. 1 lines 10-12) over every tensor, in place, fused.

    Per element: ``m <- beta1 m + (1 - beta1) g``, ``v <- beta2 v + (1 - beta2) g^2``,
    ``theta <- theta (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)``, computed in fp32.
    ``masters[i]`` is the fp32 master of a low-precision ``params[i]``: the kernel reads the
    master and writes both the master and the rounded param in the same pass; with ``None``
    ``params[i]`` itself is updated (a bf16/fp16 one is rounded once, from fp32, where the twin
    also rounds ``theta (1 - lr wd)``). ``grads`` may be any float dtype; moments are fp32.
    ``skip[i]`` (bool or uint8, on device) leaves tensor ``i`` entirely untouched.
    ``step``, ``lr`` and the betas are runtime arguments: changing them never recompiles.
    One launch per (param dtype, grad dtype, has-master) group.
    """
    n = _check_lengths(params=params, grads=grads, masters=masters, exp_avgs=exp_avgs,
                       exp_avg_sqs=exp_avg_sqs)
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    if n == 0:
        return
    device = params[0].device
    with _on_device(device):
        skip = _check_skip(skip, n, device)
        for i in range(n):
            _check_weights(i, params[i], masters[i], exp_avgs[i], exp_avg_sqs[i])
        grads = [
            _contiguous_grad(f"grads[{i}]", g, params[i].shape, device)
            for i, g in enumerate(grads)
        ]
        scalars = (1.0 - beta1, beta2, 1.0 - beta2, bc2, eps, lr / bc1, 1.0 - lr * weight_decay)
        keys = [(p.dtype, g.dtype, m is not None) for p, g, m in zip(params, grads, masters)]
        for (param, grad, has_master), indices in _groups(keys).items():
            rows, tiles = _update_rows(indices, params, grads, masters, exp_avgs, exp_avg_sqs)
            _launch_update(rows, tiles, skip, device, scalars, param=param, grad=grad,
                           has_master=has_master, momentum=False)


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
    """The extra step at the end of an inner loop (Alg. 1 line 16), in place, fused:
    ``theta <- theta - lr * beta1 * m_hat / (sqrt(v_hat) + eps)`` with the moments at ``t = step``.

    Moments are only read. Same master / low-precision write rule as :func:`adam_update_`;
    one launch per (param dtype, has-master) group.
    """
    n = _check_lengths(params=params, masters=masters, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    bc1, bc2 = bias_corrections(step, beta1, beta2)
    if n == 0:
        return
    device = params[0].device
    with _on_device(device):
        for i in range(n):
            _check_weights(i, params[i], masters[i], exp_avgs[i], exp_avg_sqs[i])
        scalars = (1.0 - beta1, beta2, 1.0 - beta2, bc2, eps, lr * beta1 / bc1, 1.0)
        keys = [(p.dtype, m is not None) for p, m in zip(params, masters)]
        for (param, has_master), indices in _groups(keys).items():
            rows, tiles = _update_rows(indices, params, None, masters, exp_avgs, exp_avg_sqs)
            _launch_update(rows, tiles, None, device, scalars, param=param,
                           grad=torch.float32, has_master=has_master, momentum=True)
