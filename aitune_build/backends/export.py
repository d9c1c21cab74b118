"""torch.export -> .pt2. Dynamic axes become torch.export.Dims."""

from __future__ import annotations

from ..spec import option
from .base import Backend, BackendConfig, BuildContext

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any


class ExportConfig(BackendConfig):
    """torch.export -> .pt2 (an ExportedProgram)."""

    strict: bool = option(False, "torch.export strict mode.")


def export_program(module: Any, ctx: BuildContext, strict: bool = False) -> Any:
    import torch

    from ..inputs import export_dynamic_shapes

    return torch.export.export(
        module, args=(), kwargs=ctx.example("trace"), dynamic_shapes=export_dynamic_shapes(ctx.inputs), strict=strict
    )


class ExportBackend(Backend):
    kind = "export"
    config_class = ExportConfig
    feeds_from = True  # an ExportedProgram: the input of inductor_aot and Torch-TensorRT targets
    artifact = "model.pt2"
    deterministic = True
    load_reads_only = True
    saves_off_gpu = True  # torch.export.save writes the program and its weights
    preload = ("torch", "torch._dynamo", "torch._export", "torch._functorch.aot_autograd",
               "torch.fx.experimental.symbolic_shapes", "aitune_build.backends.exported")
    revision = 2  # 2: stack traces (absolute source paths) left out of the saved program
    exported_program = True  # type: ignore[assignment]

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        import torch

        module = ctx.make_module()
        with ctx.phase("export"):
            ep = export_program(module, ctx, strict=self.config.strict)
        # Each node's stack trace names source files by absolute path, so the bytes would depend on where the
        # checkout lies: a release built in another folder would differ. They are debug information only.
        for node in ep.graph.nodes:
            node.meta.pop("stack_trace", None)
        with ctx.phase("save"):
            torch.export.save(ep, str(ctx.artifact_dir / self.artifact))
        return {"graph_nodes": len(ep.graph.nodes)}

    def load(self, ctx: BuildContext):
        import torch

        from .exported import ProgramCall

        ctx.program = torch.export.load(str(ctx.artifact_dir / self.artifact))
        return ProgramCall(ctx.program, ctx.inputs)
