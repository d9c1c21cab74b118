"""`build --executor ray`: each target to build becomes a Ray task on a cluster; the rest of the build stays here.

The driver (this process) computes the plan and every key, checks the cache, holds each key's lock, and only hands
the compiles out: a task runs the same worker subprocess as a local build (a segfaulting compile fails its target
only), on a node with a free GPU (`num_gpus=1`) or CPU (`num_cpus=1`). The project's files travel as the job's
Ray `runtime_env` `working_dir` (out_dir, cache_dir and .git left out; Ray also leaves out what .gitignore lists),
and aitune_build itself as a `py_modules` entry, so nodes need only Ray and torch (plus the backends' libraries).

A result comes back through Ray's object store: the artifact's bytes and the digests the worker computed. The
driver writes the bytes into a temp folder, checks every file against those digests, and from there stores and
materialises exactly as for a local build: nothing half-written is ever served. (Large artifacts should instead
travel through the remote cache, issue 12: the task uploads the entry and returns only its digests; the result
format has room for that — a result without "files" — but this module does not do it yet.)

Keys on a heterogeneous cluster (the driver may have no GPU): GPU targets build on nodes of one accelerator type
and their keys name that type's GPU. The type is `gpu_model` (`--gpu-model` / `[project] gpu_model`, matched against
Ray's `accelerator_type:<T>` node resources, e.g. H100), else the cluster's only type; several types and no
`gpu_model` is an error. The key's GPU (name + compute capability) is what a probe task on such a node reports;
every GPU task asks for that type and checks, before building, that its GPU is the model the key names.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
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


class RayRunner(Runner):
    def __init__(self, ray: Any, project: Project, accel: str | None):
        self.ray, self.project, self.accel = ray, project, accel
        self._refs: set[Any] = set()
        self._mutex = threading.Lock()
        self._cancelled = False
        resources = ray.cluster_resources()
        self._cpus = max(1, int(resources.get("CPU", 1)))
        self._gpus = int(resources.get("GPU", 0))

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
        excludes = [".git"]
        for d in (project.out_dir, project.cache_dir):
            try:
                excludes.append("/" + d.resolve().relative_to(root.resolve()).as_posix())
            except ValueError:
                pass  # outside the project: not shipped anyway
        # A backend registered in AITUNE_BACKENDS is registered on the nodes too (its module must be importable there).
        env_vars = {k: os.environ[k] for k in (TEST_GPU_BOUND_ENV, BACKENDS_ENV) if k in os.environ}
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

    def compile(self, project: Project, name: str, backend: Any, artifact_dir: Path, upstream: Path | None, log: Path,
                started: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        ray = self.ray
        key_gpu = project.fingerprinter.gpu_plan.model if backend.needs_gpu else None
        options: dict[str, Any] = {"max_retries": MAX_RETRIES, "num_cpus": 1}
        if backend.needs_gpu:
            options["num_gpus"] = 1
            if self.accel:
                options["resources"] = {f"accelerator_type:{self.accel}": 0.001}
        manifest_rel = project.manifest.path.relative_to(project.manifest.root).as_posix()
        from .manifest import to_json

        up = (upstream.name, upstream.read_bytes()) if upstream is not None else None
        with self._mutex:
            if self._cancelled:
                return {"ok": False, "error": "crash", "message": "cancelled"}
            ref = ray.remote(_build_on_node).options(**options).remote(
                manifest_rel, to_json(project.manifest.model), name, up, key_gpu)
            self._refs.add(ref)
        started({})
        try:
            result = ray.get(ref)
        except ray.exceptions.TaskCancelledError:
            return {"ok": False, "error": "crash", "message": "cancelled"}
        except ray.exceptions.RayError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            return {"ok": False, "error": "crash", "message": f"Ray task failed after {MAX_RETRIES} retry: {type(e).__name__}: {first}"}
        finally:
            with self._mutex:
                self._refs.discard(ref)
        log.write_bytes(result.pop("log", b""))
        if result.get("ok"):
            problem = _receive(result.pop("files"), result["digests"], artifact_dir)
            if problem:
                return {"ok": False, "error": "crash", "node": result.get("node"),
                        "message": f"artifact from node {result.get('node')} does not match the digests its worker computed: {problem}"}
        return result

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


def _build_on_node(manifest_rel: str, manifest_data: dict[str, Any], target: str,
                   upstream: tuple[str, bytes] | None, key_gpu: dict[str, str] | None) -> dict[str, Any]:
    """One target's compile on a node, in a worker subprocess as locally. Runs in the job's working_dir copy."""
    import shutil
    import tempfile
    from types import SimpleNamespace

    import ray

    from .store import describe_files
    from .toolchain import gpu_info

    node = ray.get_runtime_context().get_node_id()
    gpu = None
    if key_gpu is not None:
        seen = gpu_info()
        gpu = seen[0] if seen else None
        have = {"name": gpu["name"], "compute_capability": gpu["compute_capability"]} if gpu else None
        if have != key_gpu:
            return {"ok": False, "error": "backend", "node": node, "gpu": gpu, "log": b"",
                    "message": f"node {node} lent a GPU of another model ({have}) than the key names ({key_gpu}); "
                               "label the cluster's nodes by accelerator type or set gpu_model"}
    tmp = Path(tempfile.mkdtemp(prefix="aitune-ray-"))
    try:
        artifact_dir = tmp / "artifact"
        artifact_dir.mkdir()
        upstream_file = None
        if upstream is not None:
            upstream_file = tmp / "upstream" / upstream[0]
            upstream_file.parent.mkdir()
            upstream_file.write_bytes(upstream[1])
        project = SimpleNamespace(manifest=SimpleNamespace(path=(Path.cwd() / manifest_rel).resolve(), model=manifest_data))
        log = tmp / "build.log"
        outcome = _run_worker(project, target, artifact_dir, upstream_file, log)  # type: ignore[arg-type]
        outcome.update(node=node, gpu=gpu, log=log.read_bytes() if log.exists() else b"")
        if outcome.get("ok"):
            digests = describe_files(artifact_dir)
            outcome["digests"] = digests
            outcome["files"] = {n: (artifact_dir / n).read_bytes() for n in digests}
        return outcome
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _receive(files: dict[str, bytes], digests: dict[str, dict[str, Any]], folder: Path) -> str | None:
    """Write a task's files into folder; the first file that differs from its digests, or None."""
    import hashlib

    import xxhash

    if set(files) != set(digests):
        return f"files {sorted(files)} but digests for {sorted(digests)}"
    root = folder.resolve()
    for name, data in files.items():
        dest = (folder / name).resolve()
        if root not in dest.parents:
            return f"{name}: a path outside the artifact folder"
        want = digests[name]
        if len(data) != want["size"] or xxhash.xxh3_128_hexdigest(data) != want["xxh3"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
            return f"{name} differs"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
    return None
