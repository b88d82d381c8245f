"""The MISA optimizer: Module-wise Importance SAmpling (paper Algorithms 1 and 2).

:class:`MISA` orchestrates small pieces, each with one job:

* :class:`~.sampler.Sampler`: which units train next (Prop. 1, Alg. 2, sweep), host-side;
* :class:`~.scores.ScoreTracker`: the scores ``G_b`` (eq. 4), accumulated on the device;
* :class:`~.state_store.StateStore`: masters, moments and step counts of the trained tensors;
* :class:`~.updater.Updater`: the backend's Adam and momentum steps over param groups;
* :mod:`~.gradients`: where a step finds the gradients and their recorded norms;
* :class:`~misa_kernels.distributed.GradSync`: averaging over ranks, FSDP2;
* :mod:`~misa_kernels.backward`: autograd or the sparse backward.
"""
from __future__ import annotations

import logging
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..backward import AutogradBackward, SparseBackward
from ..distributed import GradSync, local, track_arrivals
from ..experts import route_experts
from ..integrations.checkpointing import attach_input_grad_hooks
from ..modules import ModuleFilter, find_block_list
from ..ops.backend import resolve_backend
from . import checkpoint, model_setup
from .active_set import ActiveSets
from .arguments import check_args, resolve_momentum_step, resolve_sweep
from .clipping import clip_
from .dense import DenseParameters
from .gradients import RecordedGradients, SteppedInBackward
from .loss_scale import LossScale
from .norm_records import NormRecords
from .sampler import Draw, Sampler
from .scores import ScoreTracker
from .state_store import StateStore
from .updater import Updater
from .views import MISAViews

logger = logging.getLogger("misa_kernels")

_STEP_IN_BACKWARD_DISTRIBUTED = ("step_in_backward=True updates during backward, before the gradients of the ranks "
                                 "can be averaged: use step_in_backward=False under torch.distributed")


class MISA(MISAViews, torch.optim.Optimizer):
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
            them with dense AdamW at every step, *on top of* ``delta`` (see
            :attr:`trained_parameters` and the ``dense_*`` entries of :meth:`memory_report`).
        dense_embeddings: in ``"finetune"`` mode, train the input embeddings and the
            lm_head (one tensor when tied) with dense AdamW at every step, as LISA does,
            on top of ``delta``; norms stay frozen.
        strategy: ``"misa"`` (importance sampling), ``"uniform"``, ``"topk"`` or
            ``"bottomk"`` (the ablations of paper C.4).
        granularity: ``"module"`` or ``"layer"`` (all modules of a block as one unit).
        seed: seed of the sampling generator (saved in ``state_dict``), an int >= 0.
        backend: ``"auto"`` (Triton on CUDA when available), ``"torch"`` or ``"triton"``.
        module_filter: ``(name, submodule) -> bool`` choosing the modules among every
            2-D-weight submodule, for architectures without recognisable blocks.
        sweep: before importance sampling starts, activate every never-sampled unit once
            for ``sweep_steps`` steps so that all have a score. Default (``None``): on for
            ``"misa"``, off for the C.4 ablations, which sample from the first draw.
        max_logit: cap on ``eta * G_b / mean(G)``; the largest probability ratio is
            ``exp(max_logit)``.
        score_normalization: ``"mean"`` (the logits ``eta * G_b / mean(G)`` above),
            ``"raw"`` (Prop. 1 verbatim: ``eta * G_b``, near uniform on a real model, whose
            scaled scores are tiny) or ``"unscaled"`` (the authors' release:
            ``eta * ||g_b||_F^2``, i.e. ``eta * |b| G_b``), each capped at ``max_logit``.
        score_debias: divide the score EMA by ``1 - beta^{n_b}`` (``n_b``: inner loops that
            scored module ``b``) so that a module scored once is not ``1 / (1 - beta)``
            times less important than one scored often.
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
            accumulation, clipping and a GradScaler (the update has happened before
            ``step()``); a second gradient for a module before ``step()`` raises.
        keep_states: keep a module's moments and step count when it is deactivated and
            continue them when it is sampled again, instead of freeing them (Alg. 1 line
            17): Adam paused while the module is frozen. Default: ``True`` on a PEFT LoRA
            model, else ``False``.
        momentum_step: the extra step of Alg. 1 line 16,
            ``theta -= lr * c * m_hat / (sqrt(v_hat) + eps)``: ``"beta1"`` (``c = beta1``,
            the default with fresh states), ``"proof"`` (``c = beta1 / (1 - beta1)``, 10x
            the former at ``beta1 = 0.9``: what the appendix's variable transform
            ``x = theta - alpha beta1/(1 - beta1) m/(sqrt(v) + eps)`` implies, the step
            moving ``theta`` to ``x``) or ``"none"``. With kept states the moment carries
            on into the module's next activation, so the default is ``"none"`` and a
            momentum step is refused (it would count the momentum twice).
        compile_friendly: implies ``sparse_backward``; every module weight keeps
            ``requires_grad=True`` and the frozen/active decision is made inside custom ops
            at run time, so a switch changes nothing ``torch.compile`` guards on: one graph
            for every active set. Costs: each module's input is saved whatever the active
            set, and backward runs ``dX`` down to the first block. ``nn.Linear``/``Conv1D``
            modules only (no fused experts yet).

    Non-finite gradients skip that module's update (weights, moments, step count and score
    untouched). Under ``torch.amp.GradScaler`` (``scaler.step(opt)``) MISA unscales the
    gradients itself, skips steps the scaler finds overflowing, and divides the scores'
    norms by ``S^2``, so scores do not depend on the loss scale. If you call
    ``scaler.unscale_(opt)`` yourself (to clip, as the HF Trainer does with fp16), set
    ``opt.grad_scaler = scaler`` (or clip with :meth:`clip_grad_norm_`) to keep the scores
    unclipped.

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
    _step_supports_amp_scaling = True  # GradScaler hands over scale and found_inf (loss_scale.py)

    def __init__(
        self, model: nn.Module, lr: float = 1e-5, delta: float = 0.03, eta: float = 1.0, inner_steps: int = 50,
        betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
        score_beta: float = 0.9, mode: str = "finetune", strategy: str = "misa", granularity: str = "module",
        seed: int = 0, backend: str = "auto", *, module_filter: Optional[ModuleFilter] = None,
        sweep: Optional[bool] = None, sweep_steps: int = 1, max_logit: float = 5.0, sparse_backward: bool = False,
        step_in_backward: bool = False, keep_states: Optional[bool] = None, momentum_step: Optional[str] = None,
        score_normalization: str = "mean", score_debias: bool = True, dense_embeddings: bool = False,
        compile_friendly: bool = False,
    ):
        check_args(lr=lr, delta=delta, eta=eta, inner_steps=inner_steps, betas=betas, eps=eps,
                   weight_decay=weight_decay, score_beta=score_beta, mode=mode, strategy=strategy,
                   granularity=granularity, seed=seed, backend=backend, sweep=sweep, sweep_steps=sweep_steps,
                   max_logit=max_logit, sparse_backward=sparse_backward, step_in_backward=step_in_backward,
                   keep_states=keep_states, momentum_step=momentum_step, module_filter=module_filter,
                   score_normalization=score_normalization, score_debias=score_debias,
                   dense_embeddings=dense_embeddings, compile_friendly=compile_friendly)
        model = distributed.unwrap_ddp(model)
        found = model_setup.trained_parameters(model, module_filter, granularity, mode, dense_embeddings)
        sharded = distributed.is_fsdp2(model)
        self._check_parallelism(sharded, sparse_backward or compile_friendly, step_in_backward)
        self.lora, self.units = found.lora, found.units
        self.keep_states = found.lora if keep_states is None else keep_states
        self.momentum_step = resolve_momentum_step(momentum_step, self.keep_states)
        self.delta, self.eta, self.inner_steps, self.max_logit = delta, eta, inner_steps, max_logit
        self.mode, self.strategy, self.granularity = mode, strategy, granularity
        self.score_normalization, self.score_debias = score_normalization, score_debias
        self.sweep, self.sweep_steps = resolve_sweep(sweep, strategy), sweep_steps
        self.n_model_params = found.budget_params
        self.budget = delta * self.n_model_params
        super().__init__(model_setup.param_groups(found.unit_params, found.dense, weight_decay),
                         dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._build(model, found, sharded, seed, score_beta, backend,
                    sparse_backward or step_in_backward or compile_friendly, step_in_backward, compile_friendly)

    def _build(self, model, found, sharded, seed, score_beta, backend, sparse, step_in_backward, static) -> None:
        group_of = {p: i for i, g in enumerate(self.param_groups) for p in g["params"]}
        self._device = device = model_setup.common_device(found.unit_params + found.dense)
        self._backend = resolve_backend(backend, device, frozenset(p.dtype for p in found.unit_params + found.dense))
        self._norm_dtype = torch.float64 if any(p.dtype == torch.float64 for p in found.unit_params) else torch.float32
        self._shard_group = distributed.shard_group(model) if sharded else None
        self._store = StateStore(self.state, self.keep_states)
        self._updater = Updater(self.param_groups, group_of, self._store, self._backend)
        self._sets = ActiveSets(self.units, group_of, device, self._norm_dtype)
        self._scores = ScoreTracker(len(self.units), score_beta, device, self._norm_dtype, self.score_debias)
        self._sampler = Sampler([u.numel for u in self.units], self.budget, strategy=self.strategy, eta=self.eta,
                                max_logit=self.max_logit, inner_steps=self.inner_steps, sweep=self.sweep,
                                sweep_steps=self.sweep_steps, seed=seed, normalization=self.score_normalization)
        self._backward = (model_setup.sparse_backward(model, self.units, found.experts, step_in_backward,
                                                      self._on_module_grad, static) if sparse else AutogradBackward())
        self._sync = GradSync(model, self._synced_params, self._backward.grad, self._backward.ensure_grad,
                              self._record_synced, sharded)
        records = NormRecords(len(found.unit_params), self._norm_dtype, device)
        args = (self._backward, records, self._sets, self._squared_norms, self._sync.mark_stale)
        self._source = (SteppedInBackward(*args, update=self._updater.adam, group_of=group_of,
                                          refuse=self._refuse_step_in_backward)
                        if step_in_backward else RecordedGradients(*args))
        self._dense = DenseParameters(found.dense, device)
        self._fp16 = any(p.dtype == torch.float16 for p in found.unit_params + found.dense)
        self.grad_scaler = None  # the GradScaler whose unscale_ the user calls (see loss_scale.py)
        self._warned: set[str] = set()
        self._original_requires_grad = {p: p.requires_grad for p in found.all_params}
        self._active, self._active_layers = self._sets.build([]), set()
        if sharded:
            distributed.lazy_init_fsdp2(model)
        self._handles = [route_experts(found.experts, getattr(self._backward, "slots", None))]
        self._handles += self._freeze_and_hook(model, found)
        self._store.allocate(self._dense.params)
        self._draw()

    @staticmethod
    def _check_parallelism(sharded: bool, sparse_backward: bool, step_in_backward: bool) -> None:
        if distributed.collectives.world_size() > 1 and step_in_backward:
            raise ValueError(_STEP_IN_BACKWARD_DISTRIBUTED)
        if sharded and sparse_backward:
            raise ValueError("sparse_backward=True keeps gradients outside .grad, where FSDP2 cannot "
                             "reduce-scatter them: use sparse_backward=False with fully_shard")

    def _freeze_and_hook(self, model: nn.Module, found: model_setup.TrainedParameters) -> list:
        """Freeze everything but the dense parameters; hook the modules' gradients."""
        self._backward.activate(found.unit_params)  # hooks can only be registered on such tensors
        # FSDP2 assigns the sharded .grad without accumulating it, so no hook would fire:
        # the norms are taken when the sync hands the gradients over.
        handles = [] if self._sync.sharded else self._source.hook(found.unit_params)
        self._backward.deactivate(found.unit_params + found.all_params)  # expert views are not model params
        self._backward.activate(self._dense.params)
        if not self._sync.sharded:
            handles += track_arrivals(self._dense.params, self._sync)
        blocks = find_block_list(model)
        return handles + ([] if blocks is None else attach_input_grad_hooks(blocks[1], self._active_layers.__contains__))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the gradients :meth:`gradient` returns
        (with ``sparse_backward`` on bf16/fp16 weights torch's own cannot see them; under
        ``torch.distributed`` they are averaged over the ranks first). The scores keep the
        norms from before clipping (also after a GradScaler's ``unscale_``). Returns the
        total norm before clipping."""
        if isinstance(self._source, SteppedInBackward):
            raise RuntimeError("clip_grad_norm_: with step_in_backward=True the updates happen during "
                               "backward, so there is nothing left to clip")
        self._sync.sync()  # under torch.distributed, clip the averaged gradient
        # the scores' norms, before clipping and after a GradScaler's unscale_ (which
        # changes no version counter, so backward's records cannot tell)
        self._source.record_current(self._active, [self.gradient(p) for p in self._active.params], unscaled=True)
        grads = [local(g) for group in self.param_groups for p in group["params"] if (g := self.gradient(p)) is not None]
        total = clip_(grads, max_norm, norm_type, self._shard_group, self._sync.sharded)
        return torch.zeros((), device=self._device) if total is None else total

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
        self._sync.remove()
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
        scale = LossScale.of(self)
        self._refuse_unscalable(scale)
        self._sync.sync()
        present, n = self._sync.present, len(self._active.params)
        batch = self._source.gather(self._active, scale, None if present is None else present[:n])
        if batch is not None:
            self._scores.accumulate(batch.active.unit_ids, batch.scaled_norms, batch.finite, batch.observed)
            if batch.grads:
                self._updater.adam(batch.active.params, batch.grads, batch.skip)
            self._source.release(batch.active)
        if self._dense.params:
            self._dense.step(self._updater, self._squared_norms, scale, None if present is None else present[n:])
        self._sync.reset()
        self._inner_step += 1
        if self._inner_step >= self._inner_length:
            self._switch()
        return loss

    def _squared_norms(self, grads) -> Tensor:
        out = torch.empty(len(grads), dtype=self._norm_dtype, device=self._device)
        self._backend.squared_norms_([local(g) for g in grads], out)
        return distributed.reduce_over_shards_(out, self._shard_group) if self._sync.sharded else out

    def _synced_params(self) -> list[nn.Parameter]:
        return list(self._active.params) + self._dense.params

    def _record_synced(self, params, grads) -> None:
        # FSDP2 syncs in step() or clip_grad_norm_, after a GradScaler's unscale_ if any
        self._source.record_current(self._active, grads[:len(self._active.params)], unscaled=self._sync.sharded)

    def _on_module_grad(self, name: str) -> None:
        self._source.on_module_grad(name)

    def _refuse_step_in_backward(self) -> Optional[str]:
        # the process group may have come up after MISA was built
        return _STEP_IN_BACKWARD_DISTRIBUTED if distributed.collectives.world_size() > 1 else None

    def _refuse_unscalable(self, scale: LossScale) -> None:
        if scale.scaler and self._fp16:
            raise RuntimeError("torch.amp.GradScaler with fp16 weights: their fp16 gradients would be unscaled in "
                               "fp16, losing what the scaling kept (torch's own unscale_ refuses them too); train "
                               "fp32 weights under torch.autocast(dtype=torch.float16), or bf16 without a scaler")
        if scale.scaler and isinstance(self._backward, SparseBackward) and self._backward.holds_outside_grad:
            raise RuntimeError("sparse_backward=True with bf16/fp16 weights keeps the fp32 gradients outside .grad, "
                               "where torch.amp.GradScaler can neither unscale nor check them: train fp32 weights "
                               "under autocast, use bf16 without a GradScaler, or sparse_backward=False")

    # ------------------------------------------------------------------ switching
    def _switch(self) -> None:
        """End of an outer iteration: Alg. 1 lines 14-17, then the next draw (line 5)."""
        if self.momentum_step != "none":
            self._updater.momentum(self._active.params, self.momentum_step)
        new_skips = self._scores.fold(self._active.units)
        if new_skips:
            self._report_skips(new_skips)
        self._sampler.update(self._scores.scores())
        self._deactivate()
        self._draw()

    def _draw(self) -> None:
        draw = self._sampler.draw(self._scores.scores())
        if draw.fallback:
            unit = self.units[draw.units[0]]
            self._warn_once("budget", f"delta={self.delta} allows {int(self.budget)} parameters, fewer than any "
                            f"sampled unit (e.g. {unit.name}: {unit.numel}); activating one unit at a time")
        if distributed.collectives.world_size() > 1:
            distributed.check_same_draw(draw.units, self._device)
        self._activate(draw)

    def _activate(self, draw: Draw) -> None:
        self._active = self._sets.build(draw.units)
        self._active_layers.clear()
        self._active_layers.update(self.units[b].layer for b in draw.units)
        self._backward.activate(self._active.params)
        self._store.allocate(self._active.params)
        self._inner_step, self._inner_length = 0, draw.length

    def _deactivate(self) -> None:
        self._store.release(self._active.params)
        self._backward.deactivate(self._active.params)
        self._sets.forget()

    def _report_skips(self, count: int) -> None:
        logger.warning("MISA skipped %d module update(s) with a non-finite gradient", count)
        self._warn_once("nonfinite", "non-finite gradients: the affected modules' updates were skipped "
                        "(weights, moments and scores untouched); see opt.skipped_steps")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Everything needed to resume bit-identically: param groups, masters, moments and
        step counts, scores, probabilities, active set, inner step and the sampling RNG."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` (from this model, or a fresh copy of it)."""
        checkpoint.load_state_dict(self, state_dict)
