"""The MISA optimizer (:mod:`.misa`) and the pieces it orchestrates: the sampler, the
scores, the state store, the updater, the gradient sources; see the README's layout."""
from .misa import MISA

__all__ = ["MISA"]
