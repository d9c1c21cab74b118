"""A test hook for fault injection, off unless the environment asks for it.

    AITUNE_KILL_AT=N   this process SIGKILLs itself at the Nth checkpoint it reaches (1-based)
    AITUNE_KILL_LOG=F  each checkpoint reached is appended to F (one name a line) first

Checkpoints sit between the steps of a build, a store put, a materialisation, a package and a gc, where a killed
process leaves the most half-done state: tests/test_faults.py kills at every one of them and checks that the next
run recovers. Costs one environment lookup per checkpoint when off. Never set these outside tests.
"""

from __future__ import annotations

import os

_reached = 0


def checkpoint(name: str) -> None:
    at = os.environ.get("AITUNE_KILL_AT")
    if not at:
        return
    global _reached
    _reached += 1
    log = os.environ.get("AITUNE_KILL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{_reached} {name}\n")
    if _reached == int(at):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
