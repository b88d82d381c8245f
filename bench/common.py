"""Settings, presets, models, data and small helpers shared by every benchmark section."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from misa_kernels.data import VOCAB_SIZE, batches, lm_splits

PRETRAIN_CORPUS = "python-reference"
FINETUNE_CORPUS = "python-docstrings"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-style decoder, built from a config (nothing is downloaded)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = VOCAB_SIZE


@dataclass(frozen=True)
class PeerSettings:
    """Hyperparameters of the peers that are not a learning rate."""

    lora_rank: int = 16
    lora_alpha: int = 32
    galore_rank: int = 32
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    badam_switch_every: int = 50


@dataclass(frozen=True)
class LatencySettings:
    """Paper Table 8 in small: one training step split into forward, backward, optimizer."""

    shape: ModelShape
    dtype: str
    seq_len: int
    batch_size: int
    warmup: int
    repeats: int
    deltas: tuple[float, ...] = (0.01, 0.03)
    # MISA and BAdam change their active set every 10 steps here, so that the timed steps
    # span several sets (how deep the lowest active layer is sets the backward cost).
    inner_steps: int = 10
    peers: PeerSettings = PeerSettings(badam_switch_every=10)


@dataclass(frozen=True)
class ConvergenceSettings:
    """Fine-tuning and pre-training runs, each method with a small learning-rate sweep."""

    shape: ModelShape
    dtype: str
    seq_len: int
    batch_size: int
    pretrain_steps: int
    finetune_steps: int
    eval_rows: int
    eval_points: int
    delta: float  # MISA's fine-tuning budget (see the presets for why it differs by model)
    inner_steps: int
    pretrain_delta: float
    finetune_lrs: dict[str, tuple[float, ...]]
    pretrain_lrs: dict[str, tuple[float, ...]]
    peers: PeerSettings = PeerSettings()
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class BenchSettings:
    """Everything one ``python -m bench`` run does, resolved from a preset and the device."""

    preset: str
    device: str
    latency: LatencySettings
    convergence: ConvergenceSettings
    memory_seq_lens: tuple[int, ...]
    progress: bool = True

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Quick: finishes in a few minutes on 2 CPU cores. The fine-tuning budget delta=0.1 is the
# smallest at which each MLP matrix of this tiny model (5.6% of its parameters) fits: at 3%
# Algorithm 2 could never select one. Learning-rate grids are x3 steps around a centre
# found by hand on this preset; each method gets the same number of points.
_QUICK_FT_LRS = {
    "adamw": (3e-4, 1e-3, 3e-3), "misa": (3e-4, 1e-3, 3e-3), "badam": (1e-4, 3e-4, 1e-3),
    "lora": (1e-3, 3e-3, 1e-2), "galore": (1e-3, 3e-3, 1e-2),
}
_QUICK_PT_LRS = {"adamw": (3e-4, 1e-3, 3e-3), "misa": (1e-3, 3e-3, 1e-2), "galore": (3e-3, 1e-2, 3e-2)}

PRESETS: dict[str, BenchSettings] = {
    "quick": BenchSettings(
        preset="quick", device="cpu",
        latency=LatencySettings(
            shape=ModelShape(hidden=256, layers=4, heads=4, kv_heads=1, intermediate=688),
            dtype="float32", seq_len=128, batch_size=4, warmup=5, repeats=60,
            peers=PeerSettings(galore_rank=64, badam_switch_every=10),
        ),
        convergence=ConvergenceSettings(
            shape=ModelShape(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=344),
            dtype="float32", seq_len=64, batch_size=8, pretrain_steps=400, finetune_steps=300,
            eval_rows=64, eval_points=10, delta=0.1, inner_steps=10, pretrain_delta=0.25,
            finetune_lrs=_QUICK_FT_LRS, pretrain_lrs=_QUICK_PT_LRS,
            peers=PeerSettings(galore_rank=32, galore_update_proj_gap=50, badam_switch_every=10),
        ),
        memory_seq_lens=(64, 128, 256),
    ),
    # Full mode on a GPU: latency on a TinyLlama-1.1B-shaped model in bf16 (>= 1B parameters,
    # vocabulary 32000; the byte-level text only uses ids < 256), convergence on a 23M model.
    "cuda": BenchSettings(
        preset="cuda", device="cuda",
        latency=LatencySettings(
            shape=ModelShape(hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632, vocab=32000),
            dtype="bfloat16", seq_len=1024, batch_size=4, warmup=5, repeats=60,
            peers=PeerSettings(galore_rank=512, badam_switch_every=10),
        ),
        convergence=ConvergenceSettings(
            shape=ModelShape(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1376),
            dtype="bfloat16", seq_len=256, batch_size=32, pretrain_steps=1000, finetune_steps=500,
            eval_rows=256, eval_points=10, delta=0.03, inner_steps=50, pretrain_delta=0.25,
            finetune_lrs={
                "adamw": (3e-5, 1e-4, 3e-4), "misa": (1e-4, 3e-4, 1e-3), "badam": (1e-4, 3e-4, 1e-3),
                "lora": (3e-4, 1e-3, 3e-3), "galore": (1e-4, 3e-4, 1e-3),
            },
            pretrain_lrs={"adamw": (3e-4, 1e-3, 3e-3), "misa": (3e-4, 1e-3, 3e-3), "galore": (1e-3, 3e-3, 1e-2)},
            peers=PeerSettings(galore_rank=128, galore_update_proj_gap=200, badam_switch_every=50),
        ),
        memory_seq_lens=(512, 1024, 2048, 4096),
    ),
}
# Full mode without a GPU: the demo's CPU model, longer runs (tens of minutes).
PRESETS["cpu"] = replace(
    PRESETS["quick"], preset="cpu",
    latency=replace(PRESETS["quick"].latency, shape=ModelShape(hidden=512, layers=8, heads=8, kv_heads=4,
                                                               intermediate=1376), seq_len=256),
    convergence=replace(PRESETS["quick"].convergence, seq_len=128, batch_size=16, pretrain_steps=800,
                        finetune_steps=400),
    memory_seq_lens=(128, 256, 512, 1024),
)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; refuse ``cuda`` without a GPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return name


def resolve_settings(quick: bool, device: str, progress: bool = True) -> BenchSettings:
    """The preset for ``--quick`` or for the device (full mode), run on ``device``.

    ``device="auto"`` is the CPU in quick mode and the GPU, when there is one, in full mode."""
    device = resolve_device("cpu" if quick and device == "auto" else device)
    preset = PRESETS["quick" if quick else device]
    if device == "cpu" and preset.latency.dtype != "float32":  # bf16 matmuls on CPU are slow and not the point
        preset = replace(preset, latency=replace(preset.latency, dtype="float32"),
                         convergence=replace(preset.convergence, dtype="float32"))
    return replace(preset, device=device, progress=progress)


# ---------------------------------------------------------------------------- model and data
def build_model(shape: ModelShape, dtype: str, device: str, seed: int = 0, max_len: int = 4096) -> LlamaForCausalLM:
    """A fresh, seeded LLaMA-style model, initialised directly on ``device``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max_len, tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=getattr(torch, dtype))


def n_params(model: nn.Module) -> int:
    """Parameters of ``model``, shared tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def corpus_rows(name: str, seq_len: int, eval_rows: int) -> tuple[Tensor, Tensor]:
    """Train rows and a fixed validation subset (the first ``eval_rows`` rows) of ``name``."""
    train, val = lm_splits(name, seq_len)
    return train, val[:eval_rows]


def batch_stream(rows: Tensor, batch_size: int, device: str, seed: int) -> Iterator[Tensor]:
    """Seeded random batches of ``rows``, moved to ``device``."""
    for batch in batches(rows, batch_size, torch.Generator().manual_seed(seed)):
        yield batch.to(device, non_blocking=True)


def lm_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Next-byte cross-entropy (the model shifts the labels itself)."""
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def evaluate(model: nn.Module, rows: Tensor, batch_size: int, device: str) -> float:
    """Mean validation loss over ``rows``."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size].to(device)
        total += lm_loss(model, chunk).float().item() * len(chunk)
    model.train(was_training)
    return total / len(rows)


def synchronize(device: str) -> None:
    """Wait for queued GPU work so that wall-clock readings are real."""
    if device == "cuda":
        torch.cuda.synchronize()


def nbytes(tensor: Optional[Tensor]) -> int:
    """Bytes of ``tensor`` (0 for ``None``)."""
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def finite_or_none(value: float) -> Optional[float]:
    """``value``, or ``None`` when it is NaN or infinite (JSON has no NaN)."""
    return value if value is not None and math.isfinite(value) else None


# ---------------------------------------------------------------------------- output
def write_json(path: Path, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (strict: NaN is refused), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False))
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def cpu_count() -> int:
    """CPU cores this process may run on (``taskset`` is honoured)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

