"""Registries by name (docs/design.md#registries): loss terms, balancers and module selectors are classes with
a pydantic ``Options`` model, named in a recipe and built the same way.

- A recipe names a component by ``name`` (a balancer: ``balancer: gradnorm`` or ``{name: gradnorm, alpha: 2}``;
  a loss term by its key under ``loss.terms``). Lookups and option errors are one line naming what is wrong, the
  nearest valid name and the valid choices.
- Every component is built as ``cls(options, context)``: its validated options, and a context dataclass holding
  what the run gives it (the term names of a balancer, the modules of a selector, the embedding width of a term).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound=type)


class ComponentOptions(BaseModel):
    """Base of every component's options: unknown keys are errors."""
    model_config = ConfigDict(extra="forbid")


class Registry(dict):
    """``name -> class``; each class has ``Options`` (a ComponentOptions subclass) and takes ``(options, context)``.

    ``aliases`` are older spellings of the ``name`` key that recipes may still use (e.g. ``method``).
    """

    def __init__(self, kind: str, aliases: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.kind = kind          # "loss term", "balancer": used in messages
        self.aliases = aliases

    def register(self, name: str) -> Callable[[C], C]:
        """Class decorator: register under ``name`` (also set as the class's ``name``)."""
        def wrap(cls: C) -> C:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            cls.name = name  # type: ignore[attr-defined]
            self[name] = cls
            return cls
        return wrap

    def lookup(self, name: str) -> type:
        if name not in self:
            valid = sorted(self)
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ValueError(f"unknown {self.kind} '{name}'; {hint}valid: {', '.join(valid)}")
        return self[name]

    def validate_options(self, name: str, raw: dict[str, Any]) -> BaseModel:
        """``raw`` checked against the ``Options`` of ``name``; ValueError naming the bad option."""
        model = self.lookup(name).Options
        try:
            return model.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                fields = [f for f in model.model_fields if f != "name"]
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(fields) or '(none)'}"
                raise ValueError(f"unknown option '{key}' of {self.kind} '{name}'; {hint}") from None
            raise ValueError(f"option '{key}' of {self.kind} '{name}': {err['msg']}") from None

    def validate_named(self, raw: str | dict[str, Any] | BaseModel) -> BaseModel:
        """Options from a recipe value: a name (``"gradnorm"``), a mapping (``{name: "gradnorm", alpha: 2}``) or
        options already validated. ValueError, one line, naming an unknown name or a bad option."""
        if isinstance(raw, BaseModel):
            raw = raw.model_dump()
        if isinstance(raw, str):
            raw = {"name": raw}
        if not isinstance(raw, dict):
            raise ValueError(f"give a {self.kind} name or a mapping {{name: ..., options}}")
        raw = dict(raw)
        for alias in self.aliases:
            if alias in raw and "name" not in raw:
                raw["name"] = raw.pop(alias)
        if "name" not in raw:
            raise ValueError(f"a {self.kind} mapping needs a 'name'; valid: {', '.join(sorted(self))}")
        name = str(raw["name"])
        return self.validate_options(name, {**raw, "name": name})

    def build(self, name: str, options: BaseModel, context: Any) -> Any:
        """The component ``name`` built from its options (validated again if they are not its own ``Options``)."""
        cls = self.lookup(name)
        if not isinstance(options, cls.Options):
            options = self.validate_options(name, options.model_dump())
        return cls(options, context)
