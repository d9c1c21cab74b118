"""`aitune-build record`'s second half: recorded traffic -> [modules] inputs, a backend and a served target in
aitune.toml. The file's other text (comments, order, formatting) is kept: existing tables are edited in place (only
their `inputs` value is replaced), new ones are appended. The result is validated before it replaces the file."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..manifest import FACTORY_RE, NAME_RE, module_file
from ..vocabulary import backend_kinds

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class Recorded:
    """One class's traffic, merged over every recorded process."""

    module: str
    qualname: str
    file: str | None
    calls: int = 0
    instances: int = 0
    signatures: Counter = field(default_factory=Counter)  # repr -> count
    by_repr: dict[str, list] = field(default_factory=dict)
    values: dict[str, list[int]] = field(default_factory=dict)
    other_args: dict[str, str] = field(default_factory=dict)
    init: dict[str, Any] = field(default_factory=dict)
    weights: str | None = None
    tensors: int = 0  # parameters and buffers in its state_dict

    @property
    def key(self) -> str:
        return f"{self.module}:{self.qualname}"


def merge(folder: Path) -> tuple[dict[str, Recorded], list[str]]:
    """Every process's recording in folder, merged per class; and the classes that were asked for."""
    out: dict[str, Recorded] = {}
    chosen: set[str] = set()
    for f in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        chosen.update(doc.get("chosen", []))
        for key, c in doc.get("classes", {}).items():
            r = out.get(key)
            if r is None:
                r = out[key] = Recorded(c["module"], c["qualname"], c.get("file"), init=c.get("init") or {}, weights=c.get("weights"),
                                      tensors=c.get("tensors", 0))
            r.calls += c["calls"]
            r.instances += c["instances"]
            for sig, count in c["signatures"]:
                s = repr(sig)
                r.signatures[s] += count
                r.by_repr[s] = sig
            for name, (lo, hi) in c.get("values", {}).items():
                old = r.values.get(name, [lo, hi])
                r.values[name] = [min(old[0], lo), max(old[1], hi)]
            r.other_args.update(c.get("other_args", {}))
    return out, sorted(chosen)


def input_specs(rec: Recorded) -> tuple[list[dict[str, Any]], list[str]]:
    """Input specs covering every recorded call: per axis the smallest, most common and largest size seen. Axes that
    had equal sizes in every call share one `dim`. Returns the specs and notes for the user."""
    notes: list[str] = []
    sigs = [(rec.by_repr[s], n) for s, n in rec.signatures.items()]
    names_in_all = set.intersection(*[{name for name, _, _ in sig} for sig, _ in sigs]) if sigs else set()
    order = [name for name, _, _ in max(sigs, key=lambda s: s[1])[0]] if sigs else []
    for name in sorted({n for sig, _ in sigs for n, _, _ in sig} - names_in_all):
        notes.append(f"input '{name}' was passed in some calls only: left out (calls with it run eager)")
    specs: list[dict[str, Any]] = []
    axes_sizes: dict[tuple[str, int], list[tuple[int, int]]] = {}  # (input, axis) -> [(size, count) per signature]
    for name in [n for n in order if n in names_in_all]:
        dtypes: Counter = Counter()
        ranks: Counter = Counter()
        for sig, n in sigs:
            for iname, dtype, shape in sig:
                if iname == name:
                    dtypes[dtype] += n
                    ranks[len(shape)] += n
        rank = ranks.most_common(1)[0][0]
        if len(ranks) > 1:
            notes.append(f"input '{name}' came with ranks {sorted(ranks)}: recorded rank {rank} (other calls run eager)")
        if len(dtypes) > 1:
            notes.append(f"input '{name}' came as {sorted(dtypes)}: recorded {dtypes.most_common(1)[0][0]}")
        for sig, n in sigs:
            for iname, _, shape in sig:
                if iname == name and len(shape) == rank:
                    for j, size in enumerate(shape):
                        axes_sizes.setdefault((name, j), []).append((size, n))
        specs.append({"name": name, "dtype": dtypes.most_common(1)[0][0], "rank": rank})
    # Dynamic axes whose sizes were equal in every call are one dimension (torch.export needs that when the model
    # combines them, e.g. x + y).
    dynamic = [k for k, seen in axes_sizes.items() if len({s for s, _ in seen}) > 1]
    dims: dict[tuple[str, int], str] = {}
    groups: list[list[tuple[str, int]]] = []
    for k in dynamic:
        for g in groups:
            if _same_sequence(sigs, g[0], k):
                g.append(k)
                break
        else:
            groups.append([k])
    used: set[str] = set()
    for g in groups:
        name = "batch" if all(j == 0 for _, j in g) and "batch" not in used else f"{g[0][0]}_{g[0][1]}"
        used.add(name)
        for k in g:
            dims[k] = name
    out = []
    for spec in specs:
        shape: list[Any] = []
        for j in range(spec["rank"]):
            seen = Counter()
            for size, n in axes_sizes.get((spec["name"], j), []):
                seen[size] += n
            if len(seen) == 1:
                shape.append(next(iter(seen)))
            else:
                opt = max(seen.items(), key=lambda kv: (kv[1], kv[0]))[0]
                shape.append({"dim": dims[(spec["name"], j)], "min": min(seen), "opt": opt, "max": max(seen)})
        entry: dict[str, Any] = {"name": spec["name"], "shape": shape, "dtype": spec["dtype"]}
        if spec["name"] in rec.values and spec["dtype"] not in ("bool",) and not spec["dtype"].startswith(("float", "bfloat", "complex")):
            lo, hi = rec.values[spec["name"]]
            entry["range"] = [lo, hi + 1]
        out.append(entry)
    for name, typ in sorted(rec.other_args.items()):
        notes.append(f"argument '{name}' ({typ}) is not a tensor: not an input (calls that pass it run eager)")
    return out, notes


def _same_sequence(sigs: list, a: tuple[str, int], b: tuple[str, int]) -> bool:
    for sig, _ in sigs:
        shapes = {name: shape for name, _, shape in sig}
        sa = shapes.get(a[0])
        sb = shapes.get(b[0])
        if sa is None or sb is None or len(sa) <= a[1] or len(sb) <= b[1] or sa[a[1]] != sb[b[1]]:
            return False
    return True


# --- writing aitune.toml -----------------------------------------------------------------------------------------


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    raise TypeError(f"not a TOML value: {type(v).__name__}")


def toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _inputs_text(specs: list[dict[str, Any]]) -> str:
    return "[\n" + "".join(f"  {toml_value(s)},\n" for s in specs) + "]"


def _table_span(text: str, header: str) -> tuple[int, int] | None:
    """(start of the table's first body line, end of its body) for `[header]` written as a table header."""
    parts = header.split(".")
    pat = r"^[ \t]*\[[ \t]*" + r"[ \t]*\.[ \t]*".join(f"(?:{re.escape(p)}|\"{re.escape(p)}\")" for p in parts) + r"[ \t]*\][ \t]*(?:#.*)?$"
    m = re.search(pat, text, re.M)
    if m is None:
        return None
    start = m.end() + 1 if m.end() < len(text) else m.end()
    nxt = re.search(r"^[ \t]*\[", text[start:], re.M)
    return start, start + nxt.start() if nxt else len(text)


def _value_end(text: str, i: int) -> int:
    """Index just past the TOML value starting at text[i] (arrays and inline tables may span lines)."""
    depth = 0
    while i < len(text):
        c = text[i]
        if c in "\"'":
            q3 = text[i:i + 3] == c * 3
            end = text.find(c * 3 if q3 else c, i + (3 if q3 else 1))
            while end != -1 and c == '"' and not q3 and text[end - 1] == "\\" and text[end - 2] != "\\":
                end = text.find(c, end + 1)
            if end == -1:
                return len(text)
            i = end + (3 if q3 else 1)
            if depth == 0:
                return i
            continue
        if c == "#":
            nl = text.find("\n", i)
            i = len(text) if nl == -1 else nl
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        elif c == "\n" and depth == 0:
            return i
        i += 1
    return i


def replace_key(text: str, table: str, key: str, value_text: str, display: str) -> str:
    span = _table_span(text, table)
    if span is None:
        raise UserError(f"{display}: {table}: cannot edit it in place (write it as a [{table}] table)")
    body = text[span[0]:span[1]]
    m = re.search(rf"^[ \t]*{re.escape(key)}[ \t]*=[ \t]*", body, re.M)
    if m is None:
        insert = f"{key} = {value_text}\n"
        return text[:span[0]] + insert + text[span[0]:]
    vstart = span[0] + m.end()
    vend = _value_end(text, vstart)
    return text[:vstart] + value_text + text[vend:]


@dataclass
class Edit:
    """What `record` did to the manifest, for the CLI to print."""

    modules: dict[str, str] = field(default_factory=dict)  # module name -> "added" | "updated"
    targets: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def update_manifest(path: Path, recorded: dict[str, Recorded], backend: str, target_name: str | None,
                    chosen: list[str]) -> Edit:
    """Write the recorded modules into the manifest at path (created when missing). Atomic; validated first."""
    from ..manifest import parse

    display = str(path)
    root = path.resolve().parent
    text = path.read_text() if path.exists() else f'[project]\nname = {json.dumps(root.name or "project")}\n'
    data = parse(text.encode(), path) if text.strip() else {}
    modules = data.get("modules", {}) if isinstance(data.get("modules"), dict) else {}
    backends = data.get("backends", {}) if isinstance(data.get("backends"), dict) else {}
    targets = data.get("targets", {}) if isinstance(data.get("targets"), dict) else {}
    edit = Edit()
    for key in chosen:
        if key not in recorded:
            edit.notes.append(f"{key} was never called: nothing recorded for it")
    if not recorded:
        raise UserError("nothing was recorded: the application called no module"
                        + (f" of {', '.join(chosen)}" if chosen else "") + " (did it run to the end and exit normally?)")
    backend_name, backend_kind = _backend(backends, backend, display)
    appended: list[str] = []
    if backend_name not in backends:
        appended.append(f"[backends.{toml_key(backend_name)}]\nkind = {toml_value(backend_kind)}\n")
    for key in sorted(recorded):
        rec = recorded[key]
        factory = rec.key
        if not FACTORY_RE.match(factory):
            edit.notes.append(f"{rec.module}.{rec.qualname}: a nested class cannot be a factory; write a factory function for it")
            continue
        if rec.module == "__main__" or module_file(root, rec.module) is None:
            where = "the script itself" if rec.module == "__main__" else f"'{rec.module}', not a module under {root}"
            edit.notes.append(f"{rec.qualname} is defined in {where}: move it into a project module (or write a project "
                              "factory that returns it) to build and serve it")
            continue
        specs, notes = input_specs(rec)
        edit.notes += [f"{rec.qualname}: {n}" for n in notes]
        if not specs:
            edit.notes.append(f"{rec.qualname}: no tensor input was recorded")
            continue
        name = _module_name(modules, rec, path, data)
        if name in modules:
            text = replace_key(text, f"modules.{name}", "inputs", _inputs_text(specs), display)
            edit.modules[name] = "updated"
        else:
            body = f"[modules.{toml_key(name)}]\nfactory = {toml_value(factory)}\n"
            init = rec.init or {}
            if init.get("args"):
                body += f"args = {toml_value(init['args'])}\n"
            for bad in init.get("unserializable", []):
                edit.notes.append(f"modules.{name}.args: constructor argument {bad} is not a TOML value: write a factory "
                                  "function that builds it")
            if rec.weights:
                w = Path(rec.weights)
                if w.is_relative_to(root):
                    body += f"weights = {toml_value(w.relative_to(root).as_posix())}\n"
                else:
                    edit.notes.append(f"modules.{name}.weights: {w} is outside the project folder: copy it in and set weights")
            elif rec.tensors:
                edit.notes.append(f"modules.{name}: no weights file was seen (load_state_dict(torch.load(FILE))); the build "
                                  "uses freshly initialised weights, so the application's module will not match and runs eager")
            body += f"inputs = {_inputs_text(specs)}\n"
            appended.append(body)
            modules[name] = {"factory": factory}
            edit.modules[name] = "added"
        tname = target_name if target_name and len(recorded) == 1 else f"{name}_{backend_name}"
        served_by = next((t for t, spec in targets.items() if isinstance(spec, dict) and spec.get("serve") is True
                          and spec.get("module") == name and t != tname), None)
        if tname in targets:
            spec = targets[tname]
            if spec.get("module") != name or spec.get("backend") != backend_name:
                raise UserError(f"{display}: targets.{tname}: exists with module '{spec.get('module')}' and backend "
                                f"'{spec.get('backend')}'; pass another --target")
            edit.targets[tname] = "kept"
        else:
            serve = "serve = true\n" if served_by is None else ""
            if served_by is not None:
                edit.notes.append(f"targets.{tname}: not served: target '{served_by}' already serves module '{name}'")
            appended.append(f"[targets.{toml_key(tname)}]\nmodule = {toml_value(name)}\nbackend = {toml_value(backend_name)}\n{serve}")
            targets[tname] = {"module": name, "backend": backend_name}
            edit.targets[tname] = "added"
    if appended:
        text = text.rstrip("\n") + "\n\n" + "\n".join(appended)
    text = text.rstrip("\n") + "\n"
    _write_checked(path, text)
    return edit


def _backend(backends: dict[str, Any], wanted: str, display: str) -> tuple[str, str]:
    if wanted in backends:
        return wanted, backends[wanted].get("kind", "?")
    if wanted in backend_kinds():
        return wanted, wanted
    from ..errors import did_you_mean

    choices = list(backends) + list(backend_kinds())
    raise UserError(f"--backend {wanted}: not a backend of {display} nor a backend kind{did_you_mean(wanted, choices)}; "
                    f"one of: {', '.join(choices)}")


def _module_name(modules: dict[str, Any], rec: Recorded, manifest: Path, data: dict[str, Any]) -> str:
    """The [modules] entry for this class: one whose factory is the class, or whose built targets recorded it;
    else a new name from the class name."""
    from .bootstrap import _read_record

    for name, spec in modules.items():
        if isinstance(spec, dict) and spec.get("factory") == rec.key:
            return name
    for tname, spec in (data.get("targets") or {}).items():
        if not isinstance(spec, dict) or spec.get("module") not in modules:
            continue
        built = _read_record(str(manifest.resolve()), tname, data) or {}
        cls = ((built.get("record") or {}).get("module") or {}).get("class") or {}
        if (cls.get("module"), cls.get("qualname")) == (rec.module, rec.qualname):
            return spec["module"]
    base = re.sub(r"[^A-Za-z0-9_]", "_", rec.qualname).lower()
    name, i = base, 2
    while name in modules or not NAME_RE.match(name):
        name, i = f"{base}_{i}", i + 1
    return name


def _write_checked(path: Path, text: str) -> None:
    from ..fsutil import temp_beside
    from ..manifest import load_manifest

    fd, tmp = temp_beside(path.resolve())  # the umask's mode: mkstemp's 0600 would replace aitune.toml's own
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            load_manifest(Path(tmp))
        except UserError as e:
            raise UserError(f"{path}: not written: the recorded manifest would not be valid: {str(e).split(': ', 1)[-1]}") from None
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
