"""torch_tensorrt dynamo compile during the build, saved (.pt2 by default), loaded without recompiling."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from . import tensorrt_common as trt
from ..spec import option
from .base import Backend, BuildContext
from .export import ExportBackend

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any, Literal

_FILES = {"exported_program": "model.pt2", "torchscript": "model.ts", "aot_inductor": "model.pt2"}


class TorchTensorRTAotConfig(trt.TorchTensorRTConfig):
    """torch_tensorrt dynamo compile during the build, saved to disk, loaded without recompiling."""

    output_format: Literal["exported_program", "torchscript", "aot_inductor"] = "exported_program"


class TorchTensorRTAotBackend(Backend):
    kind = "torch_tensorrt_aot"
    config_class = TorchTensorRTAotConfig
    takes_from = True
    revision = 2  # 2: an exported program is saved without re-tracing the compiled graph
    libraries = trt.LIBRARIES
    mutates_module = True  # module.to(cast dtype) casts in place
    # Not torch_tensorrt itself: importing torch-tensorrt-rtx 2.11 initialises CUDA (seen on an H200), after which a
    # forked child could not use the GPU. The server preloads torch's stack; each child imports torch_tensorrt.
    preload = ExportBackend.preload
    load_reads_only = True
    deterministic = False  # TensorRT picks tactics by timing

    @property
    def artifact(self) -> str:  # type: ignore[override]
        return _FILES[self.config.output_format]

    @property
    def exported_program(self) -> bool:
        return self.config.output_format == "exported_program"

    @property
    def saves_off_gpu(self) -> bool:  # type: ignore[override]
        # An exported program is saved without re-tracing (retrace=False): the engine's bytes are written as built.
        # torchscript traces the compiled module (it runs it) and aot_inductor compiles it again: both use the GPU.
        return self.config.output_format == "exported_program"

    @property
    def times_kernels(self) -> bool:  # type: ignore[override]
        return trt.times_kernels()

    def unavailable(self) -> str | None:
        return trt.unavailable(super().unavailable())

    def import_libraries(self) -> None:
        import torch_tensorrt  # noqa: F401

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        import torch
        import torch_tensorrt

        from ..inputs import export_dynamic_shapes

        settings, plan, version = trt.prepare(ctx, self.config)
        if self.config.output_format == "aot_inductor" and trt.known_aoti_crash(version, trt.installed()[1]):
            raise UserError(f"backends.{ctx.extra.get('backend_name', self.kind)}.output_format: 'aot_inductor' crashes "
                            f"torch-tensorrt-rtx {version} (SIGSEGV in torch_tensorrt.save, seen on an H200); "
                            "use output_format = \"exported_program\" (the default) or \"torchscript\"")
        module = ctx.source_module()
        if plan.cast:
            module = module.to(getattr(torch, plan.cast))
        example = trt.cast_inputs(ctx.example("trace"), plan.cast)
        dynamic = export_dynamic_shapes(ctx.inputs)
        with ctx.phase("export"):
            ep = torch.export.export(module, args=(), kwargs=example, dynamic_shapes=dynamic, strict=False)
        with ctx.phase("compile"):
            compiled = torch_tensorrt.dynamo.compile(ep, arg_inputs=[], kwarg_inputs=trt.trt_inputs(ctx.inputs, plan.cast), **settings)
        # Saved with the dynamic specs: saving with example tensors alone would specialise to their shapes.
        # torchscript (torch.jit.trace) and aot_inductor take the inputs positionally, in the manifest's order, which
        # is the compiled graph's placeholder order (it was exported with the inputs as keywords in that order).
        inputs = {"arg_inputs": [], "kwarg_inputs": example} if self.config.output_format == "exported_program" \
            else {"arg_inputs": list(example.values())}
        with ctx.phase("save"):
            _save(torch_tensorrt, compiled, str(ctx.artifact_dir / self.artifact), self.config.output_format, dynamic,
                  inputs)
        return {"precision": plan.note, "cast": plan.cast, "torch_tensorrt": version}

    def load(self, ctx: BuildContext):
        import sys

        import torch

        path = str(ctx.artifact_dir / self.artifact)
        version, is_rtx = trt.distribution() or trt.installed()[:2]
        cast = trt.plan_precision(self.config.precision, self.config.compile_config, version, is_rtx).cast
        if self.config.output_format == "aot_inductor":
            import torch_tensorrt  # noqa: F401

            return trt.CastingCall(_Positional(torch._inductor.aoti_load_package(path), [s.name for s in ctx.inputs]), cast)
        # Serving loads an engine, it compiles nothing: the runtime library, not the whole torch_tensorrt package.
        trt.load_runtime()
        read = torch.jit.load if self.config.output_format == "torchscript" else torch.export.load
        try:
            loaded = read(path)
        except Exception:
            if "torch_tensorrt" in sys.modules:
                raise
            import torch_tensorrt  # noqa: F401  (what else the package registers, should the runtime alone fall short)

            loaded = read(path)
        if self.config.output_format == "torchscript":
            return trt.CastingCall(_Positional(loaded, [s.name for s in ctx.inputs]), cast)
        from .exported import ProgramCall

        ctx.program = loaded
        return trt.CastingCall(ProgramCall(loaded, ctx.inputs), cast)


class _Positional:
    """Calls a traced or packaged artifact, which takes its inputs positionally, with inputs given by name."""

    def __init__(self, fn: Any, names: list[str]):
        self.fn, self.names = fn, names

    def __call__(self, **inputs: Any) -> Any:
        return self.fn(*[inputs[n] for n in self.names])


def _save(torch_tensorrt: Any, compiled: Any, path: str, output_format: str, dynamic: Any, inputs: dict[str, Any]) -> None:
    """Save the compiled graph. An exported program is written from the compiled graph as it is (retrace=False: graph
    surgery that keeps its symbolic batch and sequence sizes) instead of exporting it once more (retrace=True, which
    took about as long as the compile on an H200 host). Where that fails on this torch_tensorrt, the re-export is the
    fallback, and build.log says so. Either way the check loads the file back and runs it at the min, opt and max
    shapes."""
    if output_format == "exported_program":
        try:
            torch_tensorrt.save(compiled, path, output_format=output_format, dynamic_shapes=dynamic, retrace=False)
            return
        except Exception as e:  # noqa: BLE001  (the re-export below is the documented way; it reports its own errors)
            print(f"aitune-build: saving without re-export failed ({type(e).__name__}: {e}); re-exporting", flush=True)
            Path(path).unlink(missing_ok=True)
    torch_tensorrt.save(compiled, path, output_format=output_format, dynamic_shapes=dynamic, retrace=True, **inputs)
