"""Artifacts that load anywhere: what an exported program needs imported is recorded at build and imported by load(),
only when the local project vouches for it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aitune_build.errors import UserError

from .conftest import make_project, run_cli, statuses

PKG_PARENT = str(Path(__file__).resolve().parent.parent)

MANIFEST = """
[project]
name = "t"

[modules.pair]
factory = "models.pair:build"
inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 2, max = 4 }, 3] }]

[backends.exp]
kind = "export"

[targets.pair_export]
module = "pair"
backend = "exp"
"""

OUTPUTS = textwrap.dedent("""
    import torch.utils._pytree as pytree


    class Pair:
        def __init__(self, a, b):
            self.a, self.b = a, b
    """)
REGISTER = textwrap.dedent("""
    import torch.utils._pytree as pytree
    from models.outputs import Pair

    pytree.register_pytree_node(Pair, lambda p: ([p.a, p.b], None), lambda v, _: Pair(*v),
                                serialized_type_name="models.outputs.Pair")
    """)
PAIR = textwrap.dedent("""
    import torch
    {imports}


    class PairModel(torch.nn.Module):
        def forward(self, x):
            return Pair(x + 1, x * 2)


    def build():
        {in_build}
        return PairModel()
    """)


def _project(tmp_path: Path, registered_in: str) -> Path:
    """registered_in: 'outputs' (the class's own module), 'register' (another module the factory imports) or
    'factory' (inside build(): no import registers it)."""
    root = make_project(tmp_path / "p", MANIFEST)
    outputs = OUTPUTS + (REGISTER.split("from models.outputs import Pair\n")[1] if registered_in == "outputs" else "")
    (root / "models/outputs.py").write_text(outputs)
    (root / "models/register.py").write_text(REGISTER)
    imports = "from models.outputs import Pair" + ("\nimport models.register" if registered_in == "register" else "")
    in_build = ("import torch.utils._pytree as pytree\n    if Pair not in pytree.SUPPORTED_NODES:\n        "
                "pytree.register_pytree_node(Pair, lambda p: ([p.a, p.b], None), lambda v, _: Pair(*v), "
                "serialized_type_name='models.outputs.Pair')") if registered_in == "factory" else "pass"
    (root / "models/pair.py").write_text(PAIR.format(imports=imports, in_build=in_build))
    return root


def _fresh_load(root: Path, *extra: str) -> subprocess.CompletedProcess:
    """aitune_build.load() in a new process that never imported the model's code (run from another folder)."""
    code = (
        "import sys, torch, aitune_build\n"
        f"m = aitune_build.load('pair_export', manifest={str(root / 'aitune.toml')!r}{''.join(extra)})\n"
        "out = m(torch.ones(2, 3))\n"
        "print(type(out).__name__, float(out.a.sum()), float(out.b.sum()))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root.parent,
                          env={"PYTHONPATH": PKG_PARENT, "PATH": "/usr/bin:/bin", "HOME": str(root.parent)})


@pytest.mark.slow
def test_custom_output_class_loads_in_a_fresh_process_and_tampered_records_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = _project(tmp_path, "outputs")
    code, out, data = run_cli(root, "build", "--json")
    assert code == 0 and statuses(data) == {"pair_export": "built"}, out
    record_path = root / "build/pair_export/build.json"
    rec = json.loads(record_path.read_text())
    assert rec["record"]["imports"] == ["models.outputs"]
    proc = _fresh_load(root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["Pair", "12.0", "12.0"]

    # build.json is data: a module the project's sources do not import is never imported because it says so.
    from aitune_build import load

    (root / "evil.py").write_text("raise SystemExit('imported evil')\n")
    for bad in (["evil"], ["os"], ["models.adder"], ["models/../evil"]):
        rec["record"]["imports"] = bad
        record_path.write_text(json.dumps(rec))
        with pytest.raises(UserError, match="refusing to import"):
            load("pair_export", manifest=root / "aitune.toml")


@pytest.mark.slow
def test_registration_in_another_module_falls_back_to_the_factory_module(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = _project(tmp_path, "register")
    code, out, data = run_cli(root, "build", "--json")
    assert code == 0, out
    rec = json.loads((root / "build/pair_export/build.json").read_text())
    assert rec["record"]["imports"] == ["models.outputs", "models.pair"]  # Pair's module alone does not register it
    proc = _fresh_load(root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "Pair"


@pytest.mark.slow
def test_registration_no_import_makes_fails_the_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = _project(tmp_path, "factory")  # registered when build() runs: a loading process cannot get it
    code, out, data = run_cli(root, "build", "--json")
    assert code == 1 and statuses(data) == {"pair_export": "failed"}, out
    reason = data["targets"][0]["reason"]
    assert "does not load in a fresh process" in reason and "models.outputs" in reason, reason
    assert not (root / "build/pair_export/build.json").exists()


RECORD_BOTH_WAYS = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path

    import torch

    sys.path.insert(0, {root!r})
    import models.pair
    from aitune_build.inputs import export_dynamic_shapes
    from aitune_build.loadable import record_imports
    from aitune_build.manifest import load_manifest
    from aitune_build.spec import to_json

    m = load_manifest(Path({root!r}) / "aitune.toml").model
    specs = m.modules["pair"].inputs
    path = Path({art!r}) / "model.pt2"
    path.parent.mkdir()
    ep = torch.export.export(models.pair.build(), (), {{"x": torch.ones(2, 3)}}, dynamic_shapes=export_dynamic_shapes(specs))
    torch.export.save(ep, str(path))
    check = {{"backend": to_json(m.backends["exp"]), "inputs": [to_json(i) for i in specs]}}
    read = record_imports(path, Path({root!r}), "models.pair", check)  # a plugin's load() that set no ctx.program
    given = record_imports(path, Path({root!r}), "models.pair", check, torch.export.load(str(path)))
    print(json.dumps([read, given]))
    """)


@pytest.mark.slow
def test_the_import_record_is_the_same_whether_it_reads_the_artifact_or_is_given_the_checked_program(
        tmp_path: Path) -> None:
    """The worker hands record_imports the program its check loaded (a second read would deserialise a TensorRT
    engine again); without one (a backend whose load() does not set ctx.program) it reads the file: same record."""
    root = _project(tmp_path, "outputs")
    code = RECORD_BOTH_WAYS.format(root=str(root), art=str(tmp_path / "art"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": PKG_PARENT, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [["models.outputs"], ["models.outputs"]]


OPS = textwrap.dedent("""
    import torch


    @torch.library.custom_op("aitune_test::scale", mutates_args=())
    def scale(x: torch.Tensor) -> torch.Tensor:
        return x * 3


    @scale.register_fake
    def _(x):
        return torch.empty_like(x)
    """)
USES_OP = textwrap.dedent("""
    import torch
    import models.ops  # noqa: F401  (registers aitune_test::scale)


    class Scaled(torch.nn.Module):
        def forward(self, x):
            return torch.ops.aitune_test.scale(x) + 1


    def build():
        return Scaled()
    """)


@pytest.mark.slow
def test_custom_operator_module_is_recorded_and_imported_by_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make_project(tmp_path / "p", MANIFEST.replace("models.pair:build", "models.scaled:build"))
    (root / "models/ops.py").write_text(OPS)
    (root / "models/scaled.py").write_text(USES_OP)
    code, out, data = run_cli(root, "build", "--json")
    assert code == 0, out
    rec = json.loads((root / "build/pair_export/build.json").read_text())
    assert rec["record"]["imports"] == ["models.ops"]
    code = (
        "import torch, aitune_build\n"
        f"m = aitune_build.load('pair_export', manifest={str(root / 'aitune.toml')!r})\n"
        "print(float(m(torch.ones(2, 3)).sum()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root.parent,
                          env={"PYTHONPATH": PKG_PARENT, "PATH": "/usr/bin:/bin", "HOME": str(root.parent)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["24.0"]
