"""Why a target is stale, as data: one change per key component leaf, rendered to text by the CLI only.

A change is a plain JSON object (it goes into `--json` as it is):
    {"component": "sources", "path": "models/deep.py", "change": "changed", "old": "ab12..", "new": "cd34.."}
    {"component": "packages", "path": "transformers", "change": "changed", "old": "4.40.0", "new": "4.41.0"}
    {"component": "backend", "path": "strict", "change": "changed", "old": false, "new": true}
    {"component": "build", "path": null, "change": "never-built", "old": null, "new": null}
`change` is added | removed | changed for a component's leaf, and never-built | outputs-modified |
upstream-rebuilds | key-schema | error (its inputs cannot be read; `new` is the message) for a target as a whole.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any

FILE_COMPONENTS = ("sources", "weights", "samples")


def change(component: str, path: str | None, what: str, old: Any = None, new: Any = None) -> dict[str, Any]:
    return {"component": component, "path": path, "change": what, "old": old, "new": new}


NEVER_BUILT = change("build", None, "never-built")
OUTPUTS_MODIFIED = change("outputs", None, "outputs-modified")
KEY_SCHEMA = change("key", None, "key-schema")


def upstream_rebuilds(upstream: str) -> dict[str, Any]:
    return change("upstream", upstream, "upstream-rebuilds")


def describe(c: dict[str, Any]) -> str:
    """One line of text for a change (what `status`, `explain` and `--dry-run` print)."""
    comp, path, what, old, new = c["component"], c["path"], c["change"], c.get("old"), c.get("new")
    if what == "never-built":
        return "never built"
    if what == "outputs-modified":
        return "output files are missing or modified"
    if what == "upstream-rebuilds":
        return f"upstream '{path}' will rebuild"
    if what == "key-schema":
        return "key schema changed"
    if what == "error":  # the target's inputs cannot be read: the error's message
        return str(new)
    if comp in FILE_COMPONENTS and path is not None:
        return f"{path} {what}"
    if comp == "packages" and path is not None:
        return {"changed": f"{path} {old} -> {new}", "added": f"{path} {new} added"}.get(what, f"{path} {old} removed")
    if comp == "upstream" and path == "artifact" and what == "changed":
        return "upstream artifact changed"
    name = f"{comp}.{path}" if path is not None else comp
    if what == "added":
        return f"{name}: added ({_show(new)})"
    if what == "removed":
        return f"{name}: removed (was {_show(old)})"
    return f"{name}: {_show(old)} -> {_show(new)}"


def _show(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v
