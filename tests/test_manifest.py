"""One case per bad input: exit code 2, one line naming the file and the key, no traceback, nothing lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aitune_build.schema import manifest_schema

from .conftest import MANIFEST, run_cli

BASE = MANIFEST.split("[targets.mlp_export]")[0]

CASES = {
    "malformed_toml": ("[project\nname = 'x'", "aitune.toml: invalid TOML"),
    "unknown_top_key": (MANIFEST + "\n[extras]\nx = 1\n", "aitune.toml: extras: unknown key 'extras'"),
    "unknown_target_key": (BASE + '[targets.t]\nmodule = "mlp"\nbackend = "exp"\nbakend = "x"\n',
                           "aitune.toml: targets.t.bakend: unknown key 'bakend' (did you mean 'backend'?)"),
    "wrong_type": (BASE.replace("hidden = 8", "hidden = 8") + '[targets.t]\nmodule = "mlp"\nbackend = "exp"\ncheck = { rtol = "big" }\n',
                   "aitune.toml: targets.t.check.rtol"),
    "unknown_from": (BASE + '[backends.aoti]\nkind = "inductor_aot"\n[targets.e]\nmodule = "mlp"\nbackend = "exp"\n'
                     '[targets.t]\nfrom = "ee"\nbackend = "aoti"\n', "aitune.toml: targets.t.from: unknown target 'ee' (did you mean 'e'?)"),
    "unknown_module": (BASE + '[targets.t]\nmodule = "mpl"\nbackend = "exp"\n', "targets.t.module: unknown module 'mpl' (did you mean 'mlp'?)"),
    "unknown_backend": (BASE + '[targets.t]\nmodule = "mlp"\nbackend = "exq"\n', "targets.t.backend: unknown backend 'exq' (did you mean 'exp'?)"),
    "cycle": (BASE + '[backends.aoti]\nkind = "inductor_aot"\n[targets.a]\nfrom = "b"\nbackend = "aoti"\n[targets.b]\nfrom = "a"\nbackend = "aoti"\n',
              "cycle in 'from' edges: a -> b -> a"),
    "bad_target_name": (BASE + '[targets."my target"]\nmodule = "mlp"\nbackend = "exp"\n', "names may use letters, digits"),
    "bad_dtype": (BASE.replace('shape = [{ dim = "batch", min = 1, opt = 4, max = 8 }, 4]', 'shape = [2, 4], dtype = "flaot32"'),
                  "modules.mlp.inputs[0].dtype: unknown dtype 'flaot32' (did you mean 'float32'?)"),
    "bad_shape": (BASE.replace("min = 1, opt = 4, max = 8", "min = 1, opt = 9, max = 8"), "modules.mlp.inputs[0].shape[0]: need min <= opt <= max"),
    "shape_not_int": (BASE.replace('{ dim = "batch", min = 1, opt = 4, max = 8 }, 4]', '"b", 4]'), "modules.mlp.inputs[0].shape[0]: expected an integer"),
    "missing_weights": (BASE.replace("weights/mlp.pt", "weights/nope.pt"), "modules.mlp.weights: file not found: weights/nope.pt"),
    "missing_factory_module": (BASE.replace("models.mlp:build", "models.mpl:build"), "modules.mlp.factory: cannot find module 'models.mpl'"),
    "missing_factory_fn": (BASE.replace("models.mlp:build", "models.mlp:biuld"), "modules.mlp.factory: 'models.mlp' defines no 'biuld' (did you mean 'build'?)"),
    "bad_factory_form": (BASE.replace("models.mlp:build", "models/mlp.py"), "modules.mlp.factory: 'models/mlp.py' is not of the form"),
    "unknown_backend_kind": (BASE + '[backends.x]\nkind = "tensorrt"\n', "backends.x.kind: unknown backend kind 'tensorrt'"),
    "backend_unknown_key": (BASE + '[backends.x]\nkind = "export"\nstrikt = true\n', "backends.x.strikt: unknown key 'strikt' (did you mean 'strict'?)"),
    "shared_dim_mismatch": (BASE.replace('{ dim = "n", min = 1, opt = 3, max = 6 }] },\n]', '{ dim = "n", min = 1, opt = 3, max = 7 }] },\n]'),
                            "dim 'n' is declared with other min/opt/max"),
    "missing_project": ("[modules]\n", "aitune.toml: project: required key is missing"),
    "target_both_sources": (BASE + '[targets.t]\nmodule = "mlp"\nfrom = "x"\nbackend = "exp"\n', "set exactly one of 'module' or 'from'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_manifest(project: Path, case: str) -> None:
    text, expected = CASES[case]
    (project / "aitune.toml").write_text(text)
    for command in (["build"], ["status"], ["build", "--dry-run"]):
        code, out, _ = run_cli(project, *command)
        assert code == 2, out
        assert expected in out, out
        assert "Traceback" not in out
        assert out.count("\n") == 1, out  # one line


def test_bad_manifest_loses_nothing_built(project: Path) -> None:
    code, out, _ = run_cli(project, "build", "mlp_eager")
    assert code == 0, out
    before = (project / "build/mlp_eager/build.json").read_bytes()
    good = (project / "aitune.toml").read_text()
    (project / "aitune.toml").write_text(good + "\n[targets.x]\nmodule = 'nope'\nbackend = 'exp'\n")
    assert run_cli(project, "build")[0] == 2
    assert (project / "build/mlp_eager/build.json").read_bytes() == before
    (project / "aitune.toml").write_text(good)
    code, out, data = run_cli(project, "build", "mlp_eager", "--json")
    assert data["targets"][0]["status"] == "cached"


def test_input_name_not_in_forward_is_a_user_error(project: Path) -> None:
    text = (project / "aitune.toml").read_text().replace('{ name = "x", shape = [{ dim = "batch"', '{ name = "inp", shape = [{ dim = "batch"')
    (project / "aitune.toml").write_text(text)
    code, out, data = run_cli(project, "build", "mlp_eager", "--json")
    assert code == 2
    assert "modules.mlp.inputs[0].name: 'inp' is not a parameter of MLP.forward(x)" in data["targets"][0]["reason"]


def test_factory_that_raises_is_a_user_error_and_others_build(project: Path) -> None:
    (project / "models/broken.py").write_text("def build():\n    raise ValueError('no such checkpoint')\n")
    text = (project / "aitune.toml").read_text() + '\n[modules.broken]\nfactory = "models.broken:build"\ninputs = [{ name = "x", shape = [2] }]\n' \
        '[targets.broken_eager]\nmodule = "broken"\nbackend = "ref"\n'
    (project / "aitune.toml").write_text(text)
    code, out, data = run_cli(project, "build", "--keep-going", "mlp_eager", "broken_eager", "--json")
    assert code == 2
    st = {t["name"]: t for t in data["targets"]}
    assert st["mlp_eager"]["status"] == "built"
    assert st["broken_eager"]["status"] == "failed"
    assert "modules.broken.factory: models.broken:build(**args) raised ValueError: no such checkpoint" in st["broken_eager"]["reason"]


def test_schema_command_matches_committed_copy() -> None:
    committed = json.loads((Path(__file__).parent.parent / "schemas/aitune.schema.json").read_text())
    assert committed == manifest_schema()
    code, out, _ = run_cli(Path("."), "schema")
    assert json.loads(out) == committed


def test_runtime_specs_have_the_schema_fields() -> None:
    """manifest.py's frozen specs and schema.py's pydantic models describe one contract: same tables, same fields.
    A backend's model is derived from the config its backend declares: one per registered kind."""
    from aitune_build import manifest, schema
    from aitune_build.vocabulary import backend_kinds

    model = schema.manifest_model()
    pairs = [(schema.Project, manifest.ProjectSettings), (schema.Axis, manifest.Axis), (schema.InputModel, manifest.InputSpec),
             (schema.ModuleSpec, manifest.ModuleSpec), (schema.CheckSpec, manifest.CheckSpec),
             (schema.TargetSpec, manifest.TargetSpec), (model, manifest.Manifest)]
    pairs += [(schema.TypeAdapter(schema.backend_union()).validate_python({"kind": k}).__class__, manifest.config_class(k))
              for k in backend_kinds()]
    assert len(pairs) == 7 + 6
    for model, spec in pairs:
        assert set(model.model_fields) == set(spec.fields), (model.__name__, spec.__name__)


def test_unchanged_manifest_is_not_validated_again(project: Path) -> None:
    """The stat cache remembers the validated manifest by digest: the second run never imports pydantic."""
    import subprocess
    import sys

    probe = ("import sys\nfrom aitune_build.project import Project\np = Project.open(sys.argv[1])\np.close()\n"
             "print(sorted(p.manifest.model.targets), 'pydantic' in sys.modules)\n")
    runs = [subprocess.run([sys.executable, "-c", probe, str(project / "aitune.toml")], capture_output=True, text=True)
            for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr
    assert runs[0].stdout.split("]")[1].strip() == "True"  # first sight: validated by pydantic
    assert runs[1].stdout.split("]")[1].strip() == "False"  # same bytes: taken from the state file
    assert runs[0].stdout.split("]")[0] == runs[1].stdout.split("]")[0]
    # a damaged record is never served: the manifest is validated again
    state = project / ".aitune/state-v2.json"
    data = json.loads(state.read_text())
    data["manifests"] = {k: {"project": {}} for k in data["manifests"]}
    state.write_text(json.dumps(data))
    again = subprocess.run([sys.executable, "-c", probe, str(project / "aitune.toml")], capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == runs[0].stdout, again.stderr
    # a changed manifest is validated again: a bad value is caught, not served from the memo
    (project / "aitune.toml").write_text((project / "aitune.toml").read_text().replace('kind = "export"', 'kind = "export"\nstrikt = true'))
    bad = subprocess.run([sys.executable, "-c", probe, str(project / "aitune.toml")], capture_output=True, text=True)
    assert bad.returncode != 0 and "backends.exp.strikt: unknown key 'strikt'" in bad.stderr


def test_dist_version_agrees_with_importlib_metadata() -> None:
    """toolchain reads versions from dist-info folder names (importlib.metadata is slow to import): same answers."""
    import importlib.metadata as md

    from aitune_build.toolchain import _installed, dist_version

    dist_version.cache_clear()  # both read sys.path as it is now (imports such as setuptools' extend it)
    _installed.cache_clear()
    names = {d.metadata["Name"] for d in md.distributions()}
    assert {"torch", "pydantic", "click"} <= names
    for name in names:
        assert dist_version(name) == (name, md.version(name)), name
    assert dist_version("no-such-distribution-here") is None
