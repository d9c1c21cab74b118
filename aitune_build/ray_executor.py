"""`build --executor ray`: each target to build becomes a Ray task on a cluster; the rest of the build stays here.

The driver (this process) computes the plan and every key, checks the cache, holds each key's lock, and only hands
the compiles out: a task runs the target in a worker process of its own as a local build does (a segfaulting compile
fails its target only), on a node with a free GPU (`num_gpus=1`) or CPU (`num_cpus=1`). The project's files travel
as the job's Ray `runtime_env` `working_dir` (out_dir, cache_dir, .git, .aitune and byte-code left out, so that an
unchanged project packs to the same content hash and Ray uploads it once; Ray also leaves out what .gitignore
lists), and aitune_build itself as a `py_modules` entry, so nodes need only Ray and torch (plus the backends'
libraries).

A result never passes whole through the driver's memory. The task returns the worker's outcome and the digests
of every file it built; the bytes travel one of three ways (build.json's "transfer" says which):
- "remote": with a read-write remote cache (issue 12), the node uploads the entry itself (remote.py's write-back:
  blobs first, index last) and the driver streams it back through the read-through path, each file checked against
  the digests. Nodes use their own credentials (the library's standard chain); the driver forwards only where the
  remote is (AWS_ENDPOINT_URL*, AWS_REGION, AITUNE_REMOTE_TIMEOUT), never a secret. A node that cannot upload
  falls back to chunks and build.log says why.
- "inline": an artifact of at most one chunk comes back in the task's result.
- "chunks": a larger one stays on its node until a second task pinned there streams it as chunks of at most
  AITUNE_RAY_CHUNK_BYTES (default 64 MiB), a few in flight; the driver writes each to a temp file as it arrives,
  hashing on the way; a file that does not match is deleted, never stored. An upstream artifact (a `from` edge)
  goes out to the node in such chunks too. (Should the driver die between the two tasks, the node's copy stays in
  its temp folder until a later task on that node finds it an hour old with its Ray worker process gone.)
The driver writes into a temp folder, checks every file against the worker's digests, and from there stores and
materialises exactly as for a local build: nothing half-written or corrupt is ever served.

Worker processes: each Ray worker process keeps a warm fork server (workers.py) for the job, so a target costs a
fork, not a fresh interpreter importing torch; every target still runs in a child of its own (a segfault fails
that target only), and when Ray kills the worker process (Ctrl-C cancels it) the server kills its children.

Keys on a heterogeneous cluster (the driver may have no GPU): GPU targets build on nodes of one accelerator type
and their keys name that type's GPU. The type is `gpu_model` (`--gpu-model` / `[project] gpu_model`, matched against
Ray's `accelerator_type:<T>` node resources, e.g. H100), else the cluster's only type; several types and no
`gpu_model` is an error. The key's GPU (name + compute capability) is what a probe task on such a node reports;
every GPU task asks for that type and checks, before building, that its GPU is the model the key names.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .executor import Runner, _run_worker
from .gpus import TEST_GPU_BOUND_ENV, GpuPlan, model_matches
from .vocabulary import BACKENDS_ENV
from .project import Project

INSTALL = "pip install 'aitune-build[ray]' (Ray must be installed on every node of the cluster too)"
PROBE_TIMEOUT_S = 600.0
# Retries after a node or worker process dies (Ray's system-failure retries; a failed compile is not retried).
MAX_RETRIES = 1



CHUNK_ENV = "AITUNE_RAY_CHUNK_BYTES"
DEFAULT_CHUNK = 64 << 20
CHUNKS_IN_FLIGHT = 4  # chunks a sending task may run ahead of the driver (Ray's generator backpressure)
# Where the remote cache is, forwarded to the nodes (never credentials: nodes have their own).
REMOTE_SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION",
                   "AITUNE_REMOTE_TIMEOUT")


def chunk_bytes() -> int:
    """The largest piece of an artifact that travels in one Ray object (AITUNE_RAY_CHUNK_BYTES, default 64 MiB)."""
    try:
        return max(1, int(os.environ.get(CHUNK_ENV, DEFAULT_CHUNK)))
    except ValueError:
        return DEFAULT_CHUNK


@dataclass(frozen=True)
class NodeJob:
    """What a node needs to build one target (plain values: pickled to the node)."""

    manifest_rel: str
    manifest_data: dict[str, Any]
    target: str
    kind: str
    kinds: tuple[str, ...]  # the build's backend kinds: what the node's warm workers preload
    key_gpu: dict[str, str] | None
    chunk: int
    upstream: tuple[str, list[Any]] | None = None  # (file name, ObjectRefs of its chunks)
    upload: dict[str, Any] | None = None  # {url, project, key, comps, artifact}: upload the entry to the remote


class RayRunner(Runner):
    def __init__(self, ray: Any, project: Project, accel: str | None):
        self.ray, self.project, self.accel = ray, project, accel
        self._refs: set[Any] = set()
        self._mutex = threading.Lock()
        self._cancelled = False
        resources = ray.cluster_resources()
        self._cpus = max(1, int(resources.get("CPU", 1)))
        self._gpus = int(resources.get("GPU", 0))
        man = project.manifest.model
        self.kinds = tuple(sorted({man.backends[b].kind for t in man.targets.values()
                                   for b in (t.candidates or [t.backend]) if b is not None}))

    @classmethod
    def connect(cls, project: Project, address: str | None, jobs: int = 1) -> RayRunner:
        """Join the cluster and settle which GPU model GPU targets' keys name (before any key is computed)."""
        try:
            import ray
        except ImportError:
            raise UserError(f"--executor ray: Ray is not installed: {INSTALL}") from None
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise UserError("--executor ray: which cluster? pass --ray-address HOST:PORT or set RAY_ADDRESS")
        root = project.manifest.root
        man = project.manifest.model
        # gitignore patterns; a deterministic package: the same files give the same hash, and Ray uploads it once.
        excludes = [".git", ".aitune", "__pycache__", "*.pyc"]
        for d in (project.out_dir, project.cache_dir):
            try:
                excludes.append("/" + d.resolve().relative_to(root.resolve()).as_posix())
            except ValueError:
                pass  # outside the project: not shipped anyway
        # A backend registered in AITUNE_BACKENDS is registered on the nodes too (its module must be importable there).
        env_vars = {k: os.environ[k] for k in (TEST_GPU_BOUND_ENV, BACKENDS_ENV, *REMOTE_SETTINGS) if k in os.environ}
        runtime_env = {"working_dir": str(root), "excludes": excludes,
                       "py_modules": [str(Path(__file__).resolve().parent)], "env_vars": env_vars}
        _cluster_messages_to_stderr()
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="warning")
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UserError(f"--executor ray: cannot connect to the Ray cluster at {address}: {e}") from None
        accel = None
        try:
            if any(_needs_gpu(man, t) for t in man.targets):
                accel = _accelerator_type(ray, project.fingerprinter.gpu_model or man.project.gpu_model)
                project.fingerprinter.use_gpu_plan(_probe_gpu(ray, accel))
            return cls(ray, project, accel)
        except BaseException:
            ray.shutdown()
            raise

    def slots(self, gpu_bound: bool) -> int:
        return max(1, self._gpus) if gpu_bound else self._cpus

    def unavailable(self, backend: Any) -> str | None:
        if backend.needs_gpu and self.project.fingerprinter.gpu_plan.model is None:
            return "needs an NVIDIA GPU: the Ray cluster has none"
        return None  # what a node lacks, its worker says

    def _submit(self, fn: Any, options: dict[str, Any], *args: Any) -> Any:
        with self._mutex:
            if self._cancelled:
                return None
            ref = self.ray.remote(fn).options(**options).remote(*args)
            self._refs.add(ref)
            return ref

    def _done(self, ref: Any) -> None:
        with self._mutex:
            self._refs.discard(ref)

    def compile(self, project: Project, name: str, backend: Any, artifact_dir: Path, upstream: Path | None, log: Path,
                started: Callable[[dict[str, Any]], None], entry: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        ray = self.ray
        key_gpu = project.fingerprinter.gpu_plan.model if backend.needs_gpu else None
        options: dict[str, Any] = {"max_retries": MAX_RETRIES, "num_cpus": 1}
        if backend.needs_gpu:
            options["num_gpus"] = 1
            if self.accel:
                options["resources"] = {f"accelerator_type:{self.accel}": 0.001}
        from .manifest import to_json

        chunk = chunk_bytes()
        job = NodeJob(project.manifest.path.relative_to(project.manifest.root).as_posix(), to_json(project.manifest.model),
                      name, backend.kind, self.kinds, key_gpu, chunk,
                      upstream=(upstream.name, _put_chunks(ray, upstream, chunk)) if upstream is not None else None,
                      upload=_upload_spec(project, backend, entry) if entry is not None else None)
        ref = self._submit(_build_on_node, options, job)
        if ref is None:
            return {"ok": False, "error": "crash", "message": "cancelled"}
        started({})
        try:
            result = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return {"ok": False, "error": "crash", "message": "cancelled"}
        except ray.exceptions.RayError as e:
            return {"ok": False, "error": "crash", "message": f"Ray task failed after {MAX_RETRIES} retry: {_first_line(e)}"}
        finally:
            self._done(ref)
        log.write_bytes(result.pop("log", b""))
        if result.get("ok"):
            problem = self._collect(project, result, artifact_dir)
            if problem:
                return {"ok": False, "error": "crash", "node": result.get("node"),
                        "message": f"artifact from node {result.get('node')} ({result.get('transfer')}) does not match "
                                   f"the digests its worker computed: {problem}"}
        return result

    def _collect(self, project: Project, result: dict[str, Any], folder: Path) -> str | None:
        """Bring a built artifact into folder, checked against the worker's digests: None, or what is wrong."""
        digests = result.pop("digests")
        bad = _unsafe_names(digests, folder)
        if bad:
            return bad
        how = result.get("transfer")
        if how == "remote":
            from .remote import Outage

            try:
                return project.remote.download(digests, folder)  # type: ignore[union-attr]
            except Outage as e:
                return f"the remote cache is unavailable here ({e})"
        if how == "inline":
            return _receive(result.pop("files"), digests, folder)
        outbox = result.pop("outbox")
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options = {"num_cpus": 0, "max_retries": 0, "_generator_backpressure_num_objects": CHUNKS_IN_FLIGHT,
                   "scheduling_strategy": NodeAffinitySchedulingStrategy(result["node"], soft=False)}
        names = sorted(digests)
        gen = self._submit(_send_chunks, options, outbox, names, chunk_bytes())
        if gen is None:
            return "cancelled"
        problem: str | None = "interrupted"
        try:
            problem = _receive_chunks((self.ray.get(ref) for ref in gen), digests, folder)
            return problem
        except self.ray.exceptions.RayError as e:
            problem = f"node {result['node']} could not send it: {_first_line(e)}"
            return problem
        finally:
            if problem is not None:  # stopped reading early: end the sender, whose finally removes the outbox
                try:
                    self.ray.cancel(gen, force=False)
                except Exception:  # noqa: BLE001  (finished already)
                    pass
            self._done(gen)

    def cancel(self) -> None:
        with self._mutex:
            self._cancelled = True
            refs = list(self._refs)
        for ref in refs:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone: nothing to cancel
                pass

    def close(self) -> None:
        self.ray.shutdown()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:400]}"


def _upload_spec(project: Project, backend: Any, entry: tuple[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Where the node uploads the entry: the project's remote when it is read-write and reachable, else None."""
    from .remote import configured

    from .remote import redact

    remote = project.remote
    if remote is None or not remote.writable or not remote.available:
        return None
    url = configured(project)[0]
    if url is None or redact(url) != url:
        return None  # userinfo or a signed query in the URL: a secret, never put into Ray task arguments (chunks instead)
    return {"url": url, "project": project.manifest.model.project.name, "key": entry[0],
            "comps": entry[1], "artifact": backend.artifact}


def _put_chunks(ray: Any, path: Path, chunk: int) -> list[Any]:
    """path's bytes as ObjectRefs of at most chunk bytes each, read one chunk at a time."""
    return [ray.put(data) for data in _read_chunks(path, chunk)]


def _read_chunks(path: Path, chunk: int) -> Iterator[bytes]:
    """path's bytes, at most chunk at a time (never asking read() for more than is left: it allocates what it is
    asked for)."""
    with open(path, "rb") as f:
        left = os.fstat(f.fileno()).st_size
        while left > 0 and (data := f.read(min(chunk, left))):
            left -= len(data)
            yield data


def _cluster_messages_to_stderr() -> None:
    """Ray prints the cluster's error messages ("Raylet is terminated", from a background thread) on stdout, which
    would break `build --json`: send them to stderr. Ray 2.x looks this function up at each message."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_aitune_stderr", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        original({**data, "is_err": True}, ignore_prefix)

    to_stderr._aitune_stderr = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_stderr


def _needs_gpu(man: Any, target: str) -> bool:
    from .backends import backend_for

    if man.targets[target].backend is None:
        return False  # a tuned target: its candidates (targets "T@B" of their own) say
    config = man.backends[man.targets[target].backend]
    return backend_for(config.kind)(config).needs_gpu


def _accelerator_type(ray: Any, gpu_model: str | None) -> str | None:
    """The accelerator type GPU tasks ask for (module docstring), or None where nodes carry no such label."""
    types = sorted({r.split(":", 1)[1] for n in ray.nodes() if n.get("Alive")
                    for r in n.get("Resources", {}) if r.startswith("accelerator_type:")})
    if gpu_model:
        hit = [t for t in types if t.lower() == gpu_model.lower() or model_matches(t, gpu_model)]
        if types and not hit:
            raise UserError(f"gpu_model '{gpu_model}' matches no accelerator type of the Ray cluster ({', '.join(types)})")
        return hit[0] if hit else None
    if len(types) > 1:
        raise UserError(f"the Ray cluster has GPUs of several types ({', '.join(types)}): set gpu_model ([project] or "
                        "--gpu-model) to the one GPU targets build on, so that their keys name one GPU")
    return types[0] if types else None


def _probe_gpu(ray: Any, accel: str | None) -> GpuPlan:
    """The GPU model a GPU task gets, as that node's nvidia-smi reports it; no model where the cluster has no GPU."""
    if int(ray.cluster_resources().get("GPU", 0)) == 0:
        return GpuPlan(None)
    options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 0}
    if accel:
        options["resources"] = {f"accelerator_type:{accel}": 0.001}
    ref = ray.remote(_node_gpu).options(**options).remote()
    try:
        model = ray.get(ref, timeout=PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise UserError(f"--executor ray: no GPU node answered within {PROBE_TIMEOUT_S:.0f} s") from None
    if model is None:
        raise UserError("--executor ray: a node with a Ray GPU resource shows no NVIDIA GPU (nvidia-smi)")
    return GpuPlan(model)


# --- what runs on the nodes (shipped in py_modules; imports nothing heavy) ----------------------------------------


def _node_gpu() -> dict[str, str] | None:
    from .gpus import Gpu
    from .toolchain import gpu_info

    seen = gpu_info()  # Ray set CUDA_VISIBLE_DEVICES to the GPU it lent this task
    return Gpu.from_info(seen[0]).model if seen else None


_NODE_WORKERS: Any = None  # this Ray worker process's warm workers (workers.Workers), kept across its tasks


def _node_workers(kinds: tuple[str, ...]) -> Any:
    global _NODE_WORKERS
    if _NODE_WORKERS is None:
        import atexit

        from .workers import Workers

        _NODE_WORKERS = Workers(set(kinds))
        atexit.register(_NODE_WORKERS.close)
    return _NODE_WORKERS


def _build_on_node(job: NodeJob) -> dict[str, Any]:
    """One target's compile on a node, in a worker child as locally. Runs in the job's working_dir copy."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    import ray

    from .store import describe_files
    from .toolchain import gpu_info

    node = ray.get_runtime_context().get_node_id()
    gpu = None
    if job.key_gpu is not None:
        seen = gpu_info()
        gpu = seen[0] if seen else None
        have = {"name": gpu["name"], "compute_capability": gpu["compute_capability"]} if gpu else None
        if have != job.key_gpu:
            return {"ok": False, "error": "backend", "node": node, "gpu": gpu, "log": b"",
                    "message": f"node {node} lent a GPU of another model ({have}) than the key names ({job.key_gpu}); "
                               "label the cluster's nodes by accelerator type or set gpu_model"}
    _remove_orphans(Path(tempfile.gettempdir()))
    tmp = Path(tempfile.mkdtemp(prefix=f"aitune-ray-{os.getpid()}-"))
    keep = False
    try:
        artifact_dir = tmp / "artifact"
        artifact_dir.mkdir()
        upstream_file = None
        if job.upstream is not None:
            upstream_file = tmp / "upstream" / job.upstream[0]
            upstream_file.parent.mkdir()
            with open(upstream_file, "wb") as f:
                for ref in job.upstream[1]:  # one chunk at a time
                    f.write(ray.get(ref))
        project = SimpleNamespace(manifest=SimpleNamespace(path=(Path.cwd() / job.manifest_rel).resolve(),
                                                           model=job.manifest_data))
        log = tmp / "build.log"
        # Ray sets CUDA_VISIBLE_DEVICES to the GPU it lent this task; the warm server may have started with another.
        env = {k: os.environ[k] for k in ("CUDA_VISIBLE_DEVICES",) if k in os.environ}
        outcome = _run_worker(project, job.target, artifact_dir, upstream_file, log, env=env,  # type: ignore[arg-type]
                              workers=_node_workers(job.kinds), kind=job.kind)
        outcome.update(node=node, gpu=gpu)
        if outcome.get("ok"):
            digests = describe_files(artifact_dir)
            outcome["digests"] = digests
            why = _upload(job, artifact_dir, digests, outcome) if job.upload is not None else "no remote"
            if why is None:
                outcome["transfer"] = "remote"
            else:
                if job.upload is not None:
                    with open(log, "ab") as f:
                        f.write(f"aitune-build: node {node} could not upload to the remote cache ({why}); "
                                "the artifact goes to the driver in chunks\n".encode())
                if sum(d["size"] for d in digests.values()) <= job.chunk:
                    outcome["transfer"] = "inline"
                    outcome["files"] = {n: (artifact_dir / n).read_bytes() for n in digests}
                else:
                    outcome["transfer"] = "chunks"
                    outcome["outbox"] = str(tmp)  # _send_chunks streams it and removes it
                    keep = True
                    os.utime(tmp)  # its age for the orphan sweep counts from now, not from the build's start
        outcome["log"] = log.read_bytes() if log.exists() else b""
        return outcome
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


ORPHAN_AGE_S = 3600.0  # a node's build folder this old whose Ray worker process is gone: its driver never came


def _remove_orphans(tmp: Path, older_than_s: float = ORPHAN_AGE_S) -> list[str]:
    """Remove what killed tasks and vanished drivers left in this node's temp folder: aitune-ray-<pid>-* folders
    older than older_than_s whose worker process <pid> is gone. The names of what was removed."""
    import re
    import shutil
    import time

    from .store import _alive

    gone = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return gone
    for name in names:
        m = re.fullmatch(r"aitune-ray-(\d+)-\w+", name)
        try:
            if m is None or _alive(int(m[1])) or time.time() - (tmp / name).lstat().st_mtime < older_than_s:
                continue
        except OSError:
            continue
        shutil.rmtree(tmp / name, ignore_errors=True)
        gone.append(name)
    return gone


def _upload(job: NodeJob, artifact_dir: Path, digests: dict[str, dict[str, Any]], outcome: dict[str, Any]) -> str | None:
    """Upload the built entry to the remote cache (blobs first, index last): None, or why it could not."""
    from .executor import entry_meta
    from .remote import READ_WRITE, Outage, RemoteCache
    from .store import Entry

    spec = job.upload
    assert spec is not None
    said: list[str] = []
    remote = RemoteCache(spec["url"], READ_WRITE, store=None, project_name=spec["project"], report=said.append)  # type: ignore[arg-type]
    meta = entry_meta(job.target, spec["key"], spec["comps"], job.kind, spec["artifact"], outcome)
    try:
        remote.upload_now(Entry(key=spec["key"], path=artifact_dir, files=digests, meta=meta), job.target)
    except Outage as e:
        return said[0] if said else str(e)
    except Exception as e:  # noqa: BLE001  (no obstore on this node, ...): the artifact comes back in chunks instead
        return _first_line(e)
    return None


def _send_chunks(outbox: str, names: list[str], chunk: int) -> Any:
    """Stream the files of a build kept on this node (outbox/artifact/NAME, in the order of names) as chunks of at
    most chunk bytes, then remove the outbox. A generator task: Ray holds back when the driver falls behind."""
    import shutil

    try:
        for name in names:
            yield from _read_chunks(Path(outbox) / "artifact" / name, chunk)
    finally:
        shutil.rmtree(outbox, ignore_errors=True)


def _unsafe_names(digests: dict[str, dict[str, Any]], folder: Path) -> str | None:
    root = folder.resolve()
    for name in digests:
        if not isinstance(name, str) or root not in (folder / name).resolve().parents:
            return f"{name}: a path outside the artifact folder"
    return None


def _receive(files: dict[str, bytes], digests: dict[str, dict[str, Any]], folder: Path) -> str | None:
    """Write a task's inline files into folder; the first file that differs from its digests, or None."""
    if set(files) != set(digests):
        return f"files {sorted(files)} but digests for {sorted(digests)}"
    bad = _unsafe_names(digests, folder)
    if bad:
        return bad
    return _receive_chunks((files[n] for n in sorted(digests) if files[n]), digests, folder)


def _receive_chunks(chunks: Iterator[bytes], digests: dict[str, dict[str, Any]], folder: Path) -> str | None:
    """Write the files of digests (in sorted name order) from a stream of chunks that never spans two files, hashing
    on the way; the first file that differs from its digests (it is removed), or None. Holds one chunk at a time."""
    import hashlib

    import xxhash

    it = iter(chunks)
    for name in sorted(digests):
        want = digests[name]
        dest = folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        xx, sha, left = xxhash.xxh3_128(), hashlib.sha256(), want["size"]
        problem = None
        with open(dest, "wb") as f:
            while left > 0:
                data = next(it, None)
                if data is None:
                    problem = f"{name}: truncated ({want['size'] - left} of {want['size']} bytes arrived)"
                    break
                if len(data) > left:
                    problem = f"{name}: longer than the {want['size']} bytes recorded"
                    break
                xx.update(data)
                sha.update(data)
                f.write(data)
                left -= len(data)
                del data
        if problem is None and (xx.hexdigest() != want["xxh3"] or sha.hexdigest() != want["sha256"]):
            problem = f"{name} differs"
        if problem is not None:
            dest.unlink(missing_ok=True)
            return problem
    if next(it, None) is not None:
        return "more data than the digests describe"
    return None
