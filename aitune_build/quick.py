"""The no-op fast path: `aitune-build [build] [-j N] [-k]` settled before click is imported.

A no-op build is the command run most often (CI on every change, editor hooks), and importing click costs about a
third of it. When the command line is a plain build (only -C, --manifest, an explicit `build`, -j/--jobs, -k/--keep-going
and target names) and every selected target is up to date, this module runs the same executor and lock update as
`cli.build_cmd` and prints the same lines. Anything else — another command or option, a target that needs work, any
error — falls through to the click CLI, which starts over (nothing was written). tests/test_quick.py keeps the two
outputs equal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _parse(argv: list[str]) -> tuple[str | None, str | None, int, bool, tuple[str, ...]] | None:
    directory = manifest = None
    jobs, keep_going, targets = 1, False, []
    i, saw_build = 0, False
    while i < len(argv):
        a = argv[i]
        if not saw_build and a == "-C" and i + 1 < len(argv):
            directory, i = argv[i + 1], i + 2
        elif not saw_build and a == "--manifest" and i + 1 < len(argv):
            manifest, i = argv[i + 1], i + 2
        elif not saw_build and a.startswith("--manifest="):
            manifest, i = a.split("=", 1)[1], i + 1
        elif not saw_build and a == "build":
            saw_build, i = True, i + 1
        elif saw_build and a in ("-j", "--jobs") and i + 1 < len(argv) and argv[i + 1].isdigit() and int(argv[i + 1]) >= 1:
            jobs, i = int(argv[i + 1]), i + 2
        elif saw_build and a in ("-k", "--keep-going"):
            keep_going, i = True, i + 1
        elif saw_build and a and not a.startswith("-"):
            targets.append(a)
            i += 1
        else:
            return None  # a form this path does not handle (help, another command, other options): click decides
    if targets and not saw_build:
        return None
    return directory, manifest, jobs, keep_going, tuple(targets)


class _NeedsWork(Exception):
    pass


def try_noop(argv: list[str]) -> int | None:
    """Exit code of a no-op build of argv, its lines printed; None when click must handle argv."""
    parsed = _parse(argv)
    if parsed is None:
        return None
    directory, manifest, jobs, keep_going, targets = parsed
    import time

    from .errors import AituneError
    from .executor import CACHED, BuildOptions, NeedsWork, build
    from .plan import select
    from .project import Project

    cwd = os.getcwd()
    try:
        if directory:
            os.chdir(directory)
        t0 = time.perf_counter()
        project = Project.open(Path(manifest or "aitune.toml"))
        if project.manifest.model.project.executor == "ray":
            raise _NeedsWork("")  # keys of GPU targets come from the cluster: click's path connects first
        order = select(project.manifest.model, targets)
        from . import lockfile

        seen = lockfile.check_readable(project)  # as the click path: a malformed lock stops the build before it starts
        lines: list[str] = []

        def listen(event: str, name: str, result: object) -> None:
            if event != "done" or result.status != CACHED or result.reason != "up to date":  # type: ignore[attr-defined]
                raise _NeedsWork(name)
            lines.append(f"{result.status:<8} {name:<24} {result.seconds:7.2f}s  {result.reason}")  # type: ignore[attr-defined]

        results = build(project, order, BuildOptions(jobs=jobs, keep_going=keep_going, named=targets, settle_only=True), listen)
        lockfile.update(project, results, seen)
        project.close()  # the stat cache, as the CLI saves it
    except (_NeedsWork, NeedsWork, AituneError, OSError, KeyError, ValueError):
        os.chdir(cwd)
        return None
    from .status import Status

    summary = {s.value: sum(r.status == s for r in results) for s in Status}
    lines.append(", ".join(f"{v} {k}" for k, v in summary.items()) + f" in {time.perf_counter() - t0:.2f}s")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def main() -> None:
    code = try_noop(sys.argv[1:])
    if code is not None:
        sys.stdout.flush()
        sys.exit(code)
    from .cli import main as cli_main

    cli_main(prog_name="aitune-build")
