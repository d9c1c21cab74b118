"""The `aitune.toml` contract as pydantic models (one per TOML table, each default declared once, in the field).

Imported only to validate a manifest that changed since its last validation (see project.Project.open) and to
print the JSON Schema: pydantic's model construction costs more than a whole no-op build.
A backend's model is not written here: it is derived from the config its backend declares (backends/), one per
registered kind, so adding a backend touches neither this file nor manifest.py.
`normalise()` returns the validated manifest as plain JSON with every default filled in; manifest.py turns that
into the frozen dataclasses the rest of the program uses.
"""

from __future__ import annotations

import functools
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, field_validator, model_validator

from .errors import ManifestError, did_you_mean
from .spec import Option
from .vocabulary import DEFAULT_CACHE_DIR, DTYPES, FACTORY_RE, NAME_RE, backend_kinds, backend_registry



class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Project(_Table):
    name: str = Field(description="Project name.")
    out_dir: str = Field("build", description="Materialised outputs: <out_dir>/<target>/.")
    cache_dir: str = Field(DEFAULT_CACHE_DIR, description="Content-addressed cache; env AITUNE_CACHE_DIR overrides.")
    executor: Literal["local", "ray"] = Field(
        "local", description="local: worker processes on this host (every visible GPU); ray: a Ray cluster (build --executor overrides).")
    gpu_model: str | None = Field(
        None, description="GPU model GPU targets build on and their keys name, e.g. 'H100' (default: the first visible GPU's).")
    remote_cache: str | None = Field(None, description="Shared remote cache, e.g. s3://bucket/prefix or file:///mnt/cache; "
                                     "env AITUNE_REMOTE_CACHE overrides. Credentials come from the environment, never from here.")
    remote_cache_mode: Literal["read-write", "read"] = Field("read-write", description="'read' never uploads (pull requests).")

    @field_validator("remote_cache")
    @classmethod
    def _remote_cache(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from urllib.parse import urlsplit

        parts = urlsplit(v)
        if not parts.scheme or (parts.scheme != "file" and not parts.netloc):
            raise ValueError("expected a URL such as s3://bucket/prefix, gs://bucket/prefix or file:///shared/folder")
        if parts.username or parts.password or parts.query:
            raise ValueError("credentials do not belong in aitune.toml: remove them from the URL and set them in the "
                             "environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)")
        return v


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


class InputModel(_Table):
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


class ModuleSpec(_Table):
    factory: str = Field(description='"module.path:callable", importable from the manifest\'s folder.')
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    weights: str | None = Field(None, description="state_dict file, loaded with weights_only=True.")
    sources: list[str] = Field(default_factory=list, description="Extra file globs that belong to the key.")
    inputs: list[InputModel] = Field(min_length=1)

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        if not FACTORY_RE.match(v):
            raise ValueError(f"'{v}' is not of the form 'package.module:callable'")
        return v


def _annotation_names() -> dict[str, Any]:
    """Names that config annotations use but their modules import only for type checkers: a no-op build imports
    every config class (never this module) and need not pay for importing typing."""
    from .backends.base import DEVICES

    names: dict[str, Any] = {n: getattr(typing, n) for n in ("Any", "ClassVar", "Literal", "Optional", "Union")}
    names["Device"] = Literal[DEVICES]
    return names


def _backend_model(kind: str) -> type[BaseModel]:
    """A kind's model, derived from the config its backend declares (fields, types, defaults, descriptions):
    `kind` is the literal of the kind, every other key is refused."""
    from .backends import backend_for

    spec = backend_for(kind).config_class
    hints = typing.get_type_hints(spec, localns=_annotation_names())
    fields: dict[str, Any] = {}
    for name in spec.fields:
        if name == "kind":
            fields[name] = (Literal[kind], ...)
            continue
        opt = spec.field_options.get(name, Option())
        if opt.default_factory is not None:
            info = Field(default_factory=opt.default_factory, description=opt.description)
        elif opt.default is Option.REQUIRED:
            info = Field(description=opt.description)
        else:
            info = Field(opt.default, description=opt.description)
        fields[name] = (hints[name], info)
    return create_model(spec.__name__, __base__=_Table, __doc__=spec.__doc__, __module__=spec.__module__, **fields)


class CheckSpec(_Table):
    """Numeric check of the reloaded artifact against eager; tolerances default by precision."""

    rtol: float | None = Field(None, ge=0)
    atol: float | None = Field(None, ge=0)
    seed: int = 0


Strategy = Literal["first_wins", "min_latency", "max_throughput", "latency_budget"]


class TargetSpec(_Table):
    module: str | None = Field(None, description="A [modules] entry built from its factory.")
    from_: str | None = Field(None, alias="from", description="An upstream target whose artifact is the input.")
    backend: str | None = Field(None, description="The backend to build with (or `candidates` to choose one by measurement).")
    check: CheckSpec = Field(default_factory=CheckSpec)
    serve: bool = Field(False, description="`aitune-build run` serves this artifact in place of the module's forward (one target per module).")
    candidates: list[str] | None = Field(
        None, min_length=1, description="Backends to build, check and measure; the winner is the target's artifact (instead of `backend`).")
    select: Strategy | None = Field(
        None, description="How the winner is chosen (default min_latency): first_wins | min_latency | max_throughput | latency_budget.")
    budget_ms: float | None = Field(None, gt=0, description="latency_budget: the highest throughput whose latency is within this.")
    batch: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="Values of the dynamic batch axis to measure (default: its opt); other dynamic axes at opt.")
    min_speedup: float | None = Field(None, gt=0, description="A candidate slower than this x eager is rejected (eager is measured too).")

    @model_validator(mode="after")
    def _one_source(self) -> TargetSpec:
        if (self.module is None) == (self.from_ is None):
            raise ValueError("set exactly one of 'module' or 'from'")
        if (self.backend is None) == (self.candidates is None):
            raise ValueError("set exactly one of 'backend' or 'candidates'")
        return self


def manifest_model() -> type[BaseModel]:
    """The model of an aitune.toml file, its backends a union of every registered kind's model."""
    return _manifest_model(tuple(backend_registry().items()))


def backend_union() -> Any:
    return typing.get_args(manifest_model().model_fields["backends"].annotation)[1]


@functools.lru_cache(maxsize=4)
def _manifest_model(registry: tuple[tuple[str, str], ...]) -> type[BaseModel]:
    union = Annotated[Union[tuple(_backend_model(kind) for kind, _ in registry)], Field(discriminator="kind")]
    return create_model(
        "Manifest", __base__=_Table, __doc__="An aitune.toml file.", __module__=__name__,
        project=(Project, ...),
        modules=(dict[str, ModuleSpec], Field(default_factory=dict)),
        backends=(dict[str, union], Field(default_factory=dict)),
        targets=(dict[str, TargetSpec], Field(default_factory=dict)),
    )


# --- turning pydantic's errors into one line naming the key ---------------------------------------------------


def _from_validation_error(exc: ValidationError, display: str, model: type[BaseModel]) -> ManifestError:
    errors = exc.errors()
    kinds = backend_kinds()
    # A shape entry is an int or an Axis table: report the member the user evidently meant.
    err = next((e for e in errors if not (e["type"].startswith("int_") and isinstance(e["input"], dict))), errors[0])
    if any(p in ("Axis", "constrained-int", "int") for p in err["loc"]) and not isinstance(err["input"], (dict, int)):
        shown, _ = _walk(model, list(err["loc"]))
        return ManifestError(display, _format_loc(shown), f"expected an integer or a table {{min, opt, max[, dim]}}, got {err['input']!r}")
    if err["type"] == "missing":  # a misspelled required key is both missing and unknown: name the unknown one
        err = next((e for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] == err["loc"][:-1]), err)
    loc, kind, msg = list(err["loc"]), err["type"], err["msg"]
    shown, fields = _walk(model, loc)
    key = _format_loc(shown)
    if kind == "extra_forbidden":
        bad = str(loc[-1])
        return ManifestError(display, key, f"unknown key '{bad}'{did_you_mean(bad, fields)}; allowed: {', '.join(fields)}")
    if kind == "missing":
        return ManifestError(display, key, "required key is missing")
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag", "?")
        return ManifestError(display, key + ".kind", f"unknown backend kind '{tag}'{did_you_mean(tag, kinds)}; one of: {', '.join(kinds)}")
    if kind == "union_tag_not_found":
        return ManifestError(display, key + ".kind", f"required key is missing; one of: {', '.join(kinds)}")
    return ManifestError(display, key, msg.removeprefix("Value error, "))


def _walk(model: type[BaseModel], loc: list) -> tuple[list, list[str]]:
    """Follow pydantic's loc through the models, dropping the parts that name a union member.

    Returns the path as the user wrote it and the keys allowed in the last table visited."""
    ann: Any = model
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
            out += ("." if out else "") + (str(part) if NAME_RE.fullmatch(str(part)) and "." not in str(part) else f'"{part}"')
    return out




def normalise(data: dict, display: str) -> dict[str, Any]:
    """The validated manifest as JSON, defaults filled in; a ManifestError naming file and key otherwise."""
    model = manifest_model()
    try:
        return model.model_validate(data).model_dump(mode="json")
    except ValidationError as e:
        raise _from_validation_error(e, display, model) from None


def normalise_backend(data: dict) -> dict[str, Any]:
    """One [backends.X] table, validated, defaults filled in (for tests and tools that make a config by hand)."""
    try:
        return TypeAdapter(backend_union()).validate_python(data).model_dump(mode="json")
    except ValidationError as e:
        raise ManifestError("backend", "", str(e)) from None


def manifest_schema() -> dict:
    schema = manifest_model().model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "aitune.toml"
    return schema
