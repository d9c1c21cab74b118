"""Artifacts that load anywhere they are valid: what an exported program needs imported to deserialise.

An exported program names the Python types of its inputs and outputs (pytree nodes: a model-output class, a
registered dataclass) and its operators; a type or custom operator is found only when the module that registers it
was imported. The worker, which imported the model's code, records those modules at build time (`record.imports`
in build.json) and proves them enough by loading the artifact in a fresh process that imports only them.
`aitune_build.load()` imports them before deserialising, but only modules that the local project itself imports:
a project-local module its sources reach, or a package of a third-party distribution they import. A build record
is data, never a reason to import code the project does not already run.

    python -m aitune_build.loadable CHECK.json   (the fresh-process check: exit 0 when the artifact loads)
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import CheckFailed, UserError

# Operator namespaces a process with torch (and the backend's own imports, done by its load()) always has.
_BUILTIN_NAMESPACES = {
    "aten", "prims", "higher_order", "quantized", "quantized_decomposed", "_quantized", "c10d", "_c10d_functional",
    "_c10d_functional_autograd", "_dtensor", "profiler", "rngprims", "inductor", "tensorrt",
}
_PROVIDED = ("torch", "builtins", "collections")


def program_imports(program: Any) -> tuple[list[str], list[str]]:
    """(modules that register the program's pytree types and custom operators, operator namespaces of unknown origin)."""
    import torch

    modules: set[str] = set()
    unknown: set[str] = set()
    todo = [program.call_spec.in_spec, program.call_spec.out_spec]
    while todo:
        spec = todo.pop()
        if spec is None:
            continue
        for t in (getattr(spec, "type", None), getattr(spec, "context", None)):  # a namedtuple's class is its context
            if isinstance(t, type):
                modules.add(t.__module__)
        todo += list(spec.children()) if callable(getattr(spec, "children", None)) else list(spec.children_specs)
    from torch._library.custom_ops import OPDEFS

    for node in program.graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or op.namespace in _BUILTIN_NAMESPACES:
            continue
        opdef = OPDEFS.get(f"{op.namespace}::{op._schema.name.split('::')[-1]}")
        if opdef is not None:
            modules.add(opdef._init_fn.__module__)
        elif op.namespace in sys.modules:  # a package registering ops under its own name (torchvision::nms)
            modules.add(op.namespace)
        else:
            unknown.add(op.namespace)
    wanted = sorted(m for m in modules if m.split(".")[0] not in _PROVIDED and m != "__main__" and m.split(".")[0] not in sys.stdlib_module_names)
    return wanted, sorted(unknown)


def record_imports(artifact: Path, root: Path, factory_module: str, check: dict[str, Any], program: Any = None) -> list[str]:
    """In the worker after a build: the modules to import before loading `artifact`, proven by a fresh process.

    check: what the fresh process needs to load it as load() would ({"backend": config JSON, "inputs": [...]}).
    program: the ExportedProgram the check loaded from `artifact` already (a TensorRT engine's deserialisation costs
    seconds); None: read here."""
    if program is None:
        import torch

        program = torch.export.load(str(artifact))
    needed, unknown = program_imports(program)
    del program
    if not needed and not unknown:
        return []  # plain tensors, containers and torch's operators: any process with torch loads it
    tries = [needed] if not unknown else []
    if factory_module not in needed:  # a registration made by a module other than the type's own: the factory's imports
        tries.append(needed + [factory_module])
    error = ""
    for imports in tries:
        error = fresh_load(artifact.parent, root, imports, check)
        if not error:
            return imports
    what = f"types from {', '.join(needed)}" if needed else f"operators in {', '.join(unknown)}"
    raise CheckFailed(f"the artifact uses {what} and does not load in a fresh process that imports "
                      f"{', '.join(tries[-1])}: {error}. Register them when a module the factory imports is imported")


def fresh_load(artifact_dir: Path, root: Path, imports: list[str], check: dict[str, Any]) -> str:
    """'' when a new process that imports only `imports` loads the artifact and runs it; else the error."""
    job = artifact_dir.parent / f".{artifact_dir.name}.loadcheck.json"
    job.write_text(json.dumps({"artifact_dir": str(artifact_dir), "root": str(root), "imports": imports, **check}))
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        # cwd is the artifact folder, so `-m` puts no project folder on sys.path: only `imports` are imported.
        proc = subprocess.run([sys.executable, "-m", "aitune_build.loadable", str(job)], cwd=artifact_dir, env=env,
                              capture_output=True, text=True)
    finally:
        job.unlink(missing_ok=True)
    if proc.returncode == 0:
        return ""
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit code {proc.returncode}"


def import_modules(root: Path, names: list[str]) -> None:
    if names and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for name in names:
        importlib.import_module(name)


def import_recorded(record: dict[str, Any], project: Any, target: str) -> None:
    """In load(): import what the build recorded as needed to deserialise, if the local project vouches for it."""
    names = (record.get("record") or {}).get("imports") or []
    if not names:
        return
    if project is None:
        raise UserError(f"{target}: its artifact needs {', '.join(names)} imported to load, which only its project can "
                        "vouch for: pass manifest= of the project that builds it")
    refused = [n for n in names if not _vouched(project, target, n)]
    if refused:
        raise UserError(f"{target}: build.json asks to import {', '.join(refused)}, which {project.manifest.path.name}'s "
                        f"sources for {target} do not import; refusing to import it (rebuild {target} if they changed)")
    import_modules(project.manifest.root, names)


def _vouched(project: Any, target: str, name: str) -> bool:
    """Whether the local project's sources for target import module `name` (project-local) or its top-level package
    (from an installed distribution)."""
    from .manifest import module_file
    from .packages import distributions

    if not name or not all(part.isidentifier() for part in name.split(".")):
        return False
    module_name, _ = project.manifest.module_of(target)
    fp = project.fingerprinter
    root = project.manifest.root
    local = module_file(root, name)
    if local is not None:
        return local.relative_to(root).as_posix() in fp._module_sources(module_name)
    top = name.split(".")[0]
    return top in fp.third_party_imports(module_name) and bool(distributions([top], project.state))


def _check_main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    from .backends import BuildContext, backend_for
    from .manifest import InputSpec, backend_config

    import_modules(Path(job["root"]), job["imports"])
    config = backend_config(job["backend"])
    inputs = [InputSpec.from_json(i) for i in job["inputs"]]
    ctx = BuildContext(config=config, inputs=inputs, root=Path(job["root"]), artifact_dir=Path(job["artifact_dir"]),
                       make_module=lambda: None)
    import torch

    fn = backend_for(config.kind)(config).load(ctx)
    with torch.no_grad():
        fn(**ctx.example("opt"))
    return 0


if __name__ == "__main__":
    sys.exit(_check_main(sys.argv[1]))
