"""The estimate: :class:`MemoryEstimate`, argument checks, :func:`estimate_memory` and one
function per method (full AdamW, LoRA, layer-wise BCD, MISA); the memory model is
described in the package docstring."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from .active_sets import ModuleRef, _drawn_active_sets, _parse_module, _specs, _StateCost, _worst_active_set
from .activations import DTYPE_BYTES, LayerSpec, _activations, _Run
from .shapes import (NORMS, ConfigLike, dense_numel, layer_kinds, layer_numel, lora_numel, lora_targets, model_shape,
                     module_numel, parameter_count)
from .units import GIB, parse_bytes

METHODS = ("adamw", "lora", "layerwise", "misa")
PLACEMENTS = ("worst", "expected")
MODES = ("finetune", "pretrain")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
# what MISA's mode="pretrain" trains densely outside the blocks (forward_saved's flags)
_DENSE_FLAGS = dict(embedding_trains=True, head_trains=True, final_norm_trains=True)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training configuration (see the package docstring for the model)."""

    method: str
    weights: int
    gradients: int
    optimizer_states: int  # Adam moments + fp32 master copies
    activations: int  # saved for backward (saved_tensors_hooks)
    transient: int  # loss-head gradient buffers (and a rebuilt block under checkpointing)
    master_weights: int  # the part of optimizer_states that is fp32 master copies
    n_params: int  # all model parameters
    trainable_params: int  # trained in one step (MISA: the active set, plus the dense ones in pretrain)
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
           layers_active: int, layers: int, draws: int, mode: str) -> None:
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
        ("mode", mode, mode in MODES, f"must be one of {MODES}"),
        # only MISA has a dense part on top of a budget: AdamW trains everything already, and
        # LoRA/BAdam keep embeddings and head frozen
        ("mode", mode, mode == "finetune" or method == "misa", "'pretrain' applies to method='misa' only"),
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
    mode: str = "finetune",
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
        placement: MISA/layerwise active set, ``"worst"`` or ``"expected"`` (package docstring).
        active_modules: MISA's exact active set (overrides ``placement`` and ``delta``).
        step_in_backward: MISA updates each module in backward: one module's fp32 gradient
            at a time (implies ``sparse_backward``).
        sparse_backward: MISA's fp32 gradient buffers for the active modules.
        gradient_checkpointing: each block keeps only its input (a model, not measured).
        attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``; default the
            config's, else ``"sdpa"``.
        draws, seed: the Algorithm 2 draws averaged by ``placement="expected"``.
        mode: MISA's ``mode``. ``"finetune"`` (default): embedding, lm_head and norms are
            frozen. ``"pretrain"``: they train with dense AdamW at every step on top of the
            ``delta`` budget of modules (:func:`dense_numel` parameters, counted in
            ``trainable_params`` and in ``details["dense_params"]``): their gradients (in
            the weight dtype, in ``.grad`` even with ``sparse_backward``), fp32 masters
            (16-bit weights) and fp32 moments, and their activations (every block builds
            its input-gradient graph, the norms save their normalised inputs, the lm_head
            its input ``N h p``). Only for ``method="misa"``.

    Raises:
        ValueError: naming the bad argument (``delta`` outside (0, 1], ``seq`` < 1, an
            unknown ``method`` or config name, ``mode="pretrain"`` with another method, ...).
    """
    shape = model_shape(config, attn_implementation)
    _check(batch, seq, delta, method, placement, lora_rank, layers_active, shape.layers, draws, mode)
    act = _dtype_name(dtype, "dtype")
    run = _Run(shape, batch, seq, act, _dtype_name(lora_dtype, "lora_dtype"), lora_rank, per_expert=method == "misa")
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
    refs = None if active_modules is None else [_parse_module(m, shape) for m in active_modules]
    return _misa(delta=delta, placement=placement, active=refs, sparse=sparse, step_in_backward=step_in_backward,
                 draws=draws, seed=seed, pretrain=mode == "pretrain", **common)


def _every(shape) -> list[LayerSpec]:
    """Every module and norm of every block trains."""
    return [LayerSpec(trainable=frozenset(layer_kinds(shape, l) + NORMS)) for l in range(shape.layers)]


def _state_cost(run: _Run, master: bool, grad_bytes: Optional[int] = None) -> _StateCost:
    """Bytes per trained parameter: gradient in the weight dtype (or ``grad_bytes``), fp32
    master when ``master``, fp32 ``m, v``."""
    p = DTYPE_BYTES[run.act]
    return _StateCost(grad=p if grad_bytes is None else grad_bytes, master=4 if master else 0, moments=8)


def _adamw(run: _Run, master: bool, n_params: int, checkpointing: bool) -> MemoryEstimate:
    """Full fine-tuning: every parameter trains."""
    p = DTYPE_BYTES[run.act]
    saved, transient = _activations(run, _every(run.shape), checkpointing, embedding_trains=True,
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
    specs = [LayerSpec(lora=frozenset(lora_targets(run.shape, l))) for l in range(run.shape.layers)]
    saved, transient = _activations(run, specs, checkpointing)
    moments = 8 if lora_p == 4 else 2 * lora_p
    return MemoryEstimate("lora", weights=n_params * DTYPE_BYTES[run.act] + adapters * lora_p,
                          gradients=adapters * lora_p, optimizer_states=adapters * moments, activations=saved,
                          transient=transient, master_weights=0, n_params=n_params, trainable_params=adapters,
                          label=f"LoRA r={run.lora_rank}", details=dict(adapter_params=adapters))


def _layerwise(run: _Run, master: bool, n_params: int, checkpointing: bool, layers_active: int,
               placement: str) -> MemoryEstimate:
    """BAdam-style layer-wise BCD: ``layers_active`` consecutive blocks (norms included) train."""
    shape, every = run.shape, _every(run.shape)
    starts = [0] if placement == "worst" else list(range(shape.layers - layers_active + 1))
    saved = transient = trained = 0
    for start in starts:
        specs = [every[l] if start <= l < start + layers_active else LayerSpec() for l in range(shape.layers)]
        a, t = _activations(run, specs, checkpointing)
        saved, transient = saved + a, transient + t
        trained += sum(layer_numel(shape, l) for l in range(start, start + layers_active))
    trained //= len(starts)
    cost = _state_cost(run, master)
    return MemoryEstimate("layerwise", weights=n_params * DTYPE_BYTES[run.act], gradients=trained * cost.grad,
                          optimizer_states=trained * (cost.master + cost.moments),
                          activations=saved // len(starts), transient=transient // len(starts),
                          master_weights=trained * cost.master, n_params=n_params, trainable_params=trained,
                          label=f"layer-wise ({layers_active} layer{'s' * (layers_active > 1)})")


def _misa(run: _Run, master: bool, n_params: int, checkpointing: bool, delta: float, placement: str,
          active: Optional[list[tuple[int, str]]], sparse: bool, step_in_backward: bool, draws: int,
          seed: int, pretrain: bool) -> MemoryEstimate:
    """MISA: the active modules train; the rest of the model is frozen, except with
    ``pretrain``, where the dense parameters (embedding, lm_head, norms) train too."""
    cost = _state_cost(run, master, grad_bytes=4 if sparse else None)
    base = frozenset(NORMS) if pretrain else frozenset()  # pretrain: every block's norms train
    sets, worst = _misa_sets(run, delta * n_params, cost, placement, active, draws, seed, base)
    mean = _mean_module_part(run, sets, cost, checkpointing, worst, step_in_backward, base, pretrain)
    dense = dense_numel(run.shape) if pretrain else 0
    # dense AdamW in pretrain: gradients in .grad (weight dtype, sparse_backward or not)
    dense_cost = _state_cost(run, master)
    master_bytes = mean["master"] + dense * dense_cost.master
    moments = mean["moments"] + dense * dense_cost.moments
    suffix = " step-in-bwd" if step_in_backward else " sparse-bwd" if sparse else ""
    suffix += " pretrain" if pretrain else ""
    label = f"MISA exact set{suffix}" if active is not None else f"MISA delta={delta:g}{suffix}"
    return MemoryEstimate("misa", weights=n_params * DTYPE_BYTES[run.act],
                          gradients=mean["gradients"] + dense * dense_cost.grad,
                          optimizer_states=master_bytes + moments, activations=mean["activations"],
                          transient=mean["transient"], master_weights=master_bytes, n_params=n_params,
                          trainable_params=mean["trained"] + dense, label=label,
                          details=dict(active_modules=sets[0] if len(sets) == 1 else None,
                                       mean_modules=mean["modules"], dense_params=dense,
                                       mode="pretrain" if pretrain else "finetune",
                                       placement="exact" if active is not None else placement))


def _misa_sets(run: _Run, budget: float, cost: _StateCost, placement: str, active: Optional[list[tuple[int, str]]],
               draws: int, seed: int, base: frozenset) -> tuple[list[list[tuple[int, str]]], bool]:
    """The active sets to average over, and whether it is the worst case."""
    if active is not None:
        return [active], False
    if placement == "worst":
        return [_worst_active_set(run, budget, cost, base)], True
    return _drawn_active_sets(run.shape, budget, draws, seed), False


def _mean_module_part(run: _Run, sets: list[list[tuple[int, str]]], cost: _StateCost, checkpointing: bool,
                      worst: bool, step_in_backward: bool, base: frozenset, pretrain: bool) -> dict[str, float]:
    """Activations and the active modules' states, averaged over ``sets`` (bytes rounded)."""
    shape, totals = run.shape, Counter()
    for chosen in sets:
        numels = [module_numel(shape, k) for _, k in chosen]
        specs = _specs(shape.layers, chosen, base)
        # worst case: every block carries a gradient, the first included (an upper bound for
        # any placement of the same per-layer patterns)
        saved = _activations(run, specs, checkpointing, input_grad=True if worst else None,
                             **(_DENSE_FLAGS if pretrain else {}))
        grads = max(numels) * 4 if step_in_backward else sum(numels) * cost.grad
        totals.update(activations=saved[0], transient=saved[1], gradients=grads, trained=sum(numels),
                      master=sum(numels) * cost.master, moments=sum(numels) * cost.moments, modules=len(chosen))
    k = len(sets)
    mean = {key: int(round(value / k)) for key, value in totals.items()}
    mean["modules"] = totals["modules"] / k  # a mean count, not bytes: unrounded
    return mean
