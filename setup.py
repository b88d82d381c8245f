"""Build script. Package metadata lives in pyproject.toml.

The native sparse-backward ops in ``csrc/`` are compiled on first use with
``torch.utils.cpp_extension.load`` (ninja), cached in the torch extensions directory, so a
plain ``pip install -e .`` needs no compiler at install time. To build them ahead of time
as ``misa_kernels._C`` instead (pip's isolated build environment would not see your torch):

    MISA_KERNELS_BUILD_EXT=1 pip install --no-build-isolation -e .
"""
import os

from setuptools import setup


def _extensions() -> dict:
    if os.environ.get("MISA_KERNELS_BUILD_EXT") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext = CppExtension("misa_kernels._C", ["csrc/misa_linear.cpp"], extra_compile_args=["-O3"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extensions())
