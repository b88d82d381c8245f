"""The memory estimator on mixture-of-experts configs (Mixtral, Qwen2-MoE with a shared
expert and a dense first block), against measurements on tiny models: parameter counts,
saved activations (MISA's per-expert forward, transformers' grouped_mm for AdamW and LoRA),
gradient buffers and optimizer states."""
from __future__ import annotations

import json

import pytest
from transformers import MixtralConfig, Qwen2MoeConfig

import misa_kernels as mk
from misa_kernels.estimate import main, model_shape, parameter_count
from test_estimate import BATCH, SEQ, VOCAB, adam_state_bytes, assert_close, saved_bytes, tiny_model

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, num_experts_per_tok=2)


def moe_config(kind: str, attn: str = "eager"):
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=96, num_local_experts=4, attn_implementation=attn, **_COMMON)
    return Qwen2MoeConfig(intermediate_size=160, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                          num_experts=4, mlp_only_layers=[0], attn_implementation=attn, **_COMMON)


KINDS = ["mixtral", "qwen2_moe"]


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_counts(kind):
    config = moe_config(kind)
    model = tiny_model(config)
    assert parameter_count(model_shape(config)) == sum(p.numel() for p in model.parameters())
    shape = model_shape(config)
    assert shape.experts == 4 and shape.top_k == 2
    assert shape.dense_layers == ((0,) if kind == "qwen2_moe" else ())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_full_adamw_and_lora_activations(kind, attn):
    """Baselines run transformers' default experts implementation (grouped_mm)."""
    config = moe_config(kind, attn)
    model = tiny_model(config)
    est = mk.estimate_memory(config, BATCH, SEQ, method="adamw", dtype="float32")
    assert_close(est.activations, saved_bytes(model), "adamw activations")
    peft = pytest.importorskip("peft")
    # the estimate's LoRA on a MoE model: the nn.Linear modules (peft's "all-linear" would
    # also wrap the fused experts and the router, which the estimate does not model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_expert_gate"]
    model = peft.get_peft_model(tiny_model(config), peft.LoraConfig(r=4, target_modules=targets))
    est = mk.estimate_memory(config, BATCH, SEQ, method="lora", dtype="float32", lora_rank=4)
    assert est.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert_close(est.activations, saved_bytes(model), "lora activations")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_misa_exact_active_sets(kind, attn, seed):
    """MISA's own active sets (expert slices, routers, shared experts, attention): saved
    activations of its per-expert forward, fp32 gradient buffers and moments."""
    config = moe_config(kind, attn)
    model = tiny_model(config)
    opt = mk.MISA(model, delta=0.15, seed=seed, sweep=False, backend="torch", sparse_backward=True)
    assert any("experts." in n for n in opt.active_modules) or seed
    opt.reset_peak_gradient_bytes()
    measured = saved_bytes(model)
    est = mk.estimate_memory(config, BATCH, SEQ, method="misa", dtype="float32", sparse_backward=True,
                             active_modules=opt.active_modules)
    assert_close(est.activations, measured, "misa activations")
    assert est.trainable_params == sum(opt.trained_parameters.values())
    assert_close(est.gradients, opt.peak_gradient_bytes, "fp32 gradient arena", rel=0.02)
    opt.step()
    assert est.optimizer_states == adam_state_bytes(opt)
    worst = mk.estimate_memory(config, BATCH, SEQ, delta=0.15, method="misa", dtype="float32")
    assert worst.activations >= measured and worst.trainable_params <= 0.15 * worst.n_params
    expected = mk.estimate_memory(config, BATCH, SEQ, delta=0.15, method="misa", dtype="float32",
                                  placement="expected", draws=8)
    assert 0 < expected.activations <= worst.activations


def test_expert_names_are_parsed_and_wrong_ones_refused():
    config = moe_config("qwen2_moe")
    names = ["model.layers.1.mlp.experts.gate_up_proj[3]", "model.layers.2.mlp.gate",
             "model.layers.1.mlp.shared_expert.down_proj", "model.layers.2.mlp.shared_expert_gate",
             "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    est = mk.estimate_memory(config, BATCH, SEQ, method="misa", active_modules=names)
    assert est.details["active_modules"] == [(1, "gate_up[3]"), (2, "router"), (1, "shared_down"),
                                            (2, "shared_expert_gate"), (0, "down"), (0, "q")]
    with pytest.raises(ValueError, match="active_modules.*experts.gate_up_proj\\[7\\]"):
        mk.estimate_memory(config, BATCH, SEQ, method="misa", active_modules=["model.layers.1.mlp.experts.gate_up_proj[7]"])
    with pytest.raises(ValueError, match="active_modules"):  # block 0 is dense: no experts
        mk.estimate_memory(config, BATCH, SEQ, method="misa", active_modules=["model.layers.0.mlp.experts.down_proj[0]"])


def test_layerwise_trains_whole_moe_blocks():
    config = moe_config("qwen2_moe")
    model = tiny_model(config)
    est = mk.estimate_memory(config, BATCH, SEQ, method="layerwise", dtype="float32", layers_active=1)
    assert est.trainable_params == sum(p.numel() for p in model.model.layers[0].parameters())
    expected = mk.estimate_memory(config, BATCH, SEQ, method="layerwise", dtype="float32", placement="expected")
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]
    assert expected.trainable_params == sum(per_layer) // len(per_layer)


def test_cli_reads_a_mixtral_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(moe_config("mixtral").to_dict()))
    assert main(["--model-config", str(path), "--batch", "1", "--seq", "64", "--delta", "0.1"]) == 0
    assert "MISA" in capsys.readouterr().out
