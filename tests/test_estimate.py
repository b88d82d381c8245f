"""The memory estimator (paper App. E) against measured numbers on tiny LLaMA-style models.

Saved activations are measured with ``torch.autograd.graph.saved_tensors_hooks`` during the
forward (parameters excluded, each storage once), optimizer bytes from real optimizers after
a step; both must agree with :func:`misa_kernels.estimate_memory` within 10%.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

import misa_kernels as mk
from misa_kernels.estimate import (
    BUILTIN_CONFIGS,
    GIB,
    dense_numel,
    main,
    model_shape,
    parameter_count,
    parse_bytes,
)

REL = 0.10  # the estimate must be within 10% of the measurement
BATCH, SEQ, VOCAB = 2, 48, 256
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_CONFIG_CLASSES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_config(attn: str = "eager", cls=LlamaConfig, **overrides):
    """3 layers, hidden 64, GQA (4 query / 2 key-value heads), SwiGLU 160, vocabulary 256."""
    values = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return cls(**{**values, **overrides}, attn_implementation=attn)


def tiny_model(config, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).to(dtype).train()


def batch() -> dict:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def saved_bytes(model: nn.Module) -> int:
    """Bytes autograd saves in one forward (then runs backward, which must work)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch()).loss
    loss.backward()
    return sum(seen.values())


def adam_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of ``exp_avg``/``exp_avg_sq`` (the scalar ``step`` counters left out)."""
    return sum(v.numel() * v.element_size() for state in opt.state.values() for v in state.values()
               if torch.is_tensor(v) and v.dim() > 0)


def assert_close(estimated: int, measured: int, what: str, rel: float = REL) -> None:
    assert measured > 0, what
    assert abs(estimated / measured - 1) <= rel, f"{what}: estimated {estimated}, measured {measured}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------- parameters
@pytest.mark.parametrize("config", [
    tiny_config(),
    tiny_config(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    tiny_config(num_key_value_heads=4, head_dim=8),
    tiny_config("sdpa", Qwen2Config),
    tiny_config("sdpa", MistralConfig, sliding_window=32),
], ids=["llama-gqa", "llama-tied-bias", "llama-mha-headdim", "qwen2", "mistral"])
def test_parameter_count_is_exact(config):
    model = tiny_model(config)
    assert mk.estimate_memory(config, method="adamw").n_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(BUILTIN_CONFIGS))
def test_builtin_shapes_match_transformers(name):
    values = dict(BUILTIN_CONFIGS[name])
    config = _CONFIG_CLASSES[values.pop("model_type")](**values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert parameter_count(model_shape(name)) == sum(p.numel() for p in model.parameters())


def test_builtin_shapes_match_published_sizes():
    """Parameter counts of the public checkpoints (their model cards / safetensors indexes)."""
    published = {"llama-7b": 6_738_415_616, "llama-3-8b": 8_030_261_248, "mistral-7b": 7_241_732_096,
                 "qwen2-7b": 7_615_616_512, "tinyllama-1.1b": 1_100_048_384, "llama-3.2-1b": 1_235_814_400}
    assert {name: parameter_count(model_shape(name)) for name in published} == published


# ---------------------------------------------------------------------- activations and states
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_training_activations_and_adamw_states(attn, dtype):
    config = tiny_config(attn)
    model = tiny_model(config, dtype)
    measured = saved_bytes(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    opt.step()
    est = mk.estimate_memory(config, BATCH, SEQ, method="adamw", dtype=_dtype_name(dtype), master_weights=False)
    assert_close(est.activations, measured, "saved activations")
    assert_close(est.optimizer_states, adam_state_bytes(opt), "AdamW m, v")
    assert_close(est.gradients, sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()), "grads")


@pytest.mark.parametrize("cls, overrides, attn", [
    (Qwen2Config, {}, "sdpa"),  # q, k, v biases
    (MistralConfig, dict(sliding_window=32), "sdpa"),  # window < s: a mask, k and v repeated
    (MistralConfig, dict(sliding_window=32), "eager"),
    (MistralConfig, dict(sliding_window=None), "sdpa"),
])
def test_qwen2_and_mistral(cls, overrides, attn):
    config = tiny_config(attn, cls, **overrides)
    full = saved_bytes(tiny_model(config, torch.bfloat16))
    assert_close(mk.estimate_memory(config, BATCH, SEQ, method="adamw").activations, full, "full")
    model = tiny_model(config, torch.bfloat16)
    opt = mk.MISA(model, delta=0.1, inner_steps=1000, sweep=False, seed=2)
    measured = saved_bytes(model)
    est = mk.estimate_memory(config, BATCH, SEQ, method="misa", active_modules=opt.active_modules)
    assert_close(est.activations, measured, f"MISA {opt.active_modules}")


def test_eager_attention_saves_the_score_matrix_and_sdpa_does_not():
    """Doubling s: eager grows faster than linearly (the b a s^2 softmax), sdpa linearly."""
    def growth(attn):
        small = mk.estimate_memory(tiny_config(attn), BATCH, 32, method="adamw", dtype="float32").activations
        large = mk.estimate_memory(tiny_config(attn), BATCH, 64, method="adamw", dtype="float32").activations
        return large / small

    assert growth("eager") > 2.05 and abs(growth("sdpa") - 2) < 0.02


MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
           "model.layers.2.self_attn.o_proj", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
           "model.layers.2.mlp.down_proj", "model.layers.0.mlp.down_proj"]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("attn, dtype", [("eager", torch.float32), ("sdpa", torch.bfloat16)])
def test_misa_one_known_module(module, attn, dtype):
    """Exactly one active module (Table 15): its input plus what the layers above it save."""
    config = tiny_config(attn)
    model = tiny_model(config, dtype)
    opt = mk.MISA(model, delta=1.0, module_filter=lambda name, m: name == module, inner_steps=1000, sweep=False)
    assert opt.active_modules == [module]
    measured = saved_bytes(model)
    opt.step()
    report = opt.memory_report()
    est = mk.estimate_memory(config, BATCH, SEQ, method="misa", dtype=_dtype_name(dtype), active_modules=[module])
    assert_close(est.activations, measured, f"saved activations, {module}")
    assert_close(est.optimizer_states, report["master_weights"] + report["moments"], "MISA master + moments")
    assert est.master_weights == report["master_weights"]  # fp32 master only for the bf16 model


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misa_sampled_active_set(seed, dtype):
    """The active set MISA samples (Algorithm 2, delta=8%): exact-set estimate within 10%, and
    the default worst-case estimate is not below what was measured."""
    config = tiny_config("eager")
    model = tiny_model(config, dtype)
    opt = mk.MISA(model, delta=0.08, inner_steps=1000, sweep=False, seed=seed)
    measured = saved_bytes(model)
    grads = opt.memory_report()["gradients"]
    opt.step()
    report = opt.memory_report()
    kwargs = dict(batch=BATCH, seq=SEQ, method="misa", dtype=_dtype_name(dtype))
    exact = mk.estimate_memory(config, active_modules=opt.active_modules, **kwargs)
    assert_close(exact.activations, measured, f"saved activations, {opt.active_modules}")
    assert_close(exact.optimizer_states, report["master_weights"] + report["moments"], "MISA states")
    assert_close(exact.gradients, grads, "MISA gradients")
    worst = mk.estimate_memory(config, delta=0.08, **kwargs)
    assert worst.activations >= measured
    assert worst.total >= exact.total
    assert worst.trainable_params <= 0.08 * worst.n_params  # the set honours the budget


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_misa_sparse_backward_gradient_buffers(step_in_backward):
    """fp32 buffers for the active set; with step_in_backward one module's buffer at a time."""
    config = tiny_config("sdpa")
    model = tiny_model(config, torch.bfloat16)
    opt = mk.MISA(model, delta=0.1, inner_steps=1000, sweep=False, seed=1, sparse_backward=True,
                  step_in_backward=step_in_backward)
    assert len(opt.active_modules) > 1
    opt.reset_peak_gradient_bytes()
    saved = saved_bytes(model)
    peak = opt.peak_gradient_bytes
    est = mk.estimate_memory(config, BATCH, SEQ, method="misa", active_modules=opt.active_modules,
                             sparse_backward=True, step_in_backward=step_in_backward)
    assert_close(est.gradients, peak, "fp32 gradient buffers")
    assert_close(est.activations, saved, "saved activations")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_activations_and_states(attn, dtype):
    """peft upcasts adapters to fp32: a bf16 model's adapters each save an fp32 copy of
    their input (paper E.2.2: X, and the rank-r intermediate)."""
    peft = pytest.importorskip("peft")
    config = tiny_config(attn)
    model = peft.get_peft_model(tiny_model(config, dtype),
                                peft.LoraConfig(r=8, target_modules=LINEARS, lora_dropout=0.0))
    trainable = [p for p in model.parameters() if p.requires_grad]
    measured = saved_bytes(model)
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    opt.step()
    est = mk.estimate_memory(config, BATCH, SEQ, method="lora", lora_rank=8, dtype=_dtype_name(dtype))
    assert est.trainable_params == sum(p.numel() for p in trainable)
    assert_close(est.activations, measured, "LoRA saved activations")
    assert_close(est.optimizer_states, adam_state_bytes(opt), "LoRA AdamW states")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert_close(est.weights, weights, "weights + adapters")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_layerwise_bottom_layer(attn):
    """BAdam's worst case: the whole first block (norms included) trains."""
    config = tiny_config(attn)
    model = tiny_model(config, torch.bfloat16)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.layers.0."))
    measured = saved_bytes(model)
    est = mk.estimate_memory(config, BATCH, SEQ, method="layerwise", layers_active=1)
    assert_close(est.activations, measured, "layer-wise saved activations")
    assert est.trainable_params == sum(p.numel() for p in model.model.layers[0].parameters())


@pytest.mark.parametrize("active", [None, ["model.layers.1.mlp.down_proj"]])
def test_gradient_checkpointing_keeps_layer_inputs(active):
    config = tiny_config("sdpa")
    model = tiny_model(config)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if active is not None:
        for name, param in model.named_parameters():
            param.requires_grad_(name.startswith(active[0] + "."))
    measured = saved_bytes(model)
    method = "adamw" if active is None else "misa"
    est = mk.estimate_memory(config, BATCH, SEQ, method=method, dtype="float32", active_modules=active,
                             gradient_checkpointing=True)
    plain = mk.estimate_memory(config, BATCH, SEQ, method=method, dtype="float32", active_modules=active)
    assert_close(est.activations, measured, "checkpointed saved activations")
    assert est.activations < plain.activations


def test_misa_placements_and_budget():
    config = tiny_config("eager", num_hidden_layers=6)
    kwargs = dict(batch=BATCH, seq=SEQ, method="misa", dtype="bfloat16")
    worst = mk.estimate_memory(config, delta=0.05, **kwargs)
    expected = mk.estimate_memory(config, delta=0.05, placement="expected", **kwargs)
    assert expected.activations <= worst.activations
    assert 0 < worst.trainable_params <= 0.05 * worst.n_params
    assert 0 < expected.trainable_params <= 0.05 * expected.n_params
    # below the smallest module Algorithm 2 trains the first drawn module alone
    tiny = mk.estimate_memory(config, delta=1e-6, **kwargs)
    assert len(tiny.details["active_modules"]) == 1 and tiny.trainable_params > 1e-6 * tiny.n_params


# ---------------------------------------------------------------------- MISA pretrain mode
def dense_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters outside the seven block Linears (embedding, lm_head, norms), each once."""
    unique = {id(p): p for n, p in model.named_parameters() if not any(f".{lin}." in n for lin in LINEARS)}
    return list(unique.values())


def grad_bytes(model: nn.Module) -> int:
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)


def misa_state_bytes(opt: torch.optim.Optimizer) -> int:
    """fp32 masters (``None`` for fp32 weights) and moments of every parameter MISA holds
    state for, read from ``opt.state`` rather than ``memory_report()`` (whose keys split
    dense and module states differently across versions)."""
    return sum(t.numel() * t.element_size() for state in opt.state.values()
               for key in ("master", "exp_avg", "exp_avg_sq") if (t := state.get(key)) is not None)


@pytest.mark.parametrize("config", [
    tiny_config(),
    tiny_config(tie_word_embeddings=True, attention_bias=True),
    tiny_config("sdpa", Qwen2Config),
], ids=["llama", "llama-tied-bias", "qwen2"])
def test_dense_numel_is_the_parameters_outside_the_modules(config):
    assert dense_numel(model_shape(config)) == sum(p.numel() for p in dense_params(tiny_model(config)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("attn, dtype, tied", [
    ("eager", torch.float32, False), ("sdpa", torch.bfloat16, False), ("sdpa", torch.bfloat16, True),
], ids=["eager-fp32", "sdpa-bf16", "sdpa-bf16-tied"])
def test_misa_pretrain_trains_the_dense_parameters(attn, dtype, tied, seed):
    """mode="pretrain": MISA's sampled modules plus embedding, lm_head and norms with dense
    AdamW; activations, states and gradients measured on the real optimizer."""
    config = tiny_config(attn, tie_word_embeddings=tied)
    model = tiny_model(config, dtype)
    opt = mk.MISA(model, delta=0.08, mode="pretrain", inner_steps=1000, sweep=False, seed=seed)
    measured = saved_bytes(model)
    grads = grad_bytes(model)  # before step(), which frees the modules' gradients
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt.step()
    kwargs = dict(batch=BATCH, seq=SEQ, method="misa", dtype=_dtype_name(dtype), mode="pretrain")
    est = mk.estimate_memory(config, active_modules=opt.active_modules, **kwargs)
    # op-exact on these models: 1% lets a missing N h p term (the lm_head input, ~2%) show
    assert_close(est.activations, measured, f"pretrain saved activations, {opt.active_modules}", rel=0.01)
    assert_close(est.optimizer_states, misa_state_bytes(opt), "pretrain masters + moments")
    assert_close(est.gradients, grads, "pretrain gradients")
    assert est.trainable_params == trained
    assert est.details["dense_params"] == sum(p.numel() for p in dense_params(model)) > 0
    worst = mk.estimate_memory(config, delta=0.08, **kwargs)
    assert worst.activations >= measured and worst.total >= est.total
    finetune = mk.estimate_memory(config, active_modules=opt.active_modules, **{**kwargs, "mode": "finetune"})
    assert finetune.details["dense_params"] == 0 and finetune.trainable_params < est.trainable_params


@pytest.mark.parametrize("step_in_backward", [False, True])
def test_misa_pretrain_dense_gradients_stay_in_grad(step_in_backward):
    """With sparse_backward the modules' fp32 buffers live outside ``.grad``; the dense
    parameters' gradients stay in ``.grad`` in the weight dtype, on top of them."""
    config = tiny_config("sdpa")
    model = tiny_model(config, torch.bfloat16)
    opt = mk.MISA(model, delta=0.1, mode="pretrain", inner_steps=1000, sweep=False, seed=1, sparse_backward=True,
                  step_in_backward=step_in_backward)
    measured = saved_bytes(model)
    dense = [p for p in model.parameters() if p.grad is not None]
    assert {p.grad.dtype for p in dense} == {torch.bfloat16}
    kwargs = dict(batch=BATCH, seq=SEQ, method="misa", active_modules=opt.active_modules, sparse_backward=True,
                  step_in_backward=step_in_backward)
    pretrain = mk.estimate_memory(config, mode="pretrain", **kwargs)
    finetune = mk.estimate_memory(config, **kwargs)  # the modules' buffers alone (tested above)
    assert_close(pretrain.gradients - finetune.gradients, grad_bytes(model), "dense .grad")
    assert_close(pretrain.activations, measured, "pretrain saved activations, sparse backward")


# ---------------------------------------------------------------------- will it fit (7B)
def test_will_it_fit_7b():
    """LLaMA-7B, b=1, s=1024 on a 24 GiB GPU. Paper Fig. 2 and App. E: for long enough
    sequences MISA (delta=1%) needs less memory than LoRA r=16, and both far less than full
    AdamW (its states alone are 12 bytes per parameter); App. E.4: MISA with a small delta
    beats layer-wise BCD. The paper measures e.g. LLaMA3-8B at 30.4 GB for MISA delta=1% vs
    35.6 GB for LoRA and 33.5 GB for BAdam (Table 4)."""
    budget = parse_bytes("24GiB")
    for attn in ("eager", "sdpa"):
        est = {m: mk.estimate_memory("llama-7b", 1, 1024, delta=0.01, method=m, attn_implementation=attn)
               for m in ("adamw", "lora", "layerwise", "misa")}
        assert est["adamw"].total > est["lora"].total > est["misa"].total, attn
        assert est["layerwise"].total > est["misa"].total, attn
    sdpa = {m: mk.estimate_memory("llama-7b", 1, 1024, delta=0.01, method=m) for m in ("adamw", "misa")}
    assert not sdpa["adamw"].fits(budget) and sdpa["adamw"].headroom(budget) < 0
    assert sdpa["misa"].fits(budget) and sdpa["misa"].headroom("24GiB") > 0


def test_misa_advantage_over_lora_grows_with_sequence_length():
    """Paper Sec. 3.5 / Fig. 2: MISA beats LoRA once the sequence is long enough."""
    def gap(seq):
        lora = mk.estimate_memory("llama-3-8b", 1, seq, method="lora")
        misa = mk.estimate_memory("llama-3-8b", 1, seq, delta=0.01, method="misa")
        return lora.total - misa.total

    gaps = [gap(s) for s in (16, 256, 1024, 4096)]
    assert gaps[0] < 0 < gaps[-1]
    assert gaps == sorted(gaps)


# ---------------------------------------------------------------------- inputs
@pytest.mark.parametrize("kwargs, name", [
    (dict(delta=0.0), "delta"), (dict(delta=1.5), "delta"), (dict(seq=0), "seq"), (dict(batch=0), "batch"),
    (dict(method="sgd"), "method"), (dict(placement="middle"), "placement"), (dict(lora_rank=0), "lora_rank"),
    (dict(dtype="int8"), "dtype"), (dict(attn_implementation="flex"), "attn_implementation"),
    (dict(method="layerwise", layers_active=40), "layers_active"),
    (dict(active_modules=["model.layers.99.mlp.down_proj"]), "active_modules"),
    (dict(active_modules=["model.norm"]), "active_modules"),
    (dict(mode="pretrain", method="adamw"), "mode"), (dict(mode="pretrain", method="lora"), "mode"),
    (dict(mode="train"), "mode"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mk.estimate_memory("llama-7b", **{"batch": 1, "seq": 128, **kwargs})


def test_unknown_config_name():
    with pytest.raises(ValueError, match="config.*llama-999b"):
        mk.estimate_memory("llama-999b")
    with pytest.raises(ValueError, match="model_type"):
        mk.estimate_memory({"model_type": "gpt2", "n_embd": 768})


def test_config_sources_agree(tmp_path):
    config = tiny_config("eager")
    config.save_pretrained(tmp_path)
    as_dict = json.loads((tmp_path / "config.json").read_text())
    as_dict["attn_implementation"] = "eager"
    kwargs = dict(batch=BATCH, seq=SEQ, delta=0.1, method="misa", attn_implementation="eager")
    results = {mk.estimate_memory(source, **kwargs) for source in (config, tmp_path, tmp_path / "config.json", as_dict)}
    assert len(results) == 1
    assert mk.estimate_memory(config, BATCH, SEQ, method="adamw").activations > \
        mk.estimate_memory(tiny_config("sdpa"), BATCH, SEQ, method="adamw").activations  # the config's attention counts
    assert model_shape("llama-1b") == model_shape("tinyllama-1.1b")


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * GIB and parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("40G") == 40 * GIB and parse_bytes("24") == 24 * GIB and parse_bytes(1000) == 1000
    with pytest.raises(ValueError, match="gpu_memory"):
        parse_bytes("lots")


# ---------------------------------------------------------------------- CLI
def test_cli_table(capsys):
    assert main(["--model-config", "llama-7b", "--batch", "1", "--seq", "1024", "2048",
                 "--delta", "0.01", "0.03", "--gpu-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == 2 * (3 + 2 * 2)  # per seq: adamw, lora, layer-wise, MISA x 2 deltas x +-step_in_backward
    for seq in (1024, 2048):
        labels = [r.split(" | ")[0].lstrip("| ") for r in rows if f" | {seq} | " in r]
        assert labels == ["AdamW (full)", "LoRA r=16", "layer-wise (1 layer)", "MISA delta=0.01",
                          "MISA delta=0.01 step-in-bwd", "MISA delta=0.03", "MISA delta=0.03 step-in-bwd"]
    adamw_1024 = next(r for r in rows if r.startswith("| AdamW (full) | 1024 "))
    misa_1024 = next(r for r in rows if r.startswith("| MISA delta=0.01 | 1024 "))
    assert adamw_1024.rstrip(" |").split(" | ")[-1].startswith("no")
    assert misa_1024.rstrip(" |").split(" | ")[-1] == "yes"
    total = float(misa_1024.split(" | ")[-2])
    assert total == pytest.approx(mk.estimate_memory("llama-7b", 1, 1024, delta=0.01).total / GIB, abs=0.01)


def test_cli_module_and_errors(tmp_path):
    tiny_config("sdpa").save_pretrained(tmp_path)
    done = subprocess.run([sys.executable, "-m", "misa_kernels.estimate", "--model-config", str(tmp_path),
                           "--seq", "64", "--delta", "0.1"], capture_output=True, text=True, check=True)
    assert "| MISA delta=0.1 | 64 |" in done.stdout and "RuntimeWarning" not in done.stderr
    bad = subprocess.run([sys.executable, "-m", "misa_kernels.estimate", "--model-config", "llama-7b",
                          "--delta", "2"], capture_output=True, text=True)
    assert bad.returncode == 2 and "delta" in bad.stderr


def test_cli_pretrain_mode(capsys):
    """--mode pretrain: the MISA rows train the dense parameters too; the others are unchanged."""
    args = ["--model-config", "llama-7b", "--batch", "1", "--seq", "1024", "--delta", "0.01"]
    assert main(args) == 0
    finetune = capsys.readouterr().out
    assert main(args + ["--mode", "pretrain"]) == 0
    out = capsys.readouterr().out
    assert "MISA mode pretrain" in out and "pretrain" not in finetune
    rows = {r.split(" | ")[0].lstrip("| "): r for r in out.splitlines() if r.startswith("| ") and " | 1024 | " in r}
    assert list(rows)[3:] == ["MISA delta=0.01 pretrain", "MISA delta=0.01 step-in-bwd pretrain"]
    est = mk.estimate_memory("llama-7b", 1, 1024, delta=0.01, mode="pretrain")
    total = rows["MISA delta=0.01 pretrain"].rstrip(" |").split(" | ")[-1]  # no --gpu-memory: total is last
    assert float(total) == pytest.approx(est.total / GIB, abs=0.01)
    assert rows["MISA delta=0.01 pretrain"].split(" | ")[2] == f"{est.trainable_params / est.n_params:.2%}"
    assert all(row in finetune for name, row in rows.items() if not name.startswith("MISA"))
    with pytest.raises(SystemExit) as exc:
        main(args + ["--mode", "train"])
    assert exc.value.code == 2
