"""The `aitune.toml` contract: pydantic models (one per TOML table) and cross-reference checks.

Nothing here imports torch. Every user mistake becomes a `ManifestError` naming the file and the key path.
"""

from __future__ import annotations

import ast
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ManifestError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")

# torch dtype names accepted in input specs, mapped to the canonical torch attribute (no torch import needed).
DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "int8": "int8", "int16": "int16", "int32": "int32", "int": "int32", "int64": "int64", "long": "int64",
    "uint8": "uint8", "bool": "bool", "complex64": "complex64", "complex128": "complex128",
}
Device = Literal["cpu", "cuda"]
Precision = Literal["float32", "float16", "bfloat16"]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Project(_Table):
    name: str = Field(description="Project name.")
    out_dir: str = Field("build", description="Materialised outputs: <out_dir>/<target>/.")
    cache_dir: str = Field(".aitune", description="Content-addressed cache; env AITUNE_CACHE_DIR overrides.")


class Axis(_Table):
    """A dynamic axis. Axes sharing a `dim` name are one dimension across inputs."""

    min: int = Field(ge=0)
    opt: int = Field(ge=0)
    max: int = Field(ge=1)
    dim: str | None = Field(None, description="Shared dimension name (one torch.export.Dim).")

    @model_validator(mode="after")
    def _ordered(self) -> Axis:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}")
        return self


class InputSpec(_Table):
    name: str = Field(description="Parameter name of forward().")
    shape: list[Annotated[int, Field(ge=0)] | Axis]
    dtype: str = Field("float32", description="torch dtype name, e.g. float32, int64, bool.")
    range: tuple[float, float] | None = Field(None, description="[low, high) for generated example values.")
    sample: str | None = Field(None, description="Recorded example tensor file (torch.save), hashed into the key.")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown dtype '{v}'{did_you_mean(v, DTYPES)}; one of: {', '.join(sorted(set(DTYPES.values())))}")
        return DTYPES[v]

    @field_validator("range")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"need low < high, got {list(v)}")
        return v

    @property
    def is_dynamic(self) -> bool:
        return any(isinstance(d, Axis) for d in self.shape)


class ModuleSpec(_Table):
    factory: str = Field(description='"module.path:callable", importable from the manifest\'s folder.')
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    weights: str | None = Field(None, description="state_dict file, loaded with weights_only=True.")
    sources: list[str] = Field(default_factory=list, description="Extra file globs that belong to the key.")
    inputs: list[InputSpec] = Field(min_length=1)

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        if not FACTORY_RE.match(v):
            raise ValueError(f"'{v}' is not of the form 'package.module:callable'")
        return v


class _Backend(_Table):
    @property
    def precision(self) -> str:
        return "float32"


class ExportConfig(_Backend):
    """torch.export -> .pt2 (an ExportedProgram)."""

    kind: Literal["export"]
    device: Device = "cpu"
    strict: bool = Field(False, description="torch.export strict mode.")


class InductorAotConfig(_Backend):
    """AOTInductor package -> .pt2."""

    kind: Literal["inductor_aot"]
    device: Device = "cpu"
    inductor_configs: dict[str, Any] = Field(default_factory=dict, description="torch._inductor config overrides.")


class InductorJitConfig(_Backend):
    """torch.compile (Inductor): build = compile + warm-up + check; load recompiles."""

    kind: Literal["inductor_jit"]
    device: Device = "cpu"
    mode: str | None = None
    fullgraph: bool = False
    dynamic_shapes: bool | None = Field(None, description="true | false | omitted (auto-detect and recompile).")
    options: dict[str, Any] = Field(default_factory=dict)


class EagerConfig(_Backend):
    """The reference: the module as the factory returns it."""

    kind: Literal["eager"]
    device: Device = "cpu"


class _TorchTensorRT(_Backend):
    device: Literal["cuda"] = "cuda"
    compile_config: dict[str, Any] = Field(
        default_factory=dict, description="torch_tensorrt CompilationSettings fields, checked against the installed version."
    )
    autocast_enabled: bool = False
    autocast_dtype: Precision | None = None

    @property
    def precision(self) -> str:
        if self.autocast_enabled and self.autocast_dtype:
            return self.autocast_dtype
        wanted = {str(p).removeprefix("torch.") for p in self.compile_config.get("enabled_precisions", [])}
        for name, aliases in (("float16", {"float16", "half", "fp16"}), ("bfloat16", {"bfloat16", "bf16"})):
            if wanted & aliases:
                return name
        return "float32"


class TorchTensorRTJitConfig(_TorchTensorRT):
    """torch.compile(backend="torch_tensorrt"): compiled at run time; the build keeps a record and the engine cache."""

    kind: Literal["torch_tensorrt_jit"]
    fullgraph: bool = Field(False, description="true: fail on graph breaks.")
    dynamic_shapes: bool | None = Field(None, description="true | false | omitted (auto-detect and recompile).")
    engine_cache: bool = Field(True, description="Store torch_tensorrt's engine cache with the target (needs immutable_weights=false).")


class TorchTensorRTAotConfig(_TorchTensorRT):
    """torch_tensorrt dynamo compile during the build, saved to disk, loaded without recompiling."""

    kind: Literal["torch_tensorrt_aot"]
    output_format: Literal["exported_program", "torchscript", "aot_inductor"] = "exported_program"


BackendConfig = Annotated[
    Union[ExportConfig, InductorAotConfig, InductorJitConfig, EagerConfig, TorchTensorRTJitConfig, TorchTensorRTAotConfig],
    Field(discriminator="kind"),
]
BACKEND_KINDS = ("export", "inductor_aot", "inductor_jit", "eager", "torch_tensorrt_jit", "torch_tensorrt_aot")


class CheckSpec(_Table):
    """Numeric check of the reloaded artifact against eager; tolerances default by precision."""

    rtol: float | None = Field(None, ge=0)
    atol: float | None = Field(None, ge=0)
    seed: int = 0


class TargetSpec(_Table):
    module: str | None = Field(None, description="A [modules] entry built from its factory.")
    from_: str | None = Field(None, alias="from", description="An upstream target whose artifact is the input.")
    backend: str
    check: CheckSpec = Field(default_factory=CheckSpec)

    @model_validator(mode="after")
    def _one_source(self) -> TargetSpec:
        if (self.module is None) == (self.from_ is None):
            raise ValueError("set exactly one of 'module' or 'from'")
        return self


class Manifest(_Table):
    """An aitune.toml file."""

    project: Project
    modules: dict[str, ModuleSpec] = Field(default_factory=dict)
    backends: dict[str, BackendConfig] = Field(default_factory=dict)
    targets: dict[str, TargetSpec] = Field(default_factory=dict)


@dataclass(frozen=True)
class LoadedManifest:
    path: Path  # absolute
    display: str  # as messages name it
    root: Path  # the manifest's folder: factories import from here, relative paths resolve here
    model: Manifest

    def error(self, key: str, message: str) -> ManifestError:
        return ManifestError(self.display, key, message)

    def module_of(self, target: str) -> tuple[str, ModuleSpec]:
        """The module a target (or its furthest upstream) is built from."""
        spec = self.model.targets[target]
        while spec.module is None:
            spec = self.model.targets[spec.from_]
        return spec.module, self.model.modules[spec.module]


def load_manifest(path: str | Path) -> LoadedManifest:
    path = Path(path)
    display = _display(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(display, "", "no such file; create an aitune.toml or pass --manifest / -C") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(display, "", f"invalid TOML: {e}") from None
    return validate(data, path.resolve(), display)


def validate(data: dict, path: Path, display: str) -> LoadedManifest:
    try:
        model = Manifest.model_validate(data)
    except ValidationError as e:
        raise _from_validation_error(e, display) from None
    loaded = LoadedManifest(path=path, display=display, root=path.parent, model=model)
    _check_references(loaded)
    return loaded


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# --- turning pydantic's errors into one line naming the key ---------------------------------------------------


def _from_validation_error(exc: ValidationError, display: str) -> ManifestError:
    errors = exc.errors()
    # A shape entry is an int or an Axis table: report the member the user evidently meant.
    err = next((e for e in errors if not (e["type"].startswith("int_") and isinstance(e["input"], dict))), errors[0])
    if any(p in ("Axis", "constrained-int", "int") for p in err["loc"]) and not isinstance(err["input"], (dict, int)):
        shown, _ = _walk(list(err["loc"]))
        return ManifestError(display, _format_loc(shown), f"expected an integer or a table {{min, opt, max[, dim]}}, got {err['input']!r}")
    loc, kind, msg = list(err["loc"]), err["type"], err["msg"]
    shown, fields = _walk(loc)
    key = _format_loc(shown)
    if kind == "extra_forbidden":
        bad = str(loc[-1])
        return ManifestError(display, key, f"unknown key '{bad}'{did_you_mean(bad, fields)}; allowed: {', '.join(fields)}")
    if kind == "missing":
        return ManifestError(display, key, "required key is missing")
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag", "?")
        return ManifestError(display, key + ".kind", f"unknown backend kind '{tag}'{did_you_mean(tag, BACKEND_KINDS)}; one of: {', '.join(BACKEND_KINDS)}")
    if kind == "union_tag_not_found":
        return ManifestError(display, key + ".kind", f"required key is missing; one of: {', '.join(BACKEND_KINDS)}")
    return ManifestError(display, key, msg.removeprefix("Value error, "))


def _walk(loc: list) -> tuple[list, list[str]]:
    """Follow pydantic's loc through the models, dropping the parts that name a union member.

    Returns the path as the user wrote it and the keys allowed in the last table visited."""
    ann: Any = Manifest
    shown: list = []
    fields: list[str] = []
    for part in loc:
        ann = _strip(ann)
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            by_key = {f.alias or n: f for n, f in ann.model_fields.items()}
            fields = list(by_key)
            shown.append(part)
            ann = by_key[part].annotation if part in by_key else None
        elif origin is dict:
            shown.append(part)
            ann = typing.get_args(ann)[1]
        elif origin in (list, tuple):
            shown.append(part)
            ann = typing.get_args(ann)[0]
        elif origin in (Union, types.UnionType) and isinstance(part, str):
            members = [_strip(a) for a in typing.get_args(ann)]
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            ann = next((m for m in models if part in (m.__name__, _kind_of(m))), None)
        else:
            shown.append(part)
            ann = None
    return shown, fields


def _kind_of(model: type[BaseModel]) -> str | None:
    f = model.model_fields.get("kind")
    return typing.get_args(f.annotation)[0] if f is not None else None


def _strip(ann: Any) -> Any:
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return _strip(args[0])
    return ann


def _format_loc(loc: list) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + (str(part) if NAME_RE.match(str(part)) and "." not in str(part) else f'"{part}"')
    return out


# --- references, names, cycles, files ---------------------------------------------------------------------------


def _check_references(m: LoadedManifest) -> None:
    man = m.model
    for table in ("modules", "backends", "targets"):
        for name in getattr(man, table):
            if not NAME_RE.match(name):
                raise m.error(f'{table}."{name}"', "names may use letters, digits, '_', '.' and '-' only")
    for name, mod in man.modules.items():
        _check_module(m, name, mod)
    for name, t in man.targets.items():
        key = f"targets.{name}"
        if t.backend not in man.backends:
            raise m.error(f"{key}.backend", f"unknown backend '{t.backend}'{did_you_mean(t.backend, man.backends)}")
        if t.module is not None and t.module not in man.modules:
            raise m.error(f"{key}.module", f"unknown module '{t.module}'{did_you_mean(t.module, man.modules)}")
        if t.from_ is not None:
            if t.from_ not in man.targets:
                raise m.error(f"{key}.from", f"unknown target '{t.from_}'{did_you_mean(t.from_, man.targets)}")
            if t.from_ == name:
                raise m.error(f"{key}.from", "a target cannot take its own artifact")
    _check_cycles(m)
    for name, t in man.targets.items():
        if t.from_ is not None:
            up_kind = man.backends[man.targets[t.from_].backend].kind
            kind = man.backends[t.backend].kind
            if up_kind != "export":
                raise m.error(f"targets.{name}.from", f"target '{t.from_}' has backend kind '{up_kind}'; 'from' takes an export target's .pt2")
            if kind not in ("inductor_aot", "torch_tensorrt_aot", "torch_tensorrt_jit", "inductor_jit", "eager"):
                raise m.error(f"targets.{name}.backend", f"backend kind '{kind}' cannot take its input from another target")


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
    except SyntaxError as e:
        raise m.error(f"{key}.factory", f"{file.relative_to(m.root)}:{e.lineno}: syntax error: {e.msg}") from None
    defined = _top_level_names(tree)
    if fn not in defined and "*" not in defined:
        raise m.error(f"{key}.factory", f"'{module_path}' defines no '{fn}'{did_you_mean(fn, defined)}")
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


def manifest_schema() -> dict:
    schema = Manifest.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "aitune.toml"
    return schema
