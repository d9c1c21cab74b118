"""Runs a plan: the only place with concurrency. Each compile runs in a worker process with its log kept."""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .backends import backend_for
from .errors import ReproducibilityError, UserError
from .manifest import to_json
from .faults import checkpoint
from .outputs import FAILURE, LOG, BuildRecord, CorruptCopy, current_record, materialise, read_record
from .paths import io_problem
from .project import Project
from .status import Status

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any
    from concurrent.futures import Future

    from .gpus import GpuPool
    from .workers import Workers

BUILT, CACHED, FAILED, SKIPPED = Status.BUILT, Status.CACHED, Status.FAILED, Status.SKIPPED


@dataclass
class BuildOptions:
    """How to build: the command line's options."""

    jobs: int = 1  # CPU targets at a time; GPU targets run one per usable GPU (gpus.py)
    keep_going: bool = False
    force: bool = False
    named: tuple[str, ...] = ()  # targets named on the command line: unavailable backends fail instead of skip
    check_reproducible: bool = False
    settle_only: bool = False  # the no-op fast path (quick.py): raise NeedsWork instead of building anything
    retune: bool = False  # measure tuned targets' candidates again even when their selection is up to date or cached


class NeedsWork(Exception):
    """BuildOptions.settle_only: TARGET is not up to date (nothing was started)."""


@dataclass
class TargetResult:
    """What happened to one target in this run (one line of the report, one entry of --json)."""

    name: str
    status: Status
    key: str | None = None
    seconds: float = 0.0
    reason: str = ""
    error: str | None = None  # "user" | "check" | "backend" | "crash" | "unavailable" | "upstream"
    record: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, str] | None = None  # the GPU it was built on in this run (gpus.Gpu.as_json)
    node: str | None = None  # the Ray node it was built on (--executor ray)
    source: str | None = None  # "local" | "remote" | "built": where a built or cached artifact came from

    def as_json(self) -> dict[str, Any]:
        doc = {"name": self.name, "status": self.status, "key": self.key, "seconds": round(self.seconds, 3), "reason": self.reason,
               "gpu": self.gpu}
        if self.node is not None:
            doc["node"] = self.node
        if self.source is not None:
            doc["source"] = self.source
        if "transfer" in self.record and self.status == BUILT:  # --executor ray: how the artifact reached this host
            doc["transfer"] = self.record["transfer"]
        if "selection" in self.record:  # a tuned target: its winner, the strategy and why it won
            doc["selection"] = self.record["selection"]
        return doc


# (event, target, payload): "start" (a TargetResult with status "building" and the gpu/node it builds on) once the
# target has its device; "worker" ({"progress": Path, "log": Path}) before its worker runs: the worker appends
# {"phase", "t"} JSON lines to `progress` and writes `log`; "done" (the TargetResult).
if TYPE_CHECKING:
    Listener = Callable[[str, str, Any], None]


class Runner:
    """Where compiles run. The scheduler (build) asks it how many targets of a class may run at once and hands it
    each target to compile into a temp folder; storing and materialising stay with the scheduler."""

    def slots(self, gpu_bound: bool) -> int:
        raise NotImplementedError

    def unavailable(self, backend: Any) -> str | None:
        return backend.unavailable()

    def compile(self, project: Project, name: str, backend: Any, artifact_dir: Path, upstream: Path | None, log: Path,
                started: Callable[[dict[str, Any]], None], entry: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        """Build into artifact_dir; call started({"gpu":..., "node":...}) once the target has its device; return
        the worker's outcome ({"ok", "record", "check", "timings", ...} plus "gpu"/"node" where known). entry: the
        (key, components) the result will be stored under (not for a reproducibility rebuild); a runner that
        uploads it to the remote cache itself says so with outcome["transfer"] = "remote"."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stop compiles in flight (Ctrl-C). Local workers get the terminal's SIGINT themselves."""
        return None

    # The backend kinds of the targets not yet handed out (set by build()): a runner may prepare for them.
    pending_kinds: Callable[[], set[str]] = staticmethod(lambda: set())

    def schedule(self, man: Any, names: list[str]) -> list[str]:
        """The order in which build() hands out targets that are ready (upstreams still come first)."""
        return names

    def ahead(self, man: Any, names: list[str], will_build: Callable[[str], bool]) -> None:
        """Called once by build(), when the first target that needs work is handed out: NAMES are the targets not
        handed out before it (it included); will_build(name) computes whether one of them will compile."""
        return None

    def measuring_gpu(self) -> Any:
        """A context holding a GPU of this host for a tuned target's measurement (tune.py): the Gpu, or None."""
        from contextlib import nullcontext

        return nullcontext(None)

    def close(self) -> None:
        return None


class LocalRunner(Runner):
    """Worker processes on this host: CPU targets `jobs` at a time, GPU targets one per usable GPU, each worker
    pinned to its GPU through CUDA_VISIBLE_DEVICES."""

    def __init__(self, project: Project, jobs: int):
        self.project, self.jobs = project, max(1, jobs)
        self._pool: GpuPool | None = None
        self.kinds: set[str] = set()  # backend kinds of the build's targets: what warm workers preload
        self._workers: Workers | None = None  # started at the first compile: a no-op build starts none
        self._workers_lock = threading.Lock()
        self._primed = False
        self._late_kinds: list[str] = []  # from ahead(): one per Torch-TensorRT target that will compile
        self.server_idle_s: float | None = None  # AITUNE_BUILD_SERVER: a persistent build server (daemon.py)
        self.server_kinds: set[str] = set()  # what that server preloads, besides self.kinds
        if os.environ.get("AITUNE_BUILD_SERVER"):
            from .daemon import idle_seconds

            try:
                self.server_idle_s = idle_seconds()
            except ValueError as e:
                raise UserError(f"environment: {e}") from None
        from .gpus import overlap_checks

        self.overlap = overlap_checks()  # a GPU compiles the next target while the previous one is checked

    def workers(self) -> Workers:
        with self._workers_lock:
            if self._workers is None:
                from .workers import Workers

                self._workers = Workers(self.kinds, self.server_idle_s, self.server_kinds)
            return self._workers

    def _gpus(self) -> GpuPool:
        with self._workers_lock:  # GPU targets' threads reach this together
            if self._pool is None:
                from .gpus import GpuPool

                store = self.project.store
                lock_dir = None if store.readonly else store.root / "locks"
                self._pool = GpuPool(self.project.fingerprinter.gpu_plan.gpus, lock_dir)
            return self._pool

    def measuring_gpu(self) -> Any:
        if not self.project.fingerprinter.gpu_plan.gpus:
            return super().measuring_gpu()
        from contextlib import contextmanager

        @contextmanager
        def alone() -> Any:  # nothing else runs on the GPU meanwhile: no compile, no check
            with self._gpus().acquire(exclusive=True) as lease:
                yield lease.gpu

        return alone()

    def slots(self, gpu_bound: bool) -> int:  # no store opened here: a no-op build never opens it
        if not gpu_bound:
            return self.jobs
        # Per GPU, one target compiling and one being saved or checked (the pool lends each GPU to one compile at a time).
        return max(1, len(self.project.fingerprinter.gpu_plan.gpus)) * (2 if self.overlap else 1)

    def unavailable(self, backend: Any) -> str | None:
        if backend.needs_gpu and not self.project.fingerprinter.gpu_plan.gpus:
            return "needs an NVIDIA GPU with CUDA (nvidia-smi shows none visible; see --gpus / CUDA_VISIBLE_DEVICES)"
        return backend.unavailable()

    def schedule(self, man: Any, names: list[str]) -> list[str]:
        # Quick targets (export, eager) first, when the build also has targets whose workers import libraries late
        # (torch_tensorrt: SPARE_IMPORTS): the spares primed at the first compile import those beside them. Nothing
        # else moves (a long Inductor autotune ahead would only keep primed spares waiting).
        if not any(_late_kinds(man, n) for n in names):
            return names
        return sorted(names, key=lambda n: not _kinds(man, [n]) <= QUICK_KINDS)  # stable within each group

    def ahead(self, man: Any, names: list[str], will_build: Callable[[str], bool]) -> None:
        # Which Torch-TensorRT targets will compile, so that _prime forks no spare for targets that are up to date (a
        # wasted import of torch_tensorrt and a CUDA context); keys are computed only where there is a GPU to prime.
        gpus = self.project.fingerprinter.gpu_plan.gpus
        found: list[str] = []
        for n in names:
            late = _late_kinds(man, n)
            if gpus and late and len(found) < len(gpus) and will_build(n):
                found.append(late[0])
        self._late_kinds = found

    def _prime(self, workers: Workers) -> None:
        """At the build's first compile: a spare for each GPU that a target importing libraries late will need (one
        per such target that will compile, up to the GPUs), so that the first import runs beside other work."""
        with self._workers_lock:
            if self._primed:
                return
            self._primed = True
        late = self._late_kinds or []  # build() said which, through ahead(), before any compile
        gpus = self.project.fingerprinter.gpu_plan.gpus
        if not late or not gpus:
            return
        for gpu in gpus[:len(late)]:
            workers.prime({"CUDA_VISIBLE_DEVICES": gpu.visible_devices}, late[0])

    def compile(self, project: Project, name: str, backend: Any, artifact_dir: Path, upstream: Path | None, log: Path,
                started: Callable[[dict[str, Any]], None], entry: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        workers = self.workers()
        self._prime(workers)
        if not backend.needs_gpu:
            started({})
            return _run_worker(project, name, artifact_dir, upstream, log, workers=workers, kind=backend.kind)
        from .gpus import Cancelled
        from .workers import family_of

        overlap = self.overlap
        try:
            # A compile that times kernels (TensorRT's tactics, Inductor's autotuning) has the GPU to itself: it waits
            # for the checks of earlier targets still running there.
            asked = time.perf_counter()
            with self._gpus().acquire(exclusive=overlap and backend.times_kernels) as lease:  # given back however it ends
                gpu, waited = lease.gpu, time.perf_counter() - asked
                started({"gpu": gpu.as_json()})
                # Another target of this family still to come: the warm server may prepare a spare for this GPU.
                more = family_of(backend.kind) in {family_of(k) for k in self.pending_kinds()}
                # Once the build is done with the GPU (its artifact is being saved, or is written), the next target
                # may compile on this GPU while this one is saved and checked.
                free_from = backend.gpu_free_phases if overlap else ()
                early = OnPhase(progress_file(artifact_dir), free_from, lease.give_back) if free_from else None
                try:
                    outcome = _run_worker(project, name, artifact_dir, upstream, log,
                                          env={"CUDA_VISIBLE_DEVICES": gpu.visible_devices}, workers=workers,
                                          kind=backend.kind, more=more)
                finally:
                    if early is not None:
                        early.stop()
        except Cancelled:  # Ctrl-C while waiting for a GPU
            return {"ok": False, "error": "crash", "message": "interrupted"}
        if isinstance(outcome.get("timings"), dict):  # a target's seconds in --json include this wait
            outcome["timings"]["gpu_wait"] = round(waited, 4)
        return {**outcome, "gpu": gpu.as_json()}

    def cancel(self) -> None:  # Ctrl-C: kill the running workers now; their threads see a crash and store nothing
        if self._pool is not None:
            self._pool.cancel()
        if self._workers is not None:
            self._workers.interrupt()

    def close(self) -> None:
        if self._workers is not None:
            self._workers.close()


def build(project: Project, order: list[str], options: BuildOptions, listen: Listener | None = None,
          runner: Runner | None = None) -> list[TargetResult]:
    report = listen or (lambda *_: None)
    # Targets handed to a thread that have not got their device yet (a GPU target waits for its GPU there): still to
    # come, for the runner's pending_kinds (a warm server's spare for the next target of a family).
    waiting: set[str] = set()

    def listen(event: str, name: str, payload: Any) -> None:
        if event in ("start", "done"):
            waiting.discard(name)
        report(event, name, payload)
    man = project.manifest.model
    results: dict[str, TargetResult] = {}
    if runner is None:
        runner = LocalRunner(project, options.jobs)
        runner.kinds = _kinds(man, order)
        if runner.server_idle_s is not None:
            runner.server_kinds = server_kinds(man)
    # With a remote cache, REMOTE_FETCHES more targets than the runner's slots are in flight, so that downloads
    # overlap each other and the compiles; the compiles themselves still take a slot of their class (gate).
    extra, gate = 0, None
    stop = threading.Event()

    stopped_by: list[str] = []  # the failed target that stopped the build (no -k)
    gpu_bound_by_backends: dict[tuple[str, ...], bool] = {}

    def finish(res: TargetResult, t0: float, stops: bool = True) -> None:
        res.seconds = time.perf_counter() - t0
        results[res.name] = res
        _remember_failure(project, res)
        listen("done", res.name, res)
        if res.status == FAILED and stops and not options.keep_going:
            stopped_by.append(res.name)
            stop.set()

    def run(job: _Job) -> TargetResult:
        try:
            if job.backend is None:  # a tuned target: build its candidates, measure, select (tune.py)
                from .tune import build_selection

                return build_selection(project, job, options, runner, listen)
            return _build_one(project, job, options, runner, listen, gate)
        except ReproducibilityError as e:
            return TargetResult(job.name, FAILED, job.key, reason=str(e), error="backend")
        except UserError as e:
            return TargetResult(job.name, FAILED, job.key, reason=str(e), error="user")
        except OSError as e:  # disk full, a folder removed by `clean` meanwhile, a read-only file system
            return TargetResult(job.name, FAILED, job.key, reason=io_problem(e), error="io")

    pending = runner.schedule(man, list(order))
    runner.pending_kinds = lambda: _kinds(man, list(pending) + list(waiting))
    running: dict[Future, tuple[str, float, bool]] = {}  # future -> (target, start, GPU-bound)
    pool = None  # started at the first target that needs work: a no-op build needs no threads
    try:
        while pending or running:
            for name in list(pending):
                up = man.targets[name].from_
                if up is not None and up not in results:
                    continue  # upstream still pending or running
                gpu_bound = _gpu_bound(man, name, gpu_bound_by_backends)
                if sum(r[2] == gpu_bound for r in running.values()) >= runner.slots(gpu_bound) + extra:
                    continue  # this class (CPU or GPU) is at capacity; the other may still start
                pending.remove(name)
                t0 = time.perf_counter()
                if up is not None and results[up].status in (FAILED, SKIPPED):
                    finish(TargetResult(name, SKIPPED, reason=f"upstream '{up}' {results[up].status}", error="upstream"), t0)
                    continue
                # Keys are computed here, in order; an up-to-date target is done without a thread hand-off, so a
                # no-op build costs a key and a few stats per target.
                try:
                    job = _prepare(project, name, results, options.force or (options.retune and man.targets[name].candidates is not None))
                except UserError as e:
                    # This target's own inputs are broken (a file that does not parse, ...): it fails alone, before
                    # anything is compiled for it, and does not stop targets that do not share the problem.
                    finish(TargetResult(name, FAILED, reason=str(e), error="user"), t0, stops=False)
                    continue
                if job.current is not None and not options.check_reproducible:
                    finish(TargetResult(name, CACHED, job.key, reason="up to date", record=job.current, source="local"), t0)
                    continue
                if options.settle_only:
                    raise NeedsWork(name)
                if stop.is_set():  # after a failure (no -k): restore what the cache holds, build nothing new
                    hit = _from_store(project, name, job.key) if project.store.has(job.key) else None
                    finish(hit or TargetResult(name, SKIPPED, job.key, error="upstream", reason=(
                        f"not started: '{stopped_by[0]}' failed (--keep-going builds the rest)")), t0)
                    continue
                if pool is None:
                    from concurrent.futures import ThreadPoolExecutor

                    from .remote import REMOTE_FETCHES, configured

                    if configured(project)[0] is not None and not project.remote_disabled:
                        extra = REMOTE_FETCHES
                        gate = {c: threading.Semaphore(runner.slots(c)) for c in (False, True)}
                    pool = ThreadPoolExecutor(max_workers=len(order))  # the slots above bound what runs
                    runner.ahead(man, [name] + pending, lambda n: _will_build(project, n, results, options))
                waiting.add(name)
                running[pool.submit(run, job)] = (name, t0, gpu_bound)
            if not running:
                continue
            from concurrent.futures import FIRST_COMPLETED, wait

            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                _, t0, _ = running.pop(fut)
                finish(fut.result(), t0)
    except BaseException:  # Ctrl-C: cancel what runs elsewhere before waiting for the threads that wait on it
        runner.cancel()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        runner.close()
        project.finish_uploads()  # remote uploads overlap the build and end before it returns
    return [results[n] for n in order]  # the project is its opener's to close


def _kinds(man: Any, names: list[str]) -> set[str]:
    """The backend kinds these targets build with (a tuned target's: its candidates')."""
    return {man.backends[b].kind for n in names for b in (man.targets[n].candidates or [man.targets[n].backend])}


def _will_build(project: Project, name: str, results: dict[str, TargetResult], options: BuildOptions) -> bool:
    """Whether target NAME will compile in this build, judged before it is handed out: not up to date (its key is
    computed here and again when it is handed out), or its upstream not built yet. A target that cannot be keyed
    (its files broken) will not."""
    man = project.manifest.model
    up = man.targets[name].from_
    if up is not None and up not in results:
        return True
    force = options.force or (options.retune and man.targets[name].candidates is not None)
    try:
        job = _prepare(project, name, results, force)
    except (UserError, OSError):
        return False
    return job.current is None or options.check_reproducible


def server_kinds(man: Any) -> set[str]:
    """What a persistent build server preloads for this manifest: every target's kinds, so that a build of any of
    them finds the same server (build() and `aitune-build server start` both ask here)."""
    return _kinds(man, list(man.targets))


QUICK_KINDS = {"export", "eager"}  # a trace and a save, seconds: scheduled ahead of Torch-TensorRT targets


def _late_kinds(man: Any, name: str) -> list[str]:
    """The kinds of target NAME whose workers import libraries late (torch_tensorrt: workers.SPARE_IMPORTS)."""
    from .workers import SPARE_IMPORTS, family_of

    return sorted(k for k in _kinds(man, [name]) if SPARE_IMPORTS.get(family_of(k)))


def _gpu_bound(man: Any, name: str, known: dict[tuple[str, ...], bool] | None = None) -> bool:
    """Whether target name compiles on a GPU; known: answers by backend names, kept by the caller for one build."""
    spec = man.targets[name]
    names = tuple(spec.candidates) if spec.backend is None else (spec.backend,)
    if known is not None and names in known:
        return known[names]
    found = any(_backend_class(man.backends[b].kind)(man.backends[b]).needs_gpu for b in names)  # a tuned target: measured alone on its GPU
    if known is not None:
        known[names] = found
    return found


@functools.cache
def _backend_class(kind: str) -> type:
    return backend_for(kind)  # a no-op build asks once per kind, not three times per target


def _remember_failure(project: Project, res: TargetResult) -> None:
    """Keep the last failure in the target's folder (status, explain and dry runs report it); a success clears it."""
    folder = project.target_dir(res.name)
    if res.status == FAILED and res.error not in ("unavailable", "upstream"):
        from .fsutil import atomic_write_json

        try:
            atomic_write_json(folder / FAILURE, {"when": time.time(), "key": res.key, "error": res.error, "reason": res.reason})
        except OSError:
            pass
    elif res.status in (BUILT, CACHED):
        try:
            os.unlink(f"{folder}/{FAILURE}")
        except OSError:
            pass


@dataclass(frozen=True)
class _Job:
    """A target ready to build: its backend, key and, for a `from` edge, the upstream artifact."""

    name: str
    backend: Any
    comps: dict[str, Any]
    key: str
    upstream_file: Path | None
    current: dict[str, Any] | None  # the output folder's build.json when it holds an intact build of key


def _prepare(project: Project, name: str, results: dict[str, TargetResult], force: bool) -> _Job:
    man = project.manifest.model
    spec = man.targets[name]
    config = man.backends[spec.backend] if spec.backend is not None else None  # None: a tuned target
    upstream_file = upstream_digest = None
    if spec.from_ is not None:
        up_rec = BuildRecord(results[spec.from_].record)
        upstream_file = project.target_dir(spec.from_) / up_rec.artifact
        upstream_digest = up_rec.artifact_digest()
    key, comps = project.fingerprinter.key(name, upstream_digest)
    current = None if force else current_record(project.target_dir(name), key, project.state)
    return _Job(name, _backend_class(config.kind)(config) if config is not None else None, comps, key, upstream_file, current)


def _build_one(project: Project, job: _Job, options: BuildOptions, runner: Runner, listen: Listener,
               gate: dict[bool, threading.Semaphore] | None = None) -> TargetResult:
    name, backend, comps, key, upstream_file = job.name, job.backend, job.comps, job.key, job.upstream_file
    store = project.store

    if not options.force:
        if job.current is not None:  # only with --check-reproducible: otherwise settled by the scheduler
            res = TargetResult(name, CACHED, key, reason="up to date", record=job.current, source="local")
            return _maybe_check_reproducible(project, res, backend, options, runner, listen, upstream_file)
        with store.lock(key) if not store.readonly else _NoLock():  # gc removes under this lock: never mid-copy
            hit = _from_store(project, name, key)
        hit = hit or _from_remote(project, name, key, comps)
        if hit is not None:
            return _maybe_check_reproducible(project, hit, backend, options, runner, listen, upstream_file)

    reason = runner.unavailable(backend)
    if reason:
        status = FAILED if name in options.named else SKIPPED
        return TargetResult(name, status, key, reason=f"{backend.kind} cannot run here: {reason}", error="unavailable")

    lock = store.lock(key) if not store.readonly else _NoLock()
    with lock:
        if not options.force:  # another process may have built it while we waited for the lock
            hit = _from_store(project, name, key)
            if hit is not None:
                return hit
        with gate[backend.needs_gpu] if gate is not None else _NoLock():
            return _compile(project, name, key, comps, backend, upstream_file, runner, listen)


def _from_store(project: Project, name: str, key: str) -> TargetResult | None:
    entry = project.store.get(key)
    if entry is None:
        return None
    project.prepare_out_dir()
    record = {**entry.meta, "target": name, "source": "cache"}
    try:
        materialise(project.target_dir(name), entry.path, entry.files, record)
    except CorruptCopy:
        project.store.remove(key)
        return None
    return TargetResult(name, CACHED, key, reason="restored from cache", record=read_record(project.target_dir(name)) or record,
                        source="local")


def _from_remote(project: Project, name: str, key: str, comps: dict[str, Any]) -> TargetResult | None:
    """On a local miss: the remote cache's verified entry for key, stored locally and materialised; None on a miss."""
    remote = project.remote
    if remote is None:
        return None
    with project.store.lock(key) if not project.store.readonly else _NoLock():
        hit = _from_store(project, name, key)  # fetched by another process while we waited
        if hit is not None:
            return hit
        entry = remote.fetch(key, comps)
        if entry is None:
            return None
        record = {**entry.meta, "target": name, "source": "remote"}
        project.prepare_out_dir()
        try:
            materialise(project.target_dir(name), entry.path, entry.files, record)
        except CorruptCopy:
            project.store.remove(key)
            return None
        finally:
            if project.store.readonly:
                import shutil

                shutil.rmtree(entry.path, ignore_errors=True)  # a private temp folder, not the store
    return TargetResult(name, CACHED, key, reason=f"downloaded from {remote.display}",
                        record=read_record(project.target_dir(name)) or record, source="remote")


def progress_file(artifact_dir: Path) -> Path:
    """Where the worker building into artifact_dir reports its phases (JSON lines {"phase", "t"})."""
    return artifact_dir.with_name(artifact_dir.name + ".progress.jsonl")


def read_phases(progress: Path) -> list[str]:
    """The phases a worker has reported in its progress file so far, oldest first (none while it is unreadable)."""
    try:
        lines = progress.read_bytes().splitlines()
    except OSError:
        return []
    phases = []
    for line in lines:
        try:
            phases.append(json.loads(line)["phase"])
        except (ValueError, KeyError, TypeError):
            pass  # not a phase line
    return phases


def _compile(project: Project, name: str, key: str, comps: dict[str, Any], backend: Any, upstream_file: Path | None,
             runner: Runner, listen: Listener) -> TargetResult:
    import shutil

    folder = project.target_dir(name)
    project.prepare_out_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = project.store.new_tmp()
    progress = progress_file(tmp)
    early = None
    try:
        listen("worker", name, {"progress": progress, "log": folder / LOG})
        checkpoint("worker-start")
        watch = _UploadOnceWritten(project, tmp, backend.artifact, progress)
        try:
            outcome = runner.compile(project, name, backend, tmp, upstream_file, folder / LOG, _starter(name, key, listen),
                                     entry=(key, comps))
        finally:
            early = watch.stop()
        checkpoint("worker-done")
        where = {"gpu": outcome.get("gpu"), "node": outcome.get("node")}
        if not outcome.get("ok"):
            kind = outcome.get("error", "backend")
            msg = outcome.get("message", "failed")
            if kind not in ("user", "unavailable"):
                head, _, detail = msg.partition("\n")  # the log's path on the first line, detail below
                msg = f"{head} (log: {_rel(folder / LOG)})" + (f"\n{detail}" if detail else "")
            return TargetResult(name, FAILED, key, reason=msg, error=kind, **where)
        meta = entry_meta(name, key, comps, backend.kind, backend.artifact, outcome)
        if project.store.readonly:
            from .store import describe_files

            materialise(folder, tmp, describe_files(tmp), meta)
        else:
            entry = project.store.put(key, tmp, meta)
            checkpoint("put-done")
            materialise(folder, entry.path, entry.files, meta)
            if project.remote is not None and outcome.get("transfer") != "remote":  # a Ray node uploaded it already
                project.remote.upload(entry, name, early)  # in the background; Project.close waits for it
                early = None
        notes = (outcome.get("record") or {}).get("notes") or []  # what the backend says a user must know
        return TargetResult(name, BUILT, key, reason="; ".join(["built", *notes]), record=read_record(folder) or meta,
                            source="built", **where)
    finally:
        if early is not None:
            early.withdraw()  # the build or its check failed: the early upload's object never appears
        shutil.rmtree(tmp, ignore_errors=True)
        progress.unlink(missing_ok=True)


class OnPhase:
    """Calls `then()` once, in a thread of its own, when the worker writing `progress` has reported one of `phases`;
    stop() ends the watch (waiting for a call under way). A worker that ends before any of them never calls it."""

    def __init__(self, progress: Path, phases: tuple[str, ...], then: Callable[[], None]):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(progress, set(phases), then),
                                        name=f"aitune-on-{'-'.join(phases)}", daemon=True)
        self._thread.start()

    def _watch(self, progress: Path, phases: set[str], then: Callable[[], None]) -> None:
        while not self._stop.wait(0.05):
            if phases.intersection(read_phases(progress)):
                then()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class _UploadOnceWritten:
    """With a writable remote cache: once a local worker reports that its artifact is written (it is loaded and
    checked from then on), starts that artifact's upload so that it overlaps the check (the last target's upload
    would otherwise follow it, at the end of the build). RemoteCache.upload_early commits the object only for the
    checked bytes the store then holds; stop() hands back the EarlyUpload, if any."""

    def __init__(self, project: Project, folder: Path, artifact: str, progress: Path):
        from .worker import ARTIFACT_WRITTEN

        self.early: Any = None
        self._watch: OnPhase | None = None
        remote = project.remote
        if remote is not None and remote.writable and not project.store.readonly:
            def start() -> None:
                self.early = remote.upload_early(folder, artifact)

            self._watch = OnPhase(progress, (ARTIFACT_WRITTEN,), start)

    def stop(self) -> Any:
        if self._watch is not None:
            self._watch.stop()
        return self.early


def entry_meta(name: str, key: str, comps: dict[str, Any], kind: str, artifact: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """A built entry's metadata (build.json, the store's entry.json, the remote's index) from the worker's outcome."""
    meta = {
        "target": name, "key": key, "backend": kind, "artifact": artifact, "components": comps,
        "toolchain": comps["toolchain"], "timings": outcome["timings"], "check": outcome["check"],
        "record": outcome.get("record", {}), "built_at": time.time(), "source": "built",
        "gpu": outcome.get("gpu"),  # the GPU it was built on, driver version included (not in the key)
    }
    for where in ("node", "transfer"):  # --executor ray: the node, and how the artifact reached this host
        if outcome.get(where) is not None:
            meta[where] = outcome[where]
    return meta


def _starter(name: str, key: str, listen: Listener) -> Callable[[dict[str, Any]], None]:
    def started(where: dict[str, Any]) -> None:
        listen("start", name, TargetResult(name, "building", key, gpu=where.get("gpu"), node=where.get("node")))

    return started


def _run_worker(project: Project, name: str, artifact_dir: Path, upstream: Path | None, log: Path,
                env: dict[str, str] | None = None, workers: Workers | None = None, kind: str = "",
                more: bool = False) -> dict[str, Any]:
    """One worker process for one target. env: variables set for it on top of ours (CUDA_VISIBLE_DEVICES pins the
    worker to the GPU it was lent). workers: the build's warm workers (a child forked from a server that imported
    torch already); without, a fresh `python -m aitune_build.worker` process."""
    from .workers import Interrupted, run_plain

    result = artifact_dir.with_name(artifact_dir.name + ".result.json")
    job = artifact_dir.with_name(artifact_dir.name + ".job.json")
    submitted = time.time()
    job.write_text(json.dumps({
        "manifest": str(project.manifest.path), "manifest_data": to_json(project.manifest.model), "target": name, "artifact_dir": str(artifact_dir),
        "upstream": str(upstream) if upstream else None, "result": str(result), "submitted": submitted,
        "progress": str(progress_file(artifact_dir)),  # the phase protocol: the worker appends {"phase", "t"} lines
    }))
    try:
        code = workers.run(job, log, kind, env or {}, more) if workers is not None else run_plain(job, log, env or {})
        outcome = json.loads(result.read_text()) if result.exists() else None
        if code != 0 or outcome is None:
            return {"ok": False, "error": "crash", "message": f"worker process {_describe_exit(code)}{_disk_note(artifact_dir, log)}"}
        if isinstance(outcome.get("timings"), dict):
            outcome["timings"]["worker_total"] = round(time.time() - submitted, 4)
        return outcome
    except Interrupted:
        return {"ok": False, "error": "crash", "message": "interrupted"}
    finally:
        for f in (job, result):
            f.unlink(missing_ok=True)


def _disk_note(*paths: Path) -> str:
    """'; the disk holding X is full' when a worker died on a full disk (torch aborts rather than raising)."""
    import os

    for p in paths:
        try:
            st = os.statvfs(p.parent)
        except OSError:
            continue
        if st.f_bavail * st.f_frsize < (4 << 20):
            return f"; the disk holding {p.parent} is full: free space and build again"
    return ""


def _describe_exit(code: int) -> str:
    import signal

    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code} without a result"


def _maybe_check_reproducible(project: Project, res: TargetResult, backend: Any, options: BuildOptions,
                              runner: Runner, listen: Listener, upstream_file: Path | None) -> TargetResult:
    if not options.check_reproducible:
        return res
    if not backend.deterministic:
        res.reason += f"; not checked for reproducibility: {backend.kind} builds are not bit-for-bit deterministic"
        return res
    import shutil

    tmp = project.store.new_tmp()
    progress = progress_file(tmp)
    try:
        log = project.target_dir(res.name) / LOG
        listen("worker", res.name, {"progress": progress, "log": log})
        outcome = runner.compile(project, res.name, backend, tmp, upstream_file, log, _starter(res.name, res.key or "", listen))
        if not outcome.get("ok"):
            raise ReproducibilityError(f"rebuild for the reproducibility check failed: {outcome.get('message')}")
        from .hashing import sha256_file

        want = BuildRecord(res.record).artifact_sha256()
        got = sha256_file(tmp / backend.artifact)
        if got != want:
            raise ReproducibilityError(f"not reproducible: a rebuild gave {backend.artifact} sha256 {got[:16]}…, the cache holds {want[:16]}…")
        res.reason += "; reproducible (rebuild gave identical bytes)"
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        progress.unlink(missing_ok=True)


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
