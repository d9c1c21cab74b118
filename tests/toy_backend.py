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
        notes = [self.config.extra["note"]] if "note" in self.config.extra else []  # what the build's output must say
        return {"toy_label": self.config.label, "toy_from": ctx.upstream is not None, **({"notes": notes} if notes else {})}

    def load(self, ctx: BuildContext):
        module, scale = ctx.source_module(), self.config.scale

        def call(**inputs: Any) -> Any:
            return module(**inputs) * scale

        return call


class SaveProbeConfig(BackendConfig):
    """For the GPU scheduler's tests: files that show which builds ran at the same time."""

    mark: str = option("", "A file the build creates when it starts.")
    wait_for: str = option("", "A file the save waits for (at most wait_s), noting whether it came.")
    wait_s: float = 20.0


class SaveProbeBackend(Backend):
    """A build whose save waits for another target's build to start: it can only when the GPU is given back at
    "saving" (`saves_off_gpu`). AITUNE_BACKENDS="saveprobe=tests.toy_backend:SaveProbeBackend"."""

    kind = "saveprobe"
    config_class = SaveProbeConfig
    artifact = "record.json"
    deterministic = True
    load_reads_only = True
    saves_off_gpu = True

    def build(self, ctx: BuildContext) -> dict[str, Any]:
        from pathlib import Path

        if self.config.mark:
            Path(self.config.mark).touch()
        saw_before_save = self._came(1.0)  # before the save, the other build cannot have started unless it came first
        with ctx.phase("save"):
            saw = self._came(self.config.wait_s)
            self.write_record(ctx)
        return {"saw": saw, "saw_before_save": saw_before_save}

    def _came(self, within_s: float) -> bool:
        """Whether the file `wait_for` exists within WITHIN_S seconds (none named: False)."""
        import time
        from pathlib import Path

        deadline = time.monotonic() + within_s
        while self.config.wait_for and not Path(self.config.wait_for).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(self.config.wait_for) and Path(self.config.wait_for).exists()

    def load(self, ctx: BuildContext):
        module = ctx.source_module()
        return lambda **inputs: module(**inputs)


class SaveOnGpuProbeBackend(SaveProbeBackend):
    """The same, with a save that needs the GPU: the GPU stays lent until the artifact is written."""

    kind = "saveprobe_gpu"
    saves_off_gpu = False


class CrashingToyConfig(ToyConfig):
    """The toy's config, for a kind of its own."""


class CrashingToyBackend(ToyBackend):
    """The toy, whose loaded module kills its own process at its 21st call: a build's check (a few calls) passes, a
    tuning measurement (many calls) dies with it, as with an engine that segfaults under load.
    AITUNE_BACKENDS="crashing_toy=tests.toy_backend:CrashingToyBackend"."""

    kind = "crashing_toy"
    config_class = CrashingToyConfig

    def load(self, ctx: BuildContext):
        import os
        import signal

        call, calls = super().load(ctx), [0]

        def crashing(**inputs: Any) -> Any:
            calls[0] += 1
            if calls[0] > 20:
                os.kill(os.getpid(), signal.SIGKILL)
            return call(**inputs)

        return crashing
