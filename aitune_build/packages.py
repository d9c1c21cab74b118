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
    listings: dict[str, list[str] | None] = {}  # one listing of each sys.path folder for all names looked up
    for name in sorted(set(names)):
        dist = state.distribution(env, name)
        if dist is None:
            dist = provider(name, listings) or ""
            state.set_distribution(env, name, dist)
        if dist and dist not in _IN_TOOLCHAIN and dist in installed:
            found[dist] = installed[dist]
    return dict(sorted(found.items()))


def provider(name: str, listings: dict[str, list[str] | None] | None = None) -> str | None:
    """The normalised name of the distribution that installed top-level module `name`, first on sys.path."""
    listings = {} if listings is None else listings
    for entry in sys.path:
        folder = entry or "."
        if folder not in listings:
            try:
                listings[folder] = os.listdir(folder)
            except OSError:
                listings[folder] = None
        listing = listings[folder]
        if listing is None:
            continue
        if not any(n == name or n == f"{name}.py" or (n.startswith(f"{name}.") and n.endswith((".so", ".pyd"))) for n in listing):
            continue
        infos = [n for n in listing if n.endswith(".dist-info")]
        named = [n for n in infos if _normalise(n.split("-")[0]) == _normalise(name)]
        others = [n for n in infos if n not in named]
        # The distribution named like the module first (its top_level.txt or RECORD); then the others whose
        # top_level.txt says so (small files); the others' RECORDs last (large: only for an unusual layout).
        checks = [(n, "top_level.txt") for n in named] + [(n, "RECORD") for n in named]
        checks += [(n, "top_level.txt") for n in others] + [(n, "RECORD") for n in others]
        for info, what in checks:
            path = os.path.join(folder, info, what)
            if (name in _lines(path)) if what == "top_level.txt" else _record_lists(path, name):
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
