"""AOTInductor package -> .pt2; its input is the factory's module or an upstream export target's program."""

from __future__ import annotations

from ..spec import option
from .base import Backend, BackendConfig, BuildContext, autotunes
from .export import ExportBackend, export_program

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any


class InductorAotConfig(BackendConfig):
    """AOTInductor package -> .pt2."""

    inductor_configs: dict[str, Any] = option(default_factory=dict, description="torch._inductor config overrides.")


class InductorAotBackend(Backend):
    kind = "inductor_aot"
    config_class = InductorAotConfig
    takes_from = True
    artifact = "model.pt2"
    load_reads_only = True
    preload = ExportBackend.preload + ("torch._inductor.compile_fx",)
    deterministic = False  # measured: two builds differ (docs/reproducibility.md)

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        import torch

        if ctx.upstream is not None:
            ep = torch.export.load(str(ctx.upstream))
        else:
            module = ctx.make_module()
            with ctx.phase("export"):
                ep = export_program(module, ctx)
        with ctx.phase("compile"):  # compiles and packages in one call
            torch._inductor.aoti_compile_and_package(
                ep, package_path=str(ctx.artifact_dir / self.artifact), inductor_configs=dict(self.config.inductor_configs)
            )
        return {}

    @property
    def times_kernels(self) -> bool:  # type: ignore[override]
        return autotunes(self.config.inductor_configs)

    def load(self, ctx: BuildContext):
        import torch

        return torch._inductor.aoti_load_package(str(ctx.artifact_dir / self.artifact))
