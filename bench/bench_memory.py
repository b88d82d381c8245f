"""Training memory vs sequence length (paper Fig. 2): MISA vs LoRA vs full AdamW.

For each method and sequence length, a LLaMA-style model (built from a config, random
token ids) takes a warm-up step so that optimizer states exist, then a measured step, in
which we measure:

* ``saved_activation_bytes``: tensors autograd keeps for backward during the forward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded, each storage once;
* ``gradient_bytes``: gradients held at once (``.grad`` after backward; for MISA's sparse
  backward the peak of its fp32 buffers, one module with ``step_in_backward``);
* ``optimizer_bytes``: optimizer states (MISA: fp32 master + m + v of the active set);
* ``weight_bytes``: parameters and buffers of the model (LoRA adapters included);
* ``peak_bytes`` (CUDA only): ``torch.cuda.max_memory_allocated`` over the step.

``total_bytes`` is the sum of the four measured parts (on CPU the closest thing to a
peak); MISA's row is the largest total over a few sampling seeds (its memory depends
on the depth of its lowest active module). Methods: full AdamW, LoRA
r=16 and r=128 on every block Linear (``peft``; a row says so if it is missing), MISA
delta=1% and 3% with the sparse backward, with and without ``step_in_backward``.

    python bench/bench_memory.py --quick            # CPU, small model, seq 64..512
    python bench/bench_memory.py                    # CUDA: ~1.1B bf16 model, seq 128..4096
    python bench/bench_memory.py --json out.json
    python bench/bench_memory.py --quick --moe      # a Mixtral-style MoE model instead

With ``--moe`` the model is a Mixtral (8 experts, top-2): MISA's units are then the
attention's modules, the routers and every expert's two matrices, and its per-expert
forward computes weight gradients for the active experts only; AdamW runs transformers'
default experts implementation (``grouped_mm``, full 3-D weight gradients), LoRA adapts the
attention's Linears (the MoE blocks have no other ``nn.Linear``).

The paper's goal (Fig. 2): MISA delta=1% at most 0.86x LoRA r=16's peak at seq >= 1024
on a >= 1B model; the ``vs LoRA r16`` column gives that ratio (of ``peak_bytes`` on
CUDA, ``total_bytes`` elsewhere).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import saved_tensors_hooks
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import misa_kernels as mk  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("adamw", "lora-r16", "lora-r128", "misa-1%", "misa-3%", "misa-1%-sib", "misa-3%-sib")
REFERENCE = "lora-r16"


@dataclass(frozen=True)
class Setup:
    """Model shape, dtype, device and batch of one benchmark run."""

    config: dict
    dtype: torch.dtype
    device: torch.device
    batch_size: int
    seq_lens: tuple[int, ...]
    warmup: int = 1
    measured: int = 3  # MISA sampling seeds
    moe: bool = False  # a Mixtral instead of a LLaMA

    def build_model(self) -> nn.Module:
        torch.manual_seed(0)
        config = MixtralConfig(**self.config) if self.moe else LlamaConfig(**self.config)
        model = (MixtralForCausalLM if self.moe else LlamaForCausalLM)(config)
        return model.to(self.device, self.dtype).train()


# 6 layers (4.48M parameters): delta=1% (45k) still fits a k/v projection (33k), as on big models.
QUICK = dict(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
# TinyLlama-1.1B's shape (22 layers, GQA 32/4, SwiGLU 5632): a >= 1B LLaMA-style model.
FULL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
            num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)


# Mixtral-style, 8 experts top-2: 4 layers (13.5M parameters; an expert's down_proj 131k, 0.97%).
QUICK_MOE = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096)
# 16 layers, hidden 1024, 8 experts of width 2816: 1.2B parameters (one gate_up_proj 0.47%).
FULL_MOE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                max_position_embeddings=4096)


def default_setup(quick: bool, seq_lens: Optional[list[int]] = None, moe: bool = False) -> Setup:
    """CPU fp32 small model when ``quick`` or without CUDA; else the 1.1B model in bf16
    (``moe``: the Mixtral-style shapes instead)."""
    if quick or not torch.cuda.is_available():
        return Setup(QUICK_MOE if moe else QUICK, torch.float32, torch.device("cpu"), 2,
                     tuple(seq_lens or (64, 128, 256, 512)), moe=moe)
    return Setup(FULL_MOE if moe else FULL, torch.bfloat16, torch.device("cuda"), 1,
                 tuple(seq_lens or (128, 256, 512, 1024, 2048, 4096)), moe=moe)


# ---------------------------------------------------------------------- methods
class MissingPeer(RuntimeError):
    """An optional benchmark peer (peft) is not installed."""


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _adam_state_bytes(opt: torch.optim.Optimizer) -> int:
    return _nbytes(v for state in opt.state.values() for v in state.values() if isinstance(v, Tensor))


@dataclass
class Method:
    """A model ready to train, its optimizer, and how to read its memory."""

    model: nn.Module
    opt: torch.optim.Optimizer
    optimizer_bytes: Callable[[], int]
    gradient_bytes: Callable[[], int]


def _plain_grads(model: nn.Module) -> Callable[[], int]:
    return lambda: _nbytes(p.grad for p in model.parameters())


def _adamw(model: nn.Module) -> Method:
    fused = next(model.parameters()).is_cuda
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=fused)
    return Method(model, opt, lambda: _adam_state_bytes(opt), _plain_grads(model))


def _lora(model: nn.Module, rank: int) -> Method:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as err:
        raise MissingPeer("peft not installed (pip install -e .[bench])") from err
    present = [name for name in LINEARS if any(n.endswith(f".{name}") for n, _ in model.named_modules())]
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=present, lora_dropout=0.0))
    return _adamw(model)


def _misa(model: nn.Module, delta: float, step_in_backward: bool, seed: int) -> Method:
    # One outer iteration spans the measurement, so the states stay allocated.
    opt = mk.MISA(model, lr=1e-5, delta=delta, inner_steps=1000, sweep=False, seed=seed, sparse_backward=True,
                  step_in_backward=step_in_backward)

    def optimizer_bytes() -> int:
        report = opt.memory_report()
        return report["master_weights"] + report["moments"]

    return Method(model, opt, optimizer_bytes, lambda: opt.peak_gradient_bytes or 0)


def build_method(name: str, model: nn.Module, seed: int = 0) -> Method:
    """``name`` from :data:`METHODS` applied to ``model`` (``seed``: MISA's sampling)."""
    if name == "adamw":
        return _adamw(model)
    if name.startswith("lora-r"):
        return _lora(model, int(name.removeprefix("lora-r")))
    delta = float(name.split("-")[1].rstrip("%")) / 100
    return _misa(model, delta, name.endswith("-sib"), seed)


# ---------------------------------------------------------------------- measuring
def saved_bytes_counter(model: nn.Module) -> tuple[saved_tensors_hooks, Callable[[], int]]:
    """A ``saved_tensors_hooks`` context and a reader of the bytes it saw: non-parameter
    tensors, each storage counted once (q, k and v save the same input)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    return saved_tensors_hooks(pack, lambda t: t), lambda: sum(seen.values())


def _batch(setup: Setup, seq_len: int, step: int) -> dict:
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, setup.config["vocab_size"], (setup.batch_size, seq_len), generator=generator)
    ids = ids.to(setup.device)
    return {"input_ids": ids, "labels": ids}


def _train_step(method: Method, batch: dict) -> int:
    """One step; returns the saved-activation bytes of its forward."""
    hooks, saved = saved_bytes_counter(method.model)
    with hooks:
        loss = method.model(**batch).loss
    loss.backward()
    return saved()


def _measured_step(method: Method, batch: dict) -> dict:
    cuda = batch["input_ids"].is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if isinstance(method.opt, mk.MISA):
        method.opt.reset_peak_gradient_bytes()
    saved = _train_step(method, batch)
    grads = method.gradient_bytes()
    method.opt.step()
    row = dict(saved_activation_bytes=saved, gradient_bytes=grads, optimizer_bytes=method.optimizer_bytes(),
               weight_bytes=_nbytes(list(method.model.parameters()) + list(method.model.buffers())))
    method.opt.zero_grad(set_to_none=True)
    row["total_bytes"] = sum(row.values())
    row["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    return row


def _measure_draw(name: str, seq_len: int, setup: Setup, seed: int) -> dict:
    """Warm-up steps, then one measured step, on a fresh model (MISA samples with ``seed``)."""
    model = setup.build_model()
    method = build_method(name, model, seed)
    for step in range(setup.warmup):
        _train_step(method, _batch(setup, seq_len, step))
        method.opt.step()
        method.opt.zero_grad(set_to_none=True)
    row = _measured_step(method, _batch(setup, seq_len, setup.warmup))
    if isinstance(method.opt, mk.MISA):
        method.opt.detach()
    del method, model
    if setup.device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_one(name: str, seq_len: int, setup: Setup) -> dict:
    """The largest total over ``setup.measured`` draws: MISA's memory depends on where its
    active modules are (layers below the lowest one build no graph)."""
    draws = range(setup.measured if name.startswith("misa") else 1)
    return max((_measure_draw(name, seq_len, setup, seed) for seed in draws), key=lambda r: r["total_bytes"])


def measure_memory(seq_lens: list[int], quick: bool, methods: tuple[str, ...] = METHODS,
                   progress: bool = True, moe: bool = False) -> list[dict]:
    """Rows ``method, seq_len, peak_bytes (None on CPU), saved_activation_bytes,
    optimizer_bytes, gradient_bytes, weight_bytes, total_bytes`` (``error`` instead of the
    numbers when a peer is missing or the run does not fit); ``moe``: on the Mixtral shapes."""
    setup = default_setup(quick, seq_lens, moe)
    rows = []
    runs = [(name, seq) for seq in setup.seq_lens for name in methods]
    for name, seq in tqdm(runs, desc="memory vs sequence length", disable=not progress):
        row = dict(method=name, seq_len=seq, device=str(setup.device), dtype=str(setup.dtype).removeprefix("torch."))
        rows.append({**row, **measure_or_error(name, seq, setup)})
    return rows


def measure_or_error(name: str, seq: int, setup) -> dict:
    """:func:`measure_one`'s readings, or ``{"error": why}`` when a peer is missing or the
    run does not fit."""
    try:
        return measure_one(name, seq, setup)
    except MissingPeer as err:
        return {"error": str(err)}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "out of memory"}


# ---------------------------------------------------------------------- report
def _mib(value: Optional[int]) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _headline(row: dict) -> Optional[int]:
    return row.get("peak_bytes") or row.get("total_bytes")


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per (sequence length, method), MiB, with the ratio to LoRA r=16."""
    reference = {r["seq_len"]: _headline(r) for r in rows if r["method"] == REFERENCE and "error" not in r}
    lines = ["| seq | method | saved activations | gradients | optimizer | weights | total | peak (CUDA) "
             "| vs LoRA r16 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq_len']} | {r['method']} | {r['error']} | | | | | | |")
            continue
        ref = reference.get(r["seq_len"])
        ratio = f"{_headline(r) / ref:.2f}x" if ref else "-"
        lines.append(f"| {r['seq_len']} | {r['method']} | {_mib(r['saved_activation_bytes'])} | "
                     f"{_mib(r['gradient_bytes'])} | {_mib(r['optimizer_bytes'])} | {_mib(r['weight_bytes'])} | "
                     f"{_mib(r['total_bytes'])} | {_mib(r['peak_bytes'])} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model on CPU (the default without CUDA)")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="sequence lengths to measure")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--moe", action="store_true", help="a Mixtral-style mixture-of-experts model")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    rows = measure_memory(args.seq_lens, args.quick, tuple(args.methods), progress=not args.no_progress,
                          moe=args.moe)
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
        print(f"rows written to {args.json}")


if __name__ == "__main__":
    main()
