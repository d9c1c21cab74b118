"""The worker constructs the eager module once per target (build and reference), unless a backend mutates it."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import make_project, run_cli, statuses

COUNTED = """
import os
import torch


class Double(torch.nn.Module):
    def forward(self, x):
        return x * 2


def build():
    with open(os.path.join(os.path.dirname(__file__), "constructed.txt"), "a") as f:
        f.write("x")
    return Double()
"""

MANIFEST = """
[project]
name = "t"

[modules.double]
factory = "models.counted:build"
inputs = [{ name = "x", shape = [2, 3] }]

[backends.exp]
kind = "export"

[targets.double_export]
module = "double"
backend = "exp"
"""


def test_eager_module_is_constructed_once_per_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make_project(tmp_path / "p", MANIFEST)
    (root / "models/counted.py").write_text(COUNTED)
    code, out, data = run_cli(root, "build", "--json")
    assert code == 0 and statuses(data) == {"double_export": "built"}, out
    assert (root / "models/constructed.txt").read_text() == "x"  # was "xx": once for the build, once for the check


def test_backends_that_cast_the_module_get_a_copy() -> None:
    from aitune_build.backends import backend_for
    from aitune_build.vocabulary import BACKEND_KINDS

    mutating = {k for k in BACKEND_KINDS if backend_for(k).mutates_module}
    assert mutating == {"torch_tensorrt_aot", "torch_tensorrt_jit"}  # both cast with module.to(dtype), in place
