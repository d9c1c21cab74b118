"""Serving built artifacts into an unmodified application: `aitune-build run`, autowrapt, `record`.

The application is a script of its own (no aitune import) run in a subprocess; the hook's AITUNE_SERVE_DEBUG record
says which calls the artifact served, and the script checks every output against a functional re-implementation of
the model (so an eager fallback or a served call that computes something else both show up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import MANIFEST, make_project, run_cli

REPO = Path(__file__).resolve().parent.parent
SERVED = MANIFEST.replace('[targets.mlp_export]\nmodule = "mlp"\nbackend = "exp"\n',
                          '[targets.mlp_export]\nmodule = "mlp"\nbackend = "exp"\nserve = true\n')

# The application: builds the model itself, loads its weights, calls it. Every output is compared with the same
# math done functionally (never through the module), and written to argv[1].
APP = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from models.mlp import MLP

    def reference(sd, x):
        return F.linear(torch.relu(F.linear(x, sd["a.weight"], sd["a.bias"])), sd["b.weight"], sd["b.bias"])

    torch.manual_seed(1)
    model = MLP(8)
    model.load_state_dict(torch.load("weights/mlp.pt"))
    model.eval()
    other = MLP(8).eval()  # other weights: must run eager
    errors, calls = [], []

    def call(m, x, label):
        with torch.no_grad():
            got = m(x)
            want = reference({k: v for k, v in m.state_dict().items()}, x)
        calls.append(label)
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
            errors.append(label)

    for b in (1, 4, 8):
        call(model, torch.randn(b, 4), f"served{b}")
    call(model, torch.randn(9, 4), "out_of_range")
    call(other, torch.randn(2, 4), "other_weights")
    model.train()
    call(model, torch.randn(2, 4), "training")
    model.eval()
    call(model, torch.randn(2, 4), "served_again")
    model.b = torch.nn.Linear(8, 2)  # a new submodule after the first call: checked again, runs eager
    call(model, torch.randn(2, 4), "replaced")
    model.load_state_dict(other.state_dict())
    call(model, torch.randn(2, 4), "reloaded")
    json.dump({"calls": calls, "errors": errors}, open(sys.argv[1], "w"))
""")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AITUNE_", "AUTOWRAPT_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _py(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=600)


def _served_project(root: Path, cache: Path, build: bool = True) -> Path:
    make_project(root, SERVED)
    (root / "app.py").write_text(APP)
    if build:
        os.environ["AITUNE_CACHE_DIR"] = str(cache)
        try:
            code, out, _ = run_cli(root, "build", "mlp_export")
        finally:
            del os.environ["AITUNE_CACHE_DIR"]
        assert code == 0, out
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """A project whose served target mlp_export is built (shared by the tests that do not change it)."""
    return _served_project(tmp_path_factory.mktemp("built") / "proj", cache)


def _served_run(project: Path, tmp: Path, *run_args: str, **env: str) -> tuple[subprocess.CompletedProcess, dict, dict]:
    out, debug = tmp / "out.json", tmp / "debug.json"
    proc = _py(["-m", "aitune_build", "-C", str(project), "run", "--debug", str(debug), *run_args, "--",
                sys.executable, "app.py", str(out)], cwd=project, **{"AITUNE_CACHE_DIR": str(tmp / "no-cache"), **env})
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text()), json.loads(debug.read_text())


@pytest.mark.slow
def test_run_serves_the_export_artifact_and_runs_eager_whatever_does_not_match(built: Path, tmp_path: Path) -> None:
    proc, result, debug = _served_run(built, tmp_path)
    assert result["errors"] == [] and len(result["calls"]) == 9
    t = debug["targets"]["mlp_export"]
    assert t["status"] == "serving"
    assert t["served_calls"] == 4  # batches 1, 4, 8 (inside the built range [1..8]) and 2 after eval() again
    # where a served start's time went (the GPU serving benchmark reports these)
    assert set(t["timings"]) == {"check", "weights_digest", "load", "first_call"}, t["timings"]
    assert all(isinstance(v, float) and 0 <= v < 60 for v in t["timings"].values()), t["timings"]
    # batch 9 (out of range), another instance's weights, training mode, a replaced submodule, weights loaded later
    assert t["eager_reasons"] == {"shape": 1, "weights": 3, "training": 1}
    err = proc.stderr
    assert "mlp_export: input 'x' has shape [9, 4]; the artifact takes [1..8, 4]; this call runs eager" in err
    assert "mlp_export: this MLP's parameters and buffers differ from the weights the target was built with" in err
    assert err.count("[9, 4]") == 1 and err.count("differ from the weights") == 1  # warned once each


@pytest.mark.slow
def test_autowrapt_bootstrap_serves_without_aitune_build_run(built: Path, tmp_path: Path) -> None:
    """AUTOWRAPT_BOOTSTRAP=aitune_build python app.py: autowrapt finds our entry point group (registered in
    pyproject.toml; here installed as the dist-info that `pip install` of this checkout would write)."""
    import tomllib

    entry_points = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["aitune_build"]
    dist = tmp_path / "site" / "aitune_build-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aitune-build\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[aitune_build]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    out, debug = tmp_path / "out.json", tmp_path / "debug.json"
    env = _env(AUTOWRAPT_BOOTSTRAP="aitune_build", AITUNE_MANIFEST=str(built / "aitune.toml"), AITUNE_SERVE_DEBUG=str(debug),
               AITUNE_CACHE_DIR=str(tmp_path / "no-cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), str(REPO)])
    proc = subprocess.run([sys.executable, "app.py", str(out)], cwd=built, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["errors"] == []
    assert json.loads(debug.read_text())["targets"]["mlp_export"]["served_calls"] == 4


@pytest.mark.slow
def test_stale_or_missing_target_runs_eager_and_says_how_to_build_or_builds_on_start(tmp_path: Path, cache: Path) -> None:
    project = _served_project(tmp_path / "proj", cache, build=False)
    proc, result, debug = _served_run(project, tmp_path)
    assert result["errors"] == []
    assert debug["targets"]["mlp_export"]["status"] == "not served"
    assert "mlp_export is not built; its module runs eager. Build it: aitune-build" in proc.stderr
    # AITUNE_BUILD_ON_START=1 (run --build-on-start): built first, progress on stderr, then served.
    proc, result, debug = _served_run(project, tmp_path, "--build-on-start", AITUNE_CACHE_DIR=str(cache))
    assert "aitune-build: serve: built" in proc.stderr or "aitune-build: serve: cached" in proc.stderr, proc.stderr
    assert result["errors"] == [] and debug["targets"]["mlp_export"]["served_calls"] == 4
    # A tampered artifact is stale ("output files are missing or modified"): never served, the app still runs.
    artifact = project / "build" / "mlp_export" / "model.pt2"
    artifact.write_bytes(b"not a program" + artifact.read_bytes()[12:])
    proc, result, debug = _served_run(project, tmp_path)
    assert result["errors"] == []
    assert debug["targets"]["mlp_export"]["status"] == "not served"
    assert "output files are missing or modified" in proc.stderr and "Rebuild it" in proc.stderr


RECORD_APP = textwrap.dedent("""
    import torch
    from models.mlp import MLP
    from models.adder import Adder

    model = MLP(hidden=8)
    model.load_state_dict(torch.load("weights/mlp.pt"))
    model.eval()
    adder = Adder().eval()
    with torch.no_grad():
        for b in (2, 4, 4, 4, 6):
            model(torch.randn(b, 4))
        for n in (3, 5, 5):
            adder(torch.randn(n), torch.randn(n))
""")


@pytest.mark.slow
def test_record_writes_a_manifest_that_builds_covers_the_traffic_and_serves(tmp_path: Path, cache: Path) -> None:
    project = make_project(tmp_path / "proj", '[project]\nname = "rec"  # a comment record keeps\n')
    (project / "app.py").write_text(RECORD_APP)
    proc = _py(["-m", "aitune_build", "-C", str(project), "record", "--", sys.executable, "app.py"], cwd=project)
    assert proc.returncode == 0, proc.stderr
    text = (project / "aitune.toml").read_text()
    assert text.startswith('[project]\nname = "rec"  # a comment record keeps\n')
    umask = os.umask(0)
    os.umask(umask)
    assert (project / "aitune.toml").stat().st_mode & 0o777 == 0o666 & ~umask  # the umask's mode, not mkstemp's 0600
    import tomllib

    m = tomllib.loads(text)
    assert m["modules"]["mlp"]["factory"] == "models.mlp:MLP" and m["modules"]["mlp"]["args"] == {"hidden": 8}
    assert m["modules"]["mlp"]["weights"] == "weights/mlp.pt"
    assert m["modules"]["mlp"]["inputs"] == [{"name": "x", "dtype": "float32",
                                              "shape": [{"dim": "batch", "min": 2, "opt": 4, "max": 6}, 4]}]
    adder = m["modules"]["adder"]["inputs"]
    assert [i["shape"] for i in adder] == [[{"dim": "batch", "min": 3, "opt": 5, "max": 5}]] * 2  # tied: one dim
    assert m["targets"]["mlp_export"] == {"module": "mlp", "backend": "export", "serve": True}
    os.environ["AITUNE_CACHE_DIR"] = str(cache)
    try:
        code, out, _ = run_cli(project, "build", "mlp_export", "adder_export")
    finally:
        del os.environ["AITUNE_CACHE_DIR"]
    assert code == 0, out
    debug = tmp_path / "debug.json"
    proc = _py(["-m", "aitune_build", "-C", str(project), "run", "--debug", str(debug), "--", sys.executable, "app.py"],
               cwd=project, AITUNE_CACHE_DIR=str(cache))
    assert proc.returncode == 0, proc.stderr
    targets = json.loads(debug.read_text())["targets"]
    assert (targets["mlp_export"]["served_calls"], targets["mlp_export"]["eager_calls"]) == (5, 0), proc.stderr
    assert (targets["adder_export"]["served_calls"], targets["adder_export"]["eager_calls"]) == (3, 0), proc.stderr
    # Recording one chosen class again updates its inputs in place and leaves every other line as it was.
    (project / "app2.py").write_text("import torch\nfrom models.adder import Adder\nfrom models.mlp import MLP\n"
                                     "a = Adder().eval()\nMLP(hidden=8)(torch.randn(1, 4))\n"
                                     "for n in (4, 9, 9):\n    a(x=torch.randn(n), y=torch.randn(n))\n")
    before = (project / "aitune.toml").read_text()
    proc = _py(["-m", "aitune_build", "-C", str(project), "record", "--module", "models.adder:Adder", "--", sys.executable,
                "app2.py"], cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert "updated modules.adder" in proc.stdout and "kept targets.adder_export" in proc.stdout, proc.stdout
    after = (project / "aitune.toml").read_text()
    old_inputs = before[before.index("[modules.adder]"):].split("inputs = ", 1)[1].split("\n]\n", 1)[0]
    new_inputs = after[after.index("[modules.adder]"):].split("inputs = ", 1)[1].split("\n]\n", 1)[0]
    assert after == before.replace(old_inputs, new_inputs)
    assert tomllib.loads(after)["modules"]["adder"]["inputs"][0]["shape"] == [{"dim": "batch", "min": 4, "opt": 9, "max": 9}]


# --- fast: no torch in the child, or no child at all ---------------------------------------------------------------


def _hook_env(manifest: Path, **extra: str) -> dict[str, str]:
    from aitune_build.serve.launch import SITE_DIR

    env = _env(AITUNE_MANIFEST=str(manifest), **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), str(REPO)])
    return env


def test_hook_start_imports_no_torch_and_says_how_to_build(tmp_path: Path) -> None:
    project = _served_project(tmp_path / "proj", tmp_path, build=False)
    debug = tmp_path / "debug.json"
    proc = subprocess.run([sys.executable, "-c", "import sys; print('torch' in sys.modules)"], cwd=tmp_path,
                          env=_hook_env(project / "aitune.toml", AITUNE_SERVE_DEBUG=str(debug)), capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
    assert "mlp_export is not built; its module runs eager. Build it: aitune-build --manifest" in proc.stderr
    assert json.loads(debug.read_text())["torch_imported"] is False


@pytest.mark.parametrize("manifest_text", ["[project\nname = 'x'", None])
def test_hook_failure_is_one_warning_and_the_app_runs(tmp_path: Path, manifest_text: str | None) -> None:
    manifest = tmp_path / "aitune.toml"
    if manifest_text is not None:
        manifest.write_text(manifest_text)
    proc = subprocess.run([sys.executable, "-c", "print('app ran')"], cwd=tmp_path, env=_hook_env(manifest),
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "app ran\n"
    assert proc.stderr.count("aitune-build: serve:") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_one_served_target_per_module(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", SERVED.replace('[targets.mlp_eager]\nmodule = "mlp"\nbackend = "ref"\n',
                                                             '[targets.mlp_eager]\nmodule = "mlp"\nbackend = "ref"\nserve = true\n'))
    code, out, _ = run_cli(project, "status")
    assert code == 2
    assert out.strip() == ("aitune-build: error: aitune.toml: targets.mlp_eager.serve: module 'mlp' is already served by "
                           "target 'mlp_export'; set serve = true on one target per module"), out


def test_run_without_a_served_target_is_a_user_error(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj")
    code, out, _ = run_cli(project, "run", "--", "true")
    assert code == 2 and "no target has serve = true" in out


def test_post_import_hook_runs_after_the_module_and_keeps_its_loader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    from aitune_build.serve.imports import when_imported

    (tmp_path / "aitune_hooked_mod.py").write_text("class Net:\n    pass\nVALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    when_imported("aitune_hooked_mod", lambda m: seen.append(m.VALUE))
    assert seen == []
    import aitune_hooked_mod  # noqa: F401

    assert seen == [1]
    assert "class Net" in inspect.getsource(aitune_hooked_mod.Net)  # the real loader still serves the source
    when_imported("aitune_hooked_mod", lambda m: seen.append(2))  # already imported: called at once
    assert seen == [1, 2]
    del sys.modules["aitune_hooked_mod"]


def test_recorded_shapes_become_ranges_with_tied_axes_sharing_a_dim() -> None:
    from aitune_build.serve.manifest_edit import Recorded, input_specs

    rec = Recorded("m", "C", None)
    calls = [([["ids", "int64", [2, 7]], ["mask", "bool", [2, 7]], ["scale", "float32", [1]]], 3),
             ([["ids", "int64", [2, 12]], ["mask", "bool", [2, 12]], ["scale", "float32", [1]]], 5),
             ([["ids", "int64", [2, 30]], ["mask", "bool", [2, 30]]], 1)]
    for sig, n in calls:
        rec.signatures[repr(sig)] += n
        rec.by_repr[repr(sig)] = sig
    rec.values = {"ids": [0, 99]}
    specs, notes = input_specs(rec)
    seq = {"dim": "ids_1", "min": 7, "opt": 12, "max": 30}
    assert specs == [{"name": "ids", "shape": [2, seq], "dtype": "int64", "range": [0, 100]},
                     {"name": "mask", "shape": [2, seq], "dtype": "bool"}]
    assert notes == ["input 'scale' was passed in some calls only: left out (calls with it run eager)"]


def test_manifest_edit_replaces_only_the_inputs_value(tmp_path: Path) -> None:
    from aitune_build.serve.manifest_edit import replace_key

    text = textwrap.dedent("""\
        [project]
        name = "p"

        [modules.mlp]  # the model
        factory = "models.mlp:build"
        inputs = [
          { name = "x", shape = [2, 4] },  # old ] guess
        ]
        weights = "w.pt"

        [targets.t]
        module = "mlp"
        """)
    new = replace_key(text, "modules.mlp", "inputs", '[{ name = "x", shape = [3, 4] }]', "aitune.toml")
    assert new == text.replace('[\n  { name = "x", shape = [2, 4] },  # old ] guess\n]', '[{ name = "x", shape = [3, 4] }]')


@pytest.mark.slow
def test_run_serves_an_aotinductor_artifact(tmp_path: Path, cache: Path) -> None:
    """An inductor_aot target (built from the export target's program) served the same way (~1 min on 2 cores)."""
    text = MANIFEST + '\n[backends.aoti]\nkind = "inductor_aot"\n\n[targets.mlp_aoti]\nfrom = "mlp_export"\nbackend = "aoti"\nserve = true\n'
    project = make_project(tmp_path / "proj", text)
    (project / "app.py").write_text(APP)
    os.environ["AITUNE_CACHE_DIR"] = str(cache)
    try:
        code, out, _ = run_cli(project, "build", "mlp_aoti")
    finally:
        del os.environ["AITUNE_CACHE_DIR"]
    assert code == 0, out
    proc, result, debug = _served_run(project, tmp_path)
    assert result["errors"] == []
    t = debug["targets"]["mlp_aoti"]
    assert (t["status"], t["served_calls"]) == ("serving", 4), proc.stderr
    assert t["eager_reasons"] == {"shape": 1, "weights": 3, "training": 1}
