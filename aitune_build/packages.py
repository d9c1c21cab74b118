"""Which installed distribution provides a top-level import name, and its version: third-party code in the key.

Read from the `*.dist-info` folders on sys.path (their names, `top_level.txt`, `RECORD`), never by importing the
package or importlib.metadata (which costs more than a whole no-op build). Which distribution provides an import
name is remembered in the state cache for as long as the set of installed distributions and sys.path stay the
same, so an unchanged project costs no file reads here; versions come from the dist-info folder names, listed once
per process (`toolchain._installed`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from .hashing import StateCache
from .toolchain import _installed, _normalise

# torch is in every target's toolchain already: recording it here too would name one upgrade twice.
_IN_TOOLCHAIN = {"torch"}


def is_stdlib(name: str) -> bool:
    return name in sys.stdlib_module_names or name in sys.builtin_module_names


def environment() -> str:
    """Changes when a distribution is installed or removed, or sys.path changes (not when a version changes)."""
    import xxhash

    return xxhash.xxh3_64_hexdigest("\0".join([*sys.path, "\1", *sorted(_installed())]).encode())


def distributions(names: Iterable[str], state: StateCache) -> dict[str, str]:
    """{normalised distribution name: version} for the top-level import names an installed distribution provides.
    Names no distribution provides (not installed, a plain folder on sys.path, an editable install) are left out."""
    installed = _installed()
    env = environment()
    found: dict[str, str] = {}
    for name in sorted(set(names)):
        dist = state.distribution(env, name)
        if dist is None:
            dist = provider(name) or ""
            state.set_distribution(env, name, dist)
        if dist and dist not in _IN_TOOLCHAIN and dist in installed:
            found[dist] = installed[dist]
    return dict(sorted(found.items()))


def provider(name: str) -> str | None:
    """The normalised name of the distribution that installed top-level module `name`, first on sys.path."""
    for entry in sys.path:
        folder = entry or "."
        try:
            listing = os.listdir(folder)
        except OSError:
            continue
        if not any(n == name or n == f"{name}.py" or (n.startswith(f"{name}.") and n.endswith((".so", ".pyd"))) for n in listing):
            continue
        infos = [n for n in listing if n.endswith(".dist-info")]
        # The distribution named like the module first; then those whose top_level.txt says so; RECORDs last.
        infos.sort(key=lambda n: _normalise(n.split("-")[0]) != _normalise(name))
        for info in infos:
            if name in _lines(os.path.join(folder, info, "top_level.txt")):
                return _normalise(info.split("-")[0])
        for info in infos:
            if _record_lists(os.path.join(folder, info, "RECORD"), name):
                return _normalise(info.split("-")[0])
        return None  # found here but from no distribution: a folder on PYTHONPATH
    return None


def _lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return [line.strip() for line in f]
    except OSError:
        return []


def _record_lists(path: str, name: str) -> bool:
    prefixes = (f"{name}/", f"{name}.py,", f"{name}.")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(line.startswith(prefixes) and not line.startswith(f"{name}.dist-info") for line in f)
    except OSError:
        return False
