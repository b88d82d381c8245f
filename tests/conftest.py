"""Shared fixtures: tiny Hugging Face models built from configs (never downloaded)."""
from __future__ import annotations

import os
from typing import Optional

import torch

if not torch.cuda.is_available():
    # Triton reads this when its kernels are decorated, i.e. at import; transformers may
    # import triton, so it is set before anything else loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 256  # byte-level, matches misa_kernels.data

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def tiny_llama(layers: int = 2, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**{**_COMMON, "num_hidden_layers": layers, **overrides})
    return LlamaForCausalLM(config).to(dtype)


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**_COMMON))


def tiny_mistral(seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=64))


def tiny_gpt2(seed: int = 0, **config) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, **config))


def random_batch(batch: int = 2, seq: int = 16, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    return {"input_ids": ids, "labels": ids}


def count_calls(module, name: str, replace=setattr) -> list[int]:
    """Count the calls of ``module.name`` from now on (``replace``: e.g. ``monkeypatch.setattr``;
    the default suits a spawned rank's own copy of the module)."""
    count, inner = [0], getattr(module, name)

    def counted(*args, **kwargs):
        count[0] += 1
        return inner(*args, **kwargs)

    replace(module, name, counted)
    return count


class HostTraffic:
    """Records the calls that, on a GPU, make the host wait for the device (reading a value:
    ``bool(t)``, ``t.item()``, ``t.tolist()``, ...) or copy host data to it
    (``torch.tensor(list, device=...)``). On the CPU they cost nothing, so counting them is
    how a CPU test proves a step free of them. The methods themselves are wrapped (a
    ``TorchFunctionMode`` would miss autograd hooks and callbacks)."""

    READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu")
    COPIES = ("tensor", "as_tensor")

    def __enter__(self) -> "HostTraffic":
        self.calls: list[str] = []
        self._restore: list = []
        for name in self.READS:
            self._wrap(torch.Tensor, name)
        for name in self.COPIES:
            self._wrap(torch, name)
        return self

    def _wrap(self, owner, name: str) -> None:
        original, own = getattr(owner, name), name in vars(owner)

        def counted(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        setattr(owner, name, counted)
        self._restore.append((owner, name, original if own else None))

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._restore):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def assert_runs_agree(params, reference, lr: float, what: str = "") -> None:
    """Two training runs that differ only in fp32 rounding (gradient accumulation, sharding)
    agree: every element to 2% of one step ``lr``, 99.9% of them to 1e-6. Adam amplifies
    rounding at elements whose gradient is near ``eps``, where ``g / (|g| + eps)`` is
    ill-conditioned, so a handful of elements legitimately drift by a fraction of ``lr``."""
    ours = torch.cat([p.detach().float().flatten() for p in params])
    theirs = torch.cat([p.detach().float().flatten() for p in reference])
    gap = (ours - theirs).abs()
    assert float(gap.max()) <= 0.02 * lr, f"{what}: an element is {float(gap.max()):.3g} off (lr {lr})"
    tight = gap <= 1e-6 + 1e-5 * theirs.abs()
    assert float(tight.float().mean()) >= 0.999, f"{what}: only {float(tight.float().mean()):.4%} agree to 1e-6"


def saved_activation_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of tensors autograd saves during one forward of ``model``, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.untyped_storage().data_ptr() not in param_storages:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return total


def enable_checkpointing(model: torch.nn.Module, reentrant: Optional[bool]) -> None:
    """HF gradient checkpointing, reentrant or not; ``None`` leaves it off."""
    if reentrant is None:
        return
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name, no deprecation warning
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of one rank (FileStore rendezvous), destroyed afterwards."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def load_example(name: str):
    """``python/<name>.py`` imported as a module (registered, as dataclasses need)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "python" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
