"""Pure functions over the target graph: which targets, in what order, and why each one is stale."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UserError, did_you_mean
from .keys import diff_components
from .manifest import Manifest


def select(man: Manifest, names: list[str] | tuple[str, ...]) -> list[str]:
    """Named targets and their upstreams (all targets when none is named), upstreams first."""
    for n in names:
        if n not in man.targets:
            raise UserError(f"unknown target '{n}'{did_you_mean(n, man.targets)}; targets: {', '.join(man.targets) or '(none)'}")
    wanted = list(names) if names else list(man.targets)
    order: list[str] = []
    seen: set[str] = set()

    def visit(t: str) -> None:
        if t in seen:
            return
        seen.add(t)
        up = man.targets[t].from_
        if up is not None:
            visit(up)
        order.append(t)

    for t in wanted:
        visit(t)
    return order


@dataclass(frozen=True)
class Staleness:
    """Whether a target's output is current, and if not, why (one line per changed component)."""

    state: str  # "up-to-date" | "stale" | "never-built"
    reasons: list[str] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return self.state != "up-to-date"


def assess(key: str | None, components: dict[str, Any] | None, previous: dict[str, Any] | None, current: bool,
           upstream_stale: str | None = None) -> Staleness:
    """key/components: what the inputs give now (None when an upstream must rebuild first);
    previous: the last build.json; current: whether the output folder holds an intact build of key."""
    if upstream_stale is not None:
        return Staleness("stale" if previous else "never-built", [f"upstream '{upstream_stale}' will rebuild"])
    if previous is None:
        return Staleness("never-built", ["never built"])
    if current:
        return Staleness("up-to-date")
    if previous.get("key") == key:
        return Staleness("stale", ["output files are missing or modified"])
    reasons = diff_components(previous.get("components", {}), components or {})
    return Staleness("stale", reasons or ["key schema changed"])
