"""Fixed-address fp32 gradient storage for the sparse backward's active modules.

The fused kernels read tensors through tables of data pointers (:mod:`misa_kernels.ops.triton_tables`),
cached by content. Gradients allocated afresh at every backward can land anywhere, and every
new address is a new table: host work and a host-to-device copy per step. An arena is
allocated once per active set (at its first backward) and hands every module the same
views for the whole inner loop, so the tables are built once per switch.

Two layouts:

* ``packed`` (the default path): one flat buffer, one disjoint view per tensor; all of the
  active set's gradients coexist until ``step()``. Costs ``4 * |active|`` bytes from the
  first backward of an inner loop to the switch (also during the forward passes, where
  freshly allocated gradients would not exist yet).
* ``shared`` (``step_in_backward``): every module's views start at offset 0 of one buffer
  the size of the largest module, because each module is updated and released before the
  next one's gradient begins. A module asking while another holds the buffer gets ``None``
  (its caller allocates on its own).

Views are zero whenever they are not handed out: in the ``packed`` layout giving the last
one back zeroes the whole buffer in one fill (one per step); any other give-back zeroes
that module's views.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

ALIGN_ELEMENTS = 16  # 64-byte view offsets, enough for the kernels' 128-bit accesses

Shapes = Sequence[Optional[torch.Size]]  # a module's tensors' shapes (weight, bias); None: absent


def _aligned(n: int) -> int:
    return -(-n // ALIGN_ELEMENTS) * ALIGN_ELEMENTS


class GradArena:
    """fp32 views for the modules of ``shapes`` (``name -> (weight shape, bias shape)``)."""

    def __init__(self, shapes: Mapping[str, Shapes], device: torch.device, shared: bool = False):
        self.shared = shared
        self._offsets: dict[str, list[Optional[tuple[int, torch.Size]]]] = {}
        end = 0
        for name, module_shapes in shapes.items():
            start = 0 if shared else end
            offsets = []
            for shape in module_shapes:
                offsets.append(None if shape is None else (start, shape))
                if shape is not None:
                    start += _aligned(shape.numel())
            self._offsets[name] = offsets
            end = max(end, start)
        self.flat = torch.zeros(end, dtype=torch.float32, device=device)
        self._out: set[str] = set()  # modules holding their views
        self._dirty = False  # packed: a view was handed out since the last full zeroing

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def __contains__(self, name: str) -> bool:
        return name in self._offsets

    def take(self, name: str) -> Optional[list[Optional[Tensor]]]:
        """Zeroed views for module ``name``'s tensors (``None`` for absent ones), or ``None``
        when a ``shared`` buffer is held by another module."""
        if self.shared and self._out - {name}:
            return None
        self._out.add(name)
        self._dirty = True
        return self._views(name)

    def give_back(self, name: str) -> None:
        """Module ``name`` no longer uses its views; they are zeroed for the next take."""
        if name not in self._out:
            return
        self._out.discard(name)
        if self.shared or self._out:
            for view in self._views(name):
                if view is not None:
                    view.zero_()
        elif self._dirty:
            self.flat.zero_()
            self._dirty = False

    def _views(self, name: str) -> list[Optional[Tensor]]:
        return [None if at is None else self.flat[at[0]:at[0] + at[1].numel()].view(at[1])
                for at in self._offsets[name]]
