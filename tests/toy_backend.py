"""A backend kind declared outside aitune_build, as a plugin would be: this file plus one registration,
AITUNE_BACKENDS="toy=tests.toy_backend:ToyBackend" (tests/test_backend_registration.py)."""

from __future__ import annotations

from typing import Any, Literal

from aitune_build.backends import Backend, BackendConfig, BuildContext
from aitune_build.spec import option


class ToyConfig(BackendConfig):
    """The source module, its output multiplied by `scale`."""

    scale: float = option(1.0, "Multiplies the output.")
    label: str | None = None
    mode: Literal["plain", "fancy"] = "plain"
    extra: dict[str, Any] = option(default_factory=dict)


class ToyBackend(Backend):
    kind = "toy"
    config_class = ToyConfig
    takes_from = True
    artifact = "record.json"
    deterministic = True

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        self.write_record(ctx)
        return {"toy_label": self.config.label, "toy_from": ctx.upstream is not None}

    def load(self, ctx: BuildContext):
        module, scale = ctx.source_module(), self.config.scale

        def call(**inputs: Any) -> Any:
            return module(**inputs) * scale

        return call
