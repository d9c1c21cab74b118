"""Small real projects in tmp_path, built with real torch on the CPU."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from aitune_build.cli import main

MANIFEST = """
[project]
name = "t"

[modules.mlp]
factory = "models.mlp:build"
args = { hidden = 8 }
weights = "weights/mlp.pt"
inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 4, max = 8 }, 4] }]

[modules.adder]
factory = "models.adder:build"
inputs = [
  { name = "x", shape = [{ dim = "n", min = 1, opt = 3, max = 6 }] },
  { name = "y", shape = [{ dim = "n", min = 1, opt = 3, max = 6 }] },
]

[backends.exp]
kind = "export"

[backends.ref]
kind = "eager"

[targets.mlp_export]
module = "mlp"
backend = "exp"

[targets.mlp_eager]
module = "mlp"
backend = "ref"

[targets.adder_export]
module = "adder"
backend = "exp"
"""

FILES = {
    "models/__init__.py": "",
    "models/helpers/__init__.py": "from .deep import act\n",
    "models/helpers/deep.py": "import torch\n\n\ndef act(x):\n    return torch.relu(x)\n",
    "models/mlp.py": textwrap.dedent("""
        import torch
        from models.helpers import act


        class MLP(torch.nn.Module):
            def __init__(self, hidden):
                super().__init__()
                self.a = torch.nn.Linear(4, hidden)
                self.b = torch.nn.Linear(hidden, 2)

            def forward(self, x):
                return self.b(act(self.a(x)))


        def build(hidden=8):
            return MLP(hidden)
        """),
    "models/adder.py": textwrap.dedent("""
        import torch


        class Adder(torch.nn.Module):
            def forward(self, x, y):
                return x + y  # ties the two axes: they must share one Dim


        def build():
            return Adder()
        """),
}


def write_weights(root: Path, hidden: int = 8, seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)
    sd = {"a.weight": torch.randn(hidden, 4), "a.bias": torch.randn(hidden), "b.weight": torch.randn(2, hidden), "b.bias": torch.randn(2)}
    (root / "weights").mkdir(exist_ok=True)
    torch.save(sd, root / "weights" / "mlp.pt")


def make_project(root: Path, manifest: str = MANIFEST) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in FILES.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    write_weights(root)
    (root / "aitune.toml").write_text(manifest)
    return root


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    return make_project(tmp_path / "proj")


def age(path: Path) -> None:
    """Make a file look old, past the stat cache's racy window, as a real edit minutes later would."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10_000_000_000))


def run_cli(root: Path, *args: str) -> tuple[int, str, dict | None]:
    cwd = os.getcwd()
    try:
        result = CliRunner().invoke(main, ["-C", str(root), *args], catch_exceptions=False)
    finally:
        os.chdir(cwd)
    out = result.stdout
    data = None
    if "--json" in args:
        try:
            data = json.loads(out)
        except ValueError:
            data = None
    return result.exit_code, result.output, data


def statuses(data: dict) -> dict[str, str]:
    return {t["name"]: t["status"] for t in data["targets"]}


@pytest.fixture(scope="session")
def _built_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MANIFEST's project with every target built once per test session (its cache inside it)."""
    saved = os.environ.pop("AITUNE_CACHE_DIR", None)
    try:
        root = make_project(tmp_path_factory.mktemp("template") / "proj")
        code, out, _ = run_cli(root, "build")
        assert code == 0, out
    finally:
        if saved is not None:
            os.environ["AITUNE_CACHE_DIR"] = saved
    return root


@pytest.fixture
def built_project(_built_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the built template: every target up to date, the cache holding each key, the lock written.

    Copying (a few MB) replaces three worker runs per test; tests that change the project change only their copy."""
    import shutil

    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = tmp_path / "proj"
    shutil.copytree(_built_template, root, symlinks=True)
    return root


def sigint_default() -> None:
    """preexec_fn for a process a test interrupts with SIGINT: a shell that starts the suite as a background job
    without job control (`.ci/run &`) hands every child SIGINT ignored, and Python keeps an ignored SIGINT ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def gone(pid: int, within: float) -> bool:
    """Whether process PID has exited (a zombie not yet reaped counts) within WITHIN seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie not yet reaped by init counts as gone
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.1)
    return False
