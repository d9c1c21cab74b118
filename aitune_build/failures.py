"""Failure messages that keep their substance: a first line that says what failed and where, then bounded detail.

A message is text whose first line stands alone (file, key, what to do) and whose following lines are the detail:
the keys and shapes a state_dict lacks, the user's file:line where tracing stopped. `--json` and `build.log` carry
the whole message; the console shows at most DETAIL_LINES lines of detail (`bounded`).
"""

from __future__ import annotations

import re
from pathlib import Path

DETAIL_LINES = 15
_MAX_LINE = 240
_FILE_LINE = re.compile(r'File "([^"]+)", line (\d+)')


def first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else ""


def summary(exc: BaseException, limit: int = 500) -> str:
    """The exception's type and its first line that says something: torch's BackendCompilerFailed puts the cause on
    its second line ("backend='torch_tensorrt' raised:" then the real error), so a line ending in ':' takes the next."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:
        text += " " + lines[1]
    return f"{type(exc).__name__}: {text[:limit]}"


def bounded(message: str, limit: int = DETAIL_LINES, more: str = "") -> list[str]:
    """The first line, then at most `limit` lines of detail (long lines cut), then how much was left out."""
    lines = [ln.rstrip() for ln in message.strip().splitlines()]
    if not lines:
        return [""]
    detail = [ln if len(ln) <= _MAX_LINE else ln[: _MAX_LINE - 1] + "…" for ln in lines[1:] if ln.strip()]
    out = [lines[0], *detail[:limit]]
    if len(detail) > limit:
        out.append(f"… {len(detail) - limit} more lines" + (f" in {more}" if more else ""))
    return out


def user_locations(exc: BaseException, root: Path, limit: int = 3) -> list[str]:
    """'models/x.py:12 in forward: if x.sum() > 0:' for the frames of exc that lie in the project (innermost last),
    from the traceback and from `File "...", line N` mentions in the message (torch.export quotes the user's stack)."""
    import linecache
    import traceback

    root = root.resolve()
    seen: list[tuple[str, int, str]] = []

    def add(filename: str, lineno: int, func: str) -> None:
        try:
            path = Path(filename).resolve()
            rel = path.relative_to(root)
        except (ValueError, OSError):
            return
        if "site-packages" in rel.parts or rel.parts[:1] == (".venv",) or not path.is_file():
            return
        for i, (r, n, f) in enumerate(seen):
            if (r, n) == (rel.as_posix(), lineno):
                if func and not f:
                    seen[i] = (r, n, func)
                return
        seen.append((rel.as_posix(), lineno, func))

    e: BaseException | None = exc
    while e is not None:  # the chain too: torch re-raises user errors from its own frames
        for fr in traceback.extract_tb(e.__traceback__):
            add(fr.filename, fr.lineno or 0, fr.name)
        for m in _FILE_LINE.finditer(str(e)):
            add(m.group(1), int(m.group(2)), "")
        e = e.__cause__ or e.__context__
    out = []
    for rel, lineno, func in seen[-limit:]:
        code = linecache.getline(str(root / rel), lineno).strip()
        out.append(f"{rel}:{lineno}" + (f" in {func}" if func else "") + (f": {code}" if code else ""))
    return out


def describe(exc: BaseException, root: Path, prefix: str = "") -> str:
    """An unexpected exception from the user's code or a backend as a message: the first line names the exception
    and, when the traceback passes through the project, the innermost project line; the detail lists the project
    frames first (so that the bounded console view keeps them), then the rest of the exception's text."""
    text = str(exc).strip()
    where = user_locations(exc, root)
    at = f" (at {where[-1].split(' ')[0].rstrip(':')})" if where else ""
    first = f"{prefix}{type(exc).__name__}: {first_line(text)}{at}"
    detail = [ln for ln in text.splitlines()[1:] if ln.strip()]
    if where:
        detail = ["in your code (innermost last):", *(f"  {w}" for w in where), *detail]
    return "\n".join([first, *detail])
