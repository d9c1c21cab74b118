"""The manifest's vocabulary, shared by the frozen specs (manifest.py) and the pydantic models (schema.py), so that
neither imports the other for it: manifest.py imports schema.py (lazily, to validate), schema.py only this. Also the
one registry of backend kinds, from which both derive each kind's config."""

from __future__ import annotations

import os
import re

from .errors import UserError

# Names become folder names (<out_dir>/<target>, targets/<name>/ in archives): checked with fullmatch (a `$` would
# accept a trailing newline), never `.`/`..` or hidden (manifest.name_problem), and short enough for any filesystem.
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
NAME_MAX = 100
FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
DEFAULT_CACHE_DIR = ".aitune"
# The one registration of a backend kind: "module:Class" of its class. Everything else about a kind (its config:
# fields, defaults, descriptions; whether it takes or feeds `from`; its toolchain) is declared in that class's file,
# and manifest.py, schema.py and the JSON schema derive from it.
BACKENDS = {
    "export": "aitune_build.backends.export:ExportBackend",
    "inductor_aot": "aitune_build.backends.inductor_aot:InductorAotBackend",
    "inductor_jit": "aitune_build.backends.inductor_jit:InductorJitBackend",
    "eager": "aitune_build.backends.eager:EagerBackend",
    "torch_tensorrt_jit": "aitune_build.backends.torch_tensorrt_jit:TorchTensorRTJitBackend",
    "torch_tensorrt_aot": "aitune_build.backends.torch_tensorrt_aot:TorchTensorRTAotBackend",
}
# A backend outside this package registers here: "kind=module:Class", several separated by commas. The environment
# reaches every process a build starts (workers, load checks, measurements), as PYTHONPATH does.
BACKENDS_ENV = "AITUNE_BACKENDS"
_KIND_RE = re.compile(r"[a-z][a-z0-9_]*")
_CLASS_RE = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*")
_parsed: tuple[str, dict[str, str]] | None = None


def backend_registry() -> dict[str, str]:
    """Every registered kind: the built-in ones, then those of AITUNE_BACKENDS (a UserError says what is wrong)."""
    global _parsed
    text = os.environ.get(BACKENDS_ENV, "")
    if _parsed is not None and _parsed[0] == text:
        return _parsed[1]
    found = dict(BACKENDS)
    for entry in filter(None, (e.strip() for e in text.split(","))):
        kind, _, where = (p.strip() for p in entry.partition("="))
        if not _KIND_RE.fullmatch(kind) or not _CLASS_RE.fullmatch(where):
            raise UserError(f"{BACKENDS_ENV}: '{entry}' is not of the form kind=package.module:BackendClass")
        if kind in BACKENDS:
            raise UserError(f"{BACKENDS_ENV}: '{kind}' is a built-in backend kind; register yours under another name")
        found[kind] = where
    _parsed = (text, found)
    return found


def backend_kinds() -> tuple[str, ...]:
    return tuple(backend_registry())

# torch dtype names accepted in input specs, mapped to the canonical torch attribute (no torch import needed).
DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "int8": "int8", "int16": "int16", "int32": "int32", "int": "int32", "int64": "int64", "long": "int64",
    "uint8": "uint8", "bool": "bool", "complex64": "complex64", "complex128": "complex128",
}
