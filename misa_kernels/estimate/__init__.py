r"""Training-memory estimator: will MISA, LoRA, layer-wise BCD or full AdamW fit on a GPU?

:func:`estimate_memory` implements the memory model of the paper's Appendix E (parameters,
gradients, optimizer states, intermediate activations) for the decoder-only
Hugging Face architectures MISA targets (LLaMA, Mistral, Qwen2, and the mixture-of-experts
Mixtral and Qwen2-MoE: grouped-query attention
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
output and an fp32 log-sum-exp ``4 b a s`` instead of the ``s^2`` terms. Sequences are
assumed unpadded (packed or of equal length), as padding masks make sdpa repeat k and v
too. A trainable module adds its input (paper Table 15):
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

  ``mode="pretrain"`` (MISA's own ``mode``) also trains the *dense* parameters with dense
  AdamW at every step, on top of the budget: the token embedding, the lm_head unless tied
  and every RMSNorm weight, final norm included (:func:`dense_numel`: 37% of all
  parameters at LLaMA-130M scale, 1.5 times the modules of ``delta = 25%``). They add
  their gradients (weight dtype, in ``.grad`` even with ``sparse_backward``), fp32 masters
  (16-bit weights) and fp32 moments, and activations: with the embedding trained every
  block, the first included, builds its input-gradient graph, the norms save their
  normalised inputs ``N h p`` and the lm_head its input ``N h p``. ``trainable_params``
  counts them and ``details["dense_params"]`` says how many.

**Mixture of experts** (Mixtral, Qwen2-MoE configs): a MoE block has ``E`` experts of
width ``I_e`` (``gate_up [2 I_e, h]``, ``down [h, I_e]``), a router ``[E, h]``, top-``k``
routing and, in Qwen2-MoE, a shared SwiGLU expert with a sigmoid gate; Qwen2-MoE's
``mlp_only_layers``/``decoder_sparse_step`` blocks stay dense. MISA's modules there are the
attention's four, the router, each expert's two matrices (``gate_up[e]``, ``down[e]``:
names as ``model.layers.3.mlp.experts.gate_up_proj[5]``) and the shared expert's. Routed
activations assume balanced routing (``N k / E`` tokens per expert): the router saves its
fp32 probabilities (``4 N E``) and top-``k`` indices, every (token, expert) pair that a
gradient flows through its SwiGLU intermediates ``3 I_e p``, its routing weight and, for
the router's gradient, its output ``h p``; an active expert adds its gathered input (``h p``
per pair, ``gate_up``) or ``I_e p`` (``down``). MISA runs its per-expert forward (three
int64 indices per pair: the expert's tokens, the weights' gather, the un-sorting); AdamW, LoRA and BAdam run transformers'
default ``grouped_mm`` (three int64 indices per pair, the sorted input once if the experts
train). LoRA on a MoE config adapts the ``nn.Linear`` modules: attention, dense MLPs and
shared experts (peft's ``all-linear`` also wraps the fused experts and the router; not
modelled).

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
gradients agree with measurements on tiny LLaMA, Qwen2, Mistral, Mixtral and Qwen2-MoE
models (fp32 and bf16,
eager and sdpa, full AdamW, peft LoRA, BAdam-style layers, MISA's own active sets in both
modes, gradient checkpointing). Not yet compared with a CUDA peak: ``bench/bench_memory.py``
records ``torch.cuda.max_memory_allocated`` beside the same parts on a GPU; compare
``total`` with it.

Layout of the package:

* ``shapes.py``: :class:`ModelShape`, :data:`BUILTIN_CONFIGS`, :func:`model_shape` and the
  parameter counts (:func:`parameter_count`, :func:`dense_numel`, ...).
* ``activations.py``: the activation model above (:class:`LayerSpec`, :func:`forward_saved`).
* ``active_sets.py``: MISA's worst, drawn (expected) and exact active sets.
* ``methods.py``: :class:`MemoryEstimate`, :func:`estimate_memory` and one function per method.
* ``units.py``: :data:`GIB` and :func:`parse_bytes`; ``cli.py`` (and ``__main__.py``): the
  command line, :func:`format_table` and :func:`main`.
"""
from __future__ import annotations

from .activations import DTYPE_BYTES, LayerSpec, forward_saved
from .active_sets import ModuleRef
from .cli import format_table, main
from .methods import METHODS, MODES, PLACEMENTS, MemoryEstimate, estimate_memory
from .shapes import (ATTENTION, BUILTIN_CONFIGS, HF_NAMES, KINDS, NORMS, ConfigLike, ModelShape, dense_numel,
                     layer_numel, lora_numel, model_shape, module_numel, parameter_count)
from .units import GIB, parse_bytes

__all__ = [
    "BUILTIN_CONFIGS",
    "METHODS",
    "MemoryEstimate",
    "ModelShape",
    "dense_numel",
    "estimate_memory",
    "model_shape",
    "parse_bytes",
    "main",
]
