"""Tuned targets: candidates built as ordinary targets, measured, the winner selected, cached, pinned and loaded."""

from __future__ import annotations

import json
import shutil
import statistics
import tarfile
import textwrap
from pathlib import Path

import pytest

from aitune_build import tune

from .conftest import age, run_cli, statuses

MANIFEST = """
[project]
name = "tuning"

[modules.mlp]
factory = "models.mlp:build"
inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 4, max = 8 }, 16] }]

[modules.sneaky]
factory = "models.sneaky:build"
inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 4, max = 8 }, 16] }]

[modules.probe]
factory = "models.probe:build"
inputs = [{ name = "x", shape = [{ dim = "batch", min = 1, opt = 2, max = 4 }, 16] }]

[modules.fixed]
factory = "models.mlp:build"
inputs = [{ name = "x", shape = [2, 16] }]

[backends.exp]
kind = "export"

[backends.ref]
kind = "eager"

[backends.ref2]
kind = "eager"
device = "cpu"

[backends.jit]
kind = "inductor_jit"

[backends.strict]
kind = "export"
strict = true

[backends.gpu_exp]
kind = "export"
device = "cuda"
"""

FILES = {
    "models/__init__.py": "",
    "models/mlp.py": textwrap.dedent("""
        import torch


        class MLP(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Linear(16, 32)
                self.b = torch.nn.Linear(32, 4)

            def forward(self, x):
                return self.b(torch.relu(self.a(x)))


        def build():
            return MLP()
        """),
    # Right in eager and in a non-strict export; wrong wherever TorchDynamo traces it (a strict export, torch.compile).
    "models/sneaky.py": textwrap.dedent("""
        import torch


        class Sneaky(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.a = torch.nn.Linear(16, 4)

            def forward(self, x):
                y = self.a(x)
                if torch.compiler.is_dynamo_compiling():
                    return y * 2
                return y


        def build():
            return Sneaky()
        """),
    # Each instance appends its id to $AITUNE_TEST_PROBE on every call: the order in which candidates ran.
    "models/probe.py": textwrap.dedent("""
        import os

        import torch


        class Probe(torch.nn.Module):
            def forward(self, x):
                path = os.environ.get("AITUNE_TEST_PROBE")
                if path:
                    with open(path, "a") as f:
                        f.write(f"{os.getpid()} {id(self)}\\n")
                return x + 1


        def build():
            return Probe()
        """),
}


def make(root: Path, targets: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "aitune.toml").write_text(MANIFEST + targets)
    return root


def build(root: Path, *args: str) -> dict:
    code, out, data = run_cli(root, "build", "--json", *args)
    assert data is not None, out
    data["code"] = code
    return data


def selection(root: Path, target: str) -> dict:
    return json.loads((root / "build" / target / "selection.json").read_text())


def rows(sel: dict) -> dict[str, dict]:
    return {c["backend"]: c for c in sel["candidates"]}


# --- manifest rules (no build) ----------------------------------------------------------------------------------

BAD = {
    "unknown_candidate": ('[targets.t]\nmodule = "mlp"\ncandidates = ["exp", "rfe"]\n',
                          "aitune.toml: targets.t.candidates[1]: unknown backend 'rfe' (did you mean 'ref'?)"),
    "backend_and_candidates": ('[targets.t]\nmodule = "mlp"\nbackend = "exp"\ncandidates = ["exp"]\n',
                               "aitune.toml: targets.t: set exactly one of 'backend' or 'candidates'"),
    "neither": ('[targets.t]\nmodule = "mlp"\n', "aitune.toml: targets.t: set exactly one of 'backend' or 'candidates'"),
    "duplicate": ('[targets.t]\nmodule = "mlp"\ncandidates = ["exp", "exp"]\n', "aitune.toml: targets.t.candidates[1]: 'exp' is listed twice"),
    "empty": ('[targets.t]\nmodule = "mlp"\ncandidates = []\n', "aitune.toml: targets.t.candidates"),
    "budget_without_latency_budget": ('[targets.t]\nmodule = "mlp"\ncandidates = ["exp"]\nbudget_ms = 2.0\n',
                                      'aitune.toml: targets.t.budget_ms: applies to select = "latency_budget" only (select is "min_latency")'),
    "latency_budget_without_budget": ('[targets.t]\nmodule = "mlp"\ncandidates = ["exp"]\nselect = "latency_budget"\n',
                                      'aitune.toml: targets.t.budget_ms: required with select = "latency_budget"'),
    "unknown_strategy": ('[targets.t]\nmodule = "mlp"\ncandidates = ["exp"]\nselect = "fastest"\n', "aitune.toml: targets.t.select: Input should be"),
    "select_without_candidates": ('[targets.t]\nmodule = "mlp"\nbackend = "exp"\nselect = "min_latency"\n',
                                  "aitune.toml: targets.t.select: applies to a target that chooses among 'candidates'"),
    "min_speedup_without_candidates": ('[targets.t]\nmodule = "mlp"\nbackend = "exp"\nmin_speedup = 1.1\n',
                                       "aitune.toml: targets.t.min_speedup: applies to a target that chooses among"),
    "batch_out_of_range": ('[targets.t]\nmodule = "mlp"\ncandidates = ["exp"]\nbatch = [1, 64]\n',
                           "aitune.toml: targets.t.batch[1]: 64 is outside the batch axis' range 1..8 (modules.mlp.inputs[0].shape[0])"),
    "batch_without_dynamic_axis": ('[targets.t]\nmodule = "fixed"\ncandidates = ["exp"]\nbatch = [2]\n',
                                   "aitune.toml: targets.t.batch: module 'fixed' has no dynamic batch axis"),
    "from_a_tuned_target": ('[targets.t]\nmodule = "mlp"\ncandidates = ["exp"]\n[targets.u]\nfrom = "t"\nbackend = "ref"\n',
                            "aitune.toml: targets.u.from: target 't' chooses its backend by measurement (candidates)"),
    "tuned_from_with_export_candidate": ('[targets.e]\nmodule = "mlp"\nbackend = "exp"\n[targets.t]\nfrom = "e"\ncandidates = ["ref", "exp"]\n',
                                         "aitune.toml: targets.t.candidates[1]: backend kind 'export' cannot take its input from another target"),
    "from_a_candidate": ('[targets.t]\nmodule = "mlp"\ncandidates = ["exp"]\n[targets.u]\nfrom = "t@exp"\nbackend = "ref"\n',
                         "aitune.toml: targets.u.from: unknown target 't@exp'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_tuning_manifest(tmp_path: Path, case: str) -> None:
    text, expected = BAD[case]
    root = make(tmp_path / "p", text)
    for command in (["build"], ["status"]):
        code, out, _ = run_cli(root, *command)
        assert code == 2, out
        assert expected in out, out
        assert "Traceback" not in out and out.count("\n") == 1, out
    assert not (root / "build").exists()


# --- scoring (pure functions) -----------------------------------------------------------------------------------


def test_scores_by_strategy() -> None:
    lat = {"a": {1: 1.0, 8: 4.0}, "b": {1: 1.5, 8: 3.0}, "c": {1: 3.0, 8: 9.0}}
    assert tune.ranking("min_latency", None, None, lat, {}, {}) == ["a", "b", "c"]
    assert tune.ranking("max_throughput", None, None, lat, {}, {}) == ["b", "a", "c"]  # 8/3.0 ms beats 8/4.0 ms
    # within 2 ms only batch 1 counts: a (1000/s) before b (667/s); c has no batch within the budget
    assert tune.ranking("latency_budget", 2.0, None, lat, {}, {}) == ["a", "b"]
    assert tune.score("latency_budget", 2.0, lat["c"])[1] == "over the latency budget: 3 ms at batch 1 > 2 ms"
    assert tune.ranking("latency_budget", 5.0, None, lat, {}, {}) == ["b", "a", "c"]  # b: 8/3 ms; c: batch 1 only
    eager = {"cpu": {1: 2.0, 8: 8.0}}
    devices = {"a": "cpu", "b": "cpu", "c": "cpu"}
    assert tune.speedup(lat["a"], eager["cpu"]) == pytest.approx(2.0)
    assert tune.ranking("min_latency", None, 1.5, lat, eager, devices) == ["a", "b"]  # c: 0.78x eager
    assert tune.ranking("min_latency", None, 2.5, lat, eager, devices) == []
    st = tune._stats([5.0, 1.0, 2.0, 3.0, 4.0])
    assert (st["median"], st["p10"], st["p90"], st["samples"]) == (3.0, 1.4, 4.6, 5)
    assert st["spread"] == pytest.approx((4.0 - 2.0) / 3.0, abs=1e-4)


def _process(rounds: int, **medians: float) -> dict:
    """A measuring process's result as run_measurement returns it: candidate -> batch-1 median (ms)."""
    entry = lambda ms: {"batches": {"1": {"median": ms, "p10": ms * 0.9, "p90": ms * 1.1, "spread": 0.1, "samples": 20}},
                        "measure_s": 0.5, "warmup_s": 0.1, "error": None}  # noqa: E731
    return {"entries": {k: entry(v) for k, v in medians.items()}, "baselines": {}, "rounds": rounds, "stable": True,
            "seconds": 1.0}


def test_processes_combine_by_the_median_of_their_medians() -> None:
    # eager is fast in one process's thread regime and slow in two: one process alone would pick it
    procs = [_process(5, eager=0.40, inductor=0.50), _process(6, eager=0.70, inductor=0.52), _process(7, eager=0.65, inductor=0.48)]
    got = tune.combine(procs)
    eager, inductor = got["entries"]["eager"]["batches"]["1"], got["entries"]["inductor"]["batches"]["1"]
    assert eager["process_medians"] == [0.40, 0.70, 0.65] and eager["median"] == 0.65
    assert inductor["median"] == 0.50 and eager["samples"] == 60
    assert eager["process_spread"] == pytest.approx((0.70 - 0.40) / 0.65, abs=1e-4)
    assert got["entries"]["eager"]["measure_s"] == 1.5 and got["rounds"] == 18 and len(got["processes"]) == 3
    assert tune.ranking("min_latency", None, None, {k: {1: e["batches"]["1"]["median"]} for k, e in got["entries"].items()},
                        {}, {}) == ["inductor", "eager"]
    # a candidate that failed in any process is failed
    procs[1]["entries"]["inductor"] = {"batches": {}, "measure_s": 0.0, "warmup_s": 0.0, "error": "RuntimeError: boom"}
    assert tune.combine(procs)["entries"]["inductor"]["error"] == "RuntimeError: boom"
    # ... and so is one that a process gave no result for (that process failed before measuring it)
    del procs[2]["entries"]["eager"]
    assert tune.combine(procs)["entries"]["eager"]["error"] == "no result"
    # CPU: at least two processes, the per-candidate cap shared among them; a GPU: one
    assert tune.process_counts({"cpu"}) == (2, 3) and tune.process_counts({"cpu", "cuda"}) == (1, 1)


# --- a selection over CPU candidates ----------------------------------------------------------------------------


@pytest.mark.slow
def test_selection_measures_once_caches_pins_and_loads_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    # One intra-op thread: on a host shared by many processes, a 2-thread OpenMP barrier waits out whole scheduler
    # quanta (measured: 30-60 ms calls of a 0.05 ms MLP), which makes the measuring slow, not wrong.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = make(tmp_path / "p", '[targets.t]\nmodule = "mlp"\ncandidates = ["exp", "ref", "jit"]\nbatch = [1, 8]\n')
    first = build(root)
    assert first["code"] == 0, first
    assert statuses(first) == {"t": "built"}
    assert first["targets"][0]["selection"]["winner"] in ("exp", "ref", "jit")
    sel = selection(root, "t")
    by = rows(sel)
    assert list(by) == ["exp", "ref", "jit"] and {r["build"] for r in by.values()} == {"built"}
    for r in by.values():
        assert r["rejected"] is None and r["check"]["max_abs_err"] is not None
        assert set(r["latency_ms"]) == {"1", "8"} and r["latency_ms"]["1"]["samples"] >= 3 * tune.SETTINGS["min_rounds"]
        assert r["throughput"]["8"] == pytest.approx(8 / (r["latency_ms"]["8"]["median"] / 1e3), rel=1e-3)
        assert r["measure_s"] <= tune.SETTINGS["cap_s"] * 1.5  # one block past the cap at most
    best = min(by, key=lambda b: by[b]["latency_ms"]["1"]["median"])
    assert sel["winner"] == best and sel["rounds"] >= tune.SETTINGS["min_rounds"]
    # measured in >= 2 separate processes; each candidate's latency is the median of its per-process medians
    procs = sel["processes"]
    assert tune.SETTINGS["processes"] <= len(procs) <= tune.SETTINGS["max_processes"], procs
    assert all(p["rounds"] >= tune.SETTINGS["min_rounds"] and set(p["candidates"]) == set(by) for p in procs)
    assert sum(p["rounds"] for p in procs) == sel["rounds"]
    if len(procs) == tune.SETTINGS["processes"] < tune.SETTINGS["max_processes"]:  # stopped: the processes agreed
        assert len({p["ranking"][0] for p in procs}) == 1
    for r in by.values():
        for st in r["latency_ms"].values():
            assert len(st["process_medians"]) == len(procs)
            assert st["median"] == pytest.approx(statistics.median(st["process_medians"]), abs=1e-6)
    assert sel["device"].startswith("cpu: ")
    rec = json.loads((root / "build/t/build.json").read_text())
    assert rec["winner"]["backend"] == best and rec["backend"] == by[best]["kind"]
    assert (root / "build/t" / rec["artifact"]).is_file()  # the winner's artifact, in the target's own folder
    for b in by:
        assert (root / f"build/t/candidates/{b}/build.json").is_file()
    lock = json.loads((root / "aitune.lock").read_text())["targets"]
    assert set(lock) == {"t"} and lock["t"]["tuned"][sel["device"]]["winner"] == best

    # load() gives the winner, and it computes what eager computes
    import torch

    import aitune_build

    m = aitune_build.load("t", manifest=str(root / "aitune.toml"))
    assert m.record["winner"]["backend"] == best
    eager = aitune_build.load("t@ref", manifest=str(root / "aitune.toml"))
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), eager(x))

    # status / explain show the table and why; --json carries it
    code, out, _ = run_cli(root, "status", "t")
    assert f"winner {best}: lowest median latency" in out and "b=8 ms (spread)" in out
    code, out, data = run_cli(root, "explain", "t", "--json")
    assert data["selection"]["winner"] == best and data["changes"] == []

    # unchanged: cached, nothing measured (selection.json byte for byte the same)
    before = (root / "build/t/selection.json").read_bytes()
    again = build(root)
    assert statuses(again) == {"t": "cached"} and again["targets"][0]["reason"] == "up to date"
    assert (root / "build/t/selection.json").read_bytes() == before

    # another checkout sharing the cache: restored from the store, neither rebuilt nor measured
    shutil.rmtree(root / "build")
    again = build(root)
    assert statuses(again) == {"t": "cached"} and "not measured" in again["targets"][0]["reason"]
    assert (root / "build/t/selection.json").read_bytes() == before
    assert not (root / "build/t/candidates").exists()

    # aitune.lock keeps the pins of other GPU models (another machine's build) when this one's changes
    lock_path = root / "aitune.lock"
    lock_doc = json.loads(lock_path.read_text())
    lock_doc["targets"]["t"]["tuned"]["NVIDIA H200"] = {"winner": "trt_fp16", "key": "f" * 32, "artifact_sha256": "0" * 64}
    lock_path.write_text(json.dumps(lock_doc))

    # one candidate's key changes: it rebuilds, the others are cached, and everything is measured again
    text = (root / "aitune.toml").read_text()
    (root / "aitune.toml").write_text(text.replace('[backends.exp]\nkind = "export"', '[backends.exp]\nkind = "export"\nstrict = true'))
    code, out, data = run_cli(root, "explain", "t", "--json")
    assert "candidate exp: backend.strict: false -> true" in data["reasons"]
    changed = build(root)
    assert statuses(changed) == {"t": "built"}
    sel2 = selection(root, "t")
    assert sel2["measured_at"] != sel["measured_at"] and sel2["key"] != sel["key"]
    assert {b: r["build"] for b, r in rows(sel2).items()} == {"exp": "built", "ref": "cached", "jit": "cached"}
    pins = json.loads(lock_path.read_text())["targets"]["t"]["tuned"]
    assert pins["NVIDIA H200"]["key"] == "f" * 32 and pins[sel2["device"]]["key"] == sel2["key"]
    # --locked accepts this machine's pin even when the lock's top-level entry came from another machine
    lock_doc = json.loads(lock_path.read_text())
    lock_doc["targets"]["t"]["key"] = "e" * 32
    lock_path.write_text(json.dumps(lock_doc))
    assert run_cli(root, "build", "--locked")[0] == 0
    del lock_doc["targets"]["t"]["tuned"][sel2["device"]]
    lock_path.write_text(json.dumps(lock_doc))
    assert run_cli(root, "build", "--locked")[0] == 1
    lock_path.unlink()

    # --retune measures again with every candidate cached
    retuned = build(root, "--retune")
    assert statuses(retuned) == {"t": "built"}
    sel3 = selection(root, "t")
    assert sel3["measured_at"] != sel2["measured_at"] and {r["build"] for r in rows(sel3).values()} == {"cached"}

    # package ships the winner and its record; --all-candidates every candidate too
    code, out, _ = run_cli(root, "package", "-o", str(tmp_path / "w.tar.gz"))
    assert code == 0, out
    names = tarfile.open(tmp_path / "w.tar.gz").getnames()
    assert "targets/t/selection.json" in names and not any("@" in n for n in names)
    code, out, _ = run_cli(root, "package", "--all-candidates", "-o", str(tmp_path / "all.tar.gz"))
    names = tarfile.open(tmp_path / "all.tar.gz").getnames()
    assert {"targets/t@exp/model.pt2", "targets/t@ref/record.json", "targets/t@jit/record.json"} <= set(names)
    assert run_cli(root, "verify", str(tmp_path / "all.tar.gz"))[0] == 0
    from_archive = aitune_build.load("t", manifest=str(root / "aitune.toml"), archive=str(tmp_path / "w.tar.gz"))
    torch.testing.assert_close(from_archive(x), eager(x))

    # a winner chosen on one GPU model is not served on another
    rec = json.loads((root / "build/t/build.json").read_text())
    rec["components"]["device"] = {"gpu": {"name": "NVIDIA H200", "compute_capability": "9.0"}, "cpu": None}
    (root / "build/t/build.json").write_text(json.dumps(rec))
    with pytest.raises(aitune_build.AituneError, match="chosen by measurement on NVIDIA H200"):
        aitune_build.load("t", manifest=str(root / "aitune.toml"))


@pytest.mark.slow
def test_failed_candidates_are_rejected_with_the_reason_and_first_wins_stops_early(tmp_path: Path,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make(tmp_path / "p", textwrap.dedent("""
        [targets.best]
        module = "sneaky"
        candidates = ["strict", "exp", "ref"]

        [targets.first]
        module = "sneaky"
        select = "first_wins"
        candidates = ["gpu_exp", "strict", "exp", "ref"]

        [targets.none]
        module = "sneaky"
        candidates = ["strict"]

        [targets.gated]
        module = "sneaky"
        candidates = ["exp"]
        min_speedup = 1000.0

        [targets.budget]
        module = "sneaky"
        candidates = ["exp"]
        select = "latency_budget"
        budget_ms = 0.000001
        """))
    data = build(root, "-k")
    st = statuses(data)
    assert st == {"best": "built", "first": "built", "none": "failed", "gated": "failed", "budget": "failed"}, data
    assert data["code"] == 1

    best = rows(selection(root, "best"))
    assert best["strict"]["build"] == "failed"
    assert best["strict"]["rejected"].startswith("build failed: check against eager failed at ")
    assert selection(root, "best")["winner"] in ("exp", "ref")
    assert best["strict"]["latency_ms"] == {}  # a rejected build is never measured

    first = selection(root, "first")
    fr = rows(first)
    assert first["winner"] == "exp"
    assert fr["gpu_exp"]["build"] == "skipped" and fr["gpu_exp"]["rejected"].startswith("export cannot run here: needs an NVIDIA GPU")
    assert fr["strict"]["rejected"].startswith("build failed: check against eager failed")
    # same key as best's exp candidate: built once, shared through the store ("first" may run beside "best": its
    # gpu_exp candidate makes it GPU-bound, scheduled apart from CPU targets)
    assert sorted([fr["exp"]["build"], best["exp"]["build"]]) == ["built", "cached"]
    assert fr["ref"]["build"] == "not tried" and fr["ref"]["rejected"] == "not tried: first_wins stopped at 'exp'"
    assert not (root / "build/first/candidates/ref").exists()
    assert set(fr["exp"]["latency_ms"]) == {"4"}  # default batch: the axis' opt

    reasons = {t["name"]: t["reason"] for t in data["targets"]}
    assert reasons["none"].startswith("no candidate qualified (strict: build failed: check against eager failed")
    assert "x eager is below min_speedup 1000" in reasons["gated"]
    assert "over the latency budget" in reasons["budget"]
    assert not (root / "build/none/build.json").exists()


@pytest.mark.slow
def test_a_candidate_that_kills_its_measuring_process_is_rejected_and_the_others_are_still_measured(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A measuring process times all candidates together; one that crashes it (a segfaulting engine) would fail them
    all. Each is then measured alone to find which, and the others are measured together again without it."""
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("AITUNE_BACKENDS", "crashing_toy=tests.toy_backend:CrashingToyBackend")
    root = make(tmp_path / "p", textwrap.dedent("""
        [backends.crash]
        kind = "crashing_toy"

        [targets.t]
        module = "mlp"
        candidates = ["crash", "exp", "ref"]
        """))
    data = build(root)
    assert statuses(data) == {"t": "built"}, data
    sel = selection(root, "t")
    by = rows(sel)
    assert sel["winner"] in ("exp", "ref"), sel
    assert by["crash"]["build"] == "built"  # its check passed: only measuring it kills the process
    assert by["crash"]["rejected"].startswith("failed while measuring: the measuring process exited with code -9"), by
    assert by["crash"]["rejected"].endswith("measuring it alone (the others were measured without it)"), by
    for b in ("exp", "ref"):
        assert by[b]["rejected"] is None and by[b]["latency_ms"], by[b]


@pytest.mark.slow
def test_candidates_are_interleaved_round_by_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two eager candidates append their instance id on every call: the measuring process alternates between them."""
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    probe = tmp_path / "calls.log"
    monkeypatch.setenv("AITUNE_TEST_PROBE", str(probe))
    root = make(tmp_path / "p", '[targets.t]\nmodule = "probe"\ncandidates = ["ref", "ref2"]\n')
    assert build(root)["code"] == 0
    lines = probe.read_text().split()
    pids = lines[0::2]
    sel = selection(root, "t")
    assert len(sel["processes"]) >= 2
    # the last processes are the measuring ones, one after the other
    order = list(dict.fromkeys(pids))[-len(sel["processes"]):]
    for pid, proc in zip(order, sel["processes"]):
        measuring = [i for p, i in zip(pids, lines[1::2]) if p == pid]
        assert len(set(measuring)) == 2
        switches = sum(a != b for a, b in zip(measuring, measuring[1:]))
        # warm-up: one switch; then each round runs one block per candidate, its start rotating (A B | B A | A B ...)
        assert switches >= proc["rounds"], (switches, proc["rounds"])


@pytest.mark.slow
def test_no_op_with_a_tuned_target_does_not_import_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    root = make(tmp_path / "p", '[targets.t]\nmodule = "mlp"\ncandidates = ["exp", "ref"]\n')
    assert build(root)["code"] == 0
    for f in root.rglob("*.py"):
        age(f)
    probe = ("import sys\nfrom aitune_build.cli import main\nsys.argv = ['aitune-build', '-C', sys.argv[1], 'status']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)\n")
    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", probe, str(root)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "up-to-date   t" in run.stdout and "winner" in run.stdout
    assert run.stdout.strip().endswith("False")
