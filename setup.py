"""Build script. Package metadata lives in pyproject.toml.

The native extension in ``csrc/`` (sparse backward for module Linear layers) is built
here with ``torch.utils.cpp_extension`` once it exists; until then the package is pure
Python and uses the PyTorch fallback.
"""
from setuptools import setup

setup()
