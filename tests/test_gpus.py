"""GPUs in keys and GPU scheduling, on a machine without a GPU: nvidia-smi is a stub script on PATH.

What is tested is our code: which GPU a key names (issue 9 finding 1), the one-model rule, the GPU pool, and a real
build whose (CPU) targets are treated as GPU-bound through the documented test hook `AITUNE_TEST_GPU_BOUND_KINDS`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from aitune_build.errors import UserError
from aitune_build.gpus import TEST_GPU_BOUND_ENV, Gpu, GpuPool, plan_gpus
from aitune_build.hashing import StateCache
from aitune_build.keys import Fingerprinter, key_of
from aitune_build.manifest import load_manifest
from aitune_build.toolchain import gpu_info

from .conftest import make_project, run_cli

H100 = ("NVIDIA H100 80GB HBM3", "9.0", "570.86.15")
H100_NEW_DRIVER = ("NVIDIA H100 80GB HBM3", "9.0", "580.159.04")
H200 = ("NVIDIA H200", "9.0", "570.86.15")
A100 = ("NVIDIA A100-SXM4-80GB", "8.0", "570.86.15")


def fake_smi(folder: Path, gpus: list[tuple[str, str, str]]) -> str:
    """A folder holding an `nvidia-smi` that lists these GPUs (index i, uuid GPU-<i>aaaa...); returns it for PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = "\n".join(f"{i}, GPU-{i}{'a' * 7}-1111-2222-3333-444455556666, {n}, {cc}, {drv}" for i, (n, cc, drv) in enumerate(gpus))
    smi = folder / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\ncat <<'EOF'\n{rows}\nEOF\n")
    smi.chmod(0o755)
    return str(folder)


def uuid(i: int) -> str:
    return f"GPU-{i}{'a' * 7}-1111-2222-3333-444455556666"


@pytest.fixture
def on_path(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def use(folder: str) -> None:
        monkeypatch.setenv("PATH", folder + os.pathsep + os.environ["PATH"])

    return use


TWO_DEVICES = """
[project]
name = "t"

[modules.mlp]
factory = "models.mlp:build"
weights = "weights/mlp.pt"
inputs = [{{ name = "x", shape = [2, 4] }}]

{backends}

[targets.on_cpu]
module = "mlp"
backend = "exp_cpu"

[targets.on_cuda]
module = "mlp"
backend = "exp_cuda"
"""
CPU_FIRST = '[backends.exp_cpu]\nkind = "export"\ndevice = "cpu"\n\n[backends.exp_cuda]\nkind = "export"\ndevice = "cuda"\n'
CUDA_FIRST = '[backends.exp_cuda]\nkind = "export"\ndevice = "cuda"\n\n[backends.exp_cpu]\nkind = "export"\ndevice = "cpu"\n'


def keys(root: Path, gpus: str | None = None) -> dict[str, str]:
    fp = Fingerprinter(load_manifest(root / "aitune.toml"), StateCache(None), gpus=gpus)
    return {t: key_of(fp.components(t)) for t in ("on_cpu", "on_cuda")}


@pytest.mark.parametrize("order", [CPU_FIRST, CUDA_FIRST], ids=["cpu-backend-first", "cuda-backend-first"])
def test_gpu_in_key_per_backend_config_not_per_kind(tmp_path: Path, on_path, order: str) -> None:
    root = make_project(tmp_path / "p", TWO_DEVICES.format(backends=order))
    on_path(fake_smi(tmp_path / "h100", [H100]))
    on_h100 = keys(root)
    comps = Fingerprinter(load_manifest(root / "aitune.toml"), StateCache(None)).components("on_cuda")
    assert comps["toolchain"]["gpu"] == {"name": H100[0], "compute_capability": "9.0"}  # no driver in the key

    on_path(fake_smi(tmp_path / "h200", [H200]))
    on_h200 = keys(root)
    assert on_h200["on_cuda"] != on_h100["on_cuda"]  # an H100 engine is never served on an H200
    assert on_h200["on_cpu"] == on_h100["on_cpu"]  # a CPU target's key does not depend on the GPU

    on_path(fake_smi(tmp_path / "h100-new-driver", [H100_NEW_DRIVER]))
    assert keys(root) == on_h100  # a driver update rebuilds nothing

    on_path(fake_smi(tmp_path / "none", []))
    assert keys(root)["on_cpu"] == on_h100["on_cpu"]


def test_key_names_the_gpu_cuda_visible_devices_gives(tmp_path: Path, on_path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_project(tmp_path / "p", TWO_DEVICES.format(backends=CPU_FIRST))
    on_path(fake_smi(tmp_path / "h200", [H200]))
    only_h200 = keys(root)["on_cuda"]
    on_path(fake_smi(tmp_path / "mixed", [H100, H200]))
    on_h100 = keys(root)["on_cuda"]
    assert on_h100 != only_h200  # GPU 0 is an H100
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert keys(root)["on_cuda"] == only_h200
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuid(1)[:10])  # a UUID prefix, as CUDA accepts
    assert keys(root)["on_cuda"] == only_h200
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert keys(root, gpus="1,0")["on_cuda"] == only_h200  # --gpus: the first listed GPU's model


def test_visible_gpus_follow_cuda_rules(tmp_path: Path, on_path) -> None:
    on_path(fake_smi(tmp_path / "four", [H100, H100, H200, A100]))
    assert [g["index"] for g in gpu_info()] == ["0", "1", "2", "3"]
    assert [g["index"] for g in gpu_info("2,0")] == ["2", "0"]
    assert [g["index"] for g in gpu_info(f"{uuid(3)},1")] == ["3", "1"]
    assert [g["index"] for g in gpu_info("1,7,2")] == ["1"]  # the list ends at an entry naming no GPU
    assert gpu_info("") == [] and gpu_info("-1") == []
    assert gpu_info("0")[0] == {"index": "0", "uuid": uuid(0), "name": H100[0], "compute_capability": "9.0", "driver": H100[2]}


def _gpus(*models: tuple[str, str, str]) -> list[dict[str, str]]:
    return [{"index": str(i), "uuid": uuid(i), "name": n, "compute_capability": c, "driver": d} for i, (n, c, d) in enumerate(models)]


def test_mixed_models_build_on_one_model_only() -> None:
    plan = plan_gpus(_gpus(A100, H100, H100))
    assert plan.model == {"name": A100[0], "compute_capability": "8.0"}
    assert [g.index for g in plan.gpus] == ["0"]
    plan = plan_gpus(_gpus(A100, H100, H100), gpu_model="H100")
    assert plan.model["name"] == H100[0] and [g.index for g in plan.gpus] == ["1", "2"]
    assert plan_gpus(_gpus(A100, H100), gpu_model=H100[0].lower()).model["name"] == H100[0]
    with pytest.raises(UserError, match="gpu_model 'H200' matches none of the visible GPUs"):
        plan_gpus(_gpus(A100, H100), gpu_model="H200")
    assert plan_gpus([]).model is None and plan_gpus([]).gpus == ()


def test_gpu_pool_lends_each_gpu_to_one_user_and_takes_it_back_on_failure(tmp_path: Path) -> None:
    gpus = [Gpu.from_info(d) for d in _gpus(H100, H100)]
    pool = GpuPool(gpus, tmp_path / "locks", poll=0.01)
    holders: dict[str, int] = {}
    seen: set[str] = set()
    most = [0]
    mutex = threading.Lock()

    def work(i: int) -> None:
        try:
            with pool.acquire() as lease:
                gpu = lease.gpu
                with mutex:
                    holders[gpu.uuid] = holders.get(gpu.uuid, 0) + 1
                    seen.add(gpu.uuid)
                    most[0] = max(most[0], sum(holders.values()))
                    assert holders[gpu.uuid] == 1, "a GPU lent twice"
                time.sleep(0.02)
                with mutex:
                    holders[gpu.uuid] -= 1
                if i % 3 == 0:
                    raise RuntimeError("a failing compile")
        except RuntimeError:
            pass

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a failed user did not give its GPU back"
    assert seen == {g.uuid for g in gpus} and most[0] == 2


def test_gpu_pool_skips_a_gpu_another_process_holds(tmp_path: Path) -> None:
    gpus = [Gpu.from_info(d) for d in _gpus(H100, H100)]
    locks = tmp_path / "locks"
    locks.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from filelock import FileLock
        lock = FileLock({str(locks / f'gpu-{uuid(0)}.lock')!r}); lock.acquire()
        print("held", flush=True); sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        pool = GpuPool(gpus, locks, poll=0.01)
        with pool.acquire() as first:
            assert first.gpu.uuid == uuid(1)  # GPU 0 is busy in the other process
            got: list[str] = []
            t = threading.Thread(target=lambda: got.append(_take(pool)))
            t.start()
            time.sleep(0.3)
            assert got == []  # both GPUs busy: it waits
            holder.stdin.close()
            holder.wait(timeout=30)
            t.join(timeout=30)
            assert got == [uuid(0)]
    finally:
        holder.kill()


def _until(cond, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


@pytest.mark.parametrize("locks", [True, False], ids=["lock-folder", "read-only-store"])
def test_early_give_back_lends_the_gpu_to_one_compile_at_a_time_and_a_measurement_runs_alone(tmp_path: Path,
                                                                                            locks: bool) -> None:
    """Three compiles and a measurement on one GPU, each lease ended by the test. A compile gives the GPU back early
    (from another thread, as the build's phase watcher does); the next compile takes it while the first is still
    checking; when the first then ends, the lease the second holds is not ended with it (the third still waits);
    an exclusive lease waits for every user, and nothing starts beside it."""
    pool = GpuPool([Gpu.from_info(d) for d in _gpus(H100)], tmp_path / "locks" if locks else None, poll=0.01)
    events: list[str] = []
    gates = {name: threading.Event() for name in ("first-written", "first-end", "second-written", "second-end",
                                                   "third-end", "measure-end")}

    def compile_(name: str) -> None:
        with pool.acquire() as lease:
            events.append(f"{name} compiles")
            if gates.get(f"{name}-written") is not None:
                gates[f"{name}-written"].wait(20)
                events.append(f"{name} gives back")
                watcher = threading.Thread(target=lease.give_back)
                watcher.start()
                watcher.join()
                lease.give_back()  # idempotent
            gates[f"{name}-end"].wait(20)
        events.append(f"{name} ended")

    def measure() -> None:
        with pool.acquire(exclusive=True):
            events.append("measure runs")
            gates["measure-end"].wait(20)
        events.append("measure ended")

    threads = {n: threading.Thread(target=compile_, args=(n,)) for n in ("first", "second", "third")}
    threads["first"].start()
    assert _until(lambda: "first compiles" in events)
    threads["second"].start()
    time.sleep(0.2)
    assert "second compiles" not in events  # one compile at a time
    gates["first-written"].set()
    assert _until(lambda: "second compiles" in events), events  # beside the first one's check
    threads["third"].start()
    gates["first-end"].set()
    assert _until(lambda: "first ended" in events)
    time.sleep(0.3)
    assert "third compiles" not in events, events  # the first one's end did not end the second's lease
    gates["second-written"].set()
    assert _until(lambda: "third compiles" in events), events
    m = threading.Thread(target=measure)
    m.start()
    gates["second-end"].set()
    time.sleep(0.3)
    assert "measure runs" not in events, events  # the third still compiles on the GPU
    gates["third-end"].set()
    assert _until(lambda: "measure runs" in events), events
    late = threading.Thread(target=compile_, args=("late",))
    gates["late-end"] = threading.Event()
    late.start()
    time.sleep(0.3)
    assert "late compiles" not in events, events  # nothing starts beside a measurement
    gates["measure-end"].set()
    assert _until(lambda: "late compiles" in events), events
    gates["late-end"].set()
    for t in [*threads.values(), m, late]:
        t.join(timeout=20)
    assert events.index("second gives back") < events.index("third compiles") < events.index("measure runs")


def test_an_exclusive_lease_waits_for_a_check_still_running(tmp_path: Path) -> None:
    pool = GpuPool([Gpu.from_info(d) for d in _gpus(H100)], tmp_path / "locks", poll=0.01)
    events: list[str] = []
    checking, end = threading.Event(), threading.Event()

    def first() -> None:
        with pool.acquire() as lease:
            lease.give_back()
            checking.set()
            end.wait(20)
            events.append("check ended")

    def measure() -> None:
        with pool.acquire(exclusive=True):
            events.append("measured")

    a = threading.Thread(target=first)
    a.start()
    checking.wait(10)
    b = threading.Thread(target=measure)
    b.start()
    time.sleep(0.4)
    assert events == []  # the GPU is free of compiles, but the first one's check still uses it
    end.set()
    a.join(20)
    b.join(20)
    assert events == ["check ended", "measured"]


def test_cancel_ends_every_wait_for_a_gpu(tmp_path: Path) -> None:
    from aitune_build.gpus import Cancelled

    pool = GpuPool([Gpu.from_info(d) for d in _gpus(H100)], tmp_path / "locks", poll=0.01)
    got: list[str] = []

    def wait() -> None:
        try:
            with pool.acquire():
                got.append("lent")
        except Cancelled:
            got.append("cancelled")

    with pool.acquire():
        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.2)
        pool.cancel()
        t.join(10)
    assert got == ["cancelled"]


def _take(pool: GpuPool) -> str:
    with pool.acquire() as lease:
        return lease.gpu.uuid


# --- a real build, its eager targets treated as GPU-bound (the test hook) -------------------------------------

SCHEDULED = """
[project]
name = "sched"

[modules.probe]
factory = "models.probe:build"
inputs = [{{ name = "input", shape = [2, 4] }}]

[backends.ref]
kind = "eager"
{targets}
"""

PROBE = '''
import json, os, time
import torch

LOG = {log!r}


def build(i=0, crash=False):
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if crash:
        os._exit(3)
    t0 = time.time()
    if i < 2:
        # The first two targets wait for each other: only a build that runs them side by side on two GPUs passes.
        open(os.path.join(LOG, "started-" + cvd), "w").close()
        while not any(n != "started-" + cvd for n in os.listdir(LOG) if n.startswith("started-")):
            if time.time() - t0 > 120:
                raise RuntimeError("no other GPU's target ran meanwhile")
            time.sleep(0.05)
    time.sleep(0.3)
    with open(os.path.join(LOG, "calls.jsonl"), "a") as f:
        f.write(json.dumps({{"cvd": cvd, "pid": os.getpid(), "t0": t0, "t1": time.time(), "i": i}}) + "\\n")
    return torch.nn.Linear(4, 2)
'''


def _sched_project(root: Path, log: Path, targets: dict[str, str]) -> Path:
    log.mkdir(parents=True)
    body = "".join(f'\n[targets.{n}]\nmodule = "probe"\nbackend = "ref"\ncheck = {{ seed = {i} }}\n' for i, n in enumerate(targets))
    # Args per target go through distinct modules: each target needs its own key (one key builds once, locked).
    man = SCHEDULED.format(targets=body)
    for i, (n, args) in enumerate(targets.items()):
        man = man.replace(f'[targets.{n}]\nmodule = "probe"', f'[targets.{n}]\nmodule = "m{i}"')
        man += f'\n[modules.m{i}]\nfactory = "models.probe:build"\nargs = {args}\ninputs = [{{ name = "input", shape = [2, 4] }}]\n'
    root.mkdir(parents=True)
    (root / "models").mkdir()
    (root / "models/__init__.py").write_text("")
    (root / "models/probe.py").write_text(PROBE.format(log=str(log)))
    (root / "aitune.toml").write_text(man)
    return root


@pytest.mark.slow
def test_gpu_targets_run_one_per_gpu_side_by_side(tmp_path: Path, on_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv(TEST_GPU_BOUND_ENV, "eager")
    on_path(fake_smi(tmp_path / "smi", [H100, H100, H200]))
    log = tmp_path / "log"
    root = _sched_project(tmp_path / "p", log, {f"t{i}": f"{{ i = {i} }}" for i in range(4)})
    code, out, data = run_cli(root, "build", "-j", "1", "--json")
    assert code == 0, out
    assert [t["status"] for t in data["targets"]] == ["built"] * 4
    used = {t["gpu"]["uuid"] for t in data["targets"]}
    assert used == {uuid(0), uuid(1)}  # the H200 (GPU 2) is another model: never used, keys stay stable
    for t in data["targets"]:
        rec = json.loads((root / "build" / t["name"] / "build.json").read_text())
        assert rec["gpu"]["uuid"] == t["gpu"]["uuid"] and rec["gpu"]["driver"] == H100[2]
        assert rec["toolchain"]["gpu"] == {"name": H100[0], "compute_capability": "9.0"}
    calls = [json.loads(line) for line in (log / "calls.jsonl").read_text().splitlines()]
    spans: dict[int, tuple[str, float, float]] = {}
    for c in calls:
        cvd, t0, t1 = spans.get(c["pid"], (c["cvd"], c["t0"], c["t1"]))
        spans[c["pid"]] = (c["cvd"], min(t0, c["t0"]), max(t1, c["t1"]))
    assert {s[0] for s in spans.values()} == {uuid(0), uuid(1)}  # each worker saw exactly its GPU
    for a, (cva, a0, a1) in spans.items():
        for b, (cvb, b0, b1) in spans.items():
            if a < b and cva == cvb:
                assert a1 <= b0 or b1 <= a0, "two workers on one GPU at once"

    code, out, _ = run_cli(root, "build", "-f", "t0")
    assert code == 0 and f"on GPU 0 ({H100[0]})" in out  # progress says which GPU builds what


@pytest.mark.slow
def test_a_crashed_gpu_target_frees_its_gpu(tmp_path: Path, on_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv(TEST_GPU_BOUND_ENV, "eager")
    on_path(fake_smi(tmp_path / "smi", [H100, H100]))
    root = _sched_project(tmp_path / "p", tmp_path / "log", {"boom": "{ i = 5, crash = true }", "after": "{ i = 6 }"})
    code, out, data = run_cli(root, "build", "--gpus", "1", "-k", "--json")
    assert code == 1, out
    got = {t["name"]: t for t in data["targets"]}
    assert got["boom"]["status"] == "failed" and "exited with code 3" in got["boom"]["reason"]
    assert got["after"]["status"] == "built" and got["after"]["gpu"]["uuid"] == uuid(1)  # --gpus 1: GPU 1 only


def _cuda_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.gpu
@pytest.mark.skipif(_cuda_gpus() < 2 or len(gpu_info()) < 2, reason="needs 2 NVIDIA GPUs with CUDA torch")
def test_real_gpus_build_side_by_side_each_worker_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AITUNE_CACHE_DIR", raising=False)
    monkeypatch.delenv(TEST_GPU_BOUND_ENV, raising=False)
    visible = gpu_info()[:2]
    man = TWO_DEVICES.format(backends=CPU_FIRST).replace(
        '[targets.on_cpu]\nmodule = "mlp"\nbackend = "exp_cpu"',
        '[targets.on_cuda2]\nmodule = "mlp"\nbackend = "exp_cuda"\ncheck = { seed = 1 }')
    root = make_project(tmp_path / "p", man)
    code, out, data = run_cli(root, "build", "--gpus", ",".join(g["index"] for g in visible), "--json")
    assert code == 0, out
    used = {t["gpu"]["uuid"] for t in data["targets"]}
    assert used == {g["uuid"] for g in visible}  # both submitted at once: one on each GPU
    model = {"name": visible[0]["name"], "compute_capability": visible[0]["compute_capability"]}
    for t in data["targets"]:
        rec = json.loads((root / "build" / t["name"] / "build.json").read_text())
        assert rec["toolchain"]["gpu"] == model and rec["gpu"]["driver"] == visible[0]["driver"]


OVERLAP = """
[project]
name = "overlap"

[modules.m0]
factory = "models.probe:build"
args = {{ i = 0 }}
inputs = [{{ name = "input", shape = [2, 4] }}]

[modules.m1]
factory = "models.probe:build"
args = {{ i = 1 }}
inputs = [{{ name = "input", shape = [2, 4] }}]

[backends.exp]
kind = "export"

[targets.t0]
module = "m0"
backend = "exp"

[targets.t1]
module = "m1"
backend = "exp"
"""

OVERLAP_PROBE = '''
import os, time
import torch

LOG = {log!r}


class Probe(torch.nn.Module):
    def __init__(self, i):
        super().__init__()
        self.i = i
        self.lin = torch.nn.Linear(4, 2)

    def forward(self, input):
        if self.i == 0 and not torch.compiler.is_exporting():
            # t0's eager reference, run by its check: wait (at most wait_s) for t1's worker to construct its module
            t0 = time.time()
            while not os.path.exists(os.path.join(LOG, "constructed-1")) and time.time() - t0 < {wait_s}:
                time.sleep(0.05)
            with open(os.path.join(LOG, "t0-check-saw-t1"), "w") as f:
                f.write(str(os.path.exists(os.path.join(LOG, "constructed-1"))))
        return self.lin(input)


def build(i=0):
    if i == 1:
        open(os.path.join(LOG, "constructed-1"), "w").close()
    return Probe(i)
'''


def _overlap_project(tmp_path: Path, on_path, monkeypatch: pytest.MonkeyPatch, wait_s: int = 20) -> tuple[Path, Path]:
    """(log folder, project root): two export targets treated as GPU-bound on one fake GPU; t0's check waits up to
    wait_s for t1's module to be constructed."""
    monkeypatch.setenv(TEST_GPU_BOUND_ENV, "export")
    monkeypatch.delenv("AITUNE_GPU_OVERLAP", raising=False)
    on_path(fake_smi(tmp_path / "smi", [H100]))
    log = tmp_path / "log"
    log.mkdir()
    root = tmp_path / "p"
    (root / "models").mkdir(parents=True)
    (root / "models/__init__.py").write_text("")
    (root / "models/probe.py").write_text(OVERLAP_PROBE.format(log=str(log), wait_s=wait_s))
    (root / "aitune.toml").write_text(OVERLAP.format())
    return log, root


@pytest.mark.slow
def test_the_next_target_compiles_on_the_gpu_while_the_previous_one_is_checked(tmp_path: Path, on_path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """One (fake) GPU, two export targets treated as GPU-bound: t1's worker starts once t0's artifact is written,
    while t0 is still being checked; without that overlap t0's check would wait 20 s and see nothing."""
    log, root = _overlap_project(tmp_path, on_path, monkeypatch)
    code, out, data = run_cli(root, "build", "--json", "t0", "t1")
    assert code == 0, out
    assert [t["status"] for t in data["targets"]] == ["built", "built"]
    assert {t["gpu"]["uuid"] for t in data["targets"]} == {uuid(0)}
    assert (log / "t0-check-saw-t1").read_text() == "True"


SAVE_PROBES = """
[project]
name = "saves"

[modules.m]
factory = "models.probe:build"
args = {{ i = 1 }}
inputs = [{{ name = "input", shape = [2, 4] }}]

[backends.s0]
kind = "{kind}"
mark = "{log}/started-0"
wait_for = "{log}/started-1"
wait_s = {wait_s}

[backends.s1]
kind = "{kind}"
mark = "{log}/started-1"
wait_for = "{log}/started-0"
wait_s = {wait_s}

[targets.t0]
module = "m"
backend = "s0"

[targets.t1]
module = "m"
backend = "s1"
"""


def test_the_gpu_is_given_back_when_a_save_that_needs_no_gpu_starts(tmp_path: Path, on_path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """One (fake) GPU, two targets whose save waits for the other target's build to start. A backend whose save
    needs no GPU (an exported program, written as built) gives the GPU back as its save starts, so the other target
    compiles meanwhile and each save sees the other's build; with a save that needs the GPU, the GPU stays lent until
    the artifact is written, and the first target's save waits in vain."""
    log, _ = _overlap_project(tmp_path, on_path, monkeypatch, wait_s=0)
    monkeypatch.setenv("AITUNE_BACKENDS", "saveprobe=tests.toy_backend:SaveProbeBackend,"
                                          "saveprobe_gpu=tests.toy_backend:SaveOnGpuProbeBackend")
    monkeypatch.setenv(TEST_GPU_BOUND_ENV, "saveprobe,saveprobe_gpu")
    saw, waited, before = {}, {}, {}
    for kind, wait_s in (("saveprobe", 20), ("saveprobe_gpu", 2)):
        for f in log.glob("started-*"):
            f.unlink()
        root = tmp_path / kind
        (root / "models").mkdir(parents=True)
        (root / "models/probe.py").write_text(OVERLAP_PROBE.format(log=str(log), wait_s=0))
        (root / "aitune.toml").write_text(SAVE_PROBES.format(kind=kind, log=str(log), wait_s=wait_s))
        code, out, data = run_cli(root, "build", "--json", "t0", "t1")
        assert code == 0, out
        assert {t["gpu"]["uuid"] for t in data["targets"]} == {uuid(0)}
        recs = [json.loads((root / "build" / t / "build.json").read_text()) for t in ("t0", "t1")]
        saw[kind] = sorted(r["record"]["saw"] for r in recs)
        waited[kind] = max(r["timings"]["gpu_wait"] for r in recs)
        before[kind] = sorted(r["record"]["saw_before_save"] for r in recs)
    assert before["saveprobe"] == [False, True], before  # the GPU was not given back before the first save started
    assert saw["saveprobe"] == [True, True], saw  # each build started while the other one saved
    assert saw["saveprobe_gpu"] == [False, True], saw  # the second started once the first had written its artifact
    assert waited["saveprobe_gpu"] >= 2.0, waited  # the second target waited out the first one's save for its GPU


@pytest.mark.slow
def test_a_target_waiting_for_its_gpu_counts_as_still_to_come(tmp_path: Path, on_path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With a compile and a check per GPU in flight, the second target is handed to a thread (it waits there for
    the GPU) before the first one starts: the runner must still see it as pending, or a warm server would not fork
    the spare that imports torch_tensorrt for it ahead of time (workers.py)."""
    from aitune_build.executor import BuildOptions, LocalRunner, build
    from aitune_build.plan import select
    from aitune_build.project import Project

    _, root = _overlap_project(tmp_path, on_path, monkeypatch, wait_s=0)
    seen: dict[str, set[str]] = {}

    class Observed(LocalRunner):  # the real runner; it notes what is still to come when each target gets its GPU
        def compile(self, project, name, backend, artifact_dir, upstream, log, started, entry=None):  # noqa: ANN001
            def noted(where):  # noqa: ANN001
                started(where)
                seen[name] = set(self.pending_kinds())

            return super().compile(project, name, backend, artifact_dir, upstream, log, noted, entry)

    project = Project.open(root / "aitune.toml")
    try:
        runner = Observed(project, 1)
        runner.kinds = {"export"}
        results = build(project, select(project.manifest.model, ["t0", "t1"]), BuildOptions(), runner=runner)
    finally:
        project.close()
    assert [r.status for r in results] == ["built", "built"], [r.reason for r in results]
    first, second = list(seen)  # in the order they got the GPU (either may win it)
    assert seen[first] == {"export"}, seen  # the other one waited for the GPU in its thread: still to come
    assert seen[second] == set(), seen


PRIMED = """
[project]
name = "primed"

[modules.m]
factory = "models.tiny:build"
inputs = [{ name = "x", shape = [2, 4] }]

[backends.trt]
kind = "torch_tensorrt_aot"

[backends.exp]
kind = "export"
device = "cuda"

[targets.a_trt]
module = "m"
backend = "trt"
[targets.b_exp]
module = "m"
backend = "exp"
[targets.c_trt]
module = "m"
backend = "trt"
[targets.d_exp]
module = "m"
backend = "exp"
[targets.e_trt]
module = "m"
backend = "trt"
"""


def test_export_targets_go_first_and_each_gpu_a_trt_target_needs_gets_a_spare_at_the_first_compile(
        tmp_path: Path, on_path) -> None:
    """The local runner hands out GPU targets without late imports (export) before Torch-TensorRT ones, keeping the
    manifest's order within each group, and at its first compile asks the warm server for one spare per GPU that a
    Torch-TensorRT target will need (no more spares than such targets that will compile, none without them, never
    more than the GPUs), so that torch_tensorrt's import runs beside the export targets instead of in line."""
    from aitune_build.executor import LocalRunner
    from aitune_build.project import Project
    from aitune_build.workers import Workers

    on_path(fake_smi(tmp_path / "smi", [H100, H100]))
    root = tmp_path / "p"
    (root / "models").mkdir(parents=True)
    (root / "models/tiny.py").write_text("import torch\n\ndef build():\n    return torch.nn.Linear(4, 4)\n")
    (root / "aitune.toml").write_text(PRIMED)
    primed: list[tuple[dict[str, str], str]] = []

    class Seen(Workers):  # the runner's request is what is tested; the server side: test_workers.py
        def prime(self, env: dict[str, str], kind: str) -> None:
            primed.append((env, kind))

    project = Project.open(root / "aitune.toml")
    try:
        man = project.manifest.model
        runner = LocalRunner(project, 1)
        assert runner.schedule(man, ["a_trt", "b_exp", "c_trt", "d_exp", "e_trt"]) == \
            ["b_exp", "d_exp", "a_trt", "c_trt", "e_trt"]
        assert runner.schedule(man, ["d_exp", "b_exp"]) == ["d_exp", "b_exp"]  # no TRT target: order kept
        # build() says ahead of the first compile which targets will compile: only Torch-TensorRT targets that will
        # count (an up-to-date one would get a spare importing torch_tensorrt for nothing), up to the GPUs.
        names = ["b_exp", "a_trt", "c_trt", "d_exp", "e_trt"]
        for will, spares in (({"a_trt", "c_trt", "e_trt"}, 2), ({"c_trt", "d_exp"}, 1), ({"b_exp", "d_exp"}, 0),
                             (set(), 0), ({"a_trt", "c_trt"}, 2)):
            runner = LocalRunner(project, 1)
            asked: list[str] = []
            runner.ahead(man, names, lambda n, will=will: asked.append(n) or n in will)
            assert not {"b_exp", "d_exp"} & set(asked)  # keys are computed for Torch-TensorRT targets only
            primed.clear()
            runner._prime(Seen())
            runner._prime(Seen())  # once per build
            assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in primed] == [uuid(i) for i in range(spares)], (will, primed)
            assert all(kind == "torch_tensorrt_aot" for _, kind in primed)
    finally:
        project.close()
