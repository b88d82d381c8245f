"""The command line: ``python -m misa_kernels.estimate --model-config ... [--mode pretrain]``.

:func:`main` prints a Markdown table (:func:`format_table`) of full AdamW, LoRA,
layer-wise BCD and MISA (each ``--delta``, with and without ``step_in_backward``) at each
``--seq``; ``--mode`` applies to the MISA rows only."""
from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence

from .methods import MODES, PLACEMENTS, MemoryEstimate, estimate_memory
from .shapes import ATTENTION, BUILTIN_CONFIGS, ConfigLike, model_shape, parameter_count
from .units import GIB, parse_bytes

__all__ = ["format_table", "main", "parse_bytes"]


def _rows(config: ConfigLike, batch: int, seq: int, deltas: Sequence[float], **kw: Any) -> list[MemoryEstimate]:
    """One table block: AdamW, LoRA, layer-wise, then MISA per delta (+- step_in_backward)."""
    lora_rank, layers_active = kw.pop("lora_rank"), kw.pop("layers_active")
    placement, mode = kw.pop("placement"), kw.pop("mode")
    rows = [estimate_memory(config, batch, seq, method="adamw", **kw),
            estimate_memory(config, batch, seq, method="lora", lora_rank=lora_rank, **kw),
            estimate_memory(config, batch, seq, method="layerwise", layers_active=layers_active,
                            placement=placement, **kw)]
    for delta in deltas:
        for sib in (False, True):
            rows.append(estimate_memory(config, batch, seq, delta, "misa", placement=placement,
                                        step_in_backward=sib, mode=mode, **kw))
    return rows


def format_table(rows: Sequence[tuple[int, MemoryEstimate]], gpu_bytes: Optional[int] = None) -> str:
    """A Markdown table (GiB) of ``(seq, estimate)`` rows, with a fit column for ``gpu_bytes``."""
    head = ["method", "seq", "trainable", "weights", "grads", "optimizer", "activations", "transient", "total"]
    if gpu_bytes is not None:
        head.append(f"fits {gpu_bytes / GIB:.1f} GiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for seq, est in rows:
        cells = [est.label, str(seq), f"{est.trainable_params / est.n_params:.2%}"]
        cells += [f"{est.gib()[k]:.2f}" for k in ("weights", "gradients", "optimizer_states", "activations",
                                                  "transient", "total")]
        if gpu_bytes is not None:
            cells.append("yes" if est.fits(gpu_bytes) else f"no ({-est.headroom(gpu_bytes) / GIB:.1f} over)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m misa_kernels.estimate",
                                     description="Estimated training memory (paper App. E) of full AdamW, LoRA, "
                                                 "layer-wise BCD and MISA for a Hugging Face config.")
    parser.add_argument("--model-config", required=True,
                        help=f"config.json, its folder, or one of: {', '.join(sorted(BUILTIN_CONFIGS))}")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024])
    parser.add_argument("--delta", type=float, nargs="+", default=[0.01, 0.03])
    parser.add_argument("--gpu-memory", default=None, help="e.g. 24GiB, 80GB; adds a fits column")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attn-implementation", default=None, choices=ATTENTION)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--layers-active", type=int, default=1)
    parser.add_argument("--placement", default="worst", choices=PLACEMENTS)
    parser.add_argument("--no-master-weights", action="store_true",
                        help="AdamW/MISA/BAdam without fp32 master copies of 16-bit weights")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mode", default="finetune", choices=MODES,
                        help="MISA rows: pretrain also trains embedding, lm_head and norms densely")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the Markdown table for all methods at each ``--seq`` and ``--delta``."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        gpu = parse_bytes(args.gpu_memory) if args.gpu_memory is not None else None
        shape = model_shape(args.model_config, args.attn_implementation)
        kw = dict(dtype=args.dtype, attn_implementation=shape.attn_implementation, lora_rank=args.lora_rank,
                  layers_active=args.layers_active, placement=args.placement,
                  master_weights=False if args.no_master_weights else None,
                  gradient_checkpointing=args.gradient_checkpointing, mode=args.mode)
        rows = [(seq, est) for seq in args.seq for est in _rows(args.model_config, args.batch, seq, args.delta, **kw)]
    except ValueError as err:
        parser.error(str(err))  # exits with status 2 and the message naming the argument
    print(f"{args.model_config}: {parameter_count(shape) / 1e9:.2f}B parameters, {shape.attn_implementation} "
          f"attention, {args.dtype}, batch {args.batch}, MISA/layer-wise placement {args.placement}"
          f"{', MISA mode pretrain' if args.mode == 'pretrain' else ''} (GiB)\n")
    print(format_table(rows, gpu))
    return 0
