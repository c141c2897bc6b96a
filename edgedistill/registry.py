"""Registries by name (DESIGN decision 7): loss terms and balancers are classes with a pydantic ``Options`` model.

A recipe names a class and gives its options; lookups and option errors are one line that names what is wrong,
the nearest valid name, and the valid choices.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=type)


class Registry(dict):
    """``name -> class``; each class has ``Options`` (a pydantic model with extra="forbid")."""

    def __init__(self, kind: str, hidden_options: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.kind = kind                        # "loss term", "balancer": used in messages
        self.hidden_options = hidden_options    # fields not offered as suggestions (e.g. the name itself)

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
                fields = [f for f in model.model_fields if f not in self.hidden_options]
                close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
                hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(fields) or '(none)'}"
                raise ValueError(f"unknown option '{key}' of {self.kind} '{name}'; {hint}") from None
            raise ValueError(f"option '{key}' of {self.kind} '{name}': {err['msg']}") from None

    def validate_named(self, raw: str | dict[str, Any], key: str) -> BaseModel:
        """Options from a recipe value: a name (``"gradnorm"``) or a mapping (``{key: "gradnorm", "alpha": 2}``).

        ValueError, one line, naming an unknown name (with the valid ones) or an unknown or bad option.
        """
        if isinstance(raw, str):
            raw = {key: raw}
        if not isinstance(raw, dict):
            raise ValueError(f"give a {self.kind} name or a mapping {{{key}: ..., options}}")
        if key not in raw:
            raise ValueError(f"a {self.kind} mapping needs a '{key}'; valid: {', '.join(sorted(self))}")
        name = str(raw[key])
        return self.validate_options(name, {**raw, key: name})
