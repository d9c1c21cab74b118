"""torch_tensorrt dynamo compile during the build, saved (.pt2 by default), loaded without recompiling."""

from __future__ import annotations

from typing import Any

from . import tensorrt_common as trt
from .base import Backend, BuildContext

_FILES = {"exported_program": "model.pt2", "torchscript": "model.ts", "aot_inductor": "model.pt2"}


class TorchTensorRTAotBackend(Backend):
    kind = "torch_tensorrt_aot"
    libraries = trt.LIBRARIES
    deterministic = False  # TensorRT picks tactics by timing

    @property
    def artifact(self) -> str:  # type: ignore[override]
        return _FILES[self.config.output_format]

    def unavailable(self) -> str | None:
        return trt.unavailable(super().unavailable())

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        import torch
        import torch_tensorrt

        from ..inputs import export_dynamic_shapes

        settings, plan, version = trt.prepare(ctx, self.config)
        module = ctx.source_module()
        if plan.cast:
            module = module.to(getattr(torch, plan.cast))
        example = trt.cast_inputs(ctx.example("opt"), plan.cast)
        dynamic = export_dynamic_shapes(ctx.inputs)
        ep = torch.export.export(module, args=(), kwargs=example, dynamic_shapes=dynamic, strict=False)
        compiled = torch_tensorrt.dynamo.compile(ep, arg_inputs=[], kwarg_inputs=trt.trt_inputs(ctx.inputs, plan.cast), **settings)
        # Saved with the dynamic specs: saving with example tensors alone would specialise to their shapes.
        torch_tensorrt.save(compiled, str(ctx.artifact_dir / self.artifact), output_format=self.config.output_format,
                            arg_inputs=[], kwarg_inputs=example, dynamic_shapes=dynamic, retrace=True)
        return {"precision": plan.note, "cast": plan.cast, "torch_tensorrt": version}

    def load(self, ctx: BuildContext):
        import torch

        path = str(ctx.artifact_dir / self.artifact)
        version, is_rtx, _ = trt.installed()
        cast = trt.plan_precision(self.config.precision, self.config.compile_config, version, is_rtx).cast
        if self.config.output_format == "torchscript":
            import torch_tensorrt  # noqa: F401  (registers the TensorRT runtime ops)

            fn = torch.jit.load(path)
        elif self.config.output_format == "aot_inductor":
            import torch_tensorrt  # noqa: F401

            fn = torch._inductor.aoti_load_package(path)
        else:
            import torch_tensorrt

            fn = torch_tensorrt.load(path).module()
        return trt.CastingCall(fn, cast)
