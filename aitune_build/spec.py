"""Frozen values (`Spec`): what the manifest's tables become once validated (manifest.py, backends/).

A field may carry its default and description (`option`). Tables whose pydantic model is written out in schema.py
declare only their fields; a backend's config declares its defaults here too, and schema.py derives its model from
it, so a backend's fields are declared once, in its file.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: a no-op build pays for every import
if TYPE_CHECKING:
    from typing import Any, ClassVar


class Option:
    """A field's default (a value, or a factory for a mutable one) and its description (the JSON schema shows it)."""

    __slots__ = ("default", "default_factory", "description")
    REQUIRED: ClassVar[object] = object()

    def __init__(self, default: Any = REQUIRED, description: str | None = None, default_factory: Any = None):
        self.default, self.default_factory, self.description = default, default_factory, description


def option(default: Any = Option.REQUIRED, description: str | None = None, *, default_factory: Any = None) -> Any:
    """`name: type = option(default, "description")` in a Spec's body (`default_factory=dict` for a mutable default)."""
    return Option(default, description, default_factory)


class Spec:
    """A frozen value: its fields are the class's annotations (its bases' first), each set once, by keyword.

    A value assigned to a field in the class body is its default (`field_options`: what schema.py derives a model from);
    the constructor still takes every field: specs are made from JSON that validation filled in.

    Not a dataclass: a no-op build imports every spec class, and @dataclass costs about 1 ms a class at import
    (it compiles each generated method), more than the keys of a hundred targets take to compute."""

    fields: ClassVar[tuple[str, ...]] = ()
    field_options: ClassVar[dict[str, Option]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = tuple(cls.__dict__.get("__annotations__", {}))
        if {"fields", "field_options"} & set(own):
            raise TypeError(f"{cls.__name__}: 'fields' and 'field_options' name a spec's own bookkeeping, not a field")
        cls.fields = cls.fields + tuple(n for n in own if n not in cls.fields)
        cls.field_options = dict(cls.field_options)
        for name in own:
            if name in cls.__dict__:
                value = cls.__dict__[name]
                cls.field_options[name] = value if isinstance(value, Option) else Option(value)
                delattr(cls, name)  # an instance's value lives in its own __dict__; the class keeps no stray default

    def __init__(self, **values: Any) -> None:
        if values.keys() != set(self.fields):
            missing, extra = sorted(set(self.fields) - values.keys()), sorted(values.keys() - set(self.fields))
            raise TypeError(f"{type(self).__name__}: missing fields {missing}, unexpected fields {extra}")
        for name in self.fields:
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is frozen")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and all(getattr(self, f) == getattr(other, f) for f in self.fields)

    __hash__ = None  # type: ignore[assignment]  # dict-valued fields: not hashable

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self.fields)})"


def to_json(obj: Any) -> Any:
    """A spec as plain JSON values (what pydantic's model_dump(mode="json") gave for it): key components use this."""
    if isinstance(obj, Spec):
        return {f: to_json(getattr(obj, f)) for f in obj.fields}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    return obj
