"""Incremental builds, from edges, failure isolation, crashes, corruption and concurrency, through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import age, run_cli, statuses, write_weights


def build(root: Path, *args: str) -> dict:
    code, out, data = run_cli(root, "build", "--json", *args)
    assert data is not None, out
    data["code"] = code
    return data


def test_incremental_rebuilds_only_what_changed(built_project: Path) -> None:
    project = built_project
    for f in project.rglob("*.py"):
        age(f)
    assert statuses(build(project)) == {"mlp_export": "cached", "mlp_eager": "cached", "adder_export": "cached"}
    assert all(t["reason"] == "up to date" for t in build(project)["targets"])

    # a helper two imports away from the mlp factory
    (project / "models/helpers/deep.py").write_text("import torch\n\n\ndef act(x):\n    return torch.tanh(x)\n")
    code, out, _ = run_cli(project, "explain", "mlp_export")
    assert "models/helpers/deep.py changed" in out
    code, out, _ = run_cli(project, "status")
    assert "stale        mlp_export  (models/helpers/deep.py changed)" in out
    assert "up-to-date   adder_export" in out
    assert statuses(build(project)) == {"mlp_export": "built", "mlp_eager": "built", "adder_export": "cached"}

    # weights
    write_weights(project, seed=5)
    assert statuses(build(project)) == {"mlp_export": "built", "mlp_eager": "built", "adder_export": "cached"}

    # a backend field: only the targets of that backend
    text = (project / "aitune.toml").read_text()
    (project / "aitune.toml").write_text(text.replace('kind = "export"', 'kind = "export"\nstrict = false\n') )
    assert statuses(build(project)) == {"mlp_export": "cached", "mlp_eager": "cached", "adder_export": "cached"}  # default value: same key
    (project / "aitune.toml").write_text(text.replace('[backends.ref]\nkind = "eager"', '[backends.ref]\nkind = "eager"\ndevice = "cpu"'))
    assert statuses(build(project))["mlp_eager"] == "cached"

    # input shape of one module
    (project / "aitune.toml").write_text(text.replace("min = 1, opt = 3, max = 6 }] },\n  { name = \"y\", shape = [{ dim = \"n\", min = 1, opt = 3, max = 6",
                                                      "min = 1, opt = 4, max = 6 }] },\n  { name = \"y\", shape = [{ dim = \"n\", min = 1, opt = 4, max = 6"))
    code, out, _ = run_cli(project, "explain", "adder_export")
    assert "module.inputs[0].shape[0].opt: 3 -> 4" in out
    assert statuses(build(project)) == {"mlp_export": "cached", "mlp_eager": "cached", "adder_export": "built"}

    # args
    (project / "aitune.toml").write_text(text.replace("args = { hidden = 8 }", "args = { hidden = 8 }\nsources = ['models/*.py']"))
    assert statuses(build(project))["mlp_export"] == "built"  # sources globs are part of the key too


def test_build_json_records_key_components_toolchain_timings_and_check(built_project: Path) -> None:
    project = built_project
    assert build(project, "adder_export")["code"] == 0
    rec = json.loads((project / "build/adder_export/build.json").read_text())
    assert rec["key"] and rec["artifact"] == "model.pt2" and (project / "build/adder_export/model.pt2").is_file()
    assert rec["toolchain"]["torch"].startswith("torch ")
    assert set(rec["check"]["variants"]) == {"min", "opt", "max"}
    assert rec["check"]["variants"]["max"]["shapes"] == {"x": [6], "y": [6]}
    assert rec["check"]["max_abs_err"] == 0.0
    assert rec["timings"]["build"] > 0
    assert (project / "build/adder_export/build.log").is_file()


def test_named_target_builds_with_upstreams_only_and_dry_run_builds_nothing(project: Path) -> None:
    code, out, data = run_cli(project, "build", "--dry-run", "--json")
    assert {t["name"]: t["status"] for t in data["targets"]} == {n: "would-build" for n in ("mlp_export", "mlp_eager", "adder_export")}
    assert data["targets"][0]["reasons"] == ["never built"]
    assert not (project / "build").exists()
    assert statuses(build(project, "mlp_eager")) == {"mlp_eager": "built"}
    code, out, _ = run_cli(project, "build", "-n")
    assert "up-to-date   mlp_eager" in out and "would-build  mlp_export  (never built)" in out


def test_force_rebuilds(built_project: Path) -> None:
    assert statuses(build(built_project, "mlp_eager", "-f")) == {"mlp_eager": "built"}


def test_restored_from_cache_after_clean_and_corrupt_entry_is_rebuilt(built_project: Path) -> None:
    project = built_project
    key = json.loads((project / "build/adder_export/build.json").read_text())["key"]
    run_cli(project, "clean", "adder_export")
    again = build(project, "adder_export")
    assert again["targets"][0]["status"] == "cached" and again["targets"][0]["reason"] == "restored from cache"
    # flip a byte in the store's copy, then ask for it again
    objects = list((project / ".aitune/store-v1/objects" / key[:2] / key).rglob("model.pt2"))
    assert len(objects) == 1
    data = bytearray(objects[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    objects[0].write_bytes(bytes(data))
    run_cli(project, "clean", "adder_export")
    with pytest.warns(UserWarning, match="corrupt"):
        rebuilt = build(project, "adder_export")
    assert rebuilt["targets"][0]["status"] == "built"
    assert (project / "build/adder_export/model.pt2").read_bytes() != bytes(data)


def test_modified_output_is_restored(built_project: Path) -> None:
    project = built_project
    art = project / "build/adder_export/model.pt2"
    good = art.read_bytes()
    art.write_bytes(b"garbage")
    res = build(project, "adder_export")["targets"][0]
    assert res["status"] == "cached" and res["reason"] == "restored from cache"
    assert art.read_bytes() == good


def test_crash_in_worker_fails_that_target_only(project: Path) -> None:
    (project / "models/crash.py").write_text("import os, signal\n\n\ndef build():\n    os.kill(os.getpid(), signal.SIGSEGV)\n")
    text = (project / "aitune.toml").read_text() + '\n[modules.crash]\nfactory = "models.crash:build"\ninputs = [{ name = "x", shape = [2] }]\n' \
        '[targets.crash_eager]\nmodule = "crash"\nbackend = "ref"\n'
    (project / "aitune.toml").write_text(text)
    data = build(project, "-k", "crash_eager", "mlp_eager")
    st = {t["name"]: t for t in data["targets"]}
    assert data["code"] == 1
    assert st["crash_eager"]["status"] == "failed" and "SIGSEGV" in st["crash_eager"]["reason"]
    assert st["mlp_eager"]["status"] == "built"
    assert data["summary"]["failed"] == 1 and data["summary"]["built"] == 1


def test_failed_build_keeps_previous_output_and_skips_dependents(built_project: Path) -> None:
    project = built_project
    before = (project / "build/mlp_eager/build.json").read_bytes()
    (project / "models/mlp.py").write_text((project / "models/mlp.py").read_text().replace("return MLP(hidden)", "raise RuntimeError('boom')"))
    data = build(project, "mlp_eager")
    assert data["targets"][0]["status"] == "failed" and data["code"] == 2
    assert (project / "build/mlp_eager/build.json").read_bytes() == before
    assert "boom" in (project / "build/mlp_eager/build.log").read_text()


def test_check_mismatch_fails_and_caches_nothing(project: Path) -> None:
    # a model whose output depends on hidden state the export cannot see: each call differs
    (project / "models/noisy.py").write_text(
        "import torch\n\n\nclass Noisy(torch.nn.Module):\n    def forward(self, x):\n        return x + torch.rand(x.shape)\n\n\n"
        "def build():\n    return Noisy()\n")
    text = (project / "aitune.toml").read_text() + '\n[modules.noisy]\nfactory = "models.noisy:build"\ninputs = [{ name = "x", shape = [64] }]\n' \
        '[targets.noisy_export]\nmodule = "noisy"\nbackend = "exp"\n'
    (project / "aitune.toml").write_text(text)
    res = build(project, "noisy_export")["targets"][0]
    assert res["status"] == "failed" and "check against eager failed" in res["reason"]
    assert not list((project / ".aitune/store-v1/objects").rglob("entry.json"))


@pytest.mark.slow
def test_two_processes_build_one_key_once(project: Path) -> None:
    cmd = [sys.executable, "-m", "aitune_build", "-C", str(project), "build", "adder_export", "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    got = sorted(o["targets"][0]["status"] for o in outs)
    assert got == ["built", "cached"], outs
    assert len(list((project / ".aitune/store-v1/objects").rglob("entry.json"))) == 1


@pytest.mark.slow
def test_parallel_jobs(project: Path) -> None:
    data = build(project, "-j", "2")
    assert data["code"] == 0 and data["summary"]["built"] == 3


def test_noop_build_status_and_explain_never_import_torch_or_pydantic(built_project: Path) -> None:
    project = built_project
    probe = (
        "import sys\nfrom aitune_build.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'pydantic' not in sys.modules, 'pydantic was imported for a manifest validated before'\nprint('no torch')\n"
    )
    for args in (["build"], ["status"], ["explain", "mlp_export"], ["build", "--dry-run"], ["graph"]):
        out = subprocess.run([sys.executable, "-c", probe, "-C", str(project), *args], capture_output=True, text=True)
        assert out.returncode == 0 and "no torch" in out.stdout, (args, out.stdout, out.stderr)


def test_unavailable_backend_is_skipped_when_building_all_and_failed_when_named(built_project: Path) -> None:
    project = built_project
    text = (project / "aitune.toml").read_text() + '\n[backends.trt]\nkind = "torch_tensorrt_aot"\n[targets.mlp_trt]\nmodule = "mlp"\nbackend = "trt"\n'
    (project / "aitune.toml").write_text(text)
    from aitune_build.backends import backend_for
    from aitune_build.manifest import backend_config
    from aitune_build.schema import normalise_backend

    reason = backend_for("torch_tensorrt_aot")(backend_config(normalise_backend({"kind": "torch_tensorrt_aot"}))).unavailable()
    if reason is None:
        pytest.skip("torch_tensorrt and a GPU are present: the backend can run here")
    all_ = build(project)
    st = {t["name"]: t for t in all_["targets"]}
    assert st["mlp_trt"]["status"] == "skipped"
    assert "pip install torch-tensorrt" in st["mlp_trt"]["reason"] or "GPU" in st["mlp_trt"]["reason"]
    assert all_["code"] == 0
    named = build(project, "mlp_trt")
    assert named["targets"][0]["status"] == "failed" and named["code"] == 1


def test_graph_formats(project: Path) -> None:
    code, out, _ = run_cli(project, "graph", "--format", "mermaid")
    assert code == 0 and "module_mlp -->|export| mlp_export" in out
    code, out, _ = run_cli(project, "graph")
    assert '"module:mlp" -> "mlp_export" [label="export"];' in out


def test_gc_removes_least_recently_used_first(built_project: Path) -> None:
    project = built_project
    code, out, data = run_cli(project, "gc", "--max-size", "0", "--json")
    assert code == 0 and len(data["removed"]) == 3 and data["bytes_left"] == 0
    code, out, _ = run_cli(project, "gc", "--max-size", "lots")
    assert code == 2 and "cannot read 'lots' as a size" in out
