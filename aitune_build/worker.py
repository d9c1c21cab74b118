"""One target's compile, in its own process: a segfault or OOM kill here fails the target, not the build.

    python -m aitune_build.worker JOB.json

Reads the job, builds the eager module, runs the backend's build into the artifact folder, loads the artifact back,
runs it on seeded inputs (min, opt and max of every dynamic axis) and compares with eager. Writes RESULT.json.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .backends.base import ARTIFACT_WRITTEN  # re-exported: the executor and remote.py watch for it
from .errors import AituneError, CheckFailed, UserError
from .fsutil import atomic_write_json
from .factory import make_module
from .manifest import loaded_from_json

_STARTED = time.time()  # a fresh-process worker's start, for its "worker_start" timing

_MAX_MESSAGE = 20_000  # the whole message goes to --json; the console shows its first lines (failures.bounded)


class _Phases:
    """The phase protocol: each phase is appended to the job's `progress` file as a JSON line {"phase", "t"} (the
    parent reads it for progress lines and heartbeats) and logged with the time the previous phase took."""

    def __init__(self, job: dict[str, Any]):
        self.path = job.get("progress")
        self.current: str | None = None
        self.t = time.time()
        self.took: dict[str, float] = {}

    def __call__(self, phase: str) -> None:
        now = time.time()
        if self.current is not None:
            self.took[self.current] = self.took.get(self.current, 0.0) + now - self.t
        self.current, self.t = phase, now
        print(f"[aitune-build {time.strftime('%H:%M:%S', time.localtime(now))}] {phase}", flush=True)
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps({"phase": phase, "t": now}) + "\n")
            except OSError:
                pass

    def end(self) -> dict[str, float]:
        """Seconds per phase (the last one ends now)."""
        if self.current is not None:
            self.took[self.current] = self.took.get(self.current, 0.0) + time.time() - self.t
            self.current, self.t = None, time.time()
        return {k: round(v, 3) for k, v in self.took.items()}


_BUILD_PHASE = {"export": "exporting", "eager": "constructing"}  # every other backend compiles



def run_job(job: dict[str, Any], started: float | None = None) -> dict[str, Any]:
    """Build, load and check one target. `started`: when this process began (time.time()) for the timings."""
    phase = _Phases(job)
    phase("importing")
    timings: dict[str, float] = {}
    t_entry = time.time()
    if job.get("submitted") is not None:  # the parent's clock when it asked for this worker
        timings["worker_start"] = max(0.0, (started or t_entry) - job["submitted"])
    t0 = time.perf_counter()
    import torch

    from .backends import BuildContext, backend_for
    from .check import DEFAULT_TOLERANCES, compare
    from .inputs import variants

    m = loaded_from_json(Path(job["manifest"]), job["manifest_data"])
    target = m.model.targets[job["target"]]
    config = m.model.backends[target.backend]
    module_name, mod_spec = m.module_of(job["target"])
    backend = backend_for(config.kind)(config)
    reason = backend.unavailable()
    if reason:
        return {"ok": False, "error": "unavailable", "message": reason}
    backend.import_libraries()
    timings["imports"] = time.perf_counter() - t0  # ~0 in a child of a warm fork server
    torch.manual_seed(0)
    phase("constructing")
    t0 = time.perf_counter()
    reference = make_module(m, module_name, mod_spec, config.device)
    timings["construct"] = time.perf_counter() - t0

    def module_for_backend() -> Any:
        """The eager module is constructed once (large models: memory and start-up time); a backend that changes
        the module it is given gets a copy, so the reference stays what the factory made."""
        if backend.mutates_module:
            import copy

            return copy.deepcopy(reference)
        return reference

    ctx = BuildContext(
        config=config, inputs=mod_spec.inputs, root=m.root, artifact_dir=Path(job["artifact_dir"]),
        make_module=module_for_backend,
        upstream=Path(job["upstream"]) if job.get("upstream") else None, extra={"backend_name": target.backend},
        timings=timings, report=phase,
    )
    phase(_BUILD_PHASE.get(config.kind, "compiling"))
    with ctx.phase("build"):
        record = backend.build(ctx)
    from .serve.identity import identity

    record = {**record, "module": identity(reference)}  # what `aitune-build run` checks a live module against

    phase(ARTIFACT_WRITTEN)
    with ctx.phase("load"):
        loaded = backend.load(ctx)
    rtol, atol = DEFAULT_TOLERANCES[config.precision]
    rtol = target.check.rtol if target.check.rtol is not None else rtol
    atol = target.check.atol if target.check.atol is not None else atol
    checks: dict[str, Any] = {"precision": config.precision, "rtol": rtol, "atol": atol, "variants": {}}
    phase("checking")
    with torch.no_grad(), ctx.phase("check"):
        for which in variants(mod_spec.inputs):
            inputs = ctx.example(which, seed=target.check.seed)
            expected = reference(**inputs)
            t0 = time.perf_counter()
            got = loaded(**inputs)
            if config.device == "cuda":
                torch.cuda.synchronize()
            timings.setdefault("first_call", time.perf_counter() - t0)
            result = compare(expected, got, rtol, atol)
            result["shapes"] = {k: list(v.shape) for k, v in inputs.items()}
            checks["variants"][which] = result
            if not result["passed"]:
                raise CheckFailed(f"check against eager failed at {which} shapes: {result['reason']}")
    checks["max_abs_err"] = max(v["max_abs_err"] for v in checks["variants"].values())
    checks["max_rel_err"] = max(v["max_rel_err"] for v in checks["variants"].values())
    if backend.exported_program:  # what a process that never ran the factory must import to load it, proven
        from .loadable import record_imports
        from .manifest import to_json

        t0 = time.perf_counter()
        record["imports"] = record_imports(ctx.artifact_dir / backend.artifact, m.root, mod_spec.factory.split(":")[0],
                                           {"backend": to_json(config), "inputs": [to_json(i) for i in mod_spec.inputs]},
                                           ctx.program)
        timings["fresh_load"] = time.perf_counter() - t0
    record.update(backend.after_check(ctx))
    _log_summary(job["target"], config.kind, phase.end(), checks)
    timings["worker"] = time.time() - t_entry
    return {"ok": True, "record": record, "check": checks, "timings": {k: round(v, 4) for k, v in timings.items()}}


def _die_with_parent() -> None:
    """Linux: end with the process that started us (a killed build, a cancelled Ray task), never linger orphaned."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import os
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def _log_summary(target: str, kind: str, phases: dict[str, float], checks: dict[str, Any]) -> None:
    """What a successful build.log ends with: phases with timings, versions, the check's numbers."""
    import platform

    import torch

    print(f"built {target} ({kind})")
    print("phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in phases.items()))
    print(f"versions: python {platform.python_version()}, torch {torch.__version__}")
    print(f"check ({checks['precision']}, rtol {checks['rtol']:g}, atol {checks['atol']:g}):")
    for which, v in checks["variants"].items():
        shapes = ", ".join(f"{k}={v2}" for k, v2 in v.get("shapes", {}).items())
        print(f"  {which:<4} {shapes}: max_abs_err {v['max_abs_err']:.3g}, max_rel_err {v['max_rel_err']:.3g}, passed")
    sys.stdout.flush()


def main(argv: list[str], started: float | None = None) -> int:
    _die_with_parent()
    job = json.loads(Path(argv[0]).read_text())
    result_path = Path(job["result"])
    try:
        result = run_job(job, started)
    except UserError as e:
        result = {"ok": False, "error": "user", "message": str(e)}
    except CheckFailed as e:
        result = {"ok": False, "error": "check", "message": str(e)}
    except AituneError as e:
        result = {"ok": False, "error": "backend", "message": str(e)}
    except Exception as e:
        traceback.print_exc()  # build.log keeps everything; the message keeps the substance (failures.describe)
        from .failures import describe

        result = {"ok": False, "error": "backend", "message": describe(e, Path(job["manifest"]).parent)[:_MAX_MESSAGE]}
    if not result["ok"]:
        print(f"aitune-build: {result['message']}", file=sys.stderr)
    try:
        atomic_write_json(result_path, result)
    except OSError as e:  # a full disk: say so in the log, which the parent names
        print(f"aitune-build: cannot write the result: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], _STARTED))
