"""Twins: a scene and a copy changed by exactly one edit (``EDITS``), the pairs of the ``hard`` and ``ood`` splits.

Within a split scene keys are unique (colliding draws are redrawn), so ground truth is unambiguous. In ``ood`` every
base scene contains one of ``HELD_OUT`` (its twin may lose it: a colour, shape, bind or count edit may touch that
object).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from edgedistill.data.scenes.model import (
    COLOURS, HELD_OUT, MAX_OBJECTS, POSITIONS, SHAPES, SPLITS, Key, Scene, SceneObject, attempts, random_scene,
    sample_object, scene_key)

EDITS = ("colour", "shape", "size", "position", "count", "bind", "swap-position")


def _with(s: Scene, i: int, o: SceneObject) -> Scene:
    return replace(s, objects=s.objects[:i] + (o,) + s.objects[i + 1:])


def _free(s: Scene) -> list[str]:
    used = {o.position for o in s.objects}
    return [p for p in POSITIONS if p not in used]


def _colour_edit(s: Scene, rng: np.random.Generator, ex: tuple) -> Scene | None:
    i = int(rng.integers(len(s.objects)))
    o = s.objects[i]
    options = [c for c in COLOURS if c != o.colour and (c, o.shape) not in ex]
    return _with(s, i, replace(o, colour=options[int(rng.integers(len(options)))]))


def _shape_edit(s: Scene, rng: np.random.Generator, ex: tuple) -> Scene | None:
    i = int(rng.integers(len(s.objects)))
    o = s.objects[i]
    options = [h for h in SHAPES if h != o.shape and (o.colour, h) not in ex]
    shape = options[int(rng.integers(len(options)))]
    angle = 0.0 if shape in ("circle", "ring") else o.angle
    return _with(s, i, replace(o, shape=shape, angle=angle))


def _size_edit(s: Scene, rng: np.random.Generator, ex: tuple) -> Scene | None:
    i = int(rng.integers(len(s.objects)))
    o = s.objects[i]
    return _with(s, i, replace(o, size="small" if o.size == "large" else "large"))


def _position_edit(s: Scene, rng: np.random.Generator, ex: tuple) -> Scene | None:
    i = int(rng.integers(len(s.objects)))
    free = _free(s)
    return _with(s, i, replace(s.objects[i], position=free[int(rng.integers(len(free)))]))


def _count_edit(s: Scene, rng: np.random.Generator, ex: tuple) -> Scene | None:
    n = len(s.objects)
    add = n == 1 or (n < MAX_OBJECTS and rng.random() < 0.5)
    if add:
        free = _free(s)
        new = sample_object(rng, free[int(rng.integers(len(free)))], ex)
        return replace(s, objects=s.objects + (new,))
    i = int(rng.integers(n))
    return replace(s, objects=s.objects[:i] + s.objects[i + 1:])


def _bind_edit(s: Scene, rng: np.random.Generator, ex: tuple) -> Scene | None:
    # Two objects of different colours and different looks otherwise (else a colour swap is a position swap).
    pairs = [(i, j) for i in range(len(s.objects)) for j in range(i + 1, len(s.objects))
             if (a := s.objects[i]).colour != (b := s.objects[j]).colour
             and (a.shape, a.size) != (b.shape, b.size)
             and (b.colour, a.shape) not in ex and (a.colour, b.shape) not in ex]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    a, b = s.objects[i], s.objects[j]
    return _with(_with(s, i, replace(a, colour=b.colour)), j, replace(b, colour=a.colour))


def _swap_position_edit(s: Scene, rng: np.random.Generator, ex: tuple) -> Scene | None:
    pairs = [(i, j) for i in range(len(s.objects)) for j in range(i + 1, len(s.objects))
             if s.objects[i].attributes[:3] != s.objects[j].attributes[:3]]
    if not pairs:
        return None
    i, j = pairs[int(rng.integers(len(pairs)))]
    a, b = s.objects[i], s.objects[j]
    return _with(_with(s, i, replace(a, position=b.position)), j, replace(b, position=a.position))


_EDIT_FUNCTIONS = {"colour": _colour_edit, "shape": _shape_edit, "size": _size_edit, "position": _position_edit,
                   "count": _count_edit, "bind": _bind_edit, "swap-position": _swap_position_edit}
_MIN_OBJECTS = {"bind": 2, "swap-position": 2}


def edit_scene(scene: Scene, edit: str, rng: np.random.Generator,
               exclude: tuple[tuple[str, str], ...] = HELD_OUT) -> Scene | None:
    """``scene`` changed by exactly one ``edit`` (in EDITS; new colour-shape combinations avoid ``exclude``), or
    None where the scene does not allow it (bind, swap-position: no suitable pair of objects)."""
    if edit not in _EDIT_FUNCTIONS:
        raise ValueError(f"unknown edit '{edit}'; one of {', '.join(EDITS)}")
    return _EDIT_FUNCTIONS[edit](scene, rng, exclude)


def twin_scenes(seed: int, n_pairs: int, ood: bool = False) -> list[tuple[Scene, Scene, str, tuple[int, ...]]]:
    """``n_pairs`` (base, twin, edit, pair seed): edit ``EDITS[k % 7]`` for pair k; all 2 * n_pairs keys unique.

    ``ood``: the first object of base k is ``HELD_OUT[k % 6]``; otherwise no object is a held-out combination.
    """
    split = "ood" if ood else "hard"
    keys: set[Key] = set()
    out = []
    for k in range(n_pairs):
        edit = EDITS[k % len(EDITS)]
        include = HELD_OUT[k % len(HELD_OUT)] if ood else None
        for attempt in attempts(split):
            s = (seed, SPLITS[split], k, attempt)
            rng = np.random.default_rng(list(s))
            n = int(rng.integers(_MIN_OBJECTS.get(edit, 1), MAX_OBJECTS + 1))
            base = random_scene(rng, n, include)
            twin = edit_scene(base, edit, rng)
            if twin is not None and scene_key(base) not in keys and scene_key(twin) not in keys:
                break
        keys.update((scene_key(base), scene_key(twin)))
        out.append((base, twin, edit, s))
    return out
