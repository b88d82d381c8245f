"""The optimizer states of the tensors being trained: allocated when their module is
activated, freed when it is deactivated (Alg. 1 line 17) unless states are kept.

The layout, one entry of ``torch.optim.Optimizer.state`` per parameter (under FSDP2 of this
rank's shard only):

* ``master``: fp32 copy of a bf16/fp16 weight (the update runs on it and rounds into the
  weight), ``None`` for fp32/fp64 weights, which are updated in place. Allocated with the
  rest on activation, it is filled from the weight when the updater first reads it, so a
  weight changed in between (a checkpoint loaded, a DDP broadcast) is not reverted;
* ``exp_avg``, ``exp_avg_sq``: Adam's ``m`` and ``v`` in fp32 (fp64 for fp64 weights);
* ``step``: a 0-dim fp32 tensor on the parameter's device, the number of updates applied
  to this tensor (a skipped update does not count): its bias corrections use it, and
  it never has to be read on the host.

The store knows nothing of sampling, gradients or hooks.
"""
from __future__ import annotations

from typing import Iterable, MutableMapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..distributed import local

LOW_PRECISION = (torch.bfloat16, torch.float16)


def nbytes(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def fresh_state(param: nn.Parameter) -> dict:
    """Zero moments, no update yet, and room for the fp32 master of a 16-bit weight."""
    shard = local(param).detach()
    low = shard.dtype in LOW_PRECISION
    exp_avg = torch.zeros_like(shard, dtype=torch.float32 if low else shard.dtype,
                               memory_format=torch.preserve_format)
    return dict(master=torch.empty_like(exp_avg) if low else None, exp_avg=exp_avg,
                exp_avg_sq=torch.zeros_like(exp_avg),
                step=torch.zeros((), dtype=torch.float32, device=shard.device))


class StateStore:
    """Adam states in ``state`` (the optimizer's own dict), with byte and peak accounting.

    ``keep``: a released tensor keeps its states (and step count) for its next activation.
    """

    def __init__(self, state: MutableMapping[nn.Parameter, dict], keep: bool):
        self.state, self.keep = state, keep
        self._peak = 0
        self._unfilled: set[nn.Parameter] = set()  # masters not yet copied from their weight

    def allocate(self, params: Iterable[nn.Parameter]) -> None:
        """Give every tensor of ``params`` states (kept ones are reused)."""
        for param in params:
            if not self.state.get(param):
                self.state[param] = fresh_state(param)
                if self.state[param]["master"] is not None:
                    self._unfilled.add(param)
        self._peak = max(self._peak, self.held_bytes())

    def release(self, params: Iterable[nn.Parameter]) -> None:
        """Free the states of ``params`` (unless ``keep``)."""
        self._peak = max(self._peak, self.held_bytes())
        if not self.keep:
            for param in params:
                self.state.pop(param, None)
                self._unfilled.discard(param)

    def clear(self) -> None:
        """Free every state, kept ones too (before loading a ``state_dict``)."""
        self._peak = max(self._peak, self.held_bytes())
        self.state.clear()
        self._unfilled.clear()

    def of(self, params: Sequence[nn.Parameter]) -> list[dict]:
        """The states of ``params``, for an update: masters filled from their weights."""
        if self._unfilled:
            for param in self._unfilled.intersection(params):
                self.state[param]["master"].copy_(local(param))
                self._unfilled.discard(param)
        return [self.state[p] for p in params]

    def bytes_of(self, params: Iterable[nn.Parameter]) -> dict[str, int]:
        """Bytes of masters, moments and step counts held for ``params``."""
        held = [s for p in params if (s := self.state.get(p))]
        return dict(master_weights=sum(nbytes(s.get("master")) for s in held),
                    moments=sum(nbytes(s.get("exp_avg")) + nbytes(s.get("exp_avg_sq")) for s in held),
                    step_counts=sum(nbytes(s.get("step")) for s in held))

    def held_bytes(self) -> int:
        """Bytes of masters and moments held now."""
        parts = self.bytes_of(list(self.state))
        return parts["master_weights"] + parts["moments"]

    @property
    def peak_bytes(self) -> int:
        """The most master + moment bytes held at once since :meth:`reset_peak`."""
        return max(self._peak, self.held_bytes())

    def reset_peak(self) -> None:
        self._peak = self.held_bytes()

    def state_dict(self, index: dict[nn.Parameter, int]) -> dict[int, dict]:
        self.of(list(self._unfilled))  # no unfilled master is ever saved
        return {index[p]: dict(s) for p, s in self.state.items() if s}

    @staticmethod
    def check_shapes(saved: dict, params: Sequence[nn.Parameter]) -> None:
        """Refuse moments of another shape (an FSDP2 checkpoint of another sharding)."""
        for i, entry in saved.items():
            shape = local(params[int(i)]).shape  # FSDP2: this rank's shard
            if entry.get("exp_avg") is not None and entry["exp_avg"].shape != shape:
                raise ValueError(f"state_dict: the moments of parameter {i} have shape "
                                 f"{tuple(entry['exp_avg'].shape)}, the parameter {tuple(shape)} (saved under "
                                 "another FSDP2 sharding?)")

    def load_state_dict(self, saved: dict, params: Sequence[nn.Parameter], default_steps: Sequence[int]) -> None:
        """Replace every state by ``saved`` (from :meth:`state_dict`); a state without a
        tensor ``step`` (written before step counts were kept per tensor) takes
        ``default_steps[i]``."""
        self.check_shapes(saved, params)
        self.clear()
        for i, entry in saved.items():
            param = params[int(i)]
            device = local(param).device
            state = {k: (v.to(device, copy=True) if isinstance(v, Tensor) else v) for k, v in entry.items()}
            if not isinstance(state.get("step"), Tensor):
                count = state.get("step", default_steps[int(i)])
                state["step"] = torch.tensor(float(count), dtype=torch.float32, device=device)
            self.state[param] = state
