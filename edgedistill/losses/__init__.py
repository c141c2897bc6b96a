"""Loss terms, registered by name (METHODS.md A and C).

A recipe names its terms and their options::

    loss:
      terms:
        feature: {}
        contrastive: {temperature: 0.07, queue_size: 4096}

Every term is a small ``nn.Module`` built from its validated options; it takes one batch's ``Embeddings`` and
returns a scalar, or ``None`` when the batch lacks what it needs (a term on ground-truth pairs in a batch with no
captions). Terms that keep state (the teacher queue) keep it in buffers, so it is saved and resumed with the
run. Adding a term is one decorated class in a module of this package.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor, nn


class TermOptions(BaseModel):
    """Options every term has; a term's own options subclass this."""
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0.0, description="base weight; adaptive balancers multiply their weight by it")


@dataclass
class Embeddings:
    """One training batch, every embedding at the teacher's width D (a student of another width is projected).

    B images; P <= B of them come with a caption (one caption each, drawn per step).
    Teacher embeddings are L2-normalised and carry no gradient; student embeddings are raw (not normalised).
    """
    student_image: Tensor                   # (B, D)
    teacher_image: Tensor                   # (B, D)
    student_text: Tensor | None = None      # (P, D): the student's text embeddings of the P captions
    teacher_text: Tensor | None = None      # (P, D)
    pair_image: Tensor | None = None        # (P,) long: which of the B images each caption belongs to
    logit_scale: Tensor | None = None       # scalar: the student's learnable log logit scale (open_clip's, not exp'ed)
    text_is_student: bool = False           # True when student_text comes from a trainable student text tower
    labels: Tensor | None = None            # (B,) long class index, -1 = no label  (issue 6: classification)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossContext:
    """What a term may need at construction time."""
    embed_dim: int
    text_bank: Tensor | None = None         # (K, D) teacher text embeddings, L2-normalised (vl_align's candidates)
    class_text: Tensor | None = None        # (C, D) teacher class-prompt embeddings when labels exist


class LossTerm(nn.Module):
    name: ClassVar[str] = ""
    Options: ClassVar[type[TermOptions]] = TermOptions

    def __init__(self, options: TermOptions, context: LossContext) -> None:
        super().__init__()
        self.options = options
        self.context = context

    def forward(self, e: Embeddings) -> Tensor | None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, e: Embeddings) -> None:
        """Called once after each optimizer step with that step's batch (e.g. to enqueue teacher keys)."""


LOSSES: dict[str, type[LossTerm]] = {}
T = TypeVar("T", bound=type[LossTerm])


def register_loss(name: str) -> Callable[[T], T]:
    def wrap(cls: T) -> T:
        if name in LOSSES:
            raise ValueError(f"loss term {name!r} registered twice")
        cls.name = name
        LOSSES[name] = cls
        return cls
    return wrap


def _unknown(kind: str, name: str, valid: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ValueError(f"unknown {kind} '{name}'; {hint}valid: {', '.join(sorted(valid))}")


def validate_term_options(name: str, raw: Any) -> TermOptions:
    """Options of term ``name`` from the recipe (None or a mapping); ValueError naming the bad key."""
    _load_builtin_terms()
    if name not in LOSSES:
        raise _unknown("loss term", name, list(LOSSES))
    options_model = LOSSES[name].Options
    try:
        return options_model.model_validate(raw or {})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(key, list(options_model.model_fields), n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid: {', '.join(options_model.model_fields)}"
            raise ValueError(f"unknown option '{key}' of loss term '{name}'; {hint}") from None
        raise ValueError(f"option '{key}' of loss term '{name}': {err['msg']}") from None


def build_losses(terms: dict[str, TermOptions], context: LossContext) -> nn.ModuleDict:
    """Instantiate the recipe's terms, in recipe order."""
    _load_builtin_terms()
    return nn.ModuleDict({name: LOSSES[name](options, context) for name, options in terms.items()})


def _load_builtin_terms() -> None:
    # Importing the modules registers their terms.
    from edgedistill.losses import alignment, contrastive, output  # noqa: F401
