"""Loss terms, registered by name (docs/methods.md#loss-terms).

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

from typing import Any

from torch import nn

# Importing the term modules registers their terms.
from edgedistill.distill.losses import alignment, clipkd, contrastive, output, ranking  # noqa: F401
from edgedistill.distill.losses.base import LOSSES, Embeddings, LossContext, LossTerm, TermOptions, register_loss


def validate_term_options(name: str, raw: Any) -> TermOptions:
    """Options of term ``name`` from the recipe (None, a mapping or options); ValueError naming the bad key."""
    if isinstance(raw, TermOptions):
        raw = raw.model_dump()
    return LOSSES.validate_options(name, raw or {})  # type: ignore[return-value]


def build_losses(terms: dict[str, TermOptions], context: LossContext) -> nn.ModuleDict:
    """Instantiate the recipe's terms, in recipe order."""
    return nn.ModuleDict({name: LOSSES.build(name, options, context) for name, options in terms.items()})


__all__ = ["LOSSES", "Embeddings", "LossContext", "LossTerm", "TermOptions", "build_losses", "register_loss",
           "validate_term_options"]
