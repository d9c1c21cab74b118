"""The one interface every backend implements, CPU and Torch-TensorRT alike."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..gpus import test_gpu_bound
from ..spec import Spec, to_json
from ..toolchain import dist_version, gpu_info, has_module

SAVING = "saving"  # the worker's phase while a backend saves what it built (BuildContext.phase("save"))
ARTIFACT_WRITTEN = "loading"  # the phase from which the artifact's bytes are final (loaded and checked, not written)

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any, ClassVar, Literal
    from ..manifest import InputSpec

    Device = Literal["cpu", "cuda"]  # = Literal[DEVICES]; schema.py gives get_type_hints this name

DEVICES = ("cpu", "cuda")


class BackendConfig(Spec):
    """A [backends.X] table, frozen. Each backend declares its config beside it, deriving from this: its fields with
    their types, defaults and descriptions (`option`), once. schema.py derives the pydantic model (`kind` becomes the
    literal of the backend's kind; every other key is refused), manifest.py makes this from the validated JSON."""

    kind: str
    device: Device = "cpu"

    @property
    def precision(self) -> str:
        return "float32"


def autotunes(settings: dict[str, Any]) -> bool:
    """Whether Inductor settings (config overrides, torch.compile options) turn on an autotuning option."""
    return any(v for k, v in settings.items() if "autotune" in str(k))


@dataclass
class BuildContext:
    """What a backend gets to build or load one target. Built in the worker process (torch is imported there)."""

    config: Any  # the validated backend config (a frozen BackendConfig)
    inputs: list[InputSpec]
    root: Path  # the manifest's folder
    artifact_dir: Path  # build: where to write the artifact files; load: where they are
    make_module: Callable[[], Any]  # a fresh eager module, eval mode, on the backend's device
    upstream: Path | None = None  # an upstream target's artifact file (a `from` edge)
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase (build.json "timings")
    program: Any = None  # load(): the ExportedProgram it read, so the worker's import record does not read it again
    report: Callable[[str], None] | None = None  # the worker's phase protocol: phase("save") reports SAVING on it

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the build ("construct", "export", "compile", "save", ...); repeated phases add up."""
        if name == "save" and self.report is not None:
            self.report(SAVING)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    @property
    def device(self) -> str:
        return self.config.device

    def example(self, which: str = "opt", seed: int = 0) -> dict[str, Any]:
        from ..inputs import make_inputs

        return make_inputs(self.inputs, which, seed=seed, root=self.root, device=self.device)

    def source_module(self) -> Any:
        """The module to compile: the upstream exported program's module for a `from` edge, else the factory's."""
        if self.upstream is not None:
            import torch

            return torch.export.load(str(self.upstream)).module()
        module = self.make_module()
        served = getattr(getattr(type(module), "forward", None), "__aitune_served__", None)
        if served is not None:
            # Loading for the serving hook (serve/hook.py), which replaced the class's forward: a JIT backend must
            # trace the application's own forward, not the hook's (*args, **kwargs) wrapper around it.
            import types

            module.forward = types.MethodType(served.original, module)
        return module


class Backend:
    kind: ClassVar[str]
    # This kind's config, declared in the backend's file: the manifest's spec and the schema's model derive from it.
    config_class: ClassVar[type[BackendConfig]] = BackendConfig
    takes_from: ClassVar[bool] = False  # may compile another target's artifact (a `from` edge)
    feeds_from: ClassVar[bool] = False  # its artifact may be another target's `from` input
    artifact: ClassVar[str]  # the main file written into artifact_dir
    # Distributions whose versions go into the key; each entry lists alternative names of one library.
    libraries: ClassVar[tuple[tuple[str, ...], ...]] = ()
    # Whether two clean builds of the same inputs give identical artifact bytes (see docs/reproducibility.md).
    deterministic: ClassVar[bool] = False
    # Bumped when this backend's output changes for the same inputs, so that keys (and cache entries) change too.
    revision: ClassVar[int] = 1
    # Whether build() changes the eager module it is given (casts it in place, fuses it): it then gets a copy of the
    # worker's reference module instead of the module itself.
    mutates_module: ClassVar[bool] = False
    # Whether load() only reads the artifact (no compile, no factory call): the GPU may then compile the next target
    # while this one is loaded and checked (gpus.GpuPool.give_back). Not for JIT kinds, which compile at load.
    load_reads_only: ClassVar[bool] = False
    # With load_reads_only: whether saving the artifact uses the GPU no more than loading it (it serialises what is
    # built; it neither traces nor compiles): the GPU is then given back when the save starts, not once it ends.
    # The contract: build() enters its first `ctx.phase("save")` only after everything in it that uses the GPU.
    saves_off_gpu: ClassVar[bool] = False

    @property
    def gpu_free_phases(self) -> tuple[str, ...]:
        """The worker's phases from which (the first reported) the next target may compile on this target's GPU;
        none: once the target ends. A backend that saves off the GPU without a `save` phase gets it at loading."""
        if not self.load_reads_only:
            return ()
        return (SAVING, ARTIFACT_WRITTEN) if self.saves_off_gpu else (ARTIFACT_WRITTEN,)

    @property
    def times_kernels(self) -> bool:
        """Whether compiling times kernels on the GPU to choose them (TensorRT's tactics, Inductor's autotuning): such
        a compile must not run beside another target's check, whose GPU work would skew what it picks."""
        return False

    @property
    def exported_program(self) -> bool:
        """Whether the artifact is a saved ExportedProgram, which names Python types and operators that a loading
        process must have registered (see loadable.py)."""
        return False
    # What a worker imports to build and check this kind: a warm fork server imports these before forking
    # (measured in docs/benchmarks.md; nothing a kind does not use, torch_tensorrt only for its backends).
    preload: ClassVar[tuple[str, ...]] = ("torch",)

    def __init__(self, config: Any):
        self.config = config

    @property
    def needs_gpu(self) -> bool:
        return self.config.device == "cuda" or test_gpu_bound(self.kind)

    def toolchain(self, gpu: dict[str, str] | None = None) -> dict[str, Any]:
        """Library versions (and, for GPU backends, `gpu`: the model builds run on) for this backend's keys. No
        torch import. The driver version is left out (README: what is in a key)."""
        found: dict[str, Any] = {"backend_revision": self.revision}
        for names in (("torch",),) + self.libraries:
            hit = dist_version(*names)
            found[names[0]] = f"{hit[0]} {hit[1]}" if hit else None
        if self.needs_gpu:
            found["gpu"] = gpu
        return found

    def unavailable(self) -> str | None:
        """Why this backend cannot run on this machine, with what to install; None when it can. No torch import."""
        if not has_module("torch"):
            return "torch is not installed: pip install torch"
        if self.needs_gpu and not gpu_info():
            return "needs an NVIDIA GPU with CUDA (nvidia-smi found none)"
        return None

    def import_libraries(self) -> None:
        """Import what build() and load() need beyond torch (timed as the worker's "imports" phase)."""

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        """Compile into ctx.artifact_dir; return a record of what was done (goes into build.json)."""
        raise NotImplementedError

    def write_record(self, ctx: BuildContext) -> None:
        """The artifact of a backend that keeps no compiled file: what to recompile from."""
        record = {"kind": self.kind, "config": to_json(self.config)}
        (ctx.artifact_dir / self.artifact).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    def load(self, ctx: BuildContext) -> Callable[..., Any]:
        """A callable taking the inputs as keyword arguments, from the artifact in ctx.artifact_dir."""
        raise NotImplementedError

    def after_check(self, ctx: BuildContext) -> dict[str, Any]:
        """In the worker, after the loaded artifact passed its check: add what makes a later load() start warm
        (JIT backends: compile caches) to ctx.artifact_dir. Returns facts for the build record."""
        return {}
