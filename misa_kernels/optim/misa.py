"""The MISA optimizer: Module-wise Importance SAmpling (paper Algorithms 1 and 2)."""
from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..backward import AutogradBackward, BackwardPath, SparseBackward
from ..integrations.checkpointing import attach_input_grad_hooks
from ..modules import ModuleFilter, Unit, discover_modules, find_block_list, group_by_layer, is_lora_matrix, is_lora_model
from ..ops.backend import BACKENDS, resolve_backend
from ..ops.sparse_linear import is_routable
from .sampling import STRATEGIES, draw_order, sampling_probabilities, select_within_budget
from .scores import ScoreTracker

logger = logging.getLogger("misa_kernels")

MODES = ("finetune", "pretrain")
GRANULARITIES = ("module", "layer")
LOW_PRECISION = (torch.bfloat16, torch.float16)
_STEP_IN_BACKWARD_DISTRIBUTED = ("step_in_backward=True updates during backward, before the gradients of the ranks "
                                 "can be averaged: use step_in_backward=False under torch.distributed")


@dataclass
class _ActiveSet:
    """The tensors of the sampled units, ordered by param group, with device index maps."""

    units: list[int]
    params: list[nn.Parameter]
    slots: list[int]
    group_ranges: list[tuple[int, int, int]]  # (param group index, start, end)
    slot_ids: Optional[Tensor] = None  # device: ``slots``
    unit_ids: Optional[Tensor] = None  # device: global unit id of each active unit
    local_unit: Optional[Tensor] = None  # device: position in ``unit_ids`` of each param
    unit_numel: Optional[Tensor] = None  # device: |b| of each active unit


_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "lr": (lambda v: v >= 0, "must be >= 0"),
    "delta": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "eta": (lambda v: 0 <= v < math.inf, "must be a finite number >= 0"),
    "inner_steps": (lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)"),
    "eps": (lambda v: v >= 0, "must be >= 0"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "score_beta": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "mode": (lambda v: v in MODES, f"must be one of {MODES}"),
    "strategy": (lambda v: v in STRATEGIES, f"must be one of {STRATEGIES}"),
    "granularity": (lambda v: v in GRANULARITIES, f"must be one of {GRANULARITIES}"),
    "backend": (lambda v: v in BACKENDS, f"must be one of {BACKENDS}"),
    "sweep_steps": (lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1"),
    "max_logit": (lambda v: v > 0, "must be > 0"),
    "sparse_backward": (lambda v: isinstance(v, bool), "must be a bool"),
    "step_in_backward": (lambda v: isinstance(v, bool), "must be a bool"),
    "keep_states": (lambda v: v is None or isinstance(v, bool), "must be None or a bool"),
}


def _check_args(**values) -> None:
    """Raise ``ValueError`` (or ``TypeError`` for a value of the wrong type) naming the argument."""
    for name, value in values.items():
        rule, text = _RULES[name]
        try:
            ok = rule(value)
        except TypeError:
            raise TypeError(f"{name} {text}, got {value!r} ({type(value).__name__})") from None
        if not ok:
            raise ValueError(f"{name} {text}, got {value!r}")


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    seen, params = set(), []
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            params.append(param)
    return params


class MISA(torch.optim.Optimizer):
    r"""Module-wise Importance SAmpling (MISA), a block-coordinate AdamW for transformers.

    Each weight matrix of a transformer block is a module ``b``. An outer iteration samples
    an active set of modules whose parameters add up to at most ``delta * n_model``
    (Algorithm 2), trains it for ``T = inner_steps`` AdamW steps with fresh moments
    (Alg. 1 lines 6-13), takes the extra momentum step of line 16, updates the scores
    ``G_b`` (eq. 4, with the scaled norm ``||g_b||_F^2 / |b|`` of App. A.2) and the sampling
    probabilities (Prop. 1), frees the optimizer states (line 17) and samples again.
    Every ``step()`` call is one inner step; call it after ``backward()`` as usual.

    Args:
        model: the model to train. Modules are found from its repeated blocks.
        lr: learning rate ``alpha`` (param groups carry it, so LR schedulers work).
        delta: budget ``delta``: active parameters per outer iteration over all model
            parameters, in (0, 1].
        eta: temperature ``eta`` of ``p_b = softmax(eta * G_b / mean(G))``. Scores are
            divided by their mean, so ``eta`` is free of the gradient scale: with the
            default ``eta=1`` a module with twice the mean score is ``e`` times likelier
            than one with score 0. ``eta=0`` samples uniformly.
        inner_steps: ``T``, AdamW steps per outer iteration.
        betas, eps, weight_decay: AdamW hyperparameters (decoupled weight decay; biases
            and norms get none).
        score_beta: ``beta`` of the score EMA in eq. 4.
        mode: ``"finetune"`` freezes embeddings, lm_head and norms; ``"pretrain"`` trains
            them with dense AdamW at every step.
        strategy: ``"misa"`` (importance sampling), ``"uniform"``, ``"topk"`` or
            ``"bottomk"`` (the ablations of paper C.4).
        granularity: ``"module"`` or ``"layer"`` (all modules of a block as one unit).
        seed: seed of the sampling generator (saved in ``state_dict``).
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.
        module_filter: ``(name, submodule) -> bool`` choosing the modules among every
            2-D-weight submodule, for architectures without recognisable blocks.
        sweep: before importance sampling starts, activate every never-sampled unit once
            for ``sweep_steps`` steps so that all have a score (not used by ``"uniform"``).
        max_logit: cap on ``eta * G_b / mean(G)``; the largest probability ratio is
            ``exp(max_logit)``.
        sparse_backward: route the modules' ``nn.Linear``/``Conv1D`` layers through the
            sparse-backward ops (the ``csrc`` extension, or its PyTorch twin): a frozen
            module runs no weight-gradient GEMM and saves no input, an active module's
            gradient is accumulated in fp32 into a buffer that exists only from backward
            to ``step()`` (gradient-accumulation fusion). For bf16/fp16 weights that
            gradient is not in ``.grad`` (torch requires the parameter's dtype there):
            read it with :meth:`gradient` and clip with :meth:`clip_grad_norm_`.
        step_in_backward: implies ``sparse_backward``; each active module is updated as
            soon as its gradient is complete and the gradient is freed at once, so at most
            one module's gradient exists at a time. Incompatible with gradient
            accumulation and with clipping (the update has happened before ``step()``);
            a second gradient for a module before ``step()`` raises. With
            ``granularity="layer"`` a non-finite gradient skips only its own module.
        keep_states: keep a module's moments when it is deactivated and continue them
            (with its own Adam step count) when it is sampled again, instead of freeing
            them (Alg. 1 line 17). Default: ``True`` on a PEFT LoRA model, else ``False``.

    Under ``torch.distributed`` (no wrapper, or DDP built before or after MISA) MISA
    averages the gradients of the active set and the dense parameters over the ranks
    itself at the end of each backward (the DDP reducer is switched off), so only
    ``delta`` of the model is communicated and scores come from the averaged gradients;
    every rank must use the same ``seed`` (checked at every draw). Under FSDP2
    (``fully_shard``) FSDP averages, and the masters and moments cover this rank's shard.

    On a PEFT LoRA model (paper B.2) each LoRA ``A`` and ``B`` matrix is a module, the
    budget ``delta`` is relative to the LoRA parameters, the base weights are never
    trained (``mode="finetune"`` only) and states are kept across switches.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-5,
        delta: float = 0.03,
        eta: float = 1.0,
        inner_steps: int = 50,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        score_beta: float = 0.9,
        mode: str = "finetune",
        strategy: str = "misa",
        granularity: str = "module",
        seed: int = 0,
        backend: str = "auto",
        *,
        module_filter: Optional[ModuleFilter] = None,
        sweep: bool = True,
        sweep_steps: int = 1,
        max_logit: float = 5.0,
        sparse_backward: bool = False,
        step_in_backward: bool = False,
        keep_states: Optional[bool] = None,
    ):
        _check_args(lr=lr, delta=delta, eta=eta, inner_steps=inner_steps, betas=betas, eps=eps,
                    weight_decay=weight_decay, score_beta=score_beta, mode=mode, strategy=strategy,
                    granularity=granularity, backend=backend, sweep_steps=sweep_steps, max_logit=max_logit,
                    sparse_backward=sparse_backward, step_in_backward=step_in_backward, keep_states=keep_states)
        model = distributed.unwrap_ddp(model)
        self.lora = module_filter is None and isinstance(model, nn.Module) and is_lora_model(model)
        if self.lora and mode == "pretrain":
            raise ValueError("mode='pretrain' trains the base weights densely; a LoRA model needs mode='finetune'")
        self.keep_states = self.lora if keep_states is None else keep_states
        modules = discover_modules(model, is_lora_matrix if self.lora else module_filter)
        self._sharded = distributed.is_fsdp2(model)
        self._shard_group = distributed.shard_group(model) if self._sharded else None
        if self._distributed and step_in_backward:
            raise ValueError(_STEP_IN_BACKWARD_DISTRIBUTED)
        if self._sharded and sparse_backward:
            raise ValueError("sparse_backward=True keeps gradients outside .grad, where FSDP2 cannot "
                             "reduce-scatter them: use sparse_backward=False with fully_shard")
        self._grads_synced = self._sync_queued = False
        units = modules if granularity == "module" else group_by_layer(modules)
        self.units: list[Unit] = units
        self.delta, self.eta, self.inner_steps = delta, eta, inner_steps
        self.mode, self.strategy, self.granularity = mode, strategy, granularity
        self.sweep, self.sweep_steps, self.max_logit = sweep, sweep_steps, max_logit

        all_params = _unique_params(model)
        unit_params = [p for u in units for p in u.params]
        if len({id(p) for p in unit_params}) != len(unit_params):
            raise ValueError("model: a parameter belongs to two modules (shared weights are not supported)")
        unit_ids = {id(p) for p in unit_params}
        dense = [p for p in all_params if id(p) not in unit_ids] if mode == "pretrain" else []
        budget_params = unit_params if self.lora else all_params  # B.2: delta of the LoRA parameters
        self.n_model_params = sum(p.numel() for p in budget_params)
        self.budget = delta * self.n_model_params
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(self._param_groups(unit_params, dense, weight_decay), defaults)
        self._group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}

        self._device = self._common_device(unit_params + dense)
        self._backend = resolve_backend(backend, self._device, frozenset(p.dtype for p in unit_params + dense))
        self._step_in_backward = step_in_backward
        self._stepped_in_backward: set[str] = set()
        self._module_slot_ids: dict[str, Tensor] = {}
        self._backward: BackwardPath = (
            self._sparse_backward(model) if sparse_backward or step_in_backward else AutogradBackward()
        )
        self._original_requires_grad = {p: p.requires_grad for p in all_params}
        self._dense = dense
        self._init_scoring(unit_params, score_beta)
        self._generator = torch.Generator().manual_seed(seed)
        self._probabilities = torch.full((len(units),), 1.0 / len(units), dtype=torch.float64)
        self._sample_counts = [0] * len(units)
        self._inner_step, self._inner_length, self._dense_step = 0, inner_steps, 0
        self._warned: set[str] = set()
        self._peak_states, self._fallback_draws = 0, 0
        self._active_cache: dict[tuple[bool, ...], _ActiveSet] = {}
        self._active = self._make_active([])
        if self._sharded:
            distributed.lazy_init_fsdp2(model)
        self._ddp = distributed.DDPTakeover(model)
        self._handles = self._freeze_and_hook(model, unit_params, all_params) + [self._ddp]
        self._activate(*self._select())

    # ------------------------------------------------------------------ set-up helpers
    def _init_scoring(self, unit_params: list[nn.Parameter], score_beta: float) -> None:
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in unit_params) else torch.float32
        self._scores = ScoreTracker(len(self.units), score_beta, self._device, dtype)
        self._slot_of = {p: i for i, p in enumerate(unit_params)}
        self._unit_of_slot = [b for b, u in enumerate(self.units) for _ in u.params]
        self._hook_sq = torch.zeros(len(unit_params), dtype=dtype, device=self._device)
        self._hook_version: list[Optional[int]] = [None] * len(unit_params)
        self._dense_skipped = torch.zeros((), dtype=torch.int64, device=self._device)

    def _sparse_backward(self, model: nn.Module) -> SparseBackward:
        modules = {name: model.get_submodule(name) for u in self.units for name in u.module_names}
        unsupported = sorted(name for name, m in modules.items() if not is_routable(m))
        if unsupported and self._step_in_backward:
            raise ValueError(f"step_in_backward=True needs every module to be an nn.Linear or Conv1D with its "
                             f"own forward; these are not: {unsupported[:5]}")
        routed = {name: m for name, m in modules.items() if name not in unsupported}
        return SparseBackward(routed, self._on_module_grad)

    def _freeze_and_hook(self, model: nn.Module, unit_params: list, all_params: list) -> list:
        """Freeze everything but the dense parameters; hook the modules' gradients."""
        self._backward.activate(unit_params)  # hooks can only be registered on such tensors
        # Routed modules call back; FSDP2 assigns the sharded .grad without accumulating
        # it, so no hook would fire and the norms are taken in step() instead.
        hooked = [] if self._sharded else [p for p in unit_params if not self._backward.routes(p)]
        handles = [p.register_post_accumulate_grad_hook(self._record_grad_norm) for p in hooked]
        self._backward.deactivate(all_params)
        self._backward.activate(self._dense)
        if not self._sharded:
            handles += [p.register_post_accumulate_grad_hook(self._on_grad_arrival) for p in self._dense]
            handles.append(model.register_forward_hook(self._sync_after_backward_of))
        return handles + self._checkpoint_hooks(model)

    @staticmethod
    def _param_groups(unit_params, dense, weight_decay) -> list[dict]:
        groups = []
        for role, params in (("module", unit_params), ("dense", dense)):
            for decay in (True, False):
                members = [p for p in params if (p.dim() >= 2) == decay]
                if members:
                    groups.append(dict(params=members, weight_decay=weight_decay if decay else 0.0, role=role))
        return groups

    @staticmethod
    def _common_device(params: list[nn.Parameter]) -> torch.device:
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"model: MISA needs all trained parameters on one device, found {sorted(map(str, devices))}")
        return devices.pop()

    def _checkpoint_hooks(self, model: nn.Module) -> list:
        found = find_block_list(model)
        if found is None:
            return []
        return attach_input_grad_hooks(found[1], self._layer_is_active)

    def _layer_is_active(self, layer: int) -> bool:
        return layer in self._active_layers

    @property
    def _distributed(self) -> bool:
        # Read at use: the HF Trainer and Accelerate start the process group after the
        # user may have built the optimizer.
        return distributed.world_size() > 1

    # ------------------------------------------------------------------ public views
    @property
    def active_modules(self) -> list[str]:
        """Names of the modules trained in the current outer iteration."""
        return [name for b in self._active.units for name in self.units[b].module_names]

    @property
    def probabilities(self) -> dict[str, float]:
        """``p_b`` per sampling unit (Prop. 1), as used by the last draw."""
        return {u.name: float(p) for u, p in zip(self.units, self._probabilities)}

    @property
    def scores(self) -> dict[str, float]:
        """``G_b`` per sampling unit (eq. 4, corrected for the EMA's zero start)."""
        return {u.name: float(s) for u, s in zip(self.units, self._scores.scores())}

    @property
    def sample_counts(self) -> dict[str, int]:
        """How many outer iterations activated each unit."""
        return {u.name: c for u, c in zip(self.units, self._sample_counts)}

    @property
    def skipped_steps(self) -> int:
        """Unit-steps (and dense tensor-steps) skipped for a non-finite gradient. Reads the device."""
        return self._scores.skipped_total + self._scores.pending_skips() + int(self._dense_skipped)

    @property
    def inner_step(self) -> int:
        """Inner steps taken by the current active set."""
        return self._inner_step

    def memory_report(self) -> dict[str, int]:
        """Bytes held for training: fp32 master weights, moments ``m, v``, gradients and
        score buffers (frozen modules hold none of them)."""
        master, moments = self._state_bytes()
        grads = sum(_nbytes(distributed.local(self._backward.grad(p))) for g in self.param_groups for p in g["params"])
        tracker = self._scores
        buffers = sum(map(_nbytes, (tracker.norm_sum, tracker.finite_steps, tracker.skipped_steps, self._hook_sq)))
        report = dict(master_weights=master, moments=moments, gradients=grads, score_buffers=buffers)
        report["total"] = sum(report.values())
        return report

    def _state_bytes(self) -> tuple[int, int]:
        master = moments = 0
        for state in self.state.values():
            if state.get("master") is not None:
                master += _nbytes(state["master"])
            moments += _nbytes(state.get("exp_avg")) + _nbytes(state.get("exp_avg_sq"))
        return master, moments

    @property
    def peak_state_bytes(self) -> int:
        """The most bytes of fp32 masters and moments held at once since the last
        :meth:`reset_peak_state_bytes`: a switching ``step()`` frees the states of the
        modules it deactivates, so a reading after it would miss them."""
        return max(self._peak_states, sum(self._state_bytes()))

    def reset_peak_state_bytes(self) -> None:
        """Start a new :attr:`peak_state_bytes` measurement (from the states held now)."""
        self._peak_states = 0

    @property
    def fallback_draws(self) -> int:
        """Draws in which no sampled module fitted the budget ``delta``, so one module was
        activated alone (warned about once)."""
        return self._fallback_draws

    @property
    def peak_gradient_bytes(self) -> Optional[int]:
        """With ``sparse_backward``: the most gradient-buffer bytes held at once since the
        last :meth:`reset_peak_gradient_bytes` (with ``step_in_backward``, one module's
        worth). ``None`` on the autograd path, whose gradients all live until ``step()``
        (see ``memory_report()["gradients"]``)."""
        return getattr(self._backward, "peak_bytes", None)

    def reset_peak_gradient_bytes(self) -> None:
        """Start a new :attr:`peak_gradient_bytes` measurement."""
        if isinstance(self._backward, SparseBackward):
            self._backward.reset_peak()

    def gradient(self, param: nn.Parameter) -> Optional[Tensor]:
        """The gradient the next ``step()`` applies to ``param``: ``param.grad``, or with
        ``sparse_backward`` the fp32 buffer of a routed module (``None`` when it has none)."""
        return self._backward.grad(param)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the gradients :meth:`gradient` returns
        (with ``sparse_backward`` on bf16/fp16 weights torch's own cannot see them; under
        ``torch.distributed`` they are averaged over the ranks first). Returns the total
        norm before clipping."""
        if self._step_in_backward:
            raise RuntimeError("clip_grad_norm_: with step_in_backward=True the updates happen during "
                               "backward, so there is nothing left to clip")
        self._sync_grads()  # under torch.distributed, clip the averaged gradient
        grads = [distributed.local(g) for group in self.param_groups for p in group["params"]
                 if (g := self.gradient(p)) is not None]
        if not grads:
            return torch.zeros((), device=self._device)
        norms = torch.stack([_norm(g, norm_type) for g in grads])
        total = self._total_norm(norms, norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(coef.to(grad.dtype))
        return total

    def _total_norm(self, norms: Tensor, norm_type: float) -> Tensor:
        """The norm of the per-tensor ``norms``; under FSDP2 they are norms of this rank's
        shards, combined over the ranks."""
        if not self._sharded:
            return torch.linalg.vector_norm(norms, norm_type)
        if math.isinf(norm_type):
            return distributed.reduce_over_shards_(norms.max(), self._shard_group, "max")
        return distributed.reduce_over_shards_(norms.pow(norm_type).sum(), self._shard_group).pow(1.0 / norm_type)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` as torch does, and free the sparse-backward buffers."""
        super().zero_grad(set_to_none)
        self._backward.clear_grads()

    def __enter__(self) -> "MISA":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove MISA's hooks and routing, restore every parameter's original ``requires_grad``.
        Also runs when a ``with MISA(...) as opt:`` block ends."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._backward.detach()
        for param, flag in self._original_requires_grad.items():
            param.requires_grad_(flag)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """One inner step (Alg. 1 lines 8-12); closes the outer iteration after ``T`` steps."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_grads()
        self._update_active()
        if self._dense:
            self._update_dense()
        self._grads_synced = False
        self._inner_step += 1
        if self._inner_step >= self._inner_length:
            self._switch()
        return loss

    def _sync_grads(self) -> None:
        """Under torch.distributed, average the gradients ``step()`` applies over the ranks
        (at the end of each backward, else in ``step()`` or :meth:`clip_grad_norm_`) and
        take the scores' norms from the average. Under FSDP2 (already averaged; no hooks
        fire on shards) only the norms are taken."""
        if not (self._distributed or self._sharded) or self._grads_synced:
            return
        self._grads_synced = True
        params = self._active.params + self._dense
        if self._sharded:  # FSDP2's reduce-scatter has averaged them already
            grads = [self._backward.grad(p) for p in params]
        else:
            # A parameter with a gradient on some rank gets zeros on the others, so that
            # every rank averages the same tensors; one with none anywhere keeps none.
            present = distributed.on_any_rank([self._backward.grad(p) is not None for p in params], self._device)
            grads = [self._backward.ensure_grad(p) if ok else None for p, ok in zip(params, present)]
            distributed.average_([g for g in grads if g is not None])
        module = [(slot, g) for slot, g in zip(self._active.slots, grads) if g is not None]
        if module:
            slots = (self._active.slot_ids if len(module) == len(self._active.slots)  # the usual case, on device
                     else torch.as_tensor([slot for slot, _ in module], dtype=torch.int64, device=self._device))
            self._hook_sq.index_copy_(0, slots, self._squared_norms([g for _, g in module]))
            for slot, grad in module:
                self._hook_version[slot] = _version(grad)

    def _sync_after_backward_of(self, model: nn.Module, args: tuple, output) -> None:
        """Forward hook: under torch.distributed (FSDP2 reduces its own), average the
        gradients at the end of the backward through this output, as DDP would (not inside
        its ``no_sync()``), so that clipping between backward and ``step()`` (the HF
        Trainer's) sees the average. The callback is queued from the output's gradient,
        i.e. once per backward on every rank, on the outermost backward (not per reentrant
        checkpoint). Averaging again after more accumulation changes nothing but rounding,
        and ``step()`` averages whatever arrived after the last sync."""
        if not (torch.is_grad_enabled() and self._distributed):
            return
        self._sync_queued = False
        queue = functools.partial(self._queue_sync, self._ddp.sync_requested)  # this forward's no_sync
        for tensor in _grad_tensors(output):  # the loss and the logits: whichever backward starts from
            tensor.register_hook(queue)

    def _queue_sync(self, sync_requested: bool, grad: Tensor) -> None:
        if sync_requested and not self._sync_queued:
            self._sync_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync_at_end_of_backward)

    @torch.no_grad()
    def _sync_at_end_of_backward(self) -> None:
        self._sync_queued = False
        self._sync_grads()

    def _on_grad_arrival(self, param: Optional[nn.Parameter] = None) -> None:
        """A gradient was accumulated: ``step()`` must average unless a sync follows."""
        self._grads_synced = False

    def _record_grad_norm(self, param: nn.Parameter) -> None:
        # Runs when backward has accumulated ``param.grad``: the score sees the gradient
        # before any clipping or unscaling the user applies before ``step()``.
        self._record(param, param.grad)
        self._on_grad_arrival()

    def _record(self, param: nn.Parameter, grad: Tensor) -> None:
        slot = self._slot_of[param]
        self._hook_sq[slot] = torch.linalg.vector_norm(grad, dtype=self._hook_sq.dtype).square()
        self._hook_version[slot] = grad._version

    @torch.no_grad()
    def _on_module_grad(self, name: str) -> None:
        """Sparse backward: ``name``'s fp32 gradient is complete for this backward."""
        params = self._backward.params_of[name]
        for param in params:
            self._record(param, self._backward.grad(param))
        self._on_grad_arrival()
        if self._step_in_backward:
            self._step_module_now(name, params)

    def _step_module_now(self, name: str, params: tuple[nn.Parameter, ...]) -> None:
        if name in self._stepped_in_backward:
            raise RuntimeError(f"step_in_backward=True: {name} received a second gradient before step(); "
                               "gradient accumulation (or calling a module twice per forward) needs "
                               "step_in_backward=False")
        if self._distributed:  # the process group may have come up after MISA was built
            raise RuntimeError(_STEP_IN_BACKWARD_DISTRIBUTED)
        self._stepped_in_backward.add(name)
        params = sorted(params, key=self._group_of.__getitem__)
        if name not in self._module_slot_ids:  # one host-to-device copy per module, ever
            self._module_slot_ids[name] = torch.as_tensor([self._slot_of[p] for p in params], device=self._device)
        finite = torch.isfinite(self._hook_sq.index_select(0, self._module_slot_ids[name]).sum())
        skip = (~finite).repeat(len(params))
        grads = [self._backward.grad(p) for p in params]
        self._adam(params, grads, skip, self._group_ranges(params), self._inner_step + 1)
        self._backward.release_grads(params)

    def _score_modules_stepped_in_backward(self) -> None:
        routed = self._backward.params_of
        stepped = {p for name in self._stepped_in_backward for p in routed[name]}
        active = self._active_subset(tuple(p in stepped for p in self._active.params))
        self._stepped_in_backward.clear()
        if not active.params:
            return
        unit_scored = self._per_unit(active, self._hook_sq.index_select(0, active.slot_ids))
        self._scores.accumulate(active.unit_ids, unit_scored / active.unit_numel, torch.isfinite(unit_scored))

    def _update_active(self) -> None:
        if self._step_in_backward:
            self._score_modules_stepped_in_backward()
            return
        active = self._active_with_grads()
        if not active.params:
            return
        grads = [self._backward.grad(p) for p in active.params]
        hooked = all(self._hook_version[s] is not None for s in active.slots)
        unchanged = hooked and all(self._hook_version[s] == _version(g) for s, g in zip(active.slots, grads))
        recorded = self._hook_sq.index_select(0, active.slot_ids) if hooked else None
        applied = recorded if unchanged else self._squared_norms(grads)
        unit_applied = self._per_unit(active, applied)
        unit_scored = unit_applied if recorded is None else self._per_unit(active, recorded)
        finite = torch.isfinite(unit_applied) & torch.isfinite(unit_scored)
        self._scores.accumulate(active.unit_ids, unit_scored / active.unit_numel, finite)
        skip = (~finite).index_select(0, active.local_unit)
        self._adam(active.params, grads, skip, active.group_ranges, self._inner_step + 1)
        self._backward.release_grads(active.params)
        for slot in active.slots:
            self._hook_version[slot] = None

    def _update_dense(self) -> None:
        params = [p for g in self.param_groups if g["role"] == "dense" for p in g["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        skip = ~torch.isfinite(self._squared_norms(grads))
        self._dense_skipped += skip.sum()
        self._dense_step += 1
        ranges = self._group_ranges(params)
        self._adam(params, grads, skip, ranges, self._dense_step)

    def _squared_norms(self, grads: list[Tensor]) -> Tensor:
        out = torch.empty(len(grads), dtype=self._hook_sq.dtype, device=self._device)
        self._backend.squared_norms_([distributed.local(g) for g in grads], out)
        return distributed.reduce_over_shards_(out, self._shard_group) if self._sharded else out

    @staticmethod
    def _per_unit(active: _ActiveSet, per_param: Tensor) -> Tensor:
        out = torch.zeros(len(active.units), dtype=per_param.dtype, device=per_param.device)
        return out.index_add_(0, active.local_unit, per_param)

    def _adam(self, params, grads, skip, ranges, step: int) -> None:
        for group_index, start, end in ranges:
            group = self.param_groups[group_index]
            beta1, beta2 = group["betas"]
            for lo, hi, t in self._step_runs(params, start, end, group, step, advance=True):
                states = [self._state_for(p) for p in params[lo:hi]]
                self._backend.adam_update_(
                    _locals(params[lo:hi]), _locals(grads[lo:hi]), [s["master"] for s in states],
                    [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], skip[lo:hi],
                    step=t, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"],
                )

    def _step_runs(self, params, start: int, end: int, group: dict, step: int, advance: bool):
        """``(lo, hi, t)`` runs of ``params[start:end]`` sharing the Adam step ``t``: the
        inner step, or with ``keep_states`` each module's own count (``advance``: this is
        a new update, count it)."""
        if not (self.keep_states and group["role"] == "module"):
            yield start, end, step
            return
        steps = []
        for param in params[start:end]:
            state = self._state_for(param)
            state["step"] += int(advance)
            steps.append(state["step"])
        lo = start
        for i in range(start + 1, end + 1):
            if i == end or steps[i - start] != steps[lo - start]:
                yield lo, i, steps[lo - start]
                lo = i

    def _state_for(self, param: nn.Parameter) -> dict:
        """Adam's state of ``param``: of this rank's shard only under FSDP2."""
        state = self.state[param]
        if not state:
            param = distributed.local(param)
            low = param.dtype in LOW_PRECISION
            moment_dtype = torch.float32 if low else param.dtype
            state["master"] = param.detach().float().clone() if low else None
            state["exp_avg"] = torch.zeros_like(param, dtype=moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            if self.keep_states:
                state["step"] = 0
        return state

    # ------------------------------------------------------------------ switching
    def _switch(self) -> None:
        """End of an outer iteration: Alg. 1 lines 14-17, then the next draw (line 5)."""
        self._momentum_step()
        new_skips = self._scores.fold(self._active.units)
        if new_skips:
            self._report_skips(new_skips)
        self._probabilities = self._current_probabilities()
        self._deactivate()
        self._activate(*self._select())

    def _momentum_step(self) -> None:
        params = [p for p in self._active.params if self.state.get(p)]
        for group_index, start, end in self._group_ranges(params):
            group = self.param_groups[group_index]
            beta1, beta2 = group["betas"]
            for lo, hi, t in self._step_runs(params, start, end, group, self._inner_step, advance=False):
                states = [self.state[p] for p in params[lo:hi]]
                self._backend.momentum_step_(
                    _locals(params[lo:hi]), [s["master"] for s in states], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], step=t, lr=group["lr"],
                    beta1=beta1, beta2=beta2, eps=group["eps"],
                )

    def _current_probabilities(self) -> Tensor:
        eta = 0.0 if self.strategy == "uniform" else self.eta
        return sampling_probabilities(self._scores.scores(), eta, self.max_logit)

    def _sweeping(self) -> bool:
        return self.sweep and self.strategy != "uniform" and 0 in self._sample_counts

    def _select(self) -> tuple[list[int], int]:
        """Algorithm 2 (or the start-up sweep); returns the units and the inner-loop length."""
        sizes = [u.numel for u in self.units]
        if self._sweeping():
            never = [b for b, c in enumerate(self._sample_counts) if c == 0]
            order = [never[i] for i in torch.randperm(len(never), generator=self._generator).tolist()]
            length = self.sweep_steps
        else:
            order = draw_order(self.strategy, self._probabilities, self._scores.scores(), self._generator)
            length = self.inner_steps
        chosen = select_within_budget(order, sizes, self.budget)
        if not chosen:
            chosen = order[:1]
            self._fallback_draws += 1
            self._warn_once(
                "budget",
                f"delta={self.delta} allows {int(self.budget)} parameters, fewer than any sampled "
                f"unit (e.g. {self.units[chosen[0]].name}: {sizes[chosen[0]]}); activating one unit at a time",
            )
        if self._distributed:
            distributed.check_same_draw(chosen, self._device)
        return chosen, length

    def _activate(self, units: list[int], length: int, count: bool = True) -> None:
        self._active = self._make_active(units)
        self._active_layers = {self.units[b].layer for b in units}
        self._backward.activate(self._active.params)
        if count:
            for b in units:
                self._sample_counts[b] += 1
        self._inner_step, self._inner_length = 0, length

    def _deactivate(self) -> None:
        self._peak_states = self.peak_state_bytes
        if not self.keep_states:
            for param in self._active.params:
                self.state.pop(param, None)
        self._backward.deactivate(self._active.params)
        self._active_cache.clear()

    def _make_active(self, units: list[int], params: Optional[list[nn.Parameter]] = None) -> _ActiveSet:
        if params is None:
            params = [p for b in units for p in self.units[b].params]
        params = sorted(params, key=self._group_of.__getitem__)
        slots = [self._slot_of[p] for p in params]
        position = {b: i for i, b in enumerate(units)}
        active = _ActiveSet(units, params, slots, self._group_ranges(params))
        numel = [self.units[b].numel for b in units]
        active.slot_ids = torch.as_tensor(slots, dtype=torch.int64, device=self._device)
        active.unit_ids = torch.as_tensor(units, dtype=torch.int64, device=self._device)
        active.local_unit = torch.as_tensor(
            [position[self._unit_of_slot[s]] for s in slots], dtype=torch.int64, device=self._device
        )
        active.unit_numel = torch.as_tensor(numel, dtype=self._hook_sq.dtype, device=self._device)
        return active

    def _active_with_grads(self) -> _ActiveSet:
        return self._active_subset(tuple(self._backward.grad(p) is not None for p in self._active.params))

    def _active_subset(self, mask: tuple[bool, ...]) -> _ActiveSet:
        """The active set restricted to the parameters where ``mask`` is True (cached)."""
        if all(mask):
            return self._active
        if mask not in self._active_cache:
            params = [p for p, keep in zip(self._active.params, mask) if keep]
            self._active_cache[mask] = self._make_active(self._active.units, params)
        return self._active_cache[mask]

    def _group_ranges(self, params: list[nn.Parameter]) -> list[tuple[int, int, int]]:
        ranges: list[tuple[int, int, int]] = []
        for position, param in enumerate(params):
            group = self._group_of[param]
            if ranges and ranges[-1][0] == group:
                ranges[-1] = (group, ranges[-1][1], position + 1)
            else:
                ranges.append((group, position, position + 1))
        return ranges

    def _report_skips(self, count: int) -> None:
        logger.warning("MISA skipped %d module update(s) with a non-finite gradient", count)
        self._warn_once("nonfinite", "non-finite gradients: the affected modules' updates were skipped "
                        "(weights, moments and scores untouched); see opt.skipped_steps")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: param groups, moments and masters of
        the active set, scores, probabilities, active set, inner step and the sampling RNG."""
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        state = {index[p]: dict(s) for p, s in self.state.items() if s}
        misa = dict(
            unit_names=[u.name for u in self.units], active_units=list(self._active.units),
            inner_step=self._inner_step, inner_length=self._inner_length, dense_step=self._dense_step,
            sample_counts=list(self._sample_counts), probabilities=self._probabilities.clone(),
            scores=self._scores.state_dict(), rng=self._generator.get_state(),
            dense_skipped=int(self._dense_skipped), warned=sorted(self._warned), fallback_draws=self._fallback_draws,
        )
        return {"state": state, "param_groups": groups, "misa": misa}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (from this model, or a fresh copy of it)."""
        misa = state_dict["misa"]
        if misa["unit_names"] != [u.name for u in self.units]:
            raise ValueError("state_dict: its modules do not match this optimizer's model")
        params = [p for g in self.param_groups for p in g["params"]]
        if [len(g["params"]) for g in state_dict["param_groups"]] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("state_dict: its param groups do not match this optimizer's")
        for i, saved in state_dict["state"].items():
            shape = distributed.local(params[int(i)]).shape  # FSDP2: this rank's shard
            if saved.get("exp_avg") is not None and saved["exp_avg"].shape != shape:
                raise ValueError(f"state_dict: the moments of parameter {i} have shape {tuple(saved['exp_avg'].shape)}"
                                 f", the parameter {tuple(shape)} (saved under another FSDP2 sharding?)")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self._deactivate()
        self.state.clear()
        self._activate(list(misa["active_units"]), misa["inner_length"], count=False)
        self._inner_step, self._dense_step = misa["inner_step"], misa["dense_step"]
        for i, saved in state_dict["state"].items():
            param = params[int(i)]
            self.state[param] = {
                k: (v.to(param.device, copy=True) if isinstance(v, Tensor) else v) for k, v in saved.items()
            }
        self._sample_counts = list(misa["sample_counts"])
        self._probabilities = misa["probabilities"].clone()
        self._scores.load_state_dict(misa["scores"])
        self._generator.set_state(misa["rng"])
        self._dense_skipped.fill_(misa["dense_skipped"])
        self._warned = set(misa["warned"])
        self._fallback_draws = misa.get("fallback_draws", 0)


def _norm(tensor: Tensor, norm_type: float) -> Tensor:
    """``vector_norm`` in fp32, 0 for an empty tensor (an FSDP2 shard can be empty, where
    the inf-norm would raise on that rank alone)."""
    if tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=tensor.device)
    return torch.linalg.vector_norm(tensor, norm_type, dtype=torch.float32)


def _grad_tensors(output) -> list[Tensor]:
    """The tensors requiring grad at the top level of a model's output (a tensor, a
    tuple, or a Hugging Face ``ModelOutput``)."""
    values = list(output.values()) if isinstance(output, dict) else output
    values = values if isinstance(values, (list, tuple)) else [values]
    return [v for v in values if isinstance(v, Tensor) and v.requires_grad]


def _locals(tensors: list[Tensor]) -> list[Tensor]:
    return [distributed.local(t) for t in tensors]


def _version(grad: Tensor) -> int:
    # An FSDP2 gradient is modified through its local shard, which holds the version count.
    return distributed.local(grad)._version


def _nbytes(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
