"""Versions of what compiles a target, read without importing torch, and the GPU (via nvidia-smi)."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys


@functools.cache
def dist_version(*names: str) -> tuple[str, str] | None:
    """(distribution name, version) of the first of `names` that is installed."""
    installed = _installed()
    for name in names:
        version = installed.get(_normalise(name))
        if version is not None:
            return name, version
    return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@functools.cache
def _installed() -> dict[str, str]:
    """Normalised distribution name -> version, first on sys.path wins (as importlib.metadata finds them).

    Read from the `<name>-<version>.dist-info` folder names, which wheel installs write with normalised parts:
    importing importlib.metadata costs more than a whole no-op build's key computation."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for n in names:
            stem = n.removesuffix(".dist-info")
            if stem != n and stem.count("-") == 1:
                name, version = stem.split("-")
                found.setdefault(_normalise(name), version)
            elif n.endswith(".egg-info"):
                version = _egg_version(os.path.join(entry or ".", n))
                if version:
                    found.setdefault(_normalise(n.split("-")[0].removesuffix(".egg-info")), version)
    return found


def _egg_version(path: str) -> str | None:
    pkg_info = os.path.join(path, "PKG-INFO") if os.path.isdir(path) else path
    try:
        with open(pkg_info, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def python_version() -> str:
    impl = {"cpython": "CPython", "pypy": "PyPy"}.get(sys.implementation.name, sys.implementation.name)
    return f"{impl} {'.'.join(map(str, sys.version_info[:3]))}"


@functools.cache
def gpu_info() -> dict[str, str] | None:
    """Name and compute capability of GPU 0, or None where there is no NVIDIA GPU."""
    import shutil
    import subprocess

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
