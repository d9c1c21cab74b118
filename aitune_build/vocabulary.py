"""The manifest's vocabulary, shared by the frozen specs (manifest.py) and the pydantic models (schema.py), so that
neither imports the other for it: manifest.py imports schema.py (lazily, to validate), schema.py only this."""

from __future__ import annotations

import re

# Names become folder names (<out_dir>/<target>, targets/<name>/ in archives): checked with fullmatch (a `$` would
# accept a trailing newline), never `.`/`..` or hidden (manifest.name_problem), and short enough for any filesystem.
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
NAME_MAX = 100
FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
DEFAULT_CACHE_DIR = ".aitune"
# The one registration of a backend kind: its class in aitune_build/backends/. Everything else about a kind (its
# config class in manifest.py and schema.py, whether it takes `from`, its toolchain) is declared on that class.
BACKENDS = {
    "export": "export:ExportBackend",
    "inductor_aot": "inductor_aot:InductorAotBackend",
    "inductor_jit": "inductor_jit:InductorJitBackend",
    "eager": "eager:EagerBackend",
    "torch_tensorrt_jit": "torch_tensorrt_jit:TorchTensorRTJitBackend",
    "torch_tensorrt_aot": "torch_tensorrt_aot:TorchTensorRTAotBackend",
}
BACKEND_KINDS = tuple(BACKENDS)

# torch dtype names accepted in input specs, mapped to the canonical torch attribute (no torch import needed).
DTYPES = {
    "float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
    "float16": "float16", "half": "float16", "bfloat16": "bfloat16",
    "int8": "int8", "int16": "int16", "int32": "int32", "int": "int32", "int64": "int64", "long": "int64",
    "uint8": "uint8", "bool": "bool", "complex64": "complex64", "complex128": "complex128",
}
