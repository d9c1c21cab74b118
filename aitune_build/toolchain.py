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


def gpu_info(visible: str | None = None) -> list[dict[str, str]]:
    """The NVIDIA GPUs this process may use, in CUDA's order: [{index, uuid, name, compute_capability, driver}].

    `visible` is a CUDA_VISIBLE_DEVICES value (default: the environment's; unset means every GPU): comma-separated
    nvidia-smi indices or GPU UUIDs (`GPU-8f...`, a unique prefix is enough); as CUDA does, the list ends at the
    first entry that names no GPU. Indices are nvidia-smi's (PCI bus order): set CUDA_DEVICE_ORDER=PCI_BUS_ID for
    CUDA to number them the same way. [] where there is no NVIDIA GPU (no nvidia-smi, or it fails)."""
    import shutil

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        st = os.stat(smi)
    except OSError:
        return []
    rows = _query_gpus(smi, st.st_mtime_ns, st.st_size)
    if visible is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return [dict(r) for r in select_visible(rows, visible)]


def select_visible(rows: tuple[dict[str, str], ...] | list[dict[str, str]], visible: str | None) -> list[dict[str, str]]:
    """The rows a CUDA_VISIBLE_DEVICES value leaves visible, in its order (None: all, in index order)."""
    if visible is None:
        return list(rows)
    chosen: list[dict[str, str]] = []
    for entry in (e.strip() for e in visible.split(",")):
        if entry.isdigit():
            hit = [r for r in rows if r["index"] == str(int(entry))]
        elif entry.upper().startswith("GPU-") and len(entry) > 4:
            hit = [r for r in rows if r["uuid"].upper().startswith(entry.upper())]
        else:
            hit = []
        if len(hit) != 1 or hit[0] in chosen:
            break  # as CUDA: the list ends at an entry that names no (single, new) device
        chosen.append(hit[0])
    return chosen


@functools.cache
def _query_gpus(smi: str, mtime_ns: int, size: int) -> tuple[dict[str, str], ...]:
    """Every GPU nvidia-smi lists (it ignores CUDA_VISIBLE_DEVICES). Cached per nvidia-smi binary."""
    import subprocess

    try:
        out = subprocess.run(
            [smi, "--query-gpu=index,uuid,name,compute_cap,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    rows = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 5 or not parts[0].isdigit():
            continue
        index, uuid, name, cap, driver = parts
        rows.append({"index": index, "uuid": uuid, "name": name, "compute_capability": cap, "driver": driver})
    return tuple(rows)


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
