"""What the two Torch-TensorRT backends share: version facts, compile_config checking, precision translation.

The version logic is plain functions over (version, is_rtx, names) so the CPU test suite covers every branch;
torch_tensorrt itself is imported only inside functions that run on a GPU machine.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..errors import UserError, did_you_mean
from ..spec import option
from ..toolchain import has_module
from .base import BackendConfig

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any, Literal

LIBRARIES = (
    ("torch_tensorrt", "torch-tensorrt", "torch-tensorrt-rtx", "torch_tensorrt_rtx"),
    ("tensorrt", "tensorrt-rtx", "tensorrt_rtx", "tensorrt-cu13", "tensorrt-cu12", "tensorrt_cu13", "tensorrt_cu12"),
)
INSTALL_HINT = "pip install torch-tensorrt (NVIDIA TensorRT) or torch-tensorrt-rtx (TensorRT-RTX), matching your torch"
# Keys compile() and torch.compile's options take besides CompilationSettings fields.
EXTRA_KEYS = frozenset({"engine_cache_dir", "engine_cache_size"})
# Keys the backends set themselves: a user value would be overridden, so it is refused.
MANAGED_KEYS = frozenset({"engine_cache_dir", "cache_built_engines", "reuse_cached_engines", "device"})
_DTYPE_ALIASES = {"float16": "float16", "half": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float32": "float32", "float": "float32", "fp32": "float32", "int8": "int8", "fp8": "float8_e4m3fn",
                  "float8_e4m3fn": "float8_e4m3fn"}


class TorchTensorRTConfig(BackendConfig):
    """The fields both Torch-TensorRT backends' configs have."""

    device: Literal["cuda"] = "cuda"
    compile_config: dict[str, Any] = option(
        default_factory=dict, description="torch_tensorrt CompilationSettings fields, checked against the installed version.")
    autocast_enabled: bool = False
    autocast_dtype: Literal["float32", "float16", "bfloat16"] | None = None

    @property
    def precision(self) -> str:
        if self.autocast_enabled and self.autocast_dtype:
            return self.autocast_dtype
        wanted = {str(p).removeprefix("torch.") for p in self.compile_config.get("enabled_precisions", [])}
        for name, aliases in (("float16", {"float16", "half", "fp16"}), ("bfloat16", {"bfloat16", "bf16"})):
            if wanted & aliases:
                return name
        return "float32"


def unavailable(needs_gpu_reason: str | None) -> str | None:
    if not has_module("torch_tensorrt"):
        return f"torch_tensorrt is not installed: {INSTALL_HINT}"
    return needs_gpu_reason


def parse_version(text: str) -> tuple[int, int]:
    parts = text.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return (0, 0)


def check_compile_config(config: dict[str, Any], settings_fields: set[str], version: str, key: str) -> None:
    """Refuse keys the installed CompilationSettings lacks (torch_tensorrt drops them silently) or that we manage."""
    for name in config:
        if name in MANAGED_KEYS:
            raise UserError(f"{key}.{name}: set by aitune-build itself (the engine cache lives in the target's output); remove it")
        if name not in settings_fields and name not in EXTRA_KEYS:
            raise UserError(
                f"{key}.{name}: not a CompilationSettings field of the installed torch_tensorrt {version}"
                f"{did_you_mean(name, settings_fields)}; torch_tensorrt would ignore it silently"
            )


@dataclass(frozen=True)
class PrecisionPlan:
    """How to get the requested precision out of the installed torch_tensorrt."""

    cast: str | None  # cast module and floating inputs to this dtype before compiling
    settings: dict[str, Any]  # compile_config after translation (dtype names still strings)
    note: str


def plan_precision(requested: str, compile_config: dict[str, Any], version: str, is_rtx: bool) -> PrecisionPlan:
    """Translate `requested` (float32 | float16 | bfloat16) for this torch_tensorrt.

    - 2.10+ under its default explicit typing raises on enabled_precisions={half}; 2.13+ ignores it silently;
      TensorRT-RTX builds fp32 engines even with use_explicit_typing=False. What works on all of them: cast the
      module and the inputs, keep explicit typing, and let the engine follow the graph's dtypes.
    - Before 2.10 (weak typing) enabled_precisions is honoured, so it is passed as given.
    """
    settings = dict(compile_config)
    major_minor = parse_version(version)
    if requested == "float32":
        settings.pop("enabled_precisions", None) if major_minor >= (2, 10) else None
        return PrecisionPlan(None, settings, "fp32")
    if major_minor < (2, 10) and not is_rtx:
        settings["enabled_precisions"] = sorted(set(settings.get("enabled_precisions", [])) | {requested})
        return PrecisionPlan(None, settings, f"{requested} through enabled_precisions (weakly typed torch_tensorrt {version})")
    settings.pop("enabled_precisions", None)
    settings.pop("use_explicit_typing", None)
    flavour = "TensorRT-RTX" if is_rtx else "TensorRT"
    return PrecisionPlan(requested, settings, f"{requested} by casting module and inputs (explicit typing, {flavour}, torch_tensorrt {version})")


def known_aoti_crash(version: str, is_rtx: bool) -> bool:
    """torch_tensorrt.save(output_format="aot_inductor") killed the process (SIGSEGV, no traceback) with
    torch-tensorrt-rtx 2.11.0 / TensorRT-RTX 1.4 on an H200. Not seen with other versions (none were tried)."""
    return is_rtx and parse_version(version)[:2] == (2, 11)


def to_torch_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """Dtype names in enabled_precisions become torch dtypes."""
    import torch

    out = dict(settings)
    if "enabled_precisions" in out:
        out["enabled_precisions"] = {getattr(torch, _DTYPE_ALIASES.get(str(p).removeprefix("torch."), str(p))) for p in out["enabled_precisions"]}
    return out


@functools.cache
def installed() -> tuple[str, bool, set[str]]:
    """(torch_tensorrt version, TensorRT-RTX?, CompilationSettings field names). Imports torch_tensorrt."""
    import dataclasses

    import torch_tensorrt
    from torch_tensorrt.dynamo import CompilationSettings

    is_rtx = bool(getattr(torch_tensorrt.ENABLED_FEATURES, "tensorrt_rtx", False))
    return torch_tensorrt.__version__, is_rtx, {f.name for f in dataclasses.fields(CompilationSettings)}


def distribution() -> tuple[str, bool] | None:
    """(torch_tensorrt version, TensorRT-RTX?) from the installed distribution's metadata, without importing it."""
    from ..toolchain import dist_version

    hit = dist_version("torch-tensorrt-rtx", "torch-tensorrt")
    return (hit[1], hit[0] == "torch-tensorrt-rtx") if hit else None


def times_kernels() -> bool:
    """NVIDIA TensorRT's builder times tactics while compiling; TensorRT-RTX picks kernels at run time, in each process
    that runs the engine, so its compile does not (and its artifact does not depend on what ran beside it)."""
    dist = distribution()
    return not (dist is not None and dist[1])


# The C++ libraries `import torch_tensorrt` registers with torch (its first that exists): the tensorrt ops and the
# tensorrt::Engine class that saved programs and TorchScript modules name.
RUNTIME_LIBRARIES = ("libtorchtrt.so", "libtorchtrt_runtime.so")


@functools.cache
def load_runtime() -> str:
    """Make saved TensorRT engines runnable in this process: TensorRT's libraries and the torch_tensorrt C++ library,
    registered with torch as `import torch_tensorrt` does — but without importing the Python package, 7–9 s on an
    H200 host (nearly all of it its compiler stack), which loading and running an engine does not use. The same
    library file is registered, so a later `import torch_tensorrt` in the process finds it loaded. Where that is not
    possible it imports torch_tensorrt. Returns which of the two it did (the serving debug record shows it)."""
    import sys

    if "torch_tensorrt" in sys.modules:
        return "torch_tensorrt"
    try:
        import importlib
        import importlib.util
        from pathlib import Path

        import torch

        spec = importlib.util.find_spec("torch_tensorrt")  # finds the package without running it
        folder = Path(spec.origin).parent / "lib" if spec is not None and spec.origin else None
        lib = next((folder / n for n in RUNTIME_LIBRARIES if folder is not None and (folder / n).is_file()), None)
        if lib is None:
            raise FileNotFoundError(f"none of {', '.join(RUNTIME_LIBRARIES)} next to torch_tensorrt")
        dist = distribution()
        try:  # the wheel of TensorRT's shared libraries loads them (a system install needs nothing here)
            importlib.import_module("tensorrt_rtx_libs" if dist and dist[1] else "tensorrt_libs")
        except ImportError:
            pass
        torch.ops.load_library(str(lib))
        return f"runtime library {lib.name}"
    except Exception as e:  # noqa: BLE001  (anything odd about the installation: the full import handles it)
        import torch_tensorrt  # noqa: F401

        return f"torch_tensorrt (the runtime library alone did not load: {type(e).__name__}: {e})"


def prepare(ctx: Any, config: Any) -> tuple[Any, PrecisionPlan, str]:
    """Check compile_config against the installed version and plan precision. Returns (torch settings, plan, version)."""
    version, is_rtx, fields = installed()
    check_compile_config(config.compile_config, fields, version, f"backends.{ctx.extra.get('backend_name', config.kind)}.compile_config")
    plan = plan_precision(config.precision, config.compile_config, version, is_rtx)
    return to_torch_settings(plan.settings), plan, version


def cast_inputs(inputs: dict[str, Any], dtype_name: str | None) -> dict[str, Any]:
    if dtype_name is None:
        return inputs
    import torch

    dtype = getattr(torch, dtype_name)
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}


def trt_inputs(specs: list[Any], cast: str | None) -> dict[str, Any]:
    """{name: torch_tensorrt.Input(min, opt, max)} for every input spec."""
    import torch
    import torch_tensorrt

    from ..inputs import concrete_shape

    out = {}
    for s in specs:
        dtype = getattr(torch, s.dtype)
        if cast is not None and dtype.is_floating_point:
            dtype = getattr(torch, cast)
        out[s.name] = torch_tensorrt.Input(min_shape=concrete_shape(s, "min"), opt_shape=concrete_shape(s, "opt"),
                                           max_shape=concrete_shape(s, "max"), dtype=dtype, name=s.name)
    return out


class CastingCall:
    """Calls fn with floating inputs cast to the engine's dtype (what a cast-precision engine takes)."""

    def __init__(self, fn: Any, cast: str | None):
        self.fn, self.cast = fn, cast

    def __call__(self, **inputs: Any) -> Any:
        return self.fn(**cast_inputs(inputs, self.cast))


# torch.compile(backend="torch_tensorrt") returns a subgraph it cannot convert as the plain PyTorch graph, with only this
# warning (torch_tensorrt/dynamo/backend/backends.py, 2.x): the target still passes its check, but runs that part in
# PyTorch. The build records it rather than let a target look compiled that is not.
FALLBACK_LOGGER = "torch_tensorrt.dynamo.backend.backends"
FALLBACK_MESSAGE = "TRT conversion failed on the subgraph"


class FallbackLog:
    """Collects those warnings while attached (in the worker, from build() to after_check())."""

    def __init__(self) -> None:
        import logging

        self.failures: list[str] = []
        log = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                try:
                    if FALLBACK_MESSAGE not in record.getMessage():
                        return
                    from ..failures import summary

                    err = record.exc_info[1] if record.exc_info else None
                    log.failures.append(summary(err, 300) if err is not None else "no error given")
                except Exception:  # noqa: BLE001  (logging must never fail the compile it reports on)
                    pass

        self._handler = _Handler(logging.WARNING)
        logging.getLogger(FALLBACK_LOGGER).addHandler(self._handler)

    def detach(self) -> list[str]:
        """Stop collecting; the causes of the subgraphs that fell back, in order."""
        import logging

        logging.getLogger(FALLBACK_LOGGER).removeHandler(self._handler)
        return self.failures


def fallback_note(failures: list[str]) -> str:
    """One line for build.json's notes and the build's output."""
    n = len(failures)
    return (f"{n} subgraph{'s' if n != 1 else ''} fell back to PyTorch: torch_tensorrt could not convert "
            f"{'them' if n != 1 else 'it'} ({failures[0]}); pass_through_build_failures = true in compile_config "
            "makes that an error")
