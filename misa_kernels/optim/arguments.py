"""Checking MISA's arguments, and the defaults that depend on other arguments.

Every bad value gets a ``ValueError`` (a value out of range) or a ``TypeError`` (a value
of the wrong type: a bool where a number or an int is meant is one) whose message starts
with the argument's name.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

from ..ops.backend import BACKENDS
from .sampling import NORMALIZATIONS, STRATEGIES

MODES = ("finetune", "pretrain")
GRANULARITIES = ("module", "layer")
MOMENTUM_STEPS = ("beta1", "proof", "none")


def _real(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError
    return float(value)


def _int(value) -> Optional[int]:
    """``value`` as an int; ``None`` for a non-integral number (a bad value)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError
    return int(value) if isinstance(value, numbers.Integral) else None


def _int_at_least(low: int, high: Optional[int] = None) -> Callable[[object], bool]:
    def rule(value) -> bool:
        number = _int(value)
        return number is not None and number >= low and (high is None or number < high)

    return rule


def _flag(value, optional: bool = False) -> bool:
    if optional and value is None:
        return True
    if not isinstance(value, bool):
        raise TypeError
    return True


def _callable(value) -> bool:
    if value is not None and not callable(value):
        raise TypeError
    return True


def _finite_at_least_zero(value) -> bool:
    return math.isfinite(_real(value)) and _real(value) >= 0


_RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "lr": (_finite_at_least_zero, "must be a finite number >= 0"),
    "delta": (lambda v: 0 < _real(v) <= 1, "must be a number in (0, 1]"),
    "eta": (_finite_at_least_zero, "must be a finite number >= 0"),
    "inner_steps": (_int_at_least(1), "must be an int >= 1"),
    "betas": (lambda v: len(v) == 2 and all(0 <= _real(b) < 1 for b in v), "must be two numbers in [0, 1)"),
    "eps": (_finite_at_least_zero, "must be a finite number >= 0"),
    "weight_decay": (_finite_at_least_zero, "must be a finite number >= 0"),
    "score_beta": (lambda v: 0 <= _real(v) < 1, "must be a number in [0, 1)"),
    "mode": (lambda v: v in MODES, f"must be one of {MODES}"),
    "strategy": (lambda v: v in STRATEGIES, f"must be one of {STRATEGIES}"),
    "granularity": (lambda v: v in GRANULARITIES, f"must be one of {GRANULARITIES}"),
    "seed": (_int_at_least(0, 2**64), "must be an int in [0, 2**64)"),
    "backend": (lambda v: v in BACKENDS, f"must be one of {BACKENDS}"),
    "sweep": (lambda v: _flag(v, optional=True), "must be None or a bool"),
    "sweep_steps": (_int_at_least(1), "must be an int >= 1"),
    "max_logit": (lambda v: _real(v) > 0, "must be a number > 0 (inf: no cap)"),
    "sparse_backward": (_flag, "must be a bool"),
    "step_in_backward": (_flag, "must be a bool"),
    "keep_states": (lambda v: _flag(v, optional=True), "must be None or a bool"),
    "momentum_step": (lambda v: v is None or v in MOMENTUM_STEPS, f"must be None or one of {MOMENTUM_STEPS}"),
    "score_normalization": (lambda v: v in NORMALIZATIONS, f"must be one of {NORMALIZATIONS}"),
    "score_debias": (_flag, "must be a bool"),
    "dense_embeddings": (_flag, "must be a bool"),
    "compile_friendly": (_flag, "must be a bool"),
    "module_filter": (_callable, "must be None or a callable (name, module) -> bool"),
}


def check_args(**values) -> None:
    """Raise ``ValueError`` (or ``TypeError`` for a value of the wrong type) naming the argument."""
    for name, value in values.items():
        rule, text = _RULES[name]
        try:
            ok = rule(value)
        except TypeError:
            raise TypeError(f"{name} {text}, got {value!r} ({type(value).__name__})") from None
        if not ok:
            raise ValueError(f"{name} {text}, got {value!r}")


def resolve_sweep(sweep: Optional[bool], strategy: str) -> bool:
    """The start-up sweep scores every unit before importance sampling starts: on by default
    for ``"misa"`` only. The ablations of paper C.4 (``"uniform"``, ``"topk"``,
    ``"bottomk"``) sample from the first draw on, as the paper describes them; ``sweep=True``
    adds it to them explicitly."""
    return strategy == "misa" if sweep is None else sweep


def resolve_momentum_step(momentum_step: Optional[str], keep_states: bool) -> str:
    """``"beta1"`` by default; ``"none"`` when states are kept across switches, where the
    moment ``m`` carries on into the module's next activation and a momentum step would
    apply it twice."""
    if momentum_step is None:
        return "none" if keep_states else "beta1"
    if keep_states and momentum_step != "none":
        raise ValueError(
            f"momentum_step={momentum_step!r} takes the moment m as a step at the end of an inner loop, and "
            "keep_states=True carries the same m on when the module is sampled again: the momentum would count "
            "twice. Use momentum_step='none' (the default with kept states) or keep_states=False")
    return momentum_step


def momentum_coefficient(form: str, beta1: float) -> Optional[float]:
    """``c`` of the extra momentum step ``theta -= lr * c * m_hat / (sqrt(v_hat) + eps)``:
    ``beta1`` (``"beta1"``), ``beta1 / (1 - beta1)`` (``"proof"``), ``None`` for no step."""
    if form == "none":
        return None
    return beta1 if form == "beta1" else beta1 / (1.0 - beta1)
