"""``python -m misa_kernels.estimate``: the command line of :mod:`misa_kernels.estimate.cli`."""
import sys

from .cli import main

sys.exit(main())
