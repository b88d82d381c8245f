"""Model shapes: what the estimate reads from a config, and exact parameter counts.

:func:`model_shape` turns a config (a built-in name from :data:`BUILTIN_CONFIGS`, a
config.json, a dict or a transformers ``PretrainedConfig``) into a :class:`ModelShape`;
:func:`parameter_count`, :func:`module_numel`, :func:`layer_numel`, :func:`dense_numel`
and :func:`lora_numel` count parameters the way ``model.parameters()`` does."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
HF_NAMES = dict(q="q_proj", k="k_proj", v="v_proj", o="o_proj", gate="gate_proj", up="up_proj", down="down_proj")
NORMS = ("input_norm", "post_norm")
_KIND_OF_NAME = {name: kind for kind, name in HF_NAMES.items()}
_FAMILIES = ("llama", "mistral", "qwen2", "mixtral", "qwen2_moe")
ATTENTION_KINDS = ("q", "k", "v", "o")
# a MoE block's modules beside its experts' (gate_up[e], down[e]): the router, and
# Qwen2-MoE's shared expert (a SwiGLU MLP) with its sigmoid gate
SHARED_KINDS = ("shared_gate", "shared_up", "shared_down", "shared_expert_gate")

# Literal shapes of public checkpoints (their config.json values), so the CLI needs no download.
_LLAMA = dict(model_type="llama", vocab_size=32000, hidden_act="silu", tie_word_embeddings=False,
              attention_bias=False, mlp_bias=False)
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(_LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "llama-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama-13b": dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40),
    "llama-3-8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "llama-3-70b": dict(_LLAMA, vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "llama-3.2-1b": dict(_LLAMA, vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, tie_word_embeddings=True),
    "mistral-7b": dict(_LLAMA, model_type="mistral", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
    "qwen2-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     hidden_act="silu", tie_word_embeddings=False),
}
_BUILTIN_ALIASES = {"llama-1b": "tinyllama-1.1b", "llama-2-7b": "llama-7b", "llama-2-13b": "llama-13b",
                    "llama-3.1-8b": "llama-3-8b", "qwen2.5-7b": "qwen2-7b"}

ConfigLike = Union[str, Path, Mapping[str, Any], Any]


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a config the estimate needs (paper App. E notation in brackets)."""

    model_type: str
    vocab: int  # v
    hidden: int  # h
    layers: int  # L
    heads: int  # a
    kv_heads: int  # a_kv (GQA; = a without it)
    head_dim: int  # d
    intermediate: int  # I (SwiGLU width)
    tied: bool  # lm_head shares the embedding matrix
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    attn_implementation: str
    sliding_window: Optional[int] = None  # Mistral's attention window (a mask beyond it)
    experts: int = 0  # E routed experts per MoE block (0: a dense model)
    top_k: int = 0  # k experts per token
    expert_intermediate: int = 0  # I_e, each expert's SwiGLU width (gate_up: 2 I_e x h)
    shared_intermediate: int = 0  # Qwen2-MoE's shared expert width (0: none)
    dense_layers: tuple[int, ...] = ()  # blocks of a MoE model that keep a dense MLP

    def is_moe(self, layer: int) -> bool:
        """Whether block ``layer`` routes its tokens to experts."""
        return self.experts > 0 and layer not in self.dense_layers

    @property
    def q_width(self) -> int:
        """``a d``: output width of q and input width of o."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """``a_kv d``: output width of k and v."""
        return self.kv_heads * self.head_dim


def _config_dict(config: ConfigLike) -> dict[str, Any]:
    """A plain dict from a built-in name, a config.json path (or its folder), a mapping or a
    transformers ``PretrainedConfig``."""
    if isinstance(config, (str, Path)):
        name = str(config)
        key = _BUILTIN_ALIASES.get(name.lower(), name.lower())
        if key in BUILTIN_CONFIGS:
            return dict(BUILTIN_CONFIGS[key])
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            known = ", ".join(sorted([*BUILTIN_CONFIGS, *_BUILTIN_ALIASES]))
            raise ValueError(f"config: {name!r} is neither a config.json (or a folder holding one) nor a "
                             f"built-in shape ({known})")
        return json.loads(path.read_text())
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        values = config.to_dict()
        attn = getattr(config, "_attn_implementation", None)
        if attn is not None:
            values["attn_implementation"] = attn
        return values
    raise TypeError(f"config must be a name, a path, a dict or a PretrainedConfig, got {type(config).__name__}")


def model_shape(config: ConfigLike, attn_implementation: Optional[str] = None) -> ModelShape:
    """Read a LLaMA/Mistral/Qwen2 (or Mixtral/Qwen2-MoE) config (see :func:`_config_dict` for the accepted forms).

    ``attn_implementation`` overrides the config's (default ``"sdpa"``, what transformers
    picks when none is set)."""
    values = _config_dict(config)
    values = values.get("text_config") or values
    model_type = str(values.get("model_type", "llama"))
    if model_type not in _FAMILIES:
        raise ValueError(f"config: model_type {model_type!r} is not supported; the estimator models "
                         f"{_FAMILIES} (set model_type='llama' for a LLaMA-shaped model)")
    if values.get("hidden_act", "silu") not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
        raise ValueError(f"config: hidden_act {values['hidden_act']!r} is not modelled")
    try:
        hidden, heads = int(values["hidden_size"]), int(values["num_attention_heads"])
        shape_args = dict(vocab=int(values["vocab_size"]), hidden=hidden, layers=int(values["num_hidden_layers"]),
                          heads=heads, intermediate=int(values["intermediate_size"]))
    except KeyError as err:
        raise ValueError(f"config: missing {err.args[0]!r}") from None
    shape_args.update(_moe_args(model_type, values, shape_args["layers"]))
    attn = attn_implementation or values.get("attn_implementation") or values.get("_attn_implementation") or "sdpa"
    if attn not in ATTENTION:
        raise ValueError(f"attn_implementation must be one of {ATTENTION}, got {attn!r}")
    qwen = model_type in ("qwen2", "qwen2_moe")
    attention_bias = bool(values.get("attention_bias", False))
    return ModelShape(
        model_type=model_type, kv_heads=int(values.get("num_key_value_heads") or heads),
        head_dim=int(values.get("head_dim") or hidden // heads), tied=bool(values.get("tie_word_embeddings", False)),
        qkv_bias=qwen or attention_bias, o_bias=attention_bias and not qwen,
        mlp_bias=bool(values.get("mlp_bias", False)), attn_implementation=attn,
        sliding_window=values.get("sliding_window") if model_type == "mistral" else None, **shape_args)


def _moe_args(model_type: str, values: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """The MoE fields of :class:`ModelShape` from a Mixtral or Qwen2-MoE config."""
    if model_type == "mixtral":  # every block is MoE; each expert is intermediate_size wide
        return dict(experts=int(values.get("num_local_experts", 8)), top_k=int(values.get("num_experts_per_tok", 2)),
                    expert_intermediate=int(values["intermediate_size"]))
    if model_type == "qwen2_moe":
        step, dense_only = int(values.get("decoder_sparse_step", 1)), set(values.get("mlp_only_layers") or ())
        experts = int(values.get("num_experts", 60))
        dense = tuple(l for l in range(layers) if l in dense_only or experts == 0 or (l + 1) % step)
        return dict(experts=experts, top_k=int(values.get("num_experts_per_tok", 4)),
                    expert_intermediate=int(values.get("moe_intermediate_size", 1408)),
                    shared_intermediate=int(values.get("shared_expert_intermediate_size", 0)), dense_layers=dense)
    return {}


# ---------------------------------------------------------------------- parameters
def expert_kinds(shape: ModelShape) -> tuple[str, ...]:
    """``gate_up[e]`` and ``down[e]`` of every expert (MISA's units in a MoE block)."""
    return tuple(f"{m}[{e}]" for e in range(shape.experts) for m in ("gate_up", "down"))


def layer_kinds(shape: ModelShape, layer: int) -> tuple[str, ...]:
    """The module kinds of block ``layer``: the seven of a dense block; in a MoE block the
    attention's four, the router, every expert's two and the shared expert's."""
    if not shape.is_moe(layer):
        return KINDS
    shared = SHARED_KINDS if shape.shared_intermediate else ()
    return ATTENTION_KINDS + ("router",) + expert_kinds(shape) + shared


def _expert_matrix(kind: str) -> Optional[str]:
    """``"gate_up"`` of ``"gate_up[3]"`` (``None`` for other kinds)."""
    return kind.split("[", 1)[0] if kind.endswith("]") else None


def module_numel(shape: ModelShape, kind: str) -> int:
    """Parameters of one module (weight and bias) of kind ``q, k, v, o, gate, up, down``, or
    in a MoE block ``router``, ``gate_up[e]``, ``down[e]`` and the shared expert's kinds."""
    h, i, ie, shared = shape.hidden, shape.intermediate, shape.expert_intermediate, shape.shared_intermediate
    sizes = dict(q=(h, shape.q_width, shape.qkv_bias), k=(h, shape.kv_width, shape.qkv_bias),
                 v=(h, shape.kv_width, shape.qkv_bias), o=(shape.q_width, h, shape.o_bias),
                 gate=(h, i, shape.mlp_bias), up=(h, i, shape.mlp_bias), down=(i, h, shape.mlp_bias),
                 router=(h, shape.experts, False), gate_up=(h, 2 * ie, False), shared_gate=(h, shared, False),
                 shared_up=(h, shared, False), shared_down=(shared, h, False), shared_expert_gate=(h, 1, False))
    if _expert_matrix(kind) == "down":
        return ie * h
    fan_in, fan_out, bias = sizes[_expert_matrix(kind) or kind]
    return fan_in * fan_out + (fan_out if bias else 0)


def layer_numel(shape: ModelShape, layer: int = 0) -> int:
    """Parameters of decoder block ``layer``: its modules and two RMSNorm weights."""
    return sum(module_numel(shape, k) for k in layer_kinds(shape, layer)) + 2 * shape.hidden


def parameter_count(shape: ModelShape) -> int:
    """``sum(p.numel() for p in model.parameters())`` of the Hugging Face model: embedding,
    ``L`` blocks, final norm and the lm_head unless tied to the embedding."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    return embeddings + sum(layer_numel(shape, l) for l in range(shape.layers)) + shape.hidden


def lora_targets(shape: ModelShape, layer: int) -> tuple[str, ...]:
    """The ``nn.Linear`` modules peft adapts in block ``layer``: all seven of a dense block;
    in a MoE block the attention's and the shared expert's (fused experts and the routers
    are not ``nn.Linear``)."""
    if not shape.is_moe(layer):
        return KINDS
    return ATTENTION_KINDS + (SHARED_KINDS if shape.shared_intermediate else ())


def lora_numel(shape: ModelShape, rank: int) -> int:
    """LoRA parameters: ``r (fan_in + fan_out)`` per adapted Linear per layer."""
    h, shared = shape.hidden, shape.shared_intermediate
    fans = dict(q=h + shape.q_width, k=h + shape.kv_width, v=h + shape.kv_width, o=shape.q_width + h,
                gate=h + shape.intermediate, up=h + shape.intermediate, down=shape.intermediate + h,
                shared_gate=h + shared, shared_up=h + shared, shared_down=shared + h, shared_expert_gate=h + 1)
    return rank * sum(fans[k] for l in range(shape.layers) for k in lora_targets(shape, l))


def dense_numel(shape: ModelShape) -> int:
    """Parameters outside the seven block modules: the token embedding, the lm_head unless
    tied to it, both RMSNorm weights of every block and the final norm (what MISA's
    ``mode="pretrain"`` trains with dense AdamW on top of its active modules)."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    return embeddings + 2 * shape.layers * shape.hidden + shape.hidden
