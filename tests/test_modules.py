"""Module discovery (paper Sec. 3.3) on real Hugging Face architectures built from configs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import misa_kernels as mk
from conftest import tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2

LLAMA_LIKE = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


def _kinds(units):
    return {u.name.split(".", 3)[3] for u in units}


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_mistral], ids=["llama", "qwen2", "mistral"])
def test_llama_family_modules(factory):
    model = factory()
    units = mk.discover_modules(model)
    assert len(units) == 2 * 7
    assert _kinds(units) == LLAMA_LIKE
    assert [u.layer for u in units] == [0] * 7 + [1] * 7
    for unit in units:
        assert unit.params[0] is model.get_submodule(unit.name).weight
        assert unit.params[0].dim() == 2


def test_qwen2_biases_belong_to_their_module():
    model = tiny_qwen2()
    q = next(u for u in mk.discover_modules(model) if u.name.endswith("q_proj"))
    layer = model.get_submodule(q.name)
    assert q.params == (layer.weight, layer.bias)
    assert q.numel == layer.weight.numel() + layer.bias.numel()


def test_gpt2_modules():
    model = tiny_gpt2()
    units = mk.discover_modules(model)
    assert {u.name.split(".", 3)[3] for u in units} == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    assert len(units) == 8


def test_embeddings_head_and_norms_are_not_modules():
    model = tiny_llama()
    params = {id(p) for u in mk.discover_modules(model) for p in u.params}
    for name, p in model.named_parameters():
        is_module = "layers" in name and p.dim() == 2
        assert (id(p) in params) == is_module, name


def test_module_filter_for_unknown_architecture():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="module_filter"):
        mk.discover_modules(model)
    units = mk.discover_modules(model, module_filter=lambda name, m: isinstance(m, nn.Linear))
    assert [u.name for u in units] == ["0", "2"]
    with pytest.raises(ValueError, match="module_filter"):
        mk.discover_modules(model, module_filter=lambda name, m: False)


def test_custom_repeated_blocks_are_found_without_names():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 4)
            self.norm = nn.LayerNorm(4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.small = nn.ModuleList([nn.Linear(4, 4)])
            self.stack = nn.ModuleList([Block() for _ in range(3)])

    units = mk.discover_modules(Net())
    assert [u.name for u in units] == [f"stack.{i}.{n}" for i in range(3) for n in ("a", "b")]


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="model"):
        mk.MISA([torch.zeros(2, 2)])


def test_layer_granularity_groups_modules():
    opt = mk.MISA(tiny_llama(layers=3), delta=0.5, granularity="layer")
    assert [u.name for u in opt.units] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert all(len(u.module_names) == 7 for u in opt.units)
