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
    from aitune_build.vocabulary import backend_kinds

    mutating = {k for k in backend_kinds() if backend_for(k).mutates_module}
    assert mutating == {"torch_tensorrt_aot", "torch_tensorrt_jit"}  # both cast with module.to(dtype), in place


def test_two_projects_with_one_package_name_each_get_their_own_module(tmp_path) -> None:
    """A process that loads two projects' factories (a serving process, a test run) must not hand the second
    project the first one's `models` package, which the import cache still holds."""
    import sys

    from aitune_build.factory import make_module
    from aitune_build.manifest import load_manifest

    from .conftest import make_project

    a, b = make_project(tmp_path / "a"), make_project(tmp_path / "b")
    (b / "models/adder.py").write_text((b / "models/adder.py").read_text().replace("return x + y", "return x + y + 1"))
    try:
        for root, extra in ((a, 0.0), (b, 1.0), (a, 0.0)):
            m = load_manifest(root / "aitune.toml")
            mod = make_module(m, "adder", m.model.modules["adder"], "cpu")
            assert sys.modules[type(mod).__module__].__file__.startswith(str(root)), (root, type(mod).__module__)
            import torch

            assert mod(torch.zeros(2), torch.zeros(2)).tolist() == [extra, extra]
    finally:
        for n in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
            del sys.modules[n]
        for root in (a, b):
            while str(root) in sys.path:
                sys.path.remove(str(root))
