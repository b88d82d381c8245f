"""The methods compared: MISA, full AdamW and the peers BAdam, LoRA and GaLore.

Each peer comes from its own package (the ``bench`` extra: ``pip install -e .[bench]``),
imported only when its method is built. A missing package raises
:class:`PeerUnavailable`, which the sections turn into a "not installed" row.

How each is set up (the settings are in :class:`bench.common.PeerSettings`):

- ``adamw``: ``torch.optim.AdamW`` on every parameter (``fused=True`` on CUDA). On a bf16
  model it updates the bf16 weights in place with bf16 moments: no master copy.
- ``misa``: :class:`misa_kernels.MISA` with the spec's ``delta``, ``inner_steps``,
  ``strategy``, ``backend``, ``sweep``, ``momentum_step``, ``eta``, ``max_logit``,
  ``score_normalization``, ``score_debias`` and ``dense_embeddings``.
- ``badam``: ``badam.BlockOptimizer`` around ``torch.optim.AdamW``, one transformer layer
  per block (its default inference), ``switch_mode="random"``; it keeps an fp32 copy of the
  active block (also for fp32 models).
- ``lora``: ``peft`` LoRA on every MISA module (q, k, v, o, gate, up, down), dropout 0,
  AdamW on the adapters.
- ``galore``: ``galore_torch.GaLoreAdamW``; the block matrices are projected (rank, gap,
  scale, ``proj_type="std"``), all other parameters take plain Adam steps.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Iterable

import torch
from torch import nn

import misa_kernels as mk

from .common import PeerSettings, nbytes

KINDS = ("adamw", "misa", "badam", "lora", "galore")
# kind -> (module to import, package to pip install)
PEER_PACKAGES = {"badam": ("badam", "badam"), "lora": ("peft", "peft"), "galore": ("galore_torch", "galore-torch")}


class PeerUnavailable(RuntimeError):
    """A peer's package is not installed; ``str(err)`` is the row's status text."""


@dataclass(frozen=True)
class MethodSpec:
    """One row of a table: a display label, the method kind and its options."""

    label: str
    kind: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    """A model ready to train with one method: call ``step()`` after ``backward()``."""

    spec: MethodSpec
    model: nn.Module
    optimizer: torch.optim.Optimizer

    def step(self) -> None:
        """One optimizer step (BAdam's prints on block switches are silenced)."""
        with _quiet(self.spec.kind == "badam"):
            self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of fp32 master weights and of optimizer state (moments, projectors, scores)."""
        opt = self.optimizer
        if self.spec.kind == "misa":
            report = opt.memory_report()  # modules, and in pretrain mode the dense parameters beside them
            return dict(master_weights=report["master_weights"] + report["dense_master_weights"],
                        optimizer_state=report["moments"] + report["dense_moments"] + report["score_buffers"])
        if self.spec.kind == "badam":
            master = sum(nbytes(p) for p in getattr(opt, "param_idx2hp", {}).values())
            return dict(master_weights=master, optimizer_state=state_tensor_bytes(opt.base_optimizer.state.values()))
        return dict(master_weights=0, optimizer_state=state_tensor_bytes(opt.state.values()))

    def details(self) -> dict[str, Any]:
        """Method-specific readings for the JSON (MISA: sampling counts and scores)."""
        if self.spec.kind == "misa":
            return dict(sample_counts=self.optimizer.sample_counts)
        return {}


@contextlib.contextmanager
def _quiet(active: bool = True):
    """Swallow stdout and warnings (peers print and warn on every block switch)."""
    if not active:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def state_tensor_bytes(states: Iterable[dict]) -> int:
    """Bytes of the tensors (at least 1-D) in optimizer per-parameter states, GaLore's
    projection matrices included; 0-D step counters are left out."""
    total = 0
    for state in states:
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += nbytes(value) if value.dim() > 0 else 0
            elif hasattr(value, "ortho_matrix"):  # galore_torch.GaLoreProjector
                matrix = value.ortho_matrix
                total += sum(map(nbytes, matrix)) if isinstance(matrix, (list, tuple)) else nbytes(matrix)
    return total


def import_peer(kind: str) -> ModuleType:
    """The package behind peer ``kind``; :class:`PeerUnavailable` when it is not installed."""
    module, package = PEER_PACKAGES[kind]
    try:
        with _quiet():
            return importlib.import_module(module)
    except ImportError as err:
        raise PeerUnavailable(f"not installed (pip install {package})") from err


def peer_status(kind: str) -> str:
    """``"ok"`` when ``kind`` can be built here, else why not."""
    if kind not in PEER_PACKAGES:
        return "ok"
    try:
        import_peer(kind)
    except PeerUnavailable as err:
        return str(err)
    return "ok"


def make_method(spec: MethodSpec, model: nn.Module, lr: float, *, peers: PeerSettings,
                mode: str = "finetune", seed: int = 0) -> Method:
    """Set up ``model`` (in place; LoRA wraps it) for ``spec`` with learning rate ``lr``.

    ``mode="pretrain"`` trains every parameter (MISA's dense embeddings, lm_head and norms);
    ``"finetune"`` follows each method's own fine-tuning recipe.
    """
    builders = {"adamw": _adamw, "misa": _misa, "badam": _badam, "lora": _lora, "galore": _galore}
    if spec.kind not in builders:
        raise ValueError(f"kind must be one of {KINDS}, got {spec.kind!r}")
    with _quiet():
        model, opt = builders[spec.kind](spec, model, lr, peers=peers, mode=mode, seed=seed)
    return Method(spec, model, opt)


def _fused(model: nn.Module) -> bool:
    return next(model.parameters()).is_cuda


def _adamw(spec, model, lr, **_):
    return model, torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=_fused(model) or None)


def _misa(spec, model, lr, *, mode, seed, **_):
    o = spec.options
    opt = mk.MISA(model, lr=lr, delta=o.get("delta", 0.03), inner_steps=o.get("inner_steps", 50),
                  strategy=o.get("strategy", "misa"), backend=o.get("backend", "auto"), mode=mode, seed=seed,
                  sweep=o.get("sweep"), momentum_step=o.get("momentum_step"), eta=o.get("eta", 1.0),
                  max_logit=o.get("max_logit", 5.0), score_normalization=o.get("score_normalization", "mean"),
                  score_debias=o.get("score_debias", True), dense_embeddings=o.get("dense_embeddings", False))
    return model, opt


def _badam(spec, model, lr, *, peers, mode, **_):
    if mode != "finetune":
        raise ValueError("badam is a fine-tuning method here (mode='finetune')")
    badam = import_peer("badam")
    base = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    opt = badam.BlockOptimizer(base, list(model.named_parameters()),
                               switch_block_every=peers.badam_switch_every, switch_mode="random", verbose=0)
    return model, opt


def _module_leaf_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of MISA's modules: q_proj, k_proj, ..., down_proj."""
    return sorted({name.rsplit(".", 1)[-1] for unit in mk.discover_modules(model) for name in unit.module_names})


def _lora(spec, model, lr, *, peers, mode, **_):
    peft = import_peer("lora")
    config = peft.LoraConfig(r=spec.options.get("rank", peers.lora_rank), lora_alpha=peers.lora_alpha,
                             lora_dropout=0.0, target_modules=_module_leaf_names(model), task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)


def _galore(spec, model, lr, *, peers, **_):
    galore = import_peer("galore")
    projected = [u.params[0] for u in mk.discover_modules(model)]  # the 2-D weights
    ids = {id(p) for p in projected}
    regular = [p for p in model.parameters() if id(p) not in ids]
    groups = [
        dict(params=regular),
        dict(params=projected, rank=spec.options.get("rank", peers.galore_rank),
             update_proj_gap=peers.galore_update_proj_gap, scale=peers.galore_scale, proj_type="std"),
    ]
    return model, galore.GaLoreAdamW(groups, lr=lr, weight_decay=0.0, no_deprecation_warning=True)
