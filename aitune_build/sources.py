"""Which project files decide a module: the factory's file and every project-local module it imports, transitively.

Found by static import scanning (ast), never by executing the code. A module that does not resolve to a file under
the project root is third-party: the scan returns its top-level name (standard-library modules aside), and
`packages.distributions` turns those into distribution versions for the key.
"""

from __future__ import annotations

from pathlib import Path

from .hashing import StateCache
from .manifest import module_file


SYNTAX_ERROR = -1  # the level of the one entry _scan gives for a file that does not parse: [-1, "line", [message]]


def _scan(source: bytes, filename: str) -> list[list]:
    """[level, module, [names]] for every import statement, at any depth (imports inside functions count too)."""
    try:
        import ast  # only for a source not scanned before

        tree = ast.parse(source, filename=filename)
    except SyntaxError as e:
        return [[SYNTAX_ERROR, str(e.lineno or 0), [e.msg]]]
    found: list[list] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [[0, a.name, []] for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append([node.level, node.module or "", [a.name for a in node.names]])
    return found


def _package_of(root: Path, file: Path) -> list[str]:
    parts = list(file.relative_to(root).with_suffix("").parts)
    return parts[:-1]  # for pkg/__init__.py the package is pkg; for pkg/mod.py it is pkg as well


def _candidates(root: Path, file: Path, level: int, module: str, names: list[str]) -> list[str]:
    if level:
        base = _package_of(root, file)
        if level - 1 > len(base):
            return []
        base = base[: len(base) - (level - 1)]
        dotted = base + (module.split(".") if module else [])
    else:
        dotted = module.split(".")
    out = [".".join(dotted[: i + 1]) for i in range(len(dotted)) if dotted[: i + 1]]
    out += [".".join(dotted + [n]) for n in names if n != "*"]
    return out


def module_sources(root: Path, dotted: str, state: StateCache) -> dict[str, str]:
    """{path relative to root: digest} for `dotted` and the project-local modules it imports, transitively."""
    return scan_module(root, dotted, state)[0]


def scan_module(root: Path, dotted: str, state: StateCache, broken: list[str] | None = None
                ) -> tuple[dict[str, str], list[str]]:
    """module_sources, and the sorted top-level names of the other modules those files import (third-party ones:
    neither project-local nor standard library). Files that do not parse are listed in `broken`
    ("models/x.py:3: syntax error: ...")."""
    from .packages import is_stdlib

    start = module_file(root, dotted)
    if start is None:
        return {}, []
    seen: dict[str, str] = {}
    outside: set[str] = set()
    todo = [start]
    # importing a.b.c runs a/__init__.py and a/b/__init__.py first
    todo += [p for d in _parents(dotted) if (p := module_file(root, d)) is not None]
    while todo:
        file = todo.pop()
        rel = file.relative_to(root).as_posix()
        if rel in seen:
            continue
        digest = state.digest(file)
        seen[rel] = digest
        found = state.imports(digest)
        if found is None:
            found = _scan(file.read_bytes(), str(file))
            state.set_imports(digest, found)
        for level, module, names in found:
            if level == SYNTAX_ERROR:
                if broken is not None:
                    broken.append(f"{rel}:{module}: syntax error: {names[0]}")
                continue
            top = module.split(".")[0]
            if not level and top and top not in outside and not is_stdlib(top) and module_file(root, top) is None:
                outside.add(top)
            for cand in _candidates(root, file, level, module, names):
                target = module_file(root, cand)
                if target is not None and target.relative_to(root).as_posix() not in seen:
                    todo.append(target)
    return dict(sorted(seen.items())), sorted(outside)


def _parents(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def glob_sources(root: Path, patterns: list[str], state: StateCache) -> dict[str, list[str] | dict[str, str]]:
    """{path: digest} for the files matched by `sources` globs, and the patterns that matched nothing."""
    files: dict[str, str] = {}
    empty: list[str] = []
    for pattern in patterns:
        matched = sorted(p for p in root.glob(pattern) if p.is_file())
        if not matched:
            empty.append(pattern)
        for p in matched:
            files[p.relative_to(root).as_posix()] = state.digest(p)
    return {"files": dict(sorted(files.items())), "empty": empty}
