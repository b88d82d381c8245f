"""Real English text that is on every machine, for demos, tests and benchmarks.

Nothing is downloaded. Two corpora ship with every CPython installation:

- ``"python-reference"``: the Python language reference topics behind ``help()``
  (``pydoc_data.topics``), about 450 KB of prose and examples;
- ``"python-docstrings"``: the docstrings of a fixed list of standard-library modules,
  a different register of text (API documentation), about 200 KB;
- ``"python-stdlib-code"``: the source of the standard library's top-level modules
  (``Lib/*.py``, sorted by name), about 4.7 MB of Python code.

Text is tokenised to bytes (vocabulary 256), so any model built from a config with
``vocab_size >= 256`` can train on it without a downloaded tokenizer.
"""
from __future__ import annotations

import importlib
import inspect
import sysconfig
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

CORPORA = ("python-reference", "python-docstrings", "python-stdlib-code")
VOCAB_SIZE = 256

_DOCSTRING_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "configparser", "csv", "datetime", "decimal",
    "email.message", "fractions", "functools", "http.client", "itertools", "json", "logging",
    "pathlib", "random", "re", "sqlite3", "statistics", "string", "subprocess", "tarfile",
    "textwrap", "threading", "typing", "unittest", "urllib.parse", "zipfile",
)


@lru_cache(maxsize=None)
def load_text(name: str) -> str:
    """The whole corpus ``name`` (one of :data:`CORPORA`) as one string, deterministic."""
    if name == "python-reference":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key].strip() for key in sorted(topics))
    if name == "python-docstrings":
        return "\n\n".join(_module_docstrings(module) for module in _DOCSTRING_MODULES)
    if name == "python-stdlib-code":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return "\n\n".join(path.read_text(encoding="utf-8", errors="replace") for path in sorted(stdlib.glob("*.py")))
    raise ValueError(f"name must be one of {CORPORA}, got {name!r}")


def _module_docstrings(module_name: str) -> str:
    module = importlib.import_module(module_name)
    docs = [inspect.getdoc(module) or ""]
    with warnings.catch_warnings():  # deprecated aliases (typing.io) warn when touched
        warnings.simplefilter("ignore", DeprecationWarning)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module_name:
                docs.append(f"{attr}: {inspect.getdoc(obj) or ''}")
    return "\n".join(d for d in docs if d.strip())


def encode(text: str) -> Tensor:
    """UTF-8 bytes of ``text`` as a 1-D int64 tensor of token ids in ``[0, 256)``."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


def decode(ids: Tensor) -> str:
    """Inverse of :func:`encode` (invalid byte sequences are replaced)."""
    return bytes(ids.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def lm_splits(name: str, seq_len: int, val_fraction: float = 0.1, max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """Train and validation sequences ``[N, seq_len]`` cut from corpus ``name`` (bytes).

    The last ``val_fraction`` of the (optionally truncated) text is validation, so the
    two never overlap. Each row serves as both ``input_ids`` and ``labels``.
    """
    ids = encode(load_text(name))
    return split_rows(ids if max_tokens is None else ids[:max_tokens], seq_len, val_fraction, name)


def split_rows(ids: Tensor, seq_len: int, val_fraction: float = 0.1, name: str = "the corpus") -> tuple[Tensor, Tensor]:
    """A token stream cut into train and validation rows ``[N, seq_len]``: the last
    ``val_fraction`` of it is validation."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    split = int(len(ids) * (1 - val_fraction))

    def rows(stream: Tensor) -> Tensor:
        count = len(stream) // seq_len
        if count == 0:
            raise ValueError(f"{name!r} is too short for seq_len={seq_len}")
        return stream[: count * seq_len].view(count, seq_len)

    return rows(ids[:split]), rows(ids[split:])


def batches(rows: Tensor, batch_size: int, generator: torch.Generator):
    """An endless stream of random batches of ``rows`` (sampled with a seeded generator)."""
    while True:
        order = torch.randperm(len(rows), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield rows[order[start : start + batch_size]]
