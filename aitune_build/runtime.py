"""aitune_build.load(): a callable module from a materialised artifact or a verified release archive."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import AituneError, UserError


class LoadedModule:
    """Calls the artifact with the inputs bound by name, positional arguments in the manifest's input order."""

    def __init__(self, fn: Any, input_names: list[str], target: str, record: dict[str, Any]):
        self.fn, self.input_names, self.target, self.record = fn, input_names, target, record

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) > len(self.input_names):
            raise TypeError(f"{self.target} takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(args)}")
        kwargs.update(zip(self.input_names, args))
        return self.fn(**kwargs)

    def __repr__(self) -> str:
        return f"<aitune_build.LoadedModule {self.target} ({self.record.get('backend')}, key {str(self.record.get('key'))[:12]})>"


def load(target: str, manifest: str | Path = "aitune.toml", *, build: bool = False, archive: str | Path | None = None) -> LoadedModule:
    """Load TARGET's artifact as a callable.

    From the project's materialised outputs (building TARGET first when build=True), or, with archive=, from a
    release archive that is verified and unpacked into the cache once. eager and JIT targets re-create the module
    from its factory, so they need the project (the manifest's folder) at hand."""
    from .backends import BuildContext, backend_for
    from .factory import make_module
    from .manifest import InputSpec, ModuleSpec, backend_config
    from .outputs import read_record

    project = None
    manifest_path = Path(manifest)
    if archive is not None:
        import os

        from .release import unpack_verified

        cache = Path(os.environ.get("AITUNE_CACHE_DIR") or Path.home() / ".cache" / "aitune")
        if manifest_path.exists():
            from .project import Project

            project = Project.open(manifest_path)
            cache = project.cache_dir
        folder = unpack_verified(Path(archive), cache) / "targets" / target
        if not folder.is_dir():
            raise UserError(f"{archive}: has no target '{target}'")
        from .fsutil import read_json

        record = read_json(folder / "build.json") or {}
    else:
        from .project import Project

        project = Project.open(manifest_path)
        from .plan import select

        order = select(project.manifest.model, [target])  # raises the "did you mean" error for unknown names
        if build:
            from .executor import BuildOptions, build as run_build
            from .status import DONE

            results = run_build(project, order, BuildOptions(named=(target,)))
            project.close()  # saves the stat cache; the project stays usable
            bad = [r for r in results if r.status not in DONE]
            if bad:
                raise AituneError(f"building {bad[0].name} {bad[0].status}: {bad[0].reason}")
        folder = project.target_dir(target)
        record = read_record(folder)
        if record is None:
            raise UserError(f"target '{target}' is not built: run `aitune-build build {target}` or pass build=True")
    comps = record["components"]
    if "winner" in record:  # a tuned target: its artifact is its winner's, chosen on one GPU model (tune.py)
        from .tune import check_same_device

        check_same_device(target, record)
        comps = record["winner"]["components"]
    config = backend_config(comps["backend"])
    inputs = [InputSpec.from_json(i) for i in comps["module"]["inputs"]]
    backend = backend_for(config.kind)(config)
    reason = backend.unavailable()
    if reason:
        raise AituneError(f"cannot load {target}: {config.kind} cannot run here: {reason}")
    from .loadable import import_recorded

    import_recorded(record, project, target)  # pytree types and operators the artifact names, if the project vouches

    def module_factory() -> Any:
        if project is None:
            raise UserError(f"{target} ({config.kind}) re-creates its module from the factory: pass manifest= of its project")
        name, _ = project.manifest.module_of(target)
        spec = ModuleSpec.from_json({**comps["module"], "sources": []})
        return make_module(project.manifest, name, spec, config.device)

    upstream = None
    if "upstream" in comps and project is not None:
        up = project.manifest.model.targets[target].from_
        up_rec = read_record(project.target_dir(up)) or {}
        upstream = project.target_dir(up) / up_rec.get("artifact", "model.pt2")
    ctx = BuildContext(config=config, inputs=inputs, root=project.manifest.root if project else folder,
                       artifact_dir=folder, make_module=module_factory, upstream=upstream)
    return LoadedModule(backend.load(ctx), [i.name for i in inputs], target, record)


