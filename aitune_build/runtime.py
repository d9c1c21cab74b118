"""aitune_build.load(): a callable module from a materialised artifact or a verified release archive.

Trust: what an archive says is data. Factories, their args, backend configs of eager/JIT targets and every path
come from the local manifest; an archive target built from another module than the local manifest's is refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from .errors import AituneError, UserError

_NEEDS_FACTORY = ("eager", "inductor_jit", "torch_tensorrt_jit")  # these re-create the module at load
_warned: set[tuple[str, str, str]] = set()


class StaleArtifact(UserWarning):
    """load() found an artifact built from other inputs than the project's current ones."""


class LoadedModule:
    """Calls the artifact with the inputs bound by name, positional arguments in the manifest's input order.

    Inputs are checked against the specs (dtype, rank, each dimension within its min..max) before the call; the call
    runs under torch.no_grad(), so outputs never require grad, whatever the backend."""

    def __init__(self, fn: Any, inputs: list[Any], target: str, record: dict[str, Any]):
        from .inputs import concrete_shape

        self.fn, self.target, self.record = fn, target, record
        self.input_names = [i.name for i in inputs]
        self._specs = {i.name: (i.dtype, list(zip(concrete_shape(i, "min"), concrete_shape(i, "max")))) for i in inputs}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        if len(args) > len(self.input_names):
            raise TypeError(f"{self.target} takes {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(args)}")
        for name, value in zip(self.input_names, args):
            if name in kwargs:
                raise TypeError(f"{self.target}: input '{name}' given twice")
            kwargs[name] = value
        if kwargs.keys() != set(self.input_names):
            missing, extra = sorted(set(self.input_names) - kwargs.keys()), sorted(kwargs.keys() - set(self.input_names))
            raise TypeError(f"{self.target} takes inputs ({', '.join(self.input_names)})"
                            + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        for name, (dtype, bounds) in self._specs.items():
            t = kwargs[name]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{self.target}: input '{name}' must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != getattr(torch, dtype):
                raise ValueError(f"{self.target}: input '{name}' has dtype {str(t.dtype).removeprefix('torch.')}; "
                                 f"the artifact takes {dtype} (convert with .to(torch.{dtype}))")
            shape = list(t.shape)
            if len(shape) != len(bounds) or any(not lo <= d <= hi for d, (lo, hi) in zip(shape, bounds)):
                want = ", ".join(str(lo) if lo == hi else f"{lo}..{hi}" for lo, hi in bounds)
                raise ValueError(f"{self.target}: input '{name}' has shape {shape}; the artifact takes [{want}]")
        with torch.no_grad():
            return self.fn(**kwargs)

    def __repr__(self) -> str:
        return f"<aitune_build.LoadedModule {self.target} ({self.record.get('backend')}, key {str(self.record.get('key'))[:12]})>"


def load(target: str, manifest: str | Path = "aitune.toml", *, build: bool = False, archive: str | Path | None = None,
         strict: bool = False) -> LoadedModule:
    """Load TARGET's artifact as a callable.

    From the project's materialised outputs (building TARGET first when build=True), or, with archive=, from a
    release archive that is verified, unpacked into the cache once and re-verified on every load. eager and JIT
    targets re-create the module from the local manifest's factory, so they need the project (manifest=) at hand.
    A materialised artifact that is stale for the current project warns once (StaleArtifact); strict=True raises."""
    from .backends import BuildContext, backend_for
    from .factory import make_module
    from .manifest import InputSpec, backend_config, to_json
    from .vocabulary import backend_kinds
    from .outputs import read_record

    project = None
    manifest_path = Path(manifest)
    archive_root = None
    if archive is not None:
        import os

        from .release import unpack_verified

        cache = Path(os.environ.get("AITUNE_CACHE_DIR") or Path.home() / ".cache" / "aitune")
        state = None
        if manifest_path.exists():
            from .project import Project

            project = Project.open(manifest_path)
            cache, state = project.cache_dir, project.state
        archive_root = unpack_verified(Path(archive), cache, state)
        folder = archive_root / "targets" / target
        from .fsutil import read_json

        record = read_json(folder / "build.json") if folder.is_dir() else None
        if record is None:
            raise UserError(f"{archive}: has no target '{target}'")
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
        _check_fresh(project, order, target, record, strict)

    where = archive if archive is not None else folder
    try:
        comps = record["components"]
        if "winner" in record:  # a tuned target: its artifact is its winner's, chosen on one GPU model (tune.py)
            from .tune import check_same_device

            check_same_device(target, record)
            comps = record["winner"]["components"]
        kind = comps["backend"]["kind"]
        if kind not in backend_kinds():
            raise UserError(f"{where}: target '{target}' has unknown backend kind {kind!r}")
        archived_inputs = [InputSpec.from_json(i) for i in comps["module"]["inputs"]]
    except (KeyError, TypeError, AttributeError, ValueError):
        raise UserError(f"{where}: build.json of '{target}' is malformed") from None

    local = project is not None and target in project.manifest.model.targets
    if local:
        module_name, spec = project.manifest.module_of(target)  # type: ignore[union-attr]
        local_module = {k: v for k, v in to_json(spec).items() if k != "sources"}
        if archive is not None and comps["module"] != local_module:
            raise UserError(f"{archive}: target '{target}' was built from another module than modules.{module_name} of "
                            f"{project.manifest.display} (factory {comps['module'].get('factory')!r} with other args or "
                            "inputs); refusing it: load it with the manifest it was built from")  # type: ignore[union-attr]
        tspec = project.manifest.model.targets[target]  # type: ignore[union-attr]
        backend_name = tspec.backend
        if tspec.candidates is not None:  # the winner must be one of the local manifest's candidates
            backend_name = (record.get("selection") or {}).get("winner")
            if backend_name not in tspec.candidates:
                raise UserError(f"{where}: target '{target}' names winner {backend_name!r}, not one of its candidates "
                                f"in {project.manifest.display}")  # type: ignore[union-attr]
        config = project.manifest.model.backends[backend_name]  # type: ignore[union-attr]
        if config.kind != kind:
            raise UserError(f"{where}: target '{target}' is a {kind} build; the local manifest says {config.kind}")
        inputs = list(spec.inputs)
    else:
        if kind in _NEEDS_FACTORY:
            raise UserError(f"{target} ({kind}) re-creates its module from the factory: pass manifest= of its project "
                            "(an archive never names the code to run)")
        try:
            config = backend_config(comps["backend"])
        except (TypeError, KeyError):
            raise UserError(f"{where}: build.json of '{target}' has a malformed backend config") from None
        inputs = archived_inputs
    backend = backend_for(config.kind)(config)
    reason = backend.unavailable()
    if reason:
        raise AituneError(f"cannot load {target}: {config.kind} cannot run here: {reason}")
    from .loadable import import_recorded

    import_recorded(record, project, target)  # pytree types and operators the artifact names, if the project vouches

    def module_factory() -> Any:
        if not local:
            raise UserError(f"{target} ({config.kind}) re-creates its module from the factory: pass manifest= of its project")
        return make_module(project.manifest, module_name, spec, config.device)  # type: ignore[union-attr]

    upstream = None
    if "upstream" in comps and local:
        up = project.manifest.model.targets[target].from_  # type: ignore[union-attr]
        if up is not None:
            up_backend = project.manifest.model.backends[project.manifest.model.targets[up].backend]  # type: ignore[union-attr]
            artifact = backend_for(up_backend.kind).artifact  # the name comes from our code, not from a record
            if archive_root is not None:
                upstream = archive_root / "targets" / up / artifact
                if not upstream.is_file():
                    raise UserError(f"{archive}: target '{target}' needs its upstream '{up}', which the archive lacks")
            else:
                upstream = project.target_dir(up) / artifact  # type: ignore[union-attr]
    ctx = BuildContext(config=config, inputs=inputs, root=project.manifest.root if project else folder,
                       artifact_dir=folder, make_module=module_factory, upstream=upstream)
    return LoadedModule(backend.load(ctx), inputs, target, record)


def _check_fresh(project: Any, order: list[str], target: str, record: dict[str, Any], strict: bool) -> None:
    """Warn once per (target, built key, current key) when the materialised artifact is stale; raise with strict."""
    from .project import survey

    try:
        found = survey(project, order)[target]
    except UserError:
        return  # the project cannot say what is current (e.g. a source glob matches nothing): nothing to compare
    if found.key == record.get("key"):
        return
    why = "; ".join(found.staleness.reasons[:3]) or "its inputs changed"
    msg = (f"{target}: the materialised artifact is stale for the current project ({why}); "
           f"run `aitune-build build {target}` or pass build=True")
    if strict:
        raise UserError(msg + " (strict=True)")
    seen = (str(project.manifest.path), target, f"{record.get('key')}:{found.key}")
    if seen not in _warned:
        _warned.add(seen)
        warnings.warn(msg, StaleArtifact, stacklevel=3)
