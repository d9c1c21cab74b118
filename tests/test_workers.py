"""Warm workers: children of a fork server that imported torch once; each target still in a process of its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import gone as _gone, run_cli, sigint_default
from .test_tensorrt import gpu_project, needs_gpu  # noqa: F401  (the GPU project fixture)

CRASH = "import os, signal\n\n\ndef build():\n    os.kill(os.getpid(), signal.SIGSEGV)\n"
# A module-level global that a target's factory sets: a child that saw another target's value fails the build.
STATEFUL = (
    "import torch\n\nSEEN = set()\n\n\n"
    "def build(tag=0):\n"
    "    SEEN.add(tag)\n"
    "    if len(SEEN) > 1:\n"
    "        raise RuntimeError(f'leftover from an earlier target: {sorted(SEEN)}')\n"
    "    return torch.nn.Linear(2, 2)\n"
)
SLEEPY = (
    "import os, pathlib, time\n\n\n"
    "def build():\n"
    "    pathlib.Path(os.environ['AITUNE_TEST_MARK']).write_text(str(os.getpid()))\n"
    "    time.sleep(300)\n"
)


def add(project: Path, text: str) -> None:
    (project / "aitune.toml").write_text((project / "aitune.toml").read_text() + text)


def build(root: Path, *args: str) -> dict:
    code, out, data = run_cli(root, "build", "--json", *args)
    assert data is not None, out
    data["code"] = code
    return data


def by_name(data: dict) -> dict:
    return {t["name"]: t for t in data["targets"]}


def test_segfault_fails_its_target_only_and_the_next_target_builds_warm(project: Path) -> None:
    (project / "models/crash.py").write_text(CRASH)
    add(project, '\n[modules.crash]\nfactory = "models.crash:build"\ninputs = [{ name = "x", shape = [2] }]\n'
                 '[targets.a_crash]\nmodule = "crash"\nbackend = "exp"\n')
    data = build(project, "-k", "a_crash", "mlp_export", "mlp_eager")
    st = by_name(data)
    assert data["code"] == 1
    assert st["a_crash"]["status"] == "failed" and "SIGSEGV" in st["a_crash"]["reason"], st["a_crash"]
    assert st["mlp_export"]["status"] == "built" and st["mlp_eager"]["status"] == "built"
    # all three were forked from one warm server; each log is its own
    logs = {n: (project / "build" / n / "build.log").read_text() for n in st}
    pids = set()
    for name, log in logs.items():
        first = log.splitlines()[0]
        assert first.startswith("aitune-build: worker forked from the warm torch server"), (name, log)
        pids.add(first)
    assert len(pids) == 1, pids
    assert "SIGSEGV" not in logs["mlp_export"] and "segmentation" not in logs["mlp_export"].lower()


def test_a_childs_module_globals_do_not_reach_the_next_target(project: Path) -> None:
    (project / "models/stateful.py").write_text(STATEFUL)
    add(project, '\n[modules.s1]\nfactory = "models.stateful:build"\nargs = { tag = 1 }\ninputs = [{ name = "input", shape = [1, 2] }]\n'
                 '[modules.s2]\nfactory = "models.stateful:build"\nargs = { tag = 2 }\ninputs = [{ name = "input", shape = [1, 2] }]\n'
                 '[targets.s1_export]\nmodule = "s1"\nbackend = "exp"\n[targets.s2_export]\nmodule = "s2"\nbackend = "exp"\n')
    data = build(project, "s1_export", "s2_export")
    assert data["code"] == 0, data
    assert {t["status"] for t in data["targets"]} == {"built"}
    # the same two factories in one process do see each other's leftovers: the check above could fail
    sys.path.insert(0, str(project))
    for m in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
        del sys.modules[m]  # another test's project may have left its own `models` package imported
    try:
        from models import stateful  # type: ignore[import-not-found]

        stateful.build(1)
        with pytest.raises(RuntimeError, match="leftover"):
            stateful.build(2)
    finally:
        sys.path.remove(str(project))
        for m in [m for m in sys.modules if m == "models" or m.startswith("models.")]:
            del sys.modules[m]


def test_build_json_has_per_phase_timings(project: Path) -> None:
    assert build(project, "mlp_export")["code"] == 0
    timings = json.loads((project / "build/mlp_export/build.json").read_text())["timings"]
    for phase in ("worker_start", "imports", "construct", "export", "save", "build", "load", "check", "first_call",
                  "worker", "worker_total"):
        assert isinstance(timings.get(phase), float) and timings[phase] >= 0, (phase, timings)
    assert timings["export"] + timings["save"] <= timings["build"]
    assert timings["worker_total"] >= timings["worker"]
    code, out, data = run_cli(project, "explain", "--json", "mlp_export")
    assert code == 0 and data["timings"] == timings, out


def test_without_fork_a_fresh_process_builds_and_the_log_says_why(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AITUNE_WORKERS", "subprocess")
    data = build(project, "mlp_export")
    assert data["code"] == 0 and by_name(data)["mlp_export"]["status"] == "built"
    first = (project / "build/mlp_export/build.log").read_text().splitlines()[0]
    assert first == "aitune-build: worker in a fresh process (AITUNE_WORKERS=subprocess)"


@pytest.mark.slow
def test_ctrl_c_stops_the_build_promptly_kills_the_worker_and_stores_nothing(project: Path, tmp_path: Path) -> None:
    (project / "models/sleepy.py").write_text(SLEEPY)
    add(project, '\n[modules.sleepy]\nfactory = "models.sleepy:build"\ninputs = [{ name = "x", shape = [2] }]\n'
                 '[targets.sleepy_export]\nmodule = "sleepy"\nbackend = "exp"\n')
    mark = tmp_path / "mark"
    env = {**os.environ, "AITUNE_TEST_MARK": str(mark), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "aitune_build", "-C", str(project), "build", "sleepy_export"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 180
        while not (mark.exists() and mark.read_text()) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert mark.exists(), proc.communicate()[0]
        child = int(mark.read_text())
        server = int((project / "build/sleepy_export/build.log").read_text().split("(pid ")[1].split(")")[0])
        assert child != server and child != proc.pid
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 10, "not prompt"
        assert proc.returncode != 0, out
        assert _gone(child, 5) and _gone(server, 5), "a worker process outlived the build"
        assert not (project / "build/sleepy_export/build.json").exists()
        objects = project / ".aitune/store-v1/objects"
        assert not objects.exists() or not any(objects.rglob("entry.json"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _server_children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def test_a_spare_imports_ahead_for_its_environment_and_family_only_and_dies_with_the_server(tmp_path: Path) -> None:
    """The server's protocol with real processes: a job sent with spare=True leaves a spare for its environment and
    its late imports; the next such job runs in it (its log says what was imported ahead); a job with another
    environment, or of another family (no late imports) on the same GPU, is forked fresh; an unused spare does not
    outlive the server. The jobs themselves are files that do not exist: each child fails at once, which is what
    makes this test fast."""
    from aitune_build.workers import _ForkServer

    server = _ForkServer.start(["json"], lambda *_: None)
    assert isinstance(server, _ForkServer), server
    try:
        logs = [tmp_path / f"{i}.log" for i in range(4)]
        gpu0, gpu1 = {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}
        rcs = [server.run(tmp_path / "missing.json", logs[0], gpu0, ["decimal"], spare=True)]
        time.sleep(0.5)  # the spare imports meanwhile (a real build's current target compiles meanwhile)
        rcs.append(server.run(tmp_path / "missing.json", logs[1], gpu0, [], spare=False))  # export on GPU 0
        rcs.append(server.run(tmp_path / "missing.json", logs[2], gpu0, ["decimal"], spare=True))
        rcs.append(server.run(tmp_path / "missing.json", logs[3], gpu1, ["decimal"], spare=False))
        assert rcs == [1, 1, 1, 1]  # each job failed in its own process, and the server told us
        texts = [p.read_text() for p in logs]
        assert "spare worker" not in texts[0] and "FileNotFoundError" in texts[0]
        assert "spare worker" not in texts[1]  # the spare waits for a job of its own family
        assert texts[2].startswith("aitune-build: spare worker: decimal imported ahead of this job"), texts[2]
        assert "FileNotFoundError" in texts[2]
        assert "spare worker" not in texts[3]  # no spare for GPU 1, and GPU 0's spare is not GPU 1's
        deadline = time.time() + 10
        while not (spares := _server_children(server.pid)) and time.time() < deadline:
            time.sleep(0.1)
        assert len(spares) == 1, spares  # the third job asked for another spare; it waits, idle
    finally:
        server.close()
    assert server.proc.returncode == 0
    for pid in spares:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_primed_spare_takes_the_first_job_of_its_environment(tmp_path: Path) -> None:
    """`prime` forks a spare before any job of its family has come (the build's first compile primes one per GPU a
    Torch-TensorRT target will need): the first such job on that GPU runs in it, with the imports done; a prime for
    an environment that already has a spare forks no second one."""
    from aitune_build.workers import _ForkServer

    server = _ForkServer.start(["json"], lambda *_: None)
    assert isinstance(server, _ForkServer), server
    try:
        gpu0 = {"CUDA_VISIBLE_DEVICES": "0"}
        server.prime(gpu0, ["decimal"])
        server.prime(gpu0, ["decimal"])  # already has one: no second spare
        deadline = time.time() + 10
        while not (spares := _server_children(server.pid)) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)
        assert len(_server_children(server.pid)) == 1, _server_children(server.pid)
        log = tmp_path / "job.log"
        assert server.run(tmp_path / "missing.json", log, gpu0, ["decimal"], spare=False) == 1
        text = log.read_text()
        assert text.startswith("aitune-build: spare worker: decimal imported ahead of this job"), text
        assert "FileNotFoundError" in text
    finally:
        server.close()
    assert server.proc.returncode == 0
    for pid in spares:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.mark.gpu
@needs_gpu
def test_gpu_targets_build_in_children_of_one_warm_server(gpu_project: Path) -> None:  # noqa: F811
    """export on cuda and Torch-TensorRT targets from one server, which never imports torch_tensorrt (the children
    do); CUDA starts in the children only (the server refuses otherwise, and the log would say so)."""
    names = ["cnn_export", "cnn_aot32", "cnn_jit16"]
    code, out, data = run_cli(gpu_project, "build", "-k", "--json", "--gpus", "0", *names)  # one GPU: one after another
    assert code == 0, out
    first = {n: (gpu_project / "build" / n / "build.log").read_text().splitlines()[0] for n in names}
    assert all(line.startswith("aitune-build: worker forked from the warm torch server") for line in first.values()), first
    assert len({line.split("(pid ")[1] for line in first.values()}) == 1, first  # one server for all three
    rec = json.loads((gpu_project / "build/cnn_jit16/build.json").read_text())
    assert isinstance(rec["record"].get("compile_cache"), (dict, str)), rec["record"]
    timings = json.loads((gpu_project / "build/cnn_aot32/build.json").read_text())["timings"]
    assert {"export", "compile", "save", "imports", "worker_start"} <= set(timings), timings
    # Both Torch-TensorRT targets ran in spares that imported torch_tensorrt ahead: the first one's was primed at the
    # build's first compile (the export target, scheduled first), the second one's while the first one compiled.
    logs = {n: (gpu_project / "build" / n / "build.log").read_text().splitlines()[1] for n in ("cnn_aot32", "cnn_jit16")}
    ahead = [n for n, line in logs.items() if line.startswith("aitune-build: spare worker: torch_tensorrt imported ahead")]
    assert len(ahead) == 2, logs
    for name in ahead:
        later = json.loads((gpu_project / "build" / name / "build.json").read_text())["timings"]
        assert later["imports"] < 1.0, later
    started = {t["name"]: t for t in data["targets"]}
    assert all(started[n]["status"] == "built" for n in names), started
