"""The backward path of module-bearing layers: which weights get gradients.

MISA drives this seam at every switch of the active set. The default
:class:`AutogradBackward` toggles ``requires_grad``: eager autograd then runs no
weight-gradient GEMM for a frozen Linear and saves no input on its behalf. A native
implementation (the ``csrc`` extension) plugs in with the same three methods.
"""
from __future__ import annotations

from typing import Iterable, Protocol

from torch import nn


class BackwardPath(Protocol):
    """What MISA needs from a backward implementation."""

    name: str

    def activate(self, params: Iterable[nn.Parameter]) -> None: ...

    def deactivate(self, params: Iterable[nn.Parameter]) -> None: ...

    def detach(self) -> None: ...


class AutogradBackward:
    """Plain autograd: frozen weights simply do not require gradients."""

    name = "autograd"

    def activate(self, params: Iterable[nn.Parameter]) -> None:
        for param in params:
            param.requires_grad_(True)

    def deactivate(self, params: Iterable[nn.Parameter]) -> None:
        for param in params:
            param.requires_grad_(False)
            param.grad = None

    def detach(self) -> None:
        """Nothing was wrapped, so nothing is restored."""
