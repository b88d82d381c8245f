"""Tiny Hugging Face causal-LM configurations for architecture-coverage tests.

Every entry of :data:`ARCHITECTURES` builds a ``transformers`` config (5.x
classes) small enough that building the model and running one
forward/backward on a ``2 x 8`` batch takes a few milliseconds on CPU:
hidden size 64, 2 layers, 4 attention heads / 2 KV heads where supported,
FFN width 64, vocabulary 128, 64 positions, all dropout disabled and the
default rope settings.  Mixture-of-experts entries (:data:`MOE_ARCHITECTURES`)
use 4 experts, top-2 routing, expert FFN width 32 and one shared expert where
the architecture has them.  deepseek_v3, glm4_moe and ernie4_5_moe keep their
real layout (dense layer 0, MoE layer 1); the other MoE models are MoE on
every layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = ["ARCHITECTURES", "MOE_ARCHITECTURES", "tiny_causal_lm"]

VOCAB = 128
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 64
EXPERT_FFN = 32
EXPERTS = 4
TOP_K = 2
POSITIONS = 64
WINDOW = 4  # sliding window < seq 8, so sliding layers really mask

#: Token ids valid for the tiny vocabulary (HF defaults are often >= 128).
_TOKENS: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}

#: Settings shared by the Llama-style configs (field names as in LlamaConfig).
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "intermediate_size": FFN,
    "max_position_embeddings": POSITIONS, "attention_dropout": 0.0, **_TOKENS,
}

#: Settings shared by the GPT-2-style configs (GPT2Config / GPTJConfig field names).
_GPT2_STYLE: dict[str, Any] = {
    "vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": FFN,
    "n_positions": POSITIONS, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, **_TOKENS,
}

#: Top-k routing, for the MoE configs that use the common field name.
_MOE: dict[str, Any] = {"num_experts_per_tok": TOP_K}


def _builder(cls_name: str, **overrides: Any) -> Callable[[], PretrainedConfig]:
    """Return a zero-argument callable building ``transformers.<cls_name>(**overrides)``.

    Each call builds a fresh config from deep-copied arguments, so tests may mutate it.
    """
    cls: type[PretrainedConfig] = getattr(transformers, cls_name)

    def build() -> PretrainedConfig:
        return cls(**copy.deepcopy(overrides))

    build.__name__ = f"tiny_{cls.model_type}_config"
    build.__doc__ = f"Build a tiny ``{cls_name}``."
    return build


def _llama_like(cls_name: str, **extra: Any) -> Callable[[], PretrainedConfig]:
    """Builder for a config that accepts the Llama-style field names in ``_COMMON``."""
    return _builder(cls_name, **{**_COMMON, **extra})


_DENSE: dict[str, Callable[[], PretrainedConfig]] = {
    "llama": _llama_like("LlamaConfig", head_dim=HEAD_DIM),
    "qwen2": _llama_like("Qwen2Config"),
    "qwen3": _llama_like("Qwen3Config", head_dim=HEAD_DIM),
    "mistral": _llama_like("MistralConfig", head_dim=HEAD_DIM, sliding_window=None),
    "gemma2": _llama_like(
        "Gemma2Config", head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=WINDOW
    ),
    # One local + one global layer (the 2-layer default would be all local).
    "gemma3": _llama_like(
        "Gemma3TextConfig", head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
    ),
    "phi": _llama_like("PhiConfig", resid_pdrop=0.0, embd_pdrop=0.0),
    "phi3": _llama_like(
        "Phi3Config", resid_pdrop=0.0, embd_pdrop=0.0, original_max_position_embeddings=POSITIONS
    ),
    "gpt_neox": _builder(
        "GPTNeoXConfig",
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=POSITIONS,
        attention_dropout=0.0, hidden_dropout=0.0, classifier_dropout=0.0, **_TOKENS,
    ),
    "olmo": _llama_like("OlmoConfig"),
    "olmo2": _llama_like("Olmo2Config"),
    "cohere": _llama_like("CohereConfig"),
    "stablelm": _llama_like("StableLmConfig", hidden_dropout=0.0),
    "falcon": _builder(
        "FalconConfig",
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, ffn_hidden_size=FFN, max_position_embeddings=POSITIONS,
        attention_dropout=0.0, hidden_dropout=0.0, **_TOKENS,
    ),
    "gpt2": _builder("GPT2Config", **_GPT2_STYLE, summary_first_dropout=0.0),
    "gptj": _builder("GPTJConfig", **_GPT2_STYLE, rotary_dim=HEAD_DIM // 2),
    "bloom": _builder(
        "BloomConfig",
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
        hidden_dropout=0.0, attention_dropout=0.0, **_TOKENS,
    ),
    "opt": _builder(
        "OPTConfig",
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=FFN,
        word_embed_proj_dim=HIDDEN, num_attention_heads=HEADS, max_position_embeddings=POSITIONS,
        dropout=0.0, attention_dropout=0.0, layerdrop=0.0, **_TOKENS,
    ),
    "granite": _llama_like("GraniteConfig"),
    "starcoder2": _llama_like("Starcoder2Config", residual_dropout=0.0, embedding_dropout=0.0),
    "glm4": _llama_like("Glm4Config", head_dim=HEAD_DIM),
    "smollm3": _llama_like("SmolLM3Config"),
}

_MOE_BUILDERS: dict[str, Callable[[], PretrainedConfig]] = {
    "mixtral": _llama_like(
        "MixtralConfig", **_MOE, num_local_experts=EXPERTS, intermediate_size=EXPERT_FFN,
        head_dim=HEAD_DIM,
    ),
    "qwen2_moe": _llama_like(
        "Qwen2MoeConfig", **_MOE, num_experts=EXPERTS, moe_intermediate_size=EXPERT_FFN,
        shared_expert_intermediate_size=EXPERT_FFN, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "qwen3_moe": _llama_like(
        "Qwen3MoeConfig", **_MOE, num_experts=EXPERTS, moe_intermediate_size=EXPERT_FFN,
        head_dim=HEAD_DIM, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    # MLA attention (q/kv LoRA ranks 32/16); layer 0 dense, layer 1 MoE (4 routed + 1 shared).
    "deepseek_v3": _llama_like(
        "DeepseekV3Config", **_MOE, num_key_value_heads=HEADS, n_routed_experts=EXPERTS,
        n_shared_experts=1, moe_intermediate_size=EXPERT_FFN, first_k_dense_replace=1,
        n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=HEAD_DIM,
    ),
    # Layer 0: rope + chunked attention (chunk 16 >= seq 8); layer 1: NoPE full attention.
    # Every layer is MoE (routed experts + one always-on shared expert).
    "llama4_text": _llama_like(
        "Llama4TextConfig", **_MOE, num_local_experts=EXPERTS, intermediate_size=EXPERT_FFN,
        intermediate_size_mlp=FFN, head_dim=HEAD_DIM, interleave_moe_layer_step=1,
        attention_chunk_size=16, no_rope_layer_interval=2, router_jitter_noise=0.0,
    ),
    "olmoe": _llama_like("OlmoeConfig", **_MOE, num_experts=EXPERTS, intermediate_size=EXPERT_FFN),
    "gpt_oss": _llama_like(
        "GptOssConfig", **_MOE, num_local_experts=EXPERTS, intermediate_size=EXPERT_FFN,
        head_dim=HEAD_DIM, sliding_window=WINDOW,
    ),
    # Phimoe's sparsemixer is top-2 only; router_jitter_noise is its (deterministic) jitter_eps.
    "phimoe": _llama_like(
        "PhimoeConfig", **_MOE, num_local_experts=EXPERTS, intermediate_size=EXPERT_FFN,
        input_jitter_noise=0.0,
    ),
    "granitemoe": _llama_like(
        "GraniteMoeConfig", **_MOE, num_local_experts=EXPERTS, intermediate_size=EXPERT_FFN
    ),
    # Layer 0 dense MLP, layer 1 MoE (4 routed + 1 shared expert).
    "glm4_moe": _llama_like(
        "Glm4MoeConfig", **_MOE, n_routed_experts=EXPERTS, n_shared_experts=1,
        moe_intermediate_size=EXPERT_FFN, first_k_dense_replace=1, n_group=1, topk_group=1,
    ),
    # Layer 0 dense MLP, layer 1 MoE (4 routed + 1 shared expert).
    "ernie4_5_moe": _llama_like(
        "Ernie4_5_MoeConfig", moe_num_experts=EXPERTS, moe_k=TOP_K, moe_num_shared_experts=1,
        moe_intermediate_size=EXPERT_FFN, moe_layer_start_index=1,
        moe_layer_end_index=LAYERS - 1, moe_layer_interval=1,
    ),
}

#: Architecture name -> zero-argument builder of a tiny config.
ARCHITECTURES: dict[str, Callable[[], PretrainedConfig]] = {**_DENSE, **_MOE_BUILDERS}

#: The names in :data:`ARCHITECTURES` whose models contain mixture-of-experts layers.
MOE_ARCHITECTURES: frozenset[str] = frozenset(_MOE_BUILDERS)


def tiny_causal_lm(name: str, seed: int = 0) -> PreTrainedModel:
    """Build the tiny fp32 causal LM for architecture ``name`` with eager attention.

    ``torch.manual_seed(seed)`` is called first so weights are reproducible.
    The model is returned in the mode ``from_config`` leaves it in (``eval()``
    is not called).  Raises ``KeyError`` for an unknown ``name``.
    """
    if name not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}")
    config = ARCHITECTURES[name]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
