"""The manifest as the rest of the program sees it: frozen values (`Spec`), loaded from `aitune.toml`.

Validation is pydantic's job (schema.py: the contract, every default). Its models are costly to build, so
Project.open remembers each validation in the stat cache by the manifest's digest: bytes validated before are
neither parsed nor validated again, and pydantic is not imported at all (a no-op build stays fast). Reference,
cycle and file checks run on every load. Nothing here imports torch. Every user mistake becomes a
`ManifestError` naming the file and the key path.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import xxhash

from .errors import ManifestError, did_you_mean
from .spec import Spec, to_json  # noqa: F401  (re-exported)
from .vocabulary import DEFAULT_CACHE_DIR, DTYPES, FACTORY_RE, NAME_MAX, NAME_RE, backend_registry  # noqa: F401  (re-exported)

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any
    from .backends import BackendConfig

# A validated manifest is remembered by the digest of its bytes and of the code that validates it: these files, every
# file of the backends package (each backend declares its config there) and the module of each other registered kind.
_VALIDATOR_FILES = tuple(Path(__file__).with_name(n) for n in ("schema.py", "vocabulary.py", "spec.py", "manifest.py"))
_BACKENDS_DIR = Path(__file__).with_name("backends")


class ProjectSettings(Spec):
    name: str
    out_dir: str
    cache_dir: str
    executor: str
    gpu_model: str | None
    remote_cache: str | None
    remote_cache_mode: str


class Axis(Spec):
    """A dynamic axis. Axes sharing a `dim` name are one dimension across inputs."""

    min: int
    opt: int
    max: int
    dim: str | None


class InputSpec(Spec):
    name: str
    shape: tuple[int | Axis, ...]
    dtype: str
    range: tuple[float, float] | None
    sample: str | None

    @property
    def is_dynamic(self) -> bool:
        return any(isinstance(d, Axis) for d in self.shape)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InputSpec:
        shape = tuple(Axis(**a) if isinstance(a, dict) else a for a in d["shape"])
        rng = tuple(d["range"]) if d["range"] is not None else None
        return cls(name=d["name"], shape=shape, dtype=d["dtype"], range=rng, sample=d["sample"])


class ModuleSpec(Spec):
    factory: str
    args: dict[str, Any]
    weights: str | None
    sources: tuple[str, ...]
    inputs: tuple[InputSpec, ...]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModuleSpec:
        return cls(factory=d["factory"], args=d["args"], weights=d["weights"], sources=tuple(d["sources"]),
                   inputs=tuple(InputSpec.from_json(i) for i in d["inputs"]))


def config_class(kind: str) -> type[BackendConfig]:
    """The frozen config class of a backend kind, declared beside its backend."""
    from .backends import backend_for

    return backend_for(kind).config_class


def backend_config(d: dict[str, Any]) -> BackendConfig:
    """A backend config from its normalised JSON (a manifest's, or a build.json's key components)."""
    return config_class(d["kind"])(**d)


class CheckSpec(Spec):
    rtol: float | None
    atol: float | None
    seed: int


STRATEGIES = ("first_wins", "min_latency", "max_throughput", "latency_budget")
CANDIDATE_SEP = "@"  # a tuned target T's candidate B is the hidden target "T@B" ('@' is not allowed in names)


def candidate_target(target: str, backend: str) -> str:
    return f"{target}{CANDIDATE_SEP}{backend}"


def is_candidate(name: str) -> bool:
    return CANDIDATE_SEP in name


class TargetSpec(Spec):
    module: str | None
    from_: str | None
    backend: str | None  # None for a tuned target (candidates)
    check: CheckSpec
    serve: bool  # `aitune-build run` puts this target's artifact into the application (one per module)
    candidates: tuple[str, ...] | None
    select: str | None
    budget_ms: float | None
    batch: tuple[int, ...] | None
    min_speedup: float | None

    @property
    def strategy(self) -> str:
        return self.select or "min_latency"

    @classmethod
    def from_json(cls, t: dict[str, Any]) -> TargetSpec:
        tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
        return cls(module=t["module"], from_=t["from_"], backend=t["backend"], check=CheckSpec(**t["check"]),
                   serve=t["serve"], candidates=tup(t["candidates"]), select=t["select"], budget_ms=t["budget_ms"], batch=tup(t["batch"]),
                   min_speedup=t["min_speedup"])

    def candidate(self, backend: str) -> TargetSpec:
        """The hidden target that builds one candidate: an ordinary target with that backend."""
        return TargetSpec(module=self.module, from_=self.from_, backend=backend, check=self.check, serve=False, candidates=None,
                          select=None, budget_ms=None, batch=None, min_speedup=None)


def _with_candidates(targets: dict[str, TargetSpec]) -> dict[str, TargetSpec]:
    """Targets plus, after each tuned target, its candidates as hidden targets "T@B" (built, cached, checked as any)."""
    out: dict[str, TargetSpec] = {}
    for name, spec in targets.items():
        if is_candidate(name):
            continue  # derived again below (a manifest handed to a worker as JSON holds them already)
        out[name] = spec
        for b in spec.candidates or ():
            out[candidate_target(name, b)] = spec.candidate(b)
    return out


class Manifest(Spec):
    project: ProjectSettings
    modules: dict[str, ModuleSpec]
    backends: dict[str, BackendConfig]
    targets: dict[str, TargetSpec]

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        return cls(
            project=ProjectSettings(**d["project"]),
            modules={n: ModuleSpec.from_json(m) for n, m in d["modules"].items()},
            backends={n: backend_config(b) for n, b in d["backends"].items()},
            targets=_with_candidates({n: TargetSpec.from_json(t) for n, t in d["targets"].items()}),
        )


class LoadedManifest(Spec):
    path: Path  # absolute
    display: str  # as messages name it
    root: Path  # the manifest's folder: factories import from here, relative paths resolve here
    model: Manifest

    def error(self, key: str, message: str) -> ManifestError:
        return ManifestError(self.display, key, message)

    def batch_axis(self, target: str) -> tuple[Axis, str] | None:
        """The dynamic batch axis of a target's module and where it is declared: the axes with dim = "batch", else
        the first input's axis 0 (and the axes sharing its dim); None when there is none."""
        module_name, mod = self.module_of(target)
        found = batch_axes(mod.inputs)
        if not found:
            return None
        i, j = found[0]
        return mod.inputs[i].shape[j], f"modules.{module_name}.inputs[{i}].shape[{j}]"

    def module_of(self, target: str) -> tuple[str, ModuleSpec]:
        """The module a target (or its furthest upstream) is built from."""
        spec = self.model.targets[target]
        while spec.module is None:
            spec = self.model.targets[spec.from_]
        return spec.module, self.model.modules[spec.module]


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(_display(path), "", "no such file; create an aitune.toml or pass --manifest / -C") from None
    except IsADirectoryError:
        raise ManifestError(_display(path), "", "is a folder, not a file") from None


def parse(raw: bytes, path: Path) -> dict[str, Any]:
    """The TOML document; a ManifestError for malformed TOML."""
    if sys.version_info >= (3, 11):  # imported here: a no-op build finds its manifest validated already (7 ms)
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(_display(path), "", f"invalid TOML: {e}") from None
    except RecursionError:
        raise ManifestError(_display(path), "", f"invalid TOML: nested more than {MAX_DEPTH} levels deep") from None
    deep = _too_deep(data)
    if deep is not None:
        raise ManifestError(_display(path), deep, f"nested more than {MAX_DEPTH} levels deep")
    return data


MAX_DEPTH = 64


def _too_deep(data: Any) -> str | None:
    """The key path where data nests deeper than MAX_DEPTH (iteratively: no recursion to overflow), else None."""
    todo: list[tuple[Any, list[str], int]] = [(data, [], 0)]
    while todo:
        obj, path, depth = todo.pop()
        if depth > MAX_DEPTH:
            return ".".join(path[:4]) + ("..." if len(path) > 4 else "")
        if isinstance(obj, dict):
            todo += [(v, path + [str(k)], depth + 1) for k, v in obj.items()]
        elif isinstance(obj, list):
            todo += [(v, path[:-1] + [f"{path[-1] if path else ''}[{i}]"], depth + 1) for i, v in enumerate(obj)]
    return None


def validate(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """The document validated by pydantic (schema.py), as JSON with every default filled in."""
    from .schema import normalise

    return normalise(data, _display(path))


def validation_digest(raw: bytes) -> str:
    """What a validated manifest is remembered by: its bytes, the registered kinds and the code that validates them."""
    registry = backend_registry()
    h = xxhash.xxh3_128(raw)
    h.update(json.dumps(registry, sort_keys=True).encode())
    for f in (*_VALIDATOR_FILES, *sorted(_BACKENDS_DIR.glob("*.py")), *_plugin_files(registry)):
        h.update(b"\0" + f.read_bytes())
    return h.hexdigest()


def _plugin_files(registry: dict[str, str]) -> list[Path]:
    """The files of registered backend modules outside the backends package, found without importing them."""
    found = []
    for where in registry.values():
        module = where.split(":")[0]
        if module.startswith("aitune_build.backends."):
            continue
        import importlib.util  # only for registered plugins: 5 ms of every no-op build otherwise
        try:
            spec = importlib.util.find_spec(module)
        except ImportError:
            spec = None
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            raise ManifestError("AITUNE_BACKENDS", "", f"cannot find module '{module}' (check PYTHONPATH)")
        found.append(Path(spec.origin))
    return found


def checked(path: Path, model: Manifest) -> LoadedManifest:
    """A validated manifest, its references, names, cycles and files checked (these run on every load)."""
    loaded = _loaded(path, model)
    _check_references(loaded)
    return loaded


def load_manifest(path: str | Path) -> LoadedManifest:
    """Read, validate and check a manifest (Project.open does the same, remembering validations)."""
    path = Path(path)
    return checked(path, Manifest.from_json(validate(parse(read_bytes(path), path), path)))


def loaded_from_json(path: Path, data: dict[str, Any]) -> LoadedManifest:
    """A manifest validated and checked in another process (the build hands it to each worker as JSON, so a worker
    builds exactly what was hashed even if aitune.toml is edited meanwhile)."""
    return _loaded(path, Manifest.from_json(data))


def _loaded(path: Path, model: Manifest) -> LoadedManifest:
    path = Path(path).resolve()
    return LoadedManifest(path=path, display=_display(path), root=path.parent, model=model)


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --- references, names, cycles, files ---------------------------------------------------------------------------


def _check_references(m: LoadedManifest) -> None:
    man = m.model
    declared = {n: t for n, t in man.targets.items() if not is_candidate(n)}  # candidates are derived: checked via T
    for table, names in (("modules", man.modules), ("backends", man.backends), ("targets", declared)):
        for name in names:
            problem = name_problem(name)
            if problem:
                raise m.error(f"{table}.{json.dumps(name)}", problem)
    for name, mod in man.modules.items():
        _check_module(m, name, mod)
    for name, t in declared.items():
        key = f"targets.{name}"
        if t.candidates is None and t.backend not in man.backends:
            raise m.error(f"{key}.backend", f"unknown backend '{t.backend}'{did_you_mean(t.backend, man.backends)}")
        if t.module is not None and t.module not in man.modules:
            raise m.error(f"{key}.module", f"unknown module '{t.module}'{did_you_mean(t.module, man.modules)}")
        if t.from_ is not None:
            if t.from_ not in declared:
                raise m.error(f"{key}.from", f"unknown target '{t.from_}'{did_you_mean(t.from_, declared)}")
            if t.from_ == name:
                raise m.error(f"{key}.from", "a target cannot take its own artifact")
    _check_cycles(m)
    served: dict[str, str] = {}
    for name, t in declared.items():
        if t.serve:
            module, _ = m.module_of(name)
            if module in served:
                raise m.error(f"targets.{name}.serve", f"module '{module}' is already served by target '{served[module]}'; "
                                                      "set serve = true on one target per module")
            served[module] = name
    from .backends import backend_for

    for name, t in declared.items():
        _check_tuning(m, name, t)
    for name, t in declared.items():
        if t.from_ is not None:
            up = man.targets[t.from_]
            if up.candidates is not None:
                raise m.error(f"targets.{name}.from", f"target '{t.from_}' chooses its backend by measurement (candidates); "
                                                      "'from' takes a target with one export backend")
            up_kind = man.backends[up.backend].kind
            if not backend_for(up_kind).feeds_from:
                raise m.error(f"targets.{name}.from", f"target '{t.from_}' has backend kind '{up_kind}'; 'from' takes an export target's .pt2")
            for where, b in ([("backend", t.backend)] if t.candidates is None else
                             [(f"candidates[{i}]", c) for i, c in enumerate(t.candidates)]):
                kind = man.backends[b].kind
                if not backend_for(kind).takes_from:
                    raise m.error(f"targets.{name}.{where}", f"backend kind '{kind}' cannot take its input from another target")


def _check_tuning(m: LoadedManifest, name: str, t: TargetSpec) -> None:
    """candidates / select / budget_ms / batch / min_speedup (the pydantic model checks their types)."""
    key = f"targets.{name}"
    man = m.model
    if t.candidates is None:
        given = next((k for k in ("select", "budget_ms", "batch", "min_speedup") if getattr(t, k) is not None), None)
        if given:
            raise m.error(f"{key}.{given}", "applies to a target that chooses among 'candidates'; this one has a single 'backend'")
        return
    for i, c in enumerate(t.candidates):
        if c not in man.backends:
            raise m.error(f"{key}.candidates[{i}]", f"unknown backend '{c}'{did_you_mean(c, man.backends)}")
        if c in t.candidates[:i]:
            raise m.error(f"{key}.candidates[{i}]", f"'{c}' is listed twice")
    if t.strategy == "latency_budget" and t.budget_ms is None:
        raise m.error(f"{key}.budget_ms", 'required with select = "latency_budget" (milliseconds)')
    if t.strategy != "latency_budget" and t.budget_ms is not None:
        raise m.error(f"{key}.budget_ms", f'applies to select = "latency_budget" only (select is "{t.strategy}")')
    if t.batch is not None:
        found = m.batch_axis(name)
        if found is None:
            raise m.error(f"{key}.batch", f"module '{m.module_of(name)[0]}' has no dynamic batch axis (dim = \"batch\" or a "
                                          "dynamic axis 0 of its first input)")
        ax, where = found
        for i, b in enumerate(t.batch):
            if not ax.min <= b <= ax.max:
                raise m.error(f"{key}.batch[{i}]", f"{b} is outside the batch axis' range {ax.min}..{ax.max} ({where})")


def batch_axes(inputs: tuple[InputSpec, ...] | list[InputSpec]) -> list[tuple[int, int]]:
    """(input index, axis index) of every axis of the batch dimension (see LoadedManifest.batch_axis)."""
    named = [(i, j) for i, s in enumerate(inputs) for j, d in enumerate(s.shape) if isinstance(d, Axis) and d.dim == "batch"]
    if named:
        return named
    if not inputs or not inputs[0].shape or not isinstance(inputs[0].shape[0], Axis):
        return []
    first = inputs[0].shape[0]
    if first.dim is None:
        return [(0, 0)]
    return [(i, j) for i, s in enumerate(inputs) for j, d in enumerate(s.shape) if isinstance(d, Axis) and d.dim == first.dim]


def name_problem(name: str) -> str | None:
    """Why name cannot name a module, backend or target (it becomes a folder name), or None."""
    if not NAME_RE.fullmatch(name):
        return "names may use letters, digits, '_', '.' and '-' only"
    if name.startswith("."):
        return "names may not start with '.' ('.' and '..' are folders, not names)"
    if len(name) > NAME_MAX:
        return f"names may be at most {NAME_MAX} characters long (this one has {len(name)})"
    return None


def _check_cycles(m: LoadedManifest) -> None:
    targets = m.model.targets
    state: dict[str, int] = {}
    for start in targets:
        path, node = [], start
        while node is not None and state.get(node) is None:
            state[node] = 1
            path.append(node)
            node = targets[node].from_
        if node is not None and state.get(node) == 1:
            cycle = path[path.index(node):] + [node]
            raise m.error(f"targets.{cycle[0]}.from", f"cycle in 'from' edges: {' -> '.join(cycle)}")
        for p in path:
            state[p] = 2


def _check_module(m: LoadedManifest, name: str, mod: ModuleSpec) -> None:
    key = f"modules.{name}"
    module_path, fn = mod.factory.split(":")
    file = module_file(m.root, module_path)
    if file is None:
        raise m.error(f"{key}.factory", f"cannot find module '{module_path}' under {m.root} (looked for {module_path.replace('.', '/')}.py)")
    try:
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except SyntaxError:
        tree = None  # reported when a target of this module is keyed: the other targets still build
    defined = _top_level_names(tree) if tree is not None else [fn]
    if fn not in defined and "*" not in defined:
        raise m.error(f"{key}.factory", f"'{module_path}' defines no '{fn}'{did_you_mean(fn, defined)}")
    for field, value in [("weights", mod.weights)] + [(f"inputs[{i}].sample", s.sample) for i, s in enumerate(mod.inputs)]:
        if value is not None and "\0" in value:
            raise m.error(f"{key}.{field}", "a path may not contain a NUL character")
    for i, pattern in enumerate(mod.sources):
        parts = Path(pattern).parts
        if "\0" in pattern or not pattern or Path(pattern).is_absolute() or pattern.startswith(("/", "\\")) or ".." in parts:
            raise m.error(f"{key}.sources[{i}]", f"'{pattern}' reaches outside the project; use a glob relative to {m.root.name}/")
    if mod.weights is not None and not (m.root / mod.weights).is_file():
        raise m.error(f"{key}.weights", f"file not found: {mod.weights}")
    names: set[str] = set()
    dims: dict[str, tuple[Axis, str]] = {}
    for i, spec in enumerate(mod.inputs):
        ikey = f"{key}.inputs[{i}]"
        if spec.name in names:
            raise m.error(f"{ikey}.name", f"duplicate input name '{spec.name}'")
        names.add(spec.name)
        if spec.sample is not None and not (m.root / spec.sample).is_file():
            raise m.error(f"{ikey}.sample", f"file not found: {spec.sample}")
        if spec.range is not None and spec.dtype == "bool":
            raise m.error(f"{ikey}.range", "a bool input takes no range")
        for j, ax in enumerate(spec.shape):
            if isinstance(ax, Axis) and ax.dim is not None:
                seen = dims.setdefault(ax.dim, (ax, f"{ikey}.shape[{j}]"))
                if (seen[0].min, seen[0].opt, seen[0].max) != (ax.min, ax.opt, ax.max):
                    raise m.error(f"{ikey}.shape[{j}]", f"dim '{ax.dim}' is declared with other min/opt/max at {seen[1]}")


def _top_level_names(tree: ast.Module) -> list[str]:
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, (ast.AnnAssign,)) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [(a.asname or a.name).split(".")[0] for a in node.names]
    return names


def module_file(root: Path, dotted: str) -> Path | None:
    """The project-local file of a dotted module name, or None when it is not under root."""
    base = root.joinpath(*dotted.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


