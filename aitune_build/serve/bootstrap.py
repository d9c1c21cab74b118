"""Start-up of the serving hook, in the application's process, before its own code runs.

Entered from `aitune-build run` (a sitecustomize on PYTHONPATH, see _site/) or from autowrapt
(`AUTOWRAPT_BOOTSTRAP=aitune_build`: the entry point group `aitune_build` names `site`, a module already imported at
that point, so wrapt calls `autowrapt_entry` at once). Reads the manifest (TOML only: no pydantic, no torch) and the
build.json of each `serve = true` target, which names the class its factory returns, and asks to be called when
that class's module is imported (hook.py does the rest). A process that serves nothing pays this and nothing per
call. Any failure here is one warning and the application runs as it would without us.

Environment: AITUNE_MANIFEST (default ./aitune.toml), AITUNE_BUILD_ON_START=1 (build missing or stale targets
first), AITUNE_SERVE_DEBUG=PATH (a JSON record of served and eager calls, written at exit), AITUNE_SERVE=0 (off),
AITUNE_RECORD=DIR (record inputs instead of serving: `aitune-build record`).
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing costs ~5-10 ms to import: only the type checker reads it
if TYPE_CHECKING:
    from typing import Any

_started = False
WARNINGS: list[str] = []  # every warning printed, for the debug record
NOT_SERVED: dict[str, str] = {}  # target -> why it is not served (not built, stale, ...), for the debug record


def warn(message: str) -> None:
    """One line on stderr; never raises (the application's own warning filters cannot turn it into an error)."""
    WARNINGS.append(message)
    try:
        sys.stderr.write(f"aitune-build: serve: {message}\n")
        sys.stderr.flush()
    except Exception:  # noqa: BLE001  (a closed stderr must not break the application)
        pass


def autowrapt_entry(module: Any = None) -> None:
    """The `aitune_build` entry point group's hook (registered against `site`)."""
    start()


def start() -> None:
    global _started
    if _started:
        return
    _started = True
    try:
        _start()
    except Exception as e:  # noqa: BLE001  (never crash the application)
        warn(f"the serving hook failed to start ({type(e).__name__}: {e}); the application runs eager")


def _start() -> None:
    env = os.environ
    if env.get("AITUNE_SERVE") == "0":
        return
    if env.get("AITUNE_RECORD"):
        from .recorder import start as start_recording

        start_recording(env["AITUNE_RECORD"], env.get("AITUNE_RECORD_MODULES", ""))
        return
    if env.get("AITUNE_SERVE_DEBUG"):
        import atexit

        from .debug import write_debug_record

        atexit.register(write_debug_record, env["AITUNE_SERVE_DEBUG"])
    manifest = os.path.abspath(env.get("AITUNE_MANIFEST") or "aitune.toml")
    if not os.path.isfile(manifest):
        warn(f"{manifest}: no such file (set AITUNE_MANIFEST to the project's aitune.toml); nothing is served")
        return
    index = env.get("AITUNE_SERVE_INDEX")
    served = parse_index(index) if index is not None else {t: _class_of(r) for t, r in served_targets(manifest).items()}
    if not served:
        return
    build_on_start = env.get("AITUNE_BUILD_ON_START") == "1"
    by_module: dict[str, list[tuple[str, str]]] = {}
    for target, cls in served.items():
        if cls is None and build_on_start:
            from .hook import build_targets

            build_targets(manifest, [target])
            cls = _class_of(_read_record(manifest, target))
            if index is not None and cls is not None:  # this process's children need not build it again
                env["AITUNE_SERVE_INDEX"] = make_index({**served, target: cls})
        if cls is None:
            record = _read_record(manifest, target)
            why = "is not built" if record is None else "was built before serving existed (no class recorded)"
            flag = " -f" if record is not None else ""
            warn(f"{target} {why}; its module runs eager. Build it: aitune-build --manifest {manifest} build{flag} "
                 f"{target} (or set AITUNE_BUILD_ON_START=1)")
            NOT_SERVED[target] = WARNINGS[-1]
            continue
        by_module.setdefault(cls["module"], []).append((target, cls["qualname"]))
    if not by_module:
        return
    from .imports import when_imported

    for module_name, candidates in by_module.items():
        when_imported(module_name, _on_import(manifest, candidates))


def _on_import(manifest: str, candidates: list[tuple[str, str]]) -> Any:
    def callback(module: Any) -> None:
        try:
            from .hook import serve_module

            serve_module(manifest, module, candidates)
        except Exception as e:  # noqa: BLE001
            warn(f"{', '.join(c[0] for c in candidates)}: serving failed ({type(e).__name__}: {e}); running eager")

    return callback


def make_index(served: dict[str, dict[str, str] | None]) -> str:
    """What `aitune-build run` hands its child in AITUNE_SERVE_INDEX (target,module,qualname;...), so that the
    child's start-up neither parses TOML nor JSON: names of targets, modules and classes hold no ',' or ';'."""
    return ";".join(f"{t},{c['module']},{c['qualname']}" if c else f"{t},," for t, c in served.items())


def parse_index(index: str) -> dict[str, dict[str, str] | None]:
    out: dict[str, dict[str, str] | None] = {}
    for item in index.split(";"):
        if item:
            target, module, qualname = item.split(",")
            out[target] = {"module": module, "qualname": qualname} if module else None
    return out


def served_targets(manifest: str) -> dict[str, dict[str, Any] | None]:
    """{target: its build.json or None} for every `serve = true` target, read without validating the manifest
    (hook.py validates it through Project.open before anything is served)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    with open(manifest, "rb") as f:
        data = tomllib.load(f)
    targets = data.get("targets")
    if not isinstance(targets, dict):
        return {}
    return {name: _read_record(manifest, name, data) for name, t in targets.items() if isinstance(t, dict) and t.get("serve") is True}


def _read_record(manifest: str, target: str, data: dict[str, Any] | None = None) -> dict[str, Any] | None:
    import json

    if data is None:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        with open(manifest, "rb") as f:
            data = tomllib.load(f)
    project = data.get("project") if isinstance(data.get("project"), dict) else {}
    out_dir = project.get("out_dir", "build") if isinstance(project.get("out_dir", "build"), str) else "build"
    path = os.path.join(os.path.dirname(manifest), out_dir, target, "build.json")
    try:
        with open(path, "rb") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _class_of(record: dict[str, Any] | None) -> dict[str, str] | None:
    try:
        cls = record["record"]["module"]["class"]  # type: ignore[index]
        return cls if isinstance(cls["module"], str) and isinstance(cls["qualname"], str) else None
    except (KeyError, TypeError):
        return None
