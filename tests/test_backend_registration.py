"""A backend kind is its own file plus one registration (issue 9, "Code shape").

tests/toy_backend.py declares the kind "toy" — its class and its config (fields, types, defaults, descriptions) — and
nothing else in aitune_build names it: the manifest's specs, the schema and its error messages, the rules for `from`,
the keys and a build in a worker process all come from that file and AITUNE_BACKENDS.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import MANIFEST, run_cli

REGISTRATION = "toy=tests.toy_backend:ToyBackend"

TOY = MANIFEST + """
[backends.toy]
kind = "toy"
label = "hello"

[targets.mlp_toy]
module = "mlp"
backend = "toy"

[targets.mlp_toy_from]
from = "mlp_export"
backend = "toy"
"""


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AITUNE_BACKENDS", REGISTRATION)


def _manifest_error(project: Path, text: str, *args: str) -> str:
    (project / "aitune.toml").write_text(text)
    code, out, _ = run_cli(project, *(args or ("status",)))
    assert code == 2, out
    assert "Traceback" not in out
    return out.strip().splitlines()[-1]


def test_unregistered_kind_is_unknown(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_BACKENDS", raising=False)
    line = _manifest_error(project, TOY)
    assert "aitune.toml: backends.toy.kind: unknown backend kind 'toy'" in line


def test_registered_kind_is_validated_from_its_own_declaration(project: Path, registered: None) -> None:
    from aitune_build.manifest import load_manifest

    (project / "aitune.toml").write_text(TOY)
    m = load_manifest(project / "aitune.toml")
    config = m.model.backends["toy"]
    assert type(config).__name__ == "ToyConfig"
    assert (config.kind, config.device, config.scale, config.label, config.mode, config.extra) == ("toy", "cpu", 1.0, "hello", "plain", {})
    assert config.precision == "float32"

    bad = TOY.replace('label = "hello"', "scal = 2.0")
    assert _manifest_error(project, bad).endswith(
        "aitune.toml: backends.toy.scal: unknown key 'scal' (did you mean 'scale'?); allowed: kind, device, scale, label, mode, extra")
    line = _manifest_error(project, TOY.replace('label = "hello"', 'scale = "big"'))
    assert "aitune.toml: backends.toy.scale: " in line and "number" in line
    line = _manifest_error(project, TOY.replace('label = "hello"', 'mode = "odd"'))
    assert "aitune.toml: backends.toy.mode: " in line and "'plain' or 'fancy'" in line
    # `from`: toy takes another target's artifact (its class says so) but does not feed one
    chained = TOY + '\n[targets.after_toy]\nfrom = "mlp_toy"\nbackend = "toy"\n'
    assert _manifest_error(project, chained).endswith(
        "aitune.toml: targets.after_toy.from: target 'mlp_toy' has backend kind 'toy'; 'from' takes an export target's .pt2")

    code, out, _ = run_cli(project, "schema")
    toy = json.loads(out)["$defs"]["ToyConfig"]
    assert toy["additionalProperties"] is False and toy["required"] == ["kind"]
    assert toy["properties"]["kind"]["const"] == "toy"
    assert toy["properties"]["scale"] == {"default": 1.0, "description": "Multiplies the output.", "title": "Scale", "type": "number"}


def test_bad_registration_is_one_line(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (project / "aitune.toml").write_text(TOY)
    for value, expected in (("toy", "AITUNE_BACKENDS: 'toy' is not of the form kind=package.module:BackendClass"),
                            ("export=tests.toy_backend:ToyBackend", "AITUNE_BACKENDS: 'export' is a built-in backend kind"),
                            ("toy=tests.no_such_module:ToyBackend", "AITUNE_BACKENDS: cannot find module 'tests.no_such_module'"),
                            ("toy=tests.toy_backend:ToyConfig", "backend kind 'toy': tests.toy_backend:ToyConfig is not a Backend subclass")):
        monkeypatch.setenv("AITUNE_BACKENDS", value)
        code, out, _ = run_cli(project, "status")
        assert code == 2 and expected in out and "Traceback" not in out, (value, out)


@pytest.mark.slow  # three builds in worker processes
def test_registered_kind_builds_keys_and_takes_from(project: Path, registered: None) -> None:
    (project / "aitune.toml").write_text(TOY)
    code, out, data = run_cli(project, "build", "mlp_toy", "mlp_toy_from", "--json")
    assert code == 0, out
    st = {t["name"]: t["status"] for t in data["targets"]}
    assert st == {"mlp_export": "built", "mlp_toy": "built", "mlp_toy_from": "built"}, out
    for name, upstream in (("mlp_toy", False), ("mlp_toy_from", True)):
        record = json.loads((project / "build" / name / "build.json").read_text())
        assert record["record"]["toy_label"] == "hello" and record["record"]["toy_from"] is upstream
        assert record["components"]["backend"] == {"kind": "toy", "device": "cpu", "scale": 1.0, "label": "hello",
                                                   "mode": "plain", "extra": {}}
    code, out, data = run_cli(project, "build", "mlp_toy", "--json")
    assert code == 0 and data["targets"][-1]["status"] == "cached", out

    # a field of the toy config is in the key: changing it makes the target stale, and explain names it
    (project / "aitune.toml").write_text(TOY.replace('label = "hello"', 'label = "hello"\nscale = 2.0'))
    code, out, data = run_cli(project, "build", "--dry-run", "mlp_toy", "--json")
    row = data["targets"][-1]
    assert code == 0 and row["status"] == "would-build", out
    assert "scale" in json.dumps(row["reasons"]), row
    # the check runs the loaded toy artifact: doubling the output no longer matches eager
    code, out, data = run_cli(project, "build", "mlp_toy", "--json")
    assert code != 0 and "check against eager failed" in json.dumps(data), out
    # a backend's notes (e.g. torch_tensorrt_jit: subgraphs that fell back to PyTorch) end the target's line
    (project / "aitune.toml").write_text(TOY.replace('label = "hello"', 'label = "hello"\nextra = { note = "ran on a toy" }'))
    code, out, data = run_cli(project, "build", "mlp_toy", "--json")
    assert code == 0 and data["targets"][-1]["reason"] == "built; ran on a toy", out
    assert json.loads((project / "build/mlp_toy/build.json").read_text())["record"]["notes"] == ["ran on a toy"]

    # the validation remembered for these bytes was made with toy registered: without it, the kind is unknown again
    import os

    del os.environ["AITUNE_BACKENDS"]
    code, out, _ = run_cli(project, "status")
    assert code == 2 and "unknown backend kind 'toy'" in out, out
