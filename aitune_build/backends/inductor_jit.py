"""torch.compile with Inductor: the build compiles, warms up and checks; the artifact is the record; load recompiles."""

from __future__ import annotations

from typing import Any

from .base import Backend, BuildContext


class InductorJitBackend(Backend):
    kind = "inductor_jit"
    config_class = "InductorJitConfig"
    takes_from = True
    artifact = "record.json"

    def _compile(self, ctx: BuildContext):
        import torch

        c = self.config
        return torch.compile(
            ctx.source_module(), mode=c.mode, fullgraph=c.fullgraph, dynamic=c.dynamic_shapes, options=dict(c.options) or None
        )

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        self.write_record(ctx)
        return {}

    def load(self, ctx: BuildContext):
        return self._compile(ctx)
