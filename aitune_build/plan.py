"""Pure functions over the target graph: which targets, in what order, and why each one is stale."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError, did_you_mean
from . import reasons
from .keys import component_changes
from .manifest import Manifest, is_candidate

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any


def select(man: Manifest, names: list[str] | tuple[str, ...]) -> list[str]:
    """Named targets and their upstreams (all targets when none is named), upstreams first."""
    declared = [t for t in man.targets if not is_candidate(t)]  # a tuned target's candidates "T@B" build within T
    for n in names:
        if n not in man.targets:
            raise UserError(f"unknown target '{n}'{did_you_mean(n, declared)}; targets: {', '.join(declared) or '(none)'}")
    wanted = list(names) if names else declared
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
    """Whether a target's output is current, and if not, why (one structured change per changed component leaf:
    see reasons.py)."""

    state: str  # "up-to-date" | "stale" | "never-built" | "error" (its inputs cannot be read: the change says why)
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return self.state != "up-to-date"

    @property
    def reasons(self) -> list[str]:
        """The changes as text lines."""
        from .reasons import describe

        return [describe(c) for c in self.changes]


def assess(key: str | None, components: dict[str, Any] | None, previous: dict[str, Any] | None, current: bool,
           upstream_stale: str | None = None) -> Staleness:
    """key/components: what the inputs give now (None when an upstream must rebuild first);
    previous: the last build.json; current: whether the output folder holds an intact build of key."""
    if upstream_stale is not None:
        return Staleness("stale" if previous else "never-built", [reasons.upstream_rebuilds(upstream_stale)])
    if previous is None:
        return Staleness("never-built", [reasons.NEVER_BUILT])
    if current:
        return Staleness("up-to-date")
    if previous.get("key") == key:
        return Staleness("stale", [reasons.OUTPUTS_MODIFIED])
    changes = component_changes(previous.get("components", {}), components or {})
    return Staleness("stale", changes or [reasons.KEY_SCHEMA])
