r"""Training-memory estimator: will MISA, LoRA, layer-wise BCD or full AdamW fit on a GPU?

:func:`estimate_memory` implements the memory model of the paper's Appendix E (parameters,
gradients, optimizer states, intermediate activations) for the decoder-only
Hugging Face architectures MISA targets (LLaMA, Mistral, Qwen2: grouped-query attention
with ``a`` query and ``a_kv`` key/value heads of size ``d``, RMSNorm, and the gated SwiGLU
MLP of intermediate size ``I``) and answers "will it fit" for a config::

    >>> est = estimate_memory("llama-7b", batch=1, seq=1024, delta=0.01, method="misa")
    >>> est.fits(24 * 2**30), round(est.total / 2**30, 1)   # doctest: +SKIP

or from the command line (``--model-config`` takes a config.json, its folder, or one of
:data:`BUILTIN_CONFIGS`; nothing is ever downloaded)::

    python -m misa_kernels.estimate --model-config llama-7b --batch 1 --seq 1024 2048 \
        --delta 0.01 0.03 --gpu-memory 24GiB

Notation (paper App. E): ``b`` batch, ``s`` sequence length, ``h`` hidden size, ``L``
layers, ``a`` attention heads, ``v`` vocabulary, ``delta`` MISA's budget (active
parameters over all parameters), ``r`` LoRA rank; ``N = b s`` tokens, ``p`` bytes of the
activation dtype (2 for bf16), ``a d`` the width of q/o and ``a_kv d`` of k/v.

**Activations** are the tensors autograd saves for backward (what
``torch.autograd.graph.saved_tensors_hooks`` sees, parameters excluded, each storage once),
derived op by op from the Hugging Face implementation; autograd saves an input only when the
gradient it serves is needed. Per layer, when a gradient has to flow *through* it (the
paper's "frozen layer", Table 14), with ``eager`` attention::

    RMSNorm x2 (fp32 upcast input + 1/rms)   2 (4 N h + 4 N)
    q after RoPE, repeated k, repeated v     3 N a d p
    softmax (fp32) and its p-byte copy       b a s^2 (4 + p)   (one fp32 copy when p = 4)
    SwiGLU: gate out, silu(gate), up out     3 N I p

``sdpa``/``flash_attention_2`` save ``q, k, v`` (k, v at ``a_kv`` heads: transformers passes
``enable_gqa`` to sdpa when it needs no mask; with a mask, i.e. Mistral's sliding window
shorter than ``s``, it repeats them to ``a`` heads and saves the ``b s^2`` mask too), the
output and an fp32 log-sum-exp ``4 b a s`` instead of the ``s^2`` terms. Sequences are assumed unpadded (packed or of equal
length), as padding masks make sdpa repeat k and v too. A trainable module adds its input (paper Table 15):
``N h p`` for q/k/v (one copy shared by the three), ``N a d p`` for o (free under sdpa, whose
saved output is that tensor), ``N h p`` for gate/up (shared), ``N I p`` for down. A
trainable norm weight adds its normalised input ``N h p``. No layer below the lowest
trainable tensor saves anything (the embedding is frozen), and in the layer holding it only
what lies after it. The loss saves the fp32 log-probabilities ``4 N v`` (transformers
upcasts the logits) and the targets; RoPE's ``cos, sin`` add ``2 s d p`` once.

* **adamw**: every parameter trains (embeddings, norms and the head too): everything above
  plus each Linear's input and the norms' normalised inputs (paper "Activated layer").
* **lora**: adapters (rank ``r``, dtype ``lora_dtype``; peft upcasts them to fp32 by
  default) on q, k, v, o, gate, up, down. Each adapted Linear saves the adapter's input
  (an fp32 *copy per adapter* when the model is bf16; the model's own tensor when the
  dtypes agree) and the rank-``r`` intermediate ``N r``: paper E.2.2's ``X, A, B``.
  Gradients flow through every layer from the first q projection up.
* **layerwise** (BAdam): ``layers_active`` whole blocks (norms included) train.
* **misa**: the active modules add their inputs; which modules are active decides how many
  layers build a graph. ``placement`` picks the active set:

  - ``"worst"`` (default): every layer, the first included, keeps what the input-gradient
    path needs (as if a module in layer 0 were active: the paper's
    ``L(a b s^2 + 8 b s h)`` term), and the budget ``delta * n_params`` is filled greedily
    with the modules that add the most bytes (saved inputs + states) per parameter, one
    module of a kind per layer, shared inputs counted once: the paper's eq. (14)
    maximisation with GQA and the gated MLP. Algorithm 2 can draw this set.
  - ``"expected"``: the mean over ``draws`` active sets drawn by Algorithm 2 with uniform
    probabilities (deterministic ``seed``).
  - ``active_modules=[...]``: the exact set (names as ``MISA.active_modules`` gives them,
    e.g. ``"model.layers.3.mlp.down_proj"``, or ``(layer, "down_proj")``).

  When no module fits under the budget, Algorithm 2 trains the first drawn one alone;
  the worst case then takes the costliest single module.

**Weights** are all parameters in ``dtype`` (LoRA adapters in ``lora_dtype``).
**Gradients**: in the parameter's dtype for autograd (``.grad``); MISA's
``sparse_backward`` keeps fp32 buffers for the active modules, and ``step_in_backward``
only the largest single active module's fp32 buffer at a time.
**Optimizer states**: Adam's ``m, v`` in fp32, plus an fp32 master copy of every trained
16-bit weight when ``master_weights`` (MISA and BAdam do this for the active modules only;
for full AdamW ``master_weights=True`` is the usual mixed-precision recipe, 16 bytes per
parameter in all, and ``False`` models ``torch.optim.AdamW`` on bf16 parameters, whose
``m, v`` are bf16). fp32 models update in place (no master).

``transient`` is the short-lived loss-head buffers that exist on top of the saved
activations at the start of backward: the fp32 gradients of the log-probabilities and of
the logits, ``8 N v`` bytes. ``total`` adds every part, as the paper does; the real peak can
be lower (autograd frees activations while gradients appear) and CUDA adds its context and
allocator slack (often 0.5-1 GiB), so keep some headroom. With ``gradient_checkpointing``
(one checkpoint per decoder layer, as transformers does) every layer keeps only its input
``N h p`` (torch saves the inputs of each checkpointed call, frozen layers' too) and one
layer's activations are rebuilt during backward: that block is added to ``transient``.

Checked on CPU (``tests/test_estimate.py``): saved activations, optimizer states and
gradients agree with measurements on tiny LLaMA, Qwen2 and Mistral models (fp32 and bf16,
eager and sdpa, full AdamW, peft LoRA, BAdam-style layers, MISA's own active sets, gradient
checkpointing). Not yet compared with a CUDA peak: ``bench/bench_memory.py`` records
``torch.cuda.max_memory_allocated`` beside the same parts on a GPU; compare ``total`` with it.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

# ``python -m misa_kernels.estimate`` first imports this module through the package (which
# exports ``estimate_memory``), then runs it again as ``__main__``: harmless here (the module
# only defines things), so runpy's warning about it is silenced.
warnings.filterwarnings("ignore", message="'misa_kernels.estimate' found in sys.modules", category=RuntimeWarning)

__all__ = [
    "BUILTIN_CONFIGS",
    "METHODS",
    "MemoryEstimate",
    "ModelShape",
    "estimate_memory",
    "model_shape",
    "parse_bytes",
    "main",
]

GIB = 2**30
METHODS = ("adamw", "lora", "layerwise", "misa")
PLACEMENTS = ("worst", "expected")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
HF_NAMES = dict(q="q_proj", k="k_proj", v="v_proj", o="o_proj", gate="gate_proj", up="up_proj", down="down_proj")
NORMS = ("input_norm", "post_norm")
_KIND_OF_NAME = {name: kind for kind, name in HF_NAMES.items()}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
_FAMILIES = ("llama", "mistral", "qwen2")

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
ModuleRef = Union[str, tuple[int, str]]


# ---------------------------------------------------------------------- model shape
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
    """Read a LLaMA/Mistral/Qwen2 config (see :func:`_config_dict` for the accepted forms).

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
    attn = attn_implementation or values.get("attn_implementation") or values.get("_attn_implementation") or "sdpa"
    if attn not in ATTENTION:
        raise ValueError(f"attn_implementation must be one of {ATTENTION}, got {attn!r}")
    qwen = model_type == "qwen2"
    attention_bias = bool(values.get("attention_bias", False))
    return ModelShape(
        model_type=model_type, kv_heads=int(values.get("num_key_value_heads") or heads),
        head_dim=int(values.get("head_dim") or hidden // heads), tied=bool(values.get("tie_word_embeddings", False)),
        qkv_bias=qwen or attention_bias, o_bias=attention_bias and not qwen,
        mlp_bias=bool(values.get("mlp_bias", False)), attn_implementation=attn,
        sliding_window=values.get("sliding_window") if model_type == "mistral" else None, **shape_args)


# ---------------------------------------------------------------------- parameters
def module_numel(shape: ModelShape, kind: str) -> int:
    """Parameters of one module (weight and bias) of kind ``q, k, v, o, gate, up, down``."""
    h, i = shape.hidden, shape.intermediate
    sizes = dict(q=(h, shape.q_width, shape.qkv_bias), k=(h, shape.kv_width, shape.qkv_bias),
                 v=(h, shape.kv_width, shape.qkv_bias), o=(shape.q_width, h, shape.o_bias),
                 gate=(h, i, shape.mlp_bias), up=(h, i, shape.mlp_bias), down=(i, h, shape.mlp_bias))
    fan_in, fan_out, bias = sizes[kind]
    return fan_in * fan_out + (fan_out if bias else 0)


def layer_numel(shape: ModelShape) -> int:
    """Parameters of one decoder block: seven modules and two RMSNorm weights."""
    return sum(module_numel(shape, k) for k in KINDS) + 2 * shape.hidden


def parameter_count(shape: ModelShape) -> int:
    """``sum(p.numel() for p in model.parameters())`` of the Hugging Face model: embedding,
    ``L`` blocks, final norm and the lm_head unless tied to the embedding."""
    embeddings = shape.vocab * shape.hidden * (1 if shape.tied else 2)
    return embeddings + shape.layers * layer_numel(shape) + shape.hidden


def lora_numel(shape: ModelShape, rank: int, targets: Sequence[str] = KINDS) -> int:
    """LoRA parameters: ``r (fan_in + fan_out)`` per adapted Linear per layer."""
    fans = dict(q=shape.hidden + shape.q_width, k=shape.hidden + shape.kv_width, v=shape.hidden + shape.kv_width,
                o=shape.q_width + shape.hidden, gate=shape.hidden + shape.intermediate,
                up=shape.hidden + shape.intermediate, down=shape.intermediate + shape.hidden)
    return shape.layers * rank * sum(fans[k] for k in targets)


# ---------------------------------------------------------------------- activations
@dataclass(frozen=True)
class _Run:
    """One forward: shape, tokens and dtypes."""

    shape: ModelShape
    batch: int  # b
    seq: int  # s
    act: str  # activation dtype (= weight dtype)
    lora_dtype: str
    lora_rank: int

    @property
    def tokens(self) -> int:
        """``N = b s``."""
        return self.batch * self.seq

    @property
    def p(self) -> int:
        """Bytes per activation element."""
        return DTYPE_BYTES[self.act]


@dataclass(frozen=True)
class LayerSpec:
    """What trains in one block: module kinds (and ``input_norm``/``post_norm``) whose
    weights require grad, and kinds carrying a LoRA adapter."""

    trainable: frozenset = frozenset()
    lora: frozenset = frozenset()


def _norm(run: _Run, x_grad: bool, weight_trains: bool) -> tuple[int, bool]:
    """RMSNorm (transformers upcasts to fp32): the fp32 input and ``1/rms`` for the input
    gradient, the normalised input for the weight gradient."""
    n, h = run.tokens, run.shape.hidden
    saved = (4 * n * h + 4 * n if x_grad else 0) + (n * h * run.p if weight_trains else 0)
    return saved, x_grad or weight_trains


def _linear_inputs(run: _Run, spec: LayerSpec, kinds: Sequence[str], fan_in: int,
                   already_saved: bool = False) -> int:
    """Bytes saved for a group of Linears reading one input of width ``fan_in``: the input
    once if a weight trains (or an adapter reads it in the same dtype), an adapter's own
    cast copy otherwise, and each adapter's rank-``r`` intermediate."""
    n = run.tokens
    adapters = [k for k in kinds if k in spec.lora]
    lora_p = DTYPE_BYTES[run.lora_dtype]
    shared = any(k in spec.trainable for k in kinds) or (adapters and run.lora_dtype == run.act)
    saved = n * fan_in * run.p if shared and not already_saved else 0
    if run.lora_dtype != run.act:
        saved += len(adapters) * n * fan_in * lora_p
    return saved + len(adapters) * n * run.lora_rank * lora_p


def _attention_core(run: _Run, q_grad: bool, k_grad: bool, v_grad: bool) -> int:
    """Saved by the attention product itself (after RoPE)."""
    shape, b, s, n, p = run.shape, run.batch, run.seq, run.tokens, run.p
    if shape.attn_implementation != "eager":
        if not (q_grad or k_grad or v_grad):
            return 0  # one op that saves q, k, v, out and the log-sum-exp when anything needs grad
        masked = shape.attn_implementation == "sdpa" and shape.sliding_window is not None and s > shape.sliding_window
        kv_width = shape.q_width if masked else shape.kv_width  # with a mask transformers repeats k, v
        mask = b * s * s * p if masked else 0  # and sdpa saves the (b, 1, s, s) additive mask
        return n * p * (2 * shape.q_width + 2 * kv_width) + 4 * b * shape.heads * s + mask
    scores = b * shape.heads * s * s
    saved = n * shape.q_width * p * (k_grad + q_grad)  # q for dk; repeated k for dq
    scores_grad = q_grad or k_grad
    if p == 4:
        saved += 4 * scores if scores_grad or v_grad else 0  # softmax output is the probabilities
    else:
        saved += (4 * scores if scores_grad else 0) + (p * scores if v_grad else 0)
    saved += n * shape.q_width * p if scores_grad else 0  # repeated v for d(probabilities)
    return saved


def _layer(run: _Run, spec: LayerSpec, x_grad: bool) -> tuple[int, bool, bool]:
    """Saved bytes of one decoder block whose input requires grad iff ``x_grad``.

    Returns ``(bytes, output requires grad, RoPE tables saved)``."""
    shape, t = run.shape, spec.trainable
    saved, z_grad = _norm(run, x_grad, "input_norm" in t)
    saved += _linear_inputs(run, spec, ("q", "k", "v"), shape.hidden)
    q_grad, k_grad, v_grad = (z_grad or k in t or k in spec.lora for k in ("q", "k", "v"))
    saved += _attention_core(run, q_grad, k_grad, v_grad)
    attn_grad = q_grad or k_grad or v_grad
    fused_output = shape.attn_implementation != "eager" and attn_grad  # o's input is the saved output
    saved += _linear_inputs(run, spec, ("o",), shape.q_width, already_saved=fused_output)
    x2_grad = x_grad or attn_grad or "o" in t or "o" in spec.lora
    norm2, z2_grad = _norm(run, x2_grad, "post_norm" in t)
    saved += norm2 + _linear_inputs(run, spec, ("gate", "up"), shape.hidden)
    gate_grad, up_grad = (z2_grad or k in t or k in spec.lora for k in ("gate", "up"))
    n_i_p = run.tokens * shape.intermediate * run.p
    saved += n_i_p * (2 * gate_grad + up_grad)  # act(gate) input and up output; act(gate) output
    saved += _linear_inputs(run, spec, ("down",), shape.intermediate)
    mlp_grad = gate_grad or up_grad or "down" in t or "down" in spec.lora
    return saved, x2_grad or mlp_grad, q_grad or k_grad


@dataclass(frozen=True)
class _Forward:
    """Saved bytes of one forward, by part."""

    blocks: tuple[int, ...]  # per decoder block
    outside: int  # embedding indices, final norm, lm_head input, loss
    rope: int  # RoPE's cos and sin tables, shared by the blocks

    @property
    def total(self) -> int:
        return sum(self.blocks) + self.outside + self.rope


def forward_saved(run: _Run, layers: Sequence[LayerSpec], embedding_trains: bool = False,
                  head_trains: bool = False, final_norm_trains: bool = False,
                  input_grad: Optional[bool] = None) -> _Forward:
    """What autograd saves in one forward. ``layers[l]`` says what trains in block ``l``.

    The first block's input requires grad when the embedding trains (or ``input_grad``
    forces it); the loss saves fp32 log-probabilities ``4 N v`` and the int64 targets."""
    n, shape = run.tokens, run.shape
    grad = embedding_trains if input_grad is None else input_grad
    blocks, rope = [], False
    for spec in layers:
        saved, grad, rope_used = _layer(run, spec, grad)
        blocks.append(saved)
        rope = rope or rope_used
    final, grad = _norm(run, grad, final_norm_trains)
    outside = (8 * n if embedding_trains else 0) + final + (n * shape.hidden * run.p if head_trains else 0)
    if grad or head_trains:
        outside += 4 * n * shape.vocab + 8 * n + 4  # log_softmax output, targets, total weight
    return _Forward(tuple(blocks), outside, 2 * run.seq * shape.head_dim * run.p if rope else 0)


def _activations(run: _Run, layers: Sequence[LayerSpec], checkpointing: bool, **flags: Any) -> tuple[int, int]:
    """``(saved activations, transient)``. The transient part is the loss-head buffers
    ``8 N v`` and, under gradient checkpointing, the largest block rebuilt in backward with
    the RoPE tables (every block then keeps only its input ``N h p``, frozen ones too: torch's
    checkpoint saves the inputs of each checkpointed call)."""
    fwd = forward_saved(run, layers, **flags)
    loss_buffers = 8 * run.tokens * run.shape.vocab
    if not checkpointing:
        return fwd.total, loss_buffers
    kept = len(fwd.blocks) * run.tokens * run.shape.hidden * run.p  # torch keeps every block's input
    return kept + fwd.outside, loss_buffers + max(fwd.blocks, default=0) + fwd.rope


# ---------------------------------------------------------------------- MISA active sets
def _parse_module(ref: ModuleRef, layers: int) -> tuple[int, str]:
    """``"model.layers.3.mlp.down_proj"``, ``"3.down_proj"`` or ``(3, "down")`` -> ``(3, "down")``."""
    if isinstance(ref, tuple):
        layer, kind = ref
        kind = _KIND_OF_NAME.get(kind, kind)
    else:
        match = re.search(r"(?:^|\.)(\d+)\.(?:.*\.)?([a-z_]+)$", str(ref))
        if match is None or match.group(2) not in _KIND_OF_NAME:
            raise ValueError(f"active_modules: cannot read a layer and one of {tuple(HF_NAMES.values())} "
                             f"from {ref!r}")
        layer, kind = int(match.group(1)), _KIND_OF_NAME[match.group(2)]
    if kind not in KINDS or not 0 <= int(layer) < layers:
        raise ValueError(f"active_modules: {ref!r} is not a module of a {layers}-layer model")
    return int(layer), kind


def _specs(layers: int, active: Iterable[tuple[int, str]]) -> list[LayerSpec]:
    kinds: dict[int, set[str]] = {}
    for layer, kind in active:
        kinds.setdefault(layer, set()).add(kind)
    return [LayerSpec(trainable=frozenset(kinds.get(l, ()))) for l in range(layers)]


@dataclass
class _StateCost:
    """Bytes per trained parameter of gradients and optimizer states."""

    grad: int
    master: int
    moments: int

    @property
    def per_param(self) -> int:
        return self.grad + self.master + self.moments


def _worst_active_set(run: _Run, budget: float, cost: _StateCost) -> list[tuple[int, str]]:
    """Greedy worst case of Algorithm 2's selection: repeatedly add the module (one of a
    kind per layer) with the most extra bytes (saved input + states) per parameter that
    still fits under ``budget``; all blocks assumed to carry gradients (paper eq. 14)."""
    shape = run.shape
    numel = {k: module_numel(shape, k) for k in KINDS}
    extra: dict[frozenset, int] = {}

    def layer_bytes(kinds: frozenset) -> int:
        if kinds not in extra:
            extra[kinds] = _layer(run, LayerSpec(trainable=kinds), True)[0]
        return extra[kinds]

    def gain(pattern: frozenset, kind: str) -> int:
        return layer_bytes(pattern | {kind}) - layer_bytes(pattern) + cost.per_param * numel[kind]

    patterns: Counter = Counter({frozenset(): shape.layers})
    remaining = budget
    while True:
        options = [(gain(p, k) / numel[k], gain(p, k), p, k) for p in patterns if patterns[p]
                   for k in KINDS if k not in p and numel[k] <= remaining]
        if not options:
            break
        _, _, pattern, kind = max(options, key=lambda o: (o[0], o[1], o[3]))
        patterns[pattern] -= 1
        patterns[pattern | {kind}] += 1
        remaining -= numel[kind]
    if sum(patterns.values()) == patterns[frozenset()]:  # nothing fits: the first drawn trains alone
        kind = max(KINDS, key=lambda k: (gain(frozenset(), k), k))
        return [(0, kind)]
    active, layer = [], 0
    for pattern, count in sorted(patterns.items(), key=lambda pc: sorted(pc[0])):
        for _ in range(count):
            active += [(layer, k) for k in sorted(pattern)]
            layer += 1
    return active


def _drawn_active_sets(shape: ModelShape, budget: float, draws: int, seed: int) -> list[list[tuple[int, str]]]:
    """Active sets drawn by Algorithm 2 with uniform probabilities: modules in random order,
    each kept if it still fits; the first drawn alone when none fits."""
    modules = [(l, k) for l in range(shape.layers) for k in KINDS]
    rng = random.Random(seed)
    sets = []
    for _ in range(draws):
        order = rng.sample(modules, len(modules))
        chosen, used = [], 0
        for layer, kind in order:
            size = module_numel(shape, kind)
            if used + size <= budget:
                chosen.append((layer, kind))
                used += size
        sets.append(chosen or [order[0]])
    return sets


# ---------------------------------------------------------------------- the estimate
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training configuration (see the module docstring for the model)."""

    method: str
    weights: int
    gradients: int
    optimizer_states: int  # Adam moments + fp32 master copies
    activations: int  # saved for backward (saved_tensors_hooks)
    transient: int  # loss-head gradient buffers (and a rebuilt block under checkpointing)
    master_weights: int  # the part of optimizer_states that is fp32 master copies
    n_params: int  # all model parameters
    trainable_params: int  # trained in one step (MISA: the active set)
    label: str = ""
    details: dict = field(default_factory=dict, compare=False)

    @property
    def moments(self) -> int:
        """Adam's ``m`` and ``v``."""
        return self.optimizer_states - self.master_weights

    @property
    def total(self) -> int:
        """``weights + gradients + optimizer_states + activations + transient``."""
        return self.weights + self.gradients + self.optimizer_states + self.activations + self.transient

    def headroom(self, gpu_bytes: Union[int, str]) -> int:
        """``gpu_bytes - total`` (negative: does not fit). ``gpu_bytes`` may be ``"24GiB"``."""
        return parse_bytes(gpu_bytes) - self.total

    def fits(self, gpu_bytes: Union[int, str], margin: float = 0.0) -> bool:
        """Whether ``total * (1 + margin)`` is at most ``gpu_bytes``."""
        return self.total * (1 + margin) <= parse_bytes(gpu_bytes)

    def gib(self) -> dict[str, float]:
        """The parts and the total in GiB."""
        parts = ("weights", "gradients", "optimizer_states", "activations", "transient", "total")
        return {k: getattr(self, k) / GIB for k in parts}


def _dtype_name(dtype: Any, argument: str) -> str:
    name = str(dtype).replace("torch.", "").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_BYTES:
        raise ValueError(f"{argument} must be one of {sorted(DTYPE_BYTES)} (or bf16/fp16/fp32), got {dtype!r}")
    return name


def _check(batch: int, seq: int, delta: float, method: str, placement: str, lora_rank: int,
           layers_active: int, layers: int, draws: int) -> None:
    checks = [
        ("batch", batch, isinstance(batch, int) and batch >= 1, "must be an int >= 1"),
        ("seq", seq, isinstance(seq, int) and seq >= 1, "must be an int >= 1"),
        ("delta", delta, isinstance(delta, (int, float)) and 0 < delta <= 1, "must be in (0, 1]"),
        ("method", method, method in METHODS, f"must be one of {METHODS}"),
        ("placement", placement, placement in PLACEMENTS, f"must be one of {PLACEMENTS}"),
        ("lora_rank", lora_rank, isinstance(lora_rank, int) and lora_rank >= 1, "must be an int >= 1"),
        ("layers_active", layers_active, isinstance(layers_active, int) and 1 <= layers_active <= layers,
         f"must be an int in [1, {layers}]"),
        ("draws", draws, isinstance(draws, int) and draws >= 1, "must be an int >= 1"),
    ]
    for name, value, ok, text in checks:
        if not ok:
            raise ValueError(f"{name} {text}, got {value!r}")


def estimate_memory(
    config: ConfigLike,
    batch: int = 1,
    seq: int = 1024,
    delta: float = 0.03,
    method: str = "misa",
    *,
    dtype: Any = "bfloat16",
    master_weights: Optional[bool] = None,
    lora_rank: int = 16,
    lora_dtype: Any = "float32",
    layers_active: int = 1,
    placement: str = "worst",
    active_modules: Optional[Sequence[ModuleRef]] = None,
    step_in_backward: bool = False,
    sparse_backward: bool = False,
    gradient_checkpointing: bool = False,
    attn_implementation: Optional[str] = None,
    draws: int = 64,
    seed: int = 0,
) -> MemoryEstimate:
    """Estimated training memory of ``method`` on ``config`` with ``batch`` x ``seq`` tokens.

    Args:
        config: a transformers ``LlamaConfig``/``MistralConfig``/``Qwen2Config``, a dict, a
            path to a config.json (or its folder), or a name in :data:`BUILTIN_CONFIGS`.
        batch, seq: ``b`` and ``s``.
        delta: MISA's budget ``delta`` (active parameters / all parameters), in (0, 1].
        method: ``"adamw"`` (all parameters), ``"lora"``, ``"layerwise"`` (BAdam) or ``"misa"``.
        dtype: dtype of the weights and activations (default bf16).
        master_weights: keep fp32 master copies of trained 16-bit weights. Default: ``True``
            (MISA, BAdam and mixed-precision AdamW do); ``False`` for AdamW means torch's
            AdamW on bf16 parameters with bf16 ``m, v``. Ignored for fp32 weights and LoRA
            (adapters are ``lora_dtype``).
        lora_rank, lora_dtype: LoRA ``r`` on all seven block Linears, adapter dtype (peft
            upcasts adapters to fp32 by default).
        layers_active: blocks trained at once by ``"layerwise"`` (BAdam: 1); the worst case
            puts them at the bottom, the expected case averages over positions.
        placement: MISA/layerwise active set, ``"worst"`` or ``"expected"`` (module docstring).
        active_modules: MISA's exact active set (overrides ``placement`` and ``delta``).
        step_in_backward: MISA updates each module in backward: one module's fp32 gradient
            at a time (implies ``sparse_backward``).
        sparse_backward: MISA's fp32 gradient buffers for the active modules.
        gradient_checkpointing: each block keeps only its input (a model, not measured).
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``; default the
            config's, else ``"sdpa"``.
        draws, seed: the Algorithm 2 draws averaged by ``placement="expected"``.

    Raises:
        ValueError: naming the bad argument (``delta`` outside (0, 1], ``seq`` < 1, an
            unknown ``method`` or config name, ...).
    """
    shape = model_shape(config, attn_implementation)
    _check(batch, seq, delta, method, placement, lora_rank, layers_active, shape.layers, draws)
    act = _dtype_name(dtype, "dtype")
    run = _Run(shape, batch, seq, act, _dtype_name(lora_dtype, "lora_dtype"), lora_rank)
    master = (True if master_weights is None else bool(master_weights)) and DTYPE_BYTES[act] < 4
    n_params = parameter_count(shape)
    common = dict(run=run, master=master, n_params=n_params, checkpointing=gradient_checkpointing)
    if method == "adamw":
        return _adamw(**common)
    if method == "lora":
        return _lora(**common)
    sparse = sparse_backward or step_in_backward
    if method == "layerwise":
        return _layerwise(layers_active=layers_active, placement=placement, **common)
    refs = None if active_modules is None else [_parse_module(m, shape.layers) for m in active_modules]
    return _misa(delta=delta, placement=placement, active=refs, sparse=sparse, step_in_backward=step_in_backward,
                 draws=draws, seed=seed, **common)


def _state_cost(run: _Run, master: bool, grad_bytes: Optional[int] = None) -> _StateCost:
    """Bytes per trained parameter: gradient in the weight dtype (or ``grad_bytes``), fp32
    master when ``master``, fp32 ``m, v``."""
    p = DTYPE_BYTES[run.act]
    return _StateCost(grad=p if grad_bytes is None else grad_bytes, master=4 if master else 0, moments=8)


def _adamw(run: _Run, master: bool, n_params: int, checkpointing: bool) -> MemoryEstimate:
    """Full fine-tuning: every parameter trains."""
    p = DTYPE_BYTES[run.act]
    every = LayerSpec(trainable=frozenset(KINDS + NORMS))
    saved, transient = _activations(run, [every] * run.shape.layers, checkpointing, embedding_trains=True,
                                    head_trains=True, final_norm_trains=True)
    moments = 8 if master or p == 4 else 2 * p
    return MemoryEstimate("adamw", weights=n_params * p, gradients=n_params * p,
                          optimizer_states=n_params * (moments + (4 if master else 0)), activations=saved,
                          transient=transient, master_weights=n_params * 4 if master else 0, n_params=n_params,
                          trainable_params=n_params, label="AdamW (full)")


def _lora(run: _Run, master: bool, n_params: int, checkpointing: bool) -> MemoryEstimate:
    """LoRA on every block Linear; adapters in ``lora_dtype``, AdamW states for them."""
    lora_p = DTYPE_BYTES[run.lora_dtype]
    adapters = lora_numel(run.shape, run.lora_rank)
    spec = LayerSpec(lora=frozenset(KINDS))
    saved, transient = _activations(run, [spec] * run.shape.layers, checkpointing)
    moments = 8 if lora_p == 4 else 2 * lora_p
    return MemoryEstimate("lora", weights=n_params * DTYPE_BYTES[run.act] + adapters * lora_p,
                          gradients=adapters * lora_p, optimizer_states=adapters * moments, activations=saved,
                          transient=transient, master_weights=0, n_params=n_params, trainable_params=adapters,
                          label=f"LoRA r={run.lora_rank}", details=dict(adapter_params=adapters))


def _layerwise(run: _Run, master: bool, n_params: int, checkpointing: bool, layers_active: int,
               placement: str) -> MemoryEstimate:
    """BAdam-style layer-wise BCD: ``layers_active`` consecutive blocks (norms included) train."""
    shape, every = run.shape, LayerSpec(trainable=frozenset(KINDS + NORMS))
    starts = [0] if placement == "worst" else list(range(shape.layers - layers_active + 1))
    saved = transient = 0
    for start in starts:
        specs = [every if start <= l < start + layers_active else LayerSpec() for l in range(shape.layers)]
        a, t = _activations(run, specs, checkpointing)
        saved, transient = saved + a, transient + t
    trained = layers_active * layer_numel(shape)
    cost = _state_cost(run, master)
    return MemoryEstimate("layerwise", weights=n_params * DTYPE_BYTES[run.act], gradients=trained * cost.grad,
                          optimizer_states=trained * (cost.master + cost.moments),
                          activations=saved // len(starts), transient=transient // len(starts),
                          master_weights=trained * cost.master, n_params=n_params, trainable_params=trained,
                          label=f"layer-wise ({layers_active} layer{'s' * (layers_active > 1)})")


def _misa(run: _Run, master: bool, n_params: int, checkpointing: bool, delta: float, placement: str,
          active: Optional[list[tuple[int, str]]], sparse: bool, step_in_backward: bool, draws: int,
          seed: int) -> MemoryEstimate:
    """MISA: the active modules train; the rest of the model is frozen."""
    shape = run.shape
    cost = _state_cost(run, master, grad_bytes=4 if sparse else None)
    budget = delta * n_params
    if active is not None:
        sets, worst = [active], False
    elif placement == "worst":
        sets, worst = [_worst_active_set(run, budget, cost)], True
    else:
        sets, worst = _drawn_active_sets(shape, budget, draws, seed), False
    totals = Counter()
    for chosen in sets:
        numels = [module_numel(shape, k) for _, k in chosen]
        specs = _specs(shape.layers, chosen)
        # worst case: every block carries a gradient, the first included (an upper bound for
        # any placement of the same per-layer patterns)
        saved = _activations(run, specs, checkpointing, input_grad=True if worst else None)
        grads = max(numels) * 4 if step_in_backward else sum(numels) * cost.grad
        totals.update(activations=saved[0], transient=saved[1], gradients=grads, trained=sum(numels),
                      master=sum(numels) * cost.master, moments=sum(numels) * cost.moments, modules=len(chosen))
    k = len(sets)
    mean = {key: int(round(value / k)) for key, value in totals.items()}
    suffix = " step-in-bwd" if step_in_backward else " sparse-bwd" if sparse else ""
    label = f"MISA exact set{suffix}" if active is not None else f"MISA delta={delta:g}{suffix}"
    return MemoryEstimate("misa", weights=n_params * DTYPE_BYTES[run.act], gradients=mean["gradients"],
                          optimizer_states=mean["master"] + mean["moments"], activations=mean["activations"],
                          transient=mean["transient"], master_weights=mean["master"], n_params=n_params,
                          trainable_params=mean["trained"], label=label,
                          details=dict(active_modules=sets[0] if k == 1 else None, mean_modules=totals["modules"] / k,
                                       placement="exact" if active is not None else placement))


# ---------------------------------------------------------------------- CLI
_UNITS = {"": GIB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(value: Union[int, float, str]) -> int:
    """``"24GiB"``, ``"80GB"``, ``"40G"`` (binary), ``"24"`` (GiB) or an int (bytes) -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"gpu_memory must be > 0, got {value!r}")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"gpu_memory: cannot read {value!r}; use e.g. 24GiB, 80GB or 40G")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _rows(config: ConfigLike, batch: int, seq: int, deltas: Sequence[float], **kw: Any) -> list[MemoryEstimate]:
    lora_rank, layers_active = kw.pop("lora_rank"), kw.pop("layers_active")
    placement = kw.pop("placement")
    rows = [estimate_memory(config, batch, seq, method="adamw", **kw),
            estimate_memory(config, batch, seq, method="lora", lora_rank=lora_rank, **kw),
            estimate_memory(config, batch, seq, method="layerwise", layers_active=layers_active,
                            placement=placement, **kw)]
    for delta in deltas:
        for sib in (False, True):
            rows.append(estimate_memory(config, batch, seq, delta, "misa", placement=placement,
                                        step_in_backward=sib, **kw))
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
                  gradient_checkpointing=args.gradient_checkpointing)
        rows = [(seq, est) for seq in args.seq for est in _rows(args.model_config, args.batch, seq, args.delta, **kw)]
    except ValueError as err:
        parser.error(str(err))  # exits with status 2 and the message naming the argument
    print(f"{args.model_config}: {parameter_count(shape) / 1e9:.2f}B parameters, {shape.attn_implementation} "
          f"attention, {args.dtype}, batch {args.batch}, MISA/layer-wise placement {args.placement} (GiB)\n")
    print(format_table(rows, gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
