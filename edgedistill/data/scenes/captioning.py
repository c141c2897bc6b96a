"""Captions: every caption names every object's size, colour, shape and position, so the captions determine the
scene's object set (its ``scene_key``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgedistill.data.scenes.model import Scene, SceneObject

N_TEMPLATES = 5

_NUMBERS = {1: "one", 2: "two", 3: "three"}
_BG_WORDS = {"flat": "plain", "noisy": "noisy", "gradient": "gradient", "striped": "striped"}


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("ss") else "s")


def _join_and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _phrase(o: SceneObject) -> str:
    return f"a {o.size} {o.colour} {o.shape} in the {o.position}"


def _grouped(objects: Sequence[SceneObject]) -> list[str]:
    """Objects that look alike as one phrase: "two small red squares in the top left and the center"."""
    groups: dict[tuple[str, str, str], list[SceneObject]] = {}
    for o in objects:
        groups.setdefault((o.size, o.colour, o.shape), []).append(o)
    out = []
    for (size, colour, shape), members in groups.items():
        if len(members) == 1:
            out.append(_phrase(members[0]))
        else:
            where = _join_and([f"the {o.position}" for o in members])
            out.append(f"{_NUMBERS[len(members)]} {size} {colour} {_plural(shape)} in {where}")
    return out


def _templates(objects: Sequence[SceneObject], background: str) -> list[str]:
    n = len(objects)
    plain = _join_and([_phrase(o) for o in objects])
    grouped = _grouped(objects)
    return [plain,
            f"{_NUMBERS[n]} shape{'s' if n > 1 else ''}: " + ", ".join(grouped),
            "an image with " + plain,
            f"{plain} on a {_BG_WORDS[background]} background",
            "a picture of " + _join_and(grouped)]


def captions(scene: Scene, rng: np.random.Generator, k: int = 3) -> list[str]:
    """``k`` (<= 5) captions with distinct phrasings, objects in a fresh random order in each; every caption names
    every object's size, colour, shape and position (alike objects may share one plural phrase)."""
    if not 1 <= k <= N_TEMPLATES:
        raise ValueError(f"k must be 1..{N_TEMPLATES}, got {k}")
    chosen = rng.permutation(N_TEMPLATES)[:k]
    out = []
    for t in chosen:
        order = rng.permutation(len(scene.objects))
        out.append(_templates([scene.objects[i] for i in order], scene.background.kind)[t])
    return out


def caption_rng(seed: Sequence[int]) -> np.random.Generator:
    """The captions' own stream for the scene of ``seed``, so that skipping captions (``captioned``) changes no
    image."""
    return np.random.default_rng([*seed, 1_000_003])
