"""The MISA optimizer and its sampling machinery."""
from .misa import MISA

__all__ = ["MISA"]
