"""Versions of what compiles a target, read without importing torch, and the GPU (via nvidia-smi)."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess


@functools.cache
def dist_version(*names: str) -> tuple[str, str] | None:
    """(distribution name, version) of the first of `names` that is installed."""
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


@functools.cache
def python_version() -> str:
    return f"{platform.python_implementation()} {platform.python_version()}"


@functools.cache
def gpu_info() -> dict[str, str] | None:
    """Name and compute capability of GPU 0, or None where there is no NVIDIA GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader", "-i", "0"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    name, cap, driver = (s.strip() for s in (out.split(",") + ["", ""])[:3])
    return {"name": name, "compute_capability": cap, "driver": driver}


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
