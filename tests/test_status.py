"""What dry runs, status and explain know (the cache, the last failure), truthful statuses after a failure, and
failures that stay with the targets whose files are broken."""

from __future__ import annotations

from pathlib import Path

from .conftest import MANIFEST, run_cli, statuses

FROM_EDGE = MANIFEST + '\n[targets.adder_from]\nfrom = "adder_export"\nbackend = "ref"\n'


def _build(root: Path, *args: str) -> dict:
    code, out, data = run_cli(root, "build", "--json", *args)
    assert data is not None, out
    data["code"] = code
    return data


def test_dry_run_status_and_explain_know_what_the_cache_holds(project: Path) -> None:
    (project / "aitune.toml").write_text(FROM_EDGE)
    assert _build(project, "adder_from")["code"] == 0
    run_cli(project, "clean")
    code, out, data = run_cli(project, "build", "-n", "--json")
    st = {t["name"]: t for t in data["targets"]}
    assert st["adder_export"]["status"] == "would-restore" and st["adder_export"]["reasons"][0] == "would restore from cache"
    assert st["adder_from"]["status"] == "would-restore"  # keyed through the cached upstream's artifact
    assert st["mlp_export"]["status"] == "would-build" and st["mlp_export"]["cached"] is False
    code, out, _ = run_cli(project, "build", "-n")
    assert "would-restore adder_export  (would restore from cache; never built)" in out, out
    code, out, _ = run_cli(project, "status")
    assert "never-built  adder_export  (never built; cached (not materialised))" in out, out
    code, out, _ = run_cli(project, "explain", "adder_from")
    assert "adder_from: never-built; cached (not materialised)" in out, out
    assert statuses(_build(project, "adder_from")) == {"adder_export": "cached", "adder_from": "cached"}


def test_up_to_date_targets_stay_cached_after_a_failure_and_skips_name_it(built_project: Path) -> None:
    project = built_project
    run_cli(project, "clean", "adder_export")  # restorable from the cache: not a build
    mlp = project / "models/mlp.py"
    mlp.write_text(mlp.read_text().replace("return MLP(hidden)", "raise RuntimeError('boom')"))
    data = _build(project)  # no -k
    st = {t["name"]: t for t in data["targets"]}
    assert st["mlp_export"]["status"] == "failed"
    assert st["mlp_eager"]["status"] == "skipped" and "'mlp_export' failed" in st["mlp_eager"]["reason"]
    assert st["adder_export"]["status"] == "cached" and st["adder_export"]["reason"] == "restored from cache"
    data = _build(project)
    st = {t["name"]: t for t in data["targets"]}
    assert st["adder_export"]["status"] == "cached" and st["adder_export"]["reason"] == "up to date"
    code, out, _ = run_cli(project, "status", "mlp_export")
    assert "last build failed" in out and "boom" in out, out
    code, out, _ = run_cli(project, "explain", "mlp_export")
    assert "last build failed" in out, out
    code, out, _ = run_cli(project, "build", "-n", "mlp_export")
    assert "last build failed" in out, out
    mlp.write_text(mlp.read_text().replace("raise RuntimeError('boom')", "return MLP(hidden)"))
    assert _build(project, "mlp_export")["code"] == 0
    code, out, _ = run_cli(project, "status", "mlp_export")
    assert "last build failed" not in out, out  # a success clears it


def test_a_syntax_error_fails_only_the_targets_that_import_the_file(project: Path) -> None:
    (project / "models/adder.py").write_text("import torch\n\ndef build(:\n    pass\n")
    data = _build(project)  # no -k: the broken file is the adder's alone
    st = {t["name"]: t for t in data["targets"]}
    assert st["adder_export"]["status"] == "failed"
    assert "aitune.toml: modules.adder.factory: models/adder.py:3: syntax error" in st["adder_export"]["reason"]
    assert st["mlp_export"]["status"] == "built" and st["mlp_eager"]["status"] == "built"
    assert data["code"] == 2
    code, out, _ = run_cli(project, "status")
    assert code == 0 and "error        adder_export" in out and "up-to-date   mlp_export" in out, out
    code, out, _ = run_cli(project, "build", "-n")
    assert "would-fail   adder_export" in out, out

    # a helper two imports away from the mlp factory: the mlp targets fail, the adder (fixed) builds
    (project / "models/adder.py").write_text("import torch\n\n\nclass A(torch.nn.Module):\n    def forward(self, x, y):\n"
                                               "        return x - y\n\n\ndef build():\n    return A()\n")
    (project / "models/helpers/deep.py").write_text("def act(x)\n    return x\n")
    st = statuses(_build(project))
    assert st == {"mlp_export": "failed", "mlp_eager": "failed", "adder_export": "built"}
