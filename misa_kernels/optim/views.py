"""The read-only side of :class:`~misa_kernels.optim.misa.MISA`: what is trained now, the
scores and probabilities, the sampling history and the memory held. Every view reads the
pieces the optimizer is made of; none keeps state of its own."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..backward import SparseBackward
from ..distributed import local
from .state_store import nbytes


class MISAViews:
    """Mixed into :class:`~misa_kernels.optim.misa.MISA`."""

    @property
    def active_modules(self) -> list[str]:
        """Names of the modules trained in the current outer iteration."""
        return [name for b in self._active.units for name in self.units[b].module_names]

    @property
    def probabilities(self) -> dict[str, float]:
        """``p_b`` per sampling unit (Prop. 1), as used by the last draw."""
        return {u.name: float(p) for u, p in zip(self.units, self._sampler.probabilities)}

    @property
    def scores(self) -> dict[str, float]:
        """``G_b`` per sampling unit (eq. 4, corrected for the EMA's zero start)."""
        return {u.name: float(s) for u, s in zip(self.units, self._scores.scores())}

    @property
    def sample_counts(self) -> dict[str, int]:
        """How many outer iterations activated each unit."""
        return {u.name: c for u, c in zip(self.units, self._sampler.sample_counts)}

    @property
    def skipped_steps(self) -> int:
        """Unit-steps (and dense tensor-steps) skipped for a non-finite gradient. Reads the device."""
        return self._scores.skipped_total + self._scores.pending_skips() + int(self._dense.skipped)

    @property
    def inner_step(self) -> int:
        """Inner steps taken by the current active set."""
        return self._inner_step

    @property
    def fallback_draws(self) -> int:
        """Draws in which no sampled module fitted the budget ``delta``, so one module was
        activated alone (warned about once)."""
        return self._sampler.fallback_draws

    @property
    def trained_parameters(self) -> dict[str, int]:
        """Parameters trained now: the active modules' (at most ``delta * n``) and, with
        ``mode="pretrain"``, the dense ones (embeddings, lm_head, norms) on top of them."""
        return dict(modules=sum(p.numel() for p in self._active.params), dense=self._dense.numel)

    def memory_report(self) -> dict[str, int]:
        """Bytes held for training, right from the activation of a set: fp32 master weights,
        moments ``m, v`` and gradients of the modules (frozen ones hold none; with
        ``sparse_backward`` the gradient arena, held from the first backward of an inner
        loop to the switch), the same of
        the dense parameters of ``mode="pretrain"`` (``dense_*``, outside ``delta``), the
        per-tensor step counts and the score buffers."""
        unit_params = self._sets.params
        modules, dense = self._store.bytes_of(unit_params), self._store.bytes_of(self._dense.params)
        report = dict(master_weights=modules["master_weights"], moments=modules["moments"],
                      gradients=self._gradient_bytes(unit_params), dense_master_weights=dense["master_weights"],
                      dense_moments=dense["moments"], dense_gradients=self._gradient_bytes(self._dense.params),
                      step_counts=modules["step_counts"] + dense["step_counts"],
                      score_buffers=sum(map(nbytes, self._scores.buffers())) + nbytes(self._source.records.sq))
        report["total"] = sum(report.values())
        return report

    def _gradient_bytes(self, params) -> int:
        """``.grad`` bytes of ``params``, plus the sparse backward's buffers when they are routed."""
        routed = [p for p in params if self._backward.routes(p)]
        held = self._backward.live_bytes if routed else 0
        return held + sum(nbytes(local(self._backward.grad(p))) for p in params if not self._backward.routes(p))

    @property
    def peak_state_bytes(self) -> int:
        """The most bytes of fp32 masters and moments held at once since the last
        :meth:`reset_peak_state_bytes` (a switching ``step()`` frees one set's and allocates
        the next's)."""
        return self._store.peak_bytes

    def reset_peak_state_bytes(self) -> None:
        """Start a new :attr:`peak_state_bytes` measurement (from the states held now)."""
        self._store.reset_peak()

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
