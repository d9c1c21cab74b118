"""AITUNE_SERVE_DEBUG=PATH: at exit, a JSON record of what was served ("{pid}" in PATH is replaced by the pid)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def write_debug_record(path: str) -> None:
    from ..fsutil import atomic_write_json
    from .bootstrap import NOT_SERVED, WARNINGS

    hook = sys.modules.get("aitune_build.serve.hook")
    targets = {name: {"status": "not served", "reason": why} for name, why in NOT_SERVED.items()}
    targets.update({name: t.debug() for name, t in getattr(hook, "TARGETS", {}).items()})
    try:
        atomic_write_json(Path(path.replace("{pid}", str(os.getpid()))),
                          {"pid": os.getpid(), "targets": targets, "warnings": WARNINGS,
                           "torch_imported": "torch" in sys.modules,
                           "torch_tensorrt_imported": "torch_tensorrt" in sys.modules})
    except OSError as e:
        sys.stderr.write(f"aitune-build: serve: cannot write AITUNE_SERVE_DEBUG={path}: {e}\n")
