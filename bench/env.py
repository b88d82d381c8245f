"""Where and with what a benchmark ran: device, library versions, commit and date."""
from __future__ import annotations

import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .common import cpu_count

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "triton", "peft", "badam", "galore-torch", "matplotlib")


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model from ``/proc/cpuinfo`` with the cores in use."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def package_version(name: str) -> str:
    """The installed version of distribution ``name``, or ``"not installed"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    """Short commit hash, with ``+dirty`` when the working tree has uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def environment(device: str) -> dict[str, Any]:
    """Device, versions, commit and date of this run, as written beside every result."""
    return dict(
        device=device, device_name=device_name(device), python=platform.python_version(),
        versions={name: package_version(name) for name in PACKAGES}, commit=git_commit(),
        date=datetime.date.today().isoformat(),
    )
