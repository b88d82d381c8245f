"""misa-kernels: Module-wise Importance SAmpling (MISA) as a fast PyTorch optimizer.

>>> import misa_kernels as mk
>>> opt = mk.MISA(model, lr=1e-5, delta=0.03)   # doctest: +SKIP
"""
from .modules import Unit, discover_modules, find_block_list
from .optim.misa import MISA
from .estimate import estimate_memory

__version__ = "0.1.0"

__all__ = ["MISA", "Unit", "discover_modules", "estimate_memory", "find_block_list", "__version__"]
