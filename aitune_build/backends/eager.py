"""The reference: the module as its factory returns it. The artifact is a record; load calls the factory."""

from __future__ import annotations

from .base import Backend, BackendConfig, BuildContext

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any


class EagerConfig(BackendConfig):
    """The reference: the module as the factory returns it."""


class EagerBackend(Backend):
    kind = "eager"
    config_class = EagerConfig
    takes_from = True
    artifact = "record.json"
    deterministic = True

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        self.write_record(ctx)
        return {}

    def load(self, ctx: BuildContext):
        return ctx.source_module()
