"""The no-op fast path (quick.py) prints what the click CLI prints, without importing click; anything else falls
through to click."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import run_cli

PKG = str(Path(__file__).resolve().parent.parent)
PROBE = """
import sys
from aitune_build.quick import try_noop
code = try_noop(sys.argv[1:])
print("CODE", code, "click" in sys.modules, "torch" in sys.modules)
"""


def probe(*argv: str) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": PKG})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return "\n".join(lines[:-1]), lines[-1]


def norm(text: str) -> str:
    return re.sub(r"\d+\.\d\ds", "T", text).strip()


def test_noop_fast_path_matches_the_cli_and_skips_click(project: Path) -> None:
    assert run_cli(project, "build", "mlp_export", "mlp_eager")[0] == 0
    code, cli_out, _ = run_cli(project, "build", "-j", "2", "mlp_export", "mlp_eager")
    assert code == 0
    fast_out, tail = probe("-C", str(project), "build", "-j", "2", "mlp_export", "mlp_eager")
    assert tail == "CODE 0 False False", tail
    assert norm(fast_out) == norm(cli_out), (fast_out, cli_out)
    assert "2 cached" in fast_out
    # the same through `python -m aitune_build`
    out = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(project), "build", "mlp_export"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": PKG})
    assert out.returncode == 0 and "up to date" in out.stdout


def test_anything_else_falls_through_to_click(project: Path) -> None:
    assert run_cli(project, "build", "mlp_export")[0] == 0
    # a target that needs building, another command, other options, an unknown target, an implicit build
    for argv in (["build", "adder_export"], ["status"], ["build", "--json", "mlp_export"], ["build", "nope"],
                 ["mlp_export"], ["build", "-f", "mlp_export"]):
        out, tail = probe("-C", str(project), *argv)
        assert tail.startswith("CODE None"), (argv, tail)
        assert out == "", (argv, out)
    assert not (project / "build/adder_export").exists()  # settling never builds
