"""The activation model: bytes autograd saves for backward, op by op (package docstring).

:func:`forward_saved` walks one forward block by block (:class:`LayerSpec` says what
trains in each) and :func:`_activations` turns it into ``(saved, transient)`` bytes,
gradient checkpointing included."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .shapes import SHARED_KINDS, ModelShape

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
    per_expert: bool = False  # MoE blocks run MISA's per-expert forward (else transformers' grouped_mm)

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


def _layer(run: _Run, spec: LayerSpec, x_grad: bool, moe: bool = False) -> tuple[int, bool, bool]:
    """Saved bytes of one decoder block (``moe``: with a MoE MLP) whose input requires grad
    iff ``x_grad``.

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
    mlp_saved, mlp_grad = (_moe_mlp if moe else _swiglu)(run, spec, z2_grad)
    return saved + norm2 + mlp_saved, x2_grad or mlp_grad, q_grad or k_grad


def _swiglu(run: _Run, spec: LayerSpec, z_grad: bool, kinds: Sequence[str] = ("gate", "up", "down"),
            width: Optional[int] = None, input_saved: bool = False) -> tuple[int, bool]:
    """A gated MLP ``down(act(gate z) * up z)`` on an input that requires grad iff ``z_grad``:
    saved bytes, and whether its output requires grad."""
    t, (gate, up, down) = spec.trainable, kinds
    width = run.shape.intermediate if width is None else width
    saved = _linear_inputs(run, spec, (gate, up), run.shape.hidden, already_saved=input_saved)
    gate_grad, up_grad = (z_grad or k in t or k in spec.lora for k in (gate, up))
    saved += run.tokens * width * run.p * (2 * gate_grad + up_grad)  # act(gate) input, up out; act(gate) out
    saved += _linear_inputs(run, spec, (down,), width)
    return saved, gate_grad or up_grad or down in t or down in spec.lora


def _expert_pairs(run: _Run, spec: LayerSpec, z_grad: bool, weights_grad: bool) -> tuple[int, bool]:
    """The experts' saved bytes, and whether their output requires grad.

    MISA's per-expert forward (``run.per_expert``) gathers each expert's tokens (an int64
    index per pair), concatenates the outputs in expert order and weights and un-sorts them
    with one gather each (an int64 index per pair apiece); transformers' ``grouped_mm``
    sorts the pairs once (three int64 indices per pair, ``E`` int32 offsets) and runs the
    fused tensors, whose input is kept if any expert trains."""
    shape, t, p = run.shape, spec.trainable, run.p
    h, width, pairs = shape.hidden, shape.expert_intermediate, run.tokens * shape.top_k
    share = pairs / shape.experts
    grouped_input = any(f"gate_up[{e}]" in t for e in range(shape.experts))
    saved = 8 * pairs if run.per_expert and weights_grad else 0  # the sort order, gathering the weights
    out_grad = weights_grad
    for e in range(shape.experts):
        gate_up, down = f"gate_up[{e}]" in t, f"down[{e}]" in t
        hidden_grad = z_grad or gate_up
        y_grad = hidden_grad or down
        if not (y_grad or weights_grad):
            continue
        out_grad = True
        per_pair = 3 * width * p * hidden_grad + width * p * down + p * y_grad + h * p * weights_grad
        if run.per_expert:
            per_pair += 8 + h * p * gate_up  # the expert's token index, its gathered input
        else:
            per_pair += 24 + h * p * grouped_input
        saved += round(share * per_pair)
    if out_grad:  # the un-sorting gather's index; grouped_mm's offsets
        saved += 8 * pairs if run.per_expert else 4 * shape.experts
    return saved, out_grad


def _moe_mlp(run: _Run, spec: LayerSpec, z_grad: bool) -> tuple[int, bool]:
    """A MoE block on ``z`` (``N x h``): the router (fp32 softmax over ``E``, top-``k``),
    then the ``N k`` (token, expert) pairs, ``N k / E`` per expert (routing assumed
    balanced), each saving its input, SwiGLU intermediates, routing weight and weighted
    output as the gradients need (:func:`_expert_pairs`); plus a shared expert."""
    shape, t, n, p = run.shape, spec.trainable, run.tokens, run.p
    h, pairs = shape.hidden, n * shape.top_k
    z_read = "router" in t or any(k in t or k in spec.lora for k in SHARED_KINDS)
    saved = n * h * p if z_read else 0  # z, once, for the weights reading it directly
    weights_grad = z_grad or "router" in t
    if weights_grad:  # softmax probabilities, top-k indices, the renormalisation's operands
        saved += 4 * n * shape.experts + 8 * pairs + 4 * n + 4 * pairs
    experts, out_grad = _expert_pairs(run, spec, z_grad, weights_grad)
    saved += experts
    if shape.shared_intermediate:
        shared, shared_grad = _swiglu(run, spec, z_grad, SHARED_KINDS[:3], shape.shared_intermediate, input_saved=z_read)
        gate_grad = z_grad or "shared_expert_gate" in t
        # sigmoid(gate z) * shared(z): the sigmoid's output (its own backward and the product's),
        # the shared output for the gate's gradient
        saved += shared + (n * p if gate_grad or shared_grad else 0) + (n * h * p if gate_grad else 0)
        out_grad = out_grad or shared_grad or gate_grad
    return saved, out_grad


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
    for layer, spec in enumerate(layers):
        saved, grad, rope_used = _layer(run, spec, grad, shape.is_moe(layer))
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
