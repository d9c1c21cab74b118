"""torch.compile(backend="torch_tensorrt"): compiled at run time. The build compiles, warms up and checks; the stored
artifact is the record plus torch_tensorrt's engine cache for this key and PyTorch's compile caches
(compile_cache.py), so a later load() starts warm."""

from __future__ import annotations

from . import compile_cache
from . import tensorrt_common as trt
from ..spec import option
from .base import Backend, BuildContext

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any

ENGINE_CACHE = "engine_cache"


class TorchTensorRTJitConfig(trt.TorchTensorRTConfig):
    """torch.compile(backend="torch_tensorrt"): compiled at run time; the build keeps a record and the engine cache."""

    fullgraph: bool = option(False, "true: fail on graph breaks.")
    dynamic_shapes: bool | None = option(None, "true | false | omitted (auto-detect and recompile).")
    engine_cache: bool = option(True, "Store torch_tensorrt's engine cache with the target (needs immutable_weights=false).")


class TorchTensorRTJitBackend(Backend):
    kind = "torch_tensorrt_jit"
    config_class = TorchTensorRTJitConfig
    takes_from = True
    artifact = "record.json"
    preload = ("torch", "torch._dynamo", "torch._functorch.aot_autograd")  # not torch_tensorrt: see torch_tensorrt_aot
    revision = 2  # 2: PyTorch's compile caches stored with the record
    libraries = trt.LIBRARIES
    mutates_module = True  # module.to(cast dtype) casts in place

    @property
    def times_kernels(self) -> bool:  # type: ignore[override]
        return trt.times_kernels()

    def unavailable(self) -> str | None:
        return trt.unavailable(super().unavailable())

    def import_libraries(self) -> None:
        import torch_tensorrt  # noqa: F401

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        _, plan, version = trt.prepare(ctx, self.config)
        self.write_record(ctx)
        (ctx.artifact_dir / ENGINE_CACHE).mkdir(exist_ok=True)
        ctx.extra["trt_fallbacks"] = trt.FallbackLog()  # the check's first call compiles: what did not convert
        return {"precision": plan.note, "cast": plan.cast, "torch_tensorrt": version, "engine_cache": self.config.engine_cache}

    def after_check(self, ctx: BuildContext) -> dict[str, Any]:
        with ctx.phase("save"):
            saved = compile_cache.save(ctx.artifact_dir)
        watched = ctx.extra.pop("trt_fallbacks", None)
        failures = watched.detach() if watched is not None else []
        if failures:
            note = trt.fallback_note(failures)
            print(f"aitune-build: warning: {note}", flush=True)
            return {**saved, "trt_fallbacks": failures, "notes": [note]}
        return {**saved, "trt_fallbacks": []}

    def load(self, ctx: BuildContext):
        import torch

        restored = compile_cache.restore(ctx.artifact_dir)
        settings, plan, _ = trt.prepare(ctx, self.config)
        module = ctx.source_module()
        if plan.cast:
            module = module.to(getattr(torch, plan.cast))

        engines = ctx.artifact_dir / ENGINE_CACHE
        # Something to start warm from: restored compile caches, or engines a build stored. Nothing at the build's
        # own check, which is what fills the engine cache; a finished output is not written to afterwards.
        stored = bool(restored) or (self.config.engine_cache and engines.is_dir() and any(engines.iterdir()))

        def compiled(warm: bool) -> Any:
            options = dict(settings)
            if self.config.engine_cache:
                # The engine cache only works with mutable weights; its key has no TensorRT or GPU version, which
                # is why it lives inside this target's output, whose key has both.
                options.update(immutable_weights=False, cache_built_engines=not stored, reuse_cached_engines=warm,
                               engine_cache_dir=str(engines))
            return torch.compile(module, backend="torch_tensorrt", fullgraph=self.config.fullgraph,
                                 dynamic=self.config.dynamic_shapes, options=options)

        warm = _ColdOnFailure(compiled, stored)  # the build's own check starts cold: nothing to fall back from
        # No MarkDynamic here: torch_tensorrt names a dynamic input by its Dynamo source's local_name, which inputs
        # marked outside the compiled frame (DictGetItemSource) lack; dynamic_shapes decides instead.
        fn = compile_cache.NoGradCall(trt.CastingCall(warm, plan.cast))
        if self.config.autocast_enabled and self.config.autocast_dtype:
            dtype = getattr(torch, self.config.autocast_dtype)

            def autocast_call(**inputs: Any) -> Any:
                with torch.autocast("cuda", dtype=dtype):
                    return fn(**inputs)

            return autocast_call
        return fn


class _ColdOnFailure:
    """The compiled module, started warm (engine cache and compile caches reused). Should its first call fail with
    those caches — a cached engine that does not refit on this TensorRT, a restored graph torch cannot use — it is
    compiled again without them, once, with a warning: a warm start is an optimisation, never a reason to fail."""

    def __init__(self, make: Any, warm: bool):
        import threading

        self.make, self.warm = make, warm
        self.fn = make(warm)
        self.first = True
        self._lock = threading.Lock()  # one first call: two threads must not both fall back

    def __call__(self, **inputs: Any) -> Any:
        if not self.first:
            return self.fn(**inputs)
        with self._lock:
            if not self.first:
                return self.fn(**inputs)
            try:
                out = self.fn(**inputs)
            except Exception as e:  # noqa: BLE001
                if not self.warm:
                    raise
                import sys

                self.warm = False
                from ..failures import summary

                sys.stderr.write(f"aitune-build: torch_tensorrt_jit: the warm start failed ({summary(e, 300)}); "
                                 "compiling without the stored caches (other compiled graphs of this process recompile "
                                 "at their next call)\n")
                import torch

                torch._dynamo.reset()  # forget the graphs (and restored caches' guards) of the warm attempt
                self.fn = self.make(False)
                out = self.fn(**inputs)
            self.first = False
            return out
