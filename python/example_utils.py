"""Small helpers shared by the examples in this folder (model, data, evaluation, plots).

The examples import this file from beside them; each stays runnable on its own from the
repository root (``python python/<example>.py``), on CPU, with nothing downloaded.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # misa_kernels without `pip install -e .`, and bench/
    sys.path.insert(0, str(REPO))
from misa_kernels.data import VOCAB_SIZE, batches, lm_splits  # noqa: E402

RUNS = REPO / "runs"  # git-ignored


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def tiny_llama(hidden: int = 128, layers: int = 4, seq_len: int = 128, seed: int = 0,
               device: str = "cpu") -> LlamaForCausalLM:
    """A byte-level LLaMA-style model built from a config (seeded; nothing downloaded)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=seq_len, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(device)


def text_rows(corpus: str, seq_len: int, eval_rows: int = 64) -> tuple[Tensor, Tensor]:
    """Train rows and the first ``eval_rows`` validation rows of a ``misa_kernels.data`` corpus."""
    train, val = lm_splits(corpus, seq_len)
    return train, val[:eval_rows]


def batch_stream(rows: Tensor, batch_size: int, device: str, seed: int = 0) -> Iterator[Tensor]:
    """Endless seeded random batches of ``rows`` on ``device``."""
    for batch in batches(rows, batch_size, torch.Generator().manual_seed(seed)):
        yield batch.to(device)


@torch.no_grad()
def evaluate(model: nn.Module, rows: Tensor, batch_size: int, device: str) -> float:
    """Mean next-byte cross-entropy over ``rows``."""
    model.eval()
    total = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size].to(device)
        total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    model.train()
    return total / len(rows)


def pretrain_briefly(model: nn.Module, steps: int, batch_size: int, seq_len: int, lr: float = 3e-3) -> float:
    """Dense AdamW on ``python-reference`` so that fine-tuning starts from a real base model;
    returns the final validation loss."""
    device = next(model.parameters()).device.type
    train, val = text_rows("python-reference", seq_len)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    stream = batch_stream(train, batch_size, device)
    for _ in tqdm(range(steps), desc="pre-train base (AdamW, python-reference)"):
        ids = next(stream)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return evaluate(model, val, batch_size, device)


def save_loss_plot(curves: dict[str, list[tuple[float, float]]], path: Path, title: str,
                   xlabel: str = "step") -> Optional[Path]:
    """Plot ``{label: [(x, loss), ...]}`` to ``path`` and say where it went; ``None`` (and a
    message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[demo]): no plot written")
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker=".", label=label)
    ax.set(xlabel=xlabel, ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"loss plot written to {path}")
    return path
