"""What goes into a target's key, canonicalised and versioned, and how two sets of key components differ.

A key is xxh3-128 over canonical JSON (sorted keys, no spaces) of {"schema": KEY_SCHEMA, "components": ...}.
Components are plain JSON values, so build.json can keep them and `explain` can diff them field by field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import xxhash

from .backends import backend_for
from .gpus import GpuPlan
from .hashing import StateCache
from .manifest import LoadedManifest, to_json
from .sources import glob_sources, scan_module
from .toolchain import python_version

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any

KEY_SCHEMA = 2  # 2: third-party distributions the sources import ("packages")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def key_of(components: dict[str, Any]) -> str:
    return xxhash.xxh3_128_hexdigest(canonical_json({"schema": KEY_SCHEMA, "components": components}).encode())


@dataclass
class Fingerprinter:
    """Computes key components for the targets of one manifest. Memoises per run: files don't change mid-run."""

    manifest: LoadedManifest
    state: StateCache
    toolchain_override: dict[str, Any] | None = None  # tests fake toolchain versions through this
    gpus: str | None = None  # `build --gpus`: a CUDA_VISIBLE_DEVICES value; None: the environment's
    gpu_model: str | None = None  # `build --gpu-model`; None: [project] gpu_model, else the first visible GPU's
    _gpu_plan: GpuPlan | None = None
    _sources: dict[str, dict] = field(default_factory=dict)
    _packages: dict[str, dict] = field(default_factory=dict)
    _imports: dict[str, list[str]] = field(default_factory=dict)  # third-party top-level import names, by module
    _json: dict[tuple[str, str], Any] = field(default_factory=dict)  # specs as JSON, by (table, name)
    _toolchains: dict[str, dict] = field(default_factory=dict)
    # components that targets of one (module, backend) share, and each one's canonical JSON (encoded once, not per target)
    _shared: dict[tuple[str, str], tuple[dict[str, Any], dict[str, str]]] = field(default_factory=dict)

    @property
    def gpu_plan(self) -> GpuPlan:
        """The GPU model GPU targets' keys name and the GPUs they build on (gpus.py has the rule). Asked only when a
        GPU target's key is computed or built: CPU-only builds never run nvidia-smi."""
        if self._gpu_plan is None:
            from .gpus import plan_gpus
            from .toolchain import gpu_info

            self._gpu_plan = plan_gpus(gpu_info(self.gpus), self.gpu_model or self.manifest.model.project.gpu_model)
        return self._gpu_plan

    def use_gpu_plan(self, plan: GpuPlan) -> None:
        """Name another GPU model in keys (the Ray executor: the cluster's, not this machine's). Before any key."""
        self._gpu_plan = plan
        self._toolchains.clear()
        self._shared.clear()

    def toolchain(self, backend_name: str) -> dict[str, Any]:
        """What compiles targets of this backend (config, not kind: two `export` backends on cpu and cuda differ)."""
        if backend_name not in self._toolchains:
            config = self.manifest.model.backends[backend_name]
            backend = backend_for(config.kind)(config)
            gpu = self.gpu_plan.model if backend.needs_gpu else None
            found = {"python": python_version(), **backend.toolchain(gpu)}
            if self.toolchain_override:
                found.update(self.toolchain_override)
            self._toolchains[backend_name] = found
        return self._toolchains[backend_name]

    def _as_json(self, table: str, name: str, spec: Any) -> Any:
        if (table, name) not in self._json:
            self._json[table, name] = to_json(spec)
        return self._json[table, name]

    def _module_sources(self, module_name: str) -> dict[str, Any]:
        if module_name not in self._sources:
            spec = self.manifest.model.modules[module_name]
            root = self.manifest.root
            broken: list[str] = []
            files, self._imports[module_name] = scan_module(root, spec.factory.split(":")[0], self.state, broken)
            if broken:  # this module's targets fail; targets of other modules still build
                raise self.manifest.error(f"modules.{module_name}.factory", broken[0] + (
                    f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""))
            globbed = glob_sources(root, spec.sources, self.state)
            if globbed["empty"]:
                pattern = globbed["empty"][0]
                raise self.manifest.error(f"modules.{module_name}.sources", f"pattern '{pattern}' matches no file under {root}")
            self._sources[module_name] = {**files, **globbed["files"]}
        return self._sources[module_name]

    def packages(self, module_name: str) -> dict[str, str]:
        """{distribution: version} of the third-party code the module's sources import (torch aside: toolchain)."""
        if module_name not in self._packages:
            from .packages import distributions

            self._module_sources(module_name)
            self._packages[module_name] = distributions(self._imports[module_name], self.state)
        return self._packages[module_name]

    def third_party_imports(self, module_name: str) -> list[str]:
        """Top-level names of the modules outside the project (standard library aside) the module's sources import."""
        self._module_sources(module_name)
        return self._imports[module_name]

    def key(self, target: str, upstream_artifact: str | None = None) -> tuple[str, dict[str, Any]]:
        """(key, components) of target; upstream_artifact: the xxh3 of its `from` upstream's artifact (from a build
        record, or as aitune.lock pins it)."""
        spec = self.manifest.model.targets[target]
        if spec.candidates is not None:
            comps = self.components(target, upstream_artifact)
            return key_of(comps), comps
        shared, texts = self._shared_components(spec.backend, self.manifest.module_of(target)[0])
        comps = self._assemble(shared, spec, upstream_artifact)
        # key_of(comps), with the shared components' JSON encoded once per run (tests/test_keys.py checks they agree)
        texts = {**texts, **{k: f'"{k}":{canonical_json(v)}' for k, v in comps.items() if k not in texts}}
        body = ",".join([texts[k] for k in sorted(texts)])
        return xxhash.xxh3_128_hexdigest(f'{{"components":{{{body}}},"schema":{KEY_SCHEMA}}}'.encode()), comps

    def components(self, target: str, upstream_artifact: str | None = None) -> dict[str, Any]:
        man = self.manifest.model
        spec = man.targets[target]
        if spec.candidates is not None:  # a tuned target: its key is its selection's (candidates' keys, GPU, settings)
            from .tune import selection_components

            return selection_components(self, target, upstream_artifact)
        shared, _ = self._shared_components(spec.backend, self.manifest.module_of(target)[0])
        return self._assemble(shared, spec, upstream_artifact)

    @staticmethod
    def _assemble(shared: dict[str, Any], spec: Any, upstream_artifact: str | None) -> dict[str, Any]:
        comps = {k: v for k, v in shared.items() if k != "toolchain"}
        comps["check"] = to_json(spec.check)
        comps["toolchain"] = shared["toolchain"]
        if spec.from_ is not None:
            comps["upstream"] = {"artifact": upstream_artifact}
        return comps

    def _shared_components(self, backend_name: str, module_name: str) -> tuple[dict[str, Any], dict[str, str]]:
        """The components every target of this module and backend has alike, and each one's canonical JSON member."""
        if (module_name, backend_name) not in self._shared:
            mod = self.manifest.model.modules[module_name]
            root = self.manifest.root
            module = {k: v for k, v in self._as_json("modules", module_name, mod).items() if k != "sources"}  # files hashed below
            shared: dict[str, Any] = {
                "module": module,
                "sources": self._module_sources(module_name),
                "packages": self.packages(module_name),
                "weights": {mod.weights: self.state.digest(root / mod.weights)} if mod.weights else {},
                "samples": {i.sample: self.state.digest(root / i.sample) for i in mod.inputs if i.sample},
                "backend": self._as_json("backends", backend_name, self.manifest.model.backends[backend_name]),
                "toolchain": self.toolchain(backend_name),
            }
            # '"name":<canonical JSON>' (the names are plain identifiers: JSON spells them as they are)
            self._shared[module_name, backend_name] = shared, {k: f'"{k}":{canonical_json(v)}' for k, v in shared.items()}
        return self._shared[module_name, backend_name]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"backend.compile_config.optimization_level": 3, "sources.models/mlp.py": "ab12..", ...}"""
    if isinstance(obj, dict):
        if not obj and prefix:
            return {prefix: {}}
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        if not obj:
            return {prefix: []}
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def component_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """One structured change (reasons.change) per differing leaf of two sets of key components."""
    from .reasons import change

    a, b = flatten(old), flatten(new)
    out: list[dict[str, Any]] = []
    for k in sorted(a.keys() | b.keys()):
        if a.get(k, _MISSING) == b.get(k, _MISSING) or (k == "packages" and {} in (a.get(k), b.get(k))):
            continue  # an empty packages table gaining its first entry is said by that entry
        comp, _, path = k.partition(".")
        if "[" in comp:  # a list-valued component: "name[0]"
            comp, path = comp.split("[", 1)[0], "[" + comp.split("[", 1)[1] + (f".{path}" if path else "")
        what = "added" if k not in a else "removed" if k not in b else "changed"
        out.append(change(comp, path or None, what, a.get(k), b.get(k)))
    return out


def diff_components(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """component_changes as text: 'models/helpers.py changed', 'backend.strict: false -> true'."""
    from .reasons import describe

    return [describe(c) for c in component_changes(old, new)]


_MISSING = object()
