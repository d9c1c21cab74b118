"""Progress: start/end lines, heartbeats with the worker's phase, -v, a useful build.log; the terminal's live line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import MANIFEST

SLOW = MANIFEST + '\n[modules.slow]\nfactory = "models.slow:build"\ninputs = [{ name = "input", shape = [3] }]\n' \
    '[targets.slow_eager]\nmodule = "slow"\nbackend = "ref"\n'


def test_ci_progress_heartbeat_phases_verbose_log_and_build_log(project: Path) -> None:
    # the factory takes 1.5 s: heartbeats (every 0.4 s here) must name the phase the worker reports
    (project / "models/slow.py").write_text("import time\n\nimport torch\n\n\ndef build():\n    time.sleep(1.5)\n"
                                            "    return torch.nn.ReLU()\n")
    (project / "aitune.toml").write_text(SLOW)
    env = {**os.environ, "AITUNE_HEARTBEAT_S": "0.4"}
    env.pop("CI", None)
    out = subprocess.run([sys.executable, "-m", "aitune_build", "-C", str(project), "build", "-v", "slow_eager"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "building slow_eager ..."
    beats = [ln for ln in lines if ln.startswith("still building slow_eager (")]
    assert any(ln.endswith(", constructing)") for ln in beats), lines  # the phase, from the worker's progress file
    assert any("[slow_eager] [aitune-build" in ln and ln.endswith("constructing") for ln in lines), lines  # -v
    assert any(ln.startswith("built    slow_eager") for ln in lines), lines
    log = (project / "build/slow_eager/build.log").read_text()
    for want in ("importing", "constructing", "checking", "phases: importing", "versions: python", "check (float32",
                 "max_abs_err 0"):
        assert want in log, (want, log)


@pytest.mark.slow
def test_terminal_line_shows_elapsed_time_and_phase(project: Path) -> None:
    """On a terminal (a pty here) the live line names each running target with its elapsed seconds and phase."""
    import pty
    import select

    (project / "models/slow.py").write_text("import time\n\nimport torch\n\n\ndef build():\n    time.sleep(2.5)\n"
                                            "    return torch.nn.ReLU()\n")
    (project / "aitune.toml").write_text(SLOW)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(TERM="xterm", COLUMNS="120")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on a terminal
        os.execve(sys.executable, [sys.executable, "-m", "aitune_build", "-C", str(project), "build", "slow_eager"], env)
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 300)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert re.search(r"\[0/1\] slow_eager \d+s constructing", text), text
    assert "built    slow_eager" in text
