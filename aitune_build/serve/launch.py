"""The parent side of `aitune-build run` and `record`: the child's environment, starting it, merging a recording."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError

SITE_DIR = Path(__file__).resolve().with_name("_site")


def hook_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment that starts the hook in the child (and its own Python children): our sitecustomize first on
    PYTHONPATH (it runs the one it shadows), plus the AITUNE_* settings."""
    env = dict(os.environ)
    env.pop("AITUNE_SERVE", None)
    env["PYTHONPATH"] = str(SITE_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def check_command(command: tuple[str, ...]) -> None:
    import shutil

    if not command:
        raise UserError("no command given: aitune-build run -- python app.py ARGS")
    if shutil.which(command[0]) is None and not Path(command[0]).is_file():
        raise UserError(f"{command[0]}: command not found")


def exec_served(project: Any, command: tuple[str, ...], build_on_start: bool, debug: str | None) -> None:
    """Replace this process with the application, the serving hook in its start-up. Does not return."""
    from ..outputs import read_record
    from .bootstrap import _class_of, make_index

    check_command(command)
    served = {n: _class_of(read_record(project.target_dir(n))) for n, t in project.manifest.model.targets.items() if t.serve}
    extra = {"AITUNE_MANIFEST": str(project.manifest.path), "AITUNE_SERVE_INDEX": make_index(served)}
    if build_on_start:
        extra["AITUNE_BUILD_ON_START"] = "1"
    if debug:
        extra["AITUNE_SERVE_DEBUG"] = str(Path(debug).resolve())
    os.execvpe(command[0], list(command), hook_env(extra))


def run_recorded(command: tuple[str, ...], modules: tuple[str, ...], folder: Path) -> int:
    """Run the application with the recorder; its per-process recordings land in folder. Returns its exit code."""
    import re
    import subprocess

    check_command(command)
    for m in modules:
        if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", m):
            raise UserError(f"--module {m}: expected pkg.module:Class")
    env = hook_env({"AITUNE_RECORD": str(folder), "AITUNE_RECORD_MODULES": ",".join(modules)})
    return subprocess.run(list(command), env=env).returncode
