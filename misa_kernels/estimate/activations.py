"""The activation model: bytes autograd saves for backward, op by op (package docstring).

:func:`forward_saved` walks one forward block by block (:class:`LayerSpec` says what
trains in each) and :func:`_activations` turns it into ``(saved, transient)`` bytes,
gradient checkpointing included."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .shapes import ModelShape

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
