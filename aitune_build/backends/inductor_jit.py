"""torch.compile with Inductor: the build compiles, warms up and checks; the artifact is the record plus PyTorch's
compile caches of that compile (compile_cache.py), so load() recompiles warm."""

from __future__ import annotations

from . import compile_cache
from ..spec import option
from .base import Backend, BackendConfig, BuildContext, autotunes

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any


class InductorJitConfig(BackendConfig):
    """torch.compile (Inductor): build = compile + warm-up + check; load recompiles."""

    mode: str | None = None
    fullgraph: bool = False
    dynamic_shapes: bool | None = option(None, "true | false | omitted (auto-detect and recompile).")
    options: dict[str, Any] = option(default_factory=dict)


class InductorJitBackend(Backend):
    kind = "inductor_jit"
    config_class = InductorJitConfig
    takes_from = True
    artifact = "record.json"
    preload = ("torch", "torch._dynamo", "torch._functorch.aot_autograd", "torch._inductor.compile_fx")
    # 2: PyTorch's compile caches stored with the record; 3: dynamic axes marked (compile_cache.MarkDynamic);
    # 4: Inductor's vector-ISA check library stored with the kernels (compile_cache._isa_probes)
    revision = 4

    @property
    def times_kernels(self) -> bool:  # type: ignore[override]
        c = self.config
        return "autotune" in (c.mode or "") or autotunes(c.options)

    def _compile(self, ctx: BuildContext):
        import torch

        c = self.config
        return torch.compile(
            ctx.source_module(), mode=c.mode, fullgraph=c.fullgraph, dynamic=c.dynamic_shapes, options=dict(c.options) or None
        )

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        self.write_record(ctx)
        return {}

    def after_check(self, ctx: BuildContext) -> dict[str, Any]:
        with ctx.phase("save"):
            return compile_cache.save(ctx.artifact_dir)

    def load(self, ctx: BuildContext):
        compile_cache.restore(ctx.artifact_dir)
        compiled = self._compile(ctx)
        if self.config.dynamic_shapes is False:  # the user asked for shape-specialised graphs: no marks
            return compile_cache.NoGradCall(compiled)
        return compile_cache.NoGradCall(compile_cache.MarkDynamic(compiled, ctx.inputs))
