"""Procedural image-caption scenes with exact ground truth, for training and distilling without internet.

The world: 8 shapes x 8 colours x 2 sizes at 5 positions; a scene holds 1 to 3 objects at distinct positions on a
flat, noisy, gradient or striped background. Jitter that captions never mention (a small offset, +-12 % size,
+-6 RGB units, +-15 degrees of rotation for polygons) keeps the images from being pixel-identical per caption.

Every caption names every object's size, colour, shape and position, so the captions determine the scene's object
set: ``scene_key`` (a sorted tuple of ``(size, colour, shape, position)``) is the retrieval answer, and two scenes
with the same key are the same answer.

Each scene comes from its own seed, ``np.random.default_rng([base_seed, split_id, index, ...])``, so the order in
which scenes are made and the number of worker processes do not change a single pixel. Evaluation splits:

- ``val`` (iid): held-out seeds from the training distribution.
- ``hard``: base scenes with a twin that differs by exactly one edit (``EDITS``), edit types in turn.
- ``ood``: like hard, but every base scene contains one of ``HELD_OUT``, colour-shape combinations that training
  scenes never contain (its twin may lose it: a colour, shape, bind or count edit may touch that object).
- ``ood_classes`` (``write_ood_classes``, added to an existing dataset): scenes whose label is a ``HELD_OUT``
  combination, so its classes are disjoint from every training label (``data.ood_val``), with
  ``class_descriptions.json`` (attribute sentences of every class, ``data.class_descriptions``).

Within an evaluation split, scene keys are unique (colliding draws are redrawn), so ground truth is unambiguous.

On disk (``write_scenes``)::

    <out>/scenes.json                      settings, held-out combos, counts (a reuse check compares settings)
    <out>/train.jsonl, val.jsonl, hard.jsonl, ood.jsonl   ordinary manifests (image, captions, label)
    <out>/hard_twins.json, ood_twins.json  [{"a": line, "b": line, "edit": type}], twins on lines 2k and 2k + 1
    <out>/images/<split>/00000.jpg         JPEG, quality 95, no chroma subsampling (colours of small objects)
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from edgedistill.atomic import atomic_path, fsync_dir, writable_dir, write_json
from edgedistill.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
# Saturated, far apart, and all far from the desaturated mid-grey backgrounds (Euclidean RGB distance > 60).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 165, 60), "blue": (40, 75, 215), "yellow": (240, 215, 35),
    "purple": (135, 50, 175), "orange": (245, 135, 25), "white": (250, 250, 250), "black": (12, 12, 12)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS = ("flat", "noisy", "gradient", "striped")
EDITS = ("colour", "shape", "size", "position", "count", "bind", "swap-position")
# Colour-shape combinations no training (or val/hard) scene contains; one colour and one shape each, so every
# colour and every shape is still seen in training, only never in these pairings.
HELD_OUT: tuple[tuple[str, str], ...] = (("purple", "star"), ("orange", "hexagon"), ("green", "triangle"),
                                         ("white", "cross"), ("blue", "ring"), ("yellow", "diamond"))
SPLITS = {"train": 0, "val": 1, "hard": 2, "ood": 3}
MAX_OBJECTS = 3

Key = tuple[tuple[str, str, str, str], ...]

# Geometry, in fractions of the image side. Corner centres at 0.215 keep two large objects (radius <= 0.16 * 1.12)
# with offsets <= 0.012 from touching the centre object along the diagonal, and every object inside the image.
_CORNER = 0.215
_POS_XY = {"top left": (_CORNER, _CORNER), "top right": (1 - _CORNER, _CORNER),
           "bottom left": (_CORNER, 1 - _CORNER), "bottom right": (1 - _CORNER, 1 - _CORNER), "center": (0.5, 0.5)}
_RADIUS = {"small": 0.10, "large": 0.16}  # circumradius; the 1.6 ratio survives +-12 % jitter (0.112 < 0.141)
_SCALE_JITTER = 0.12
_OFFSET_JITTER = 0.012
_ANGLE_JITTER = 15.0  # degrees; more would turn a square into a diamond or a cross into an x
_TINT_JITTER = 6
_RING_WIDTH = 0.36  # of the radius
NOISE_LEVELS = (5.0, 8.0, 11.0)  # noise standard deviations in RGB units: one fixed noise bank each
_GRADIENT_ANGLES = 32  # gradient directions are quantised so that their masks can be cached


def _regular(n: int, radius: float = 1.0, start: float = -90.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start + 360 * k / n)), radius * math.sin(math.radians(start + 360 * k / n)))
            for k in range(n)]


def _star() -> list[tuple[float, float]]:
    outer, inner = _regular(5), _regular(5, 0.45, -90 + 36)  # a fat inner radius stays a star at 6 px
    return [p for pair in zip(outer, inner) for p in pair]


_W, _L = 0.32, 0.95  # cross arm half-width and length (corner circumradius ~1)
# Unit polygons (circumradius <= 1, y down, pointing up) as (K, 2) arrays.
_POLYGONS = {name: np.array(points, dtype=np.float64) for name, points in {
    "square": [(-0.7, -0.7), (0.7, -0.7), (0.7, 0.7), (-0.7, 0.7)],
    "triangle": _regular(3),
    "star": _star(),
    "cross": [(-_W, -_L), (_W, -_L), (_W, -_W), (_L, -_W), (_L, _W), (_W, _W), (_W, _L), (-_W, _L), (-_W, _W),
              (-_L, _W), (-_L, -_W), (-_W, -_W)],
    "diamond": [(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)],  # narrow: a rotated square is not a diamond
    "hexagon": _regular(6, start=0.0),
}.items()}

_NUMBERS = {1: "one", 2: "two", 3: "three"}
_BG_WORDS = {"flat": "plain", "noisy": "noisy", "gradient": "gradient", "striped": "striped"}


@dataclass(frozen=True)
class SceneObject:
    """One object: what captions say (size, colour, shape, position) and jitter they do not (offsets, scale in
    fractions of the image side, angle in degrees, tint in RGB units added to the colour)."""

    size: str
    colour: str
    shape: str
    position: str
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0
    tint: tuple[int, int, int] = (0, 0, 0)

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(min(255, max(0, c + t))) for c, t in zip(COLOURS[self.colour], self.tint))  # type: ignore

    @property
    def attributes(self) -> tuple[str, str, str, str]:
        return (self.size, self.colour, self.shape, self.position)


@dataclass(frozen=True)
class Background:
    """``kind`` in BACKGROUNDS; ``tone``/``tone2`` RGB (gradient end, second stripe); ``angle`` degrees of the
    gradient or stripes (a multiple of 360/32); ``period`` the stripe period in fractions of the image side and
    ``phase`` its offset in half periods; ``noise`` the noise standard deviation in RGB units (one of
    NOISE_LEVELS); ``noise_at`` where the noise crop starts (fractions of the free range)."""

    kind: str
    tone: tuple[int, int, int]
    tone2: tuple[int, int, int]
    angle: float = 0.0
    period: float = 0.15
    phase: float = 0.0
    noise: float = 0.0
    noise_at: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class Scene:
    """1 to 3 objects at distinct positions, on a background."""

    objects: tuple[SceneObject, ...]
    background: Background


# ---------------------------------------------------------------------------------------------------- sampling


@functools.lru_cache(maxsize=None)
def _allowed(exclude: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in exclude)


def _sample_object(rng: np.random.Generator, position: str, exclude: tuple[tuple[str, str], ...],
                   combo: tuple[str, str] | None = None) -> SceneObject:
    allowed = _allowed(tuple(exclude))
    u = rng.random(9)  # one call for all of an object's draws: fast, and a fixed number of draws per object
    colour, shape = combo if combo is not None else allowed[int(u[0] * len(allowed))]
    tint = tuple(int(round((2 * t - 1) * _TINT_JITTER)) for t in u[6:9])
    return SceneObject(size=SIZES[int(u[1] * 2)], colour=colour, shape=shape, position=position,
                       dx=float((2 * u[2] - 1) * _OFFSET_JITTER), dy=float((2 * u[3] - 1) * _OFFSET_JITTER),
                       scale=float(1 + (2 * u[4] - 1) * _SCALE_JITTER),
                       angle=0.0 if shape in ("circle", "ring") else float((2 * u[5] - 1) * _ANGLE_JITTER),
                       tint=tint)  # type: ignore[arg-type]


def _sample_background(rng: np.random.Generator) -> Background:
    u = rng.random(13)
    kind = BACKGROUNDS[int(u[0] * len(BACKGROUNDS))]
    # Desaturated mid-grey: grey level 100..150 with a +-8 tint, so every object colour stands out on it.
    grey = 100 + 50 * u[1]
    tone = tuple(int(round(grey + (2 * t - 1) * 8)) for t in u[2:5])
    delta = (15 + 15 * u[5]) * (1 if u[6] < 0.5 else -1)
    tone2 = tuple(int(min(165, max(90, c + delta))) for c in tone)
    return Background(kind=kind, tone=tone, tone2=tone2,  # type: ignore[arg-type]
                      angle=360.0 * int(u[7] * _GRADIENT_ANGLES) / _GRADIENT_ANGLES,
                      period=float(0.12 + 0.16 * u[8]), phase=float(u[9]),
                      noise=NOISE_LEVELS[int(u[10] * len(NOISE_LEVELS))],
                      noise_at=(float(u[11]), float(u[12])))


def _random_scene(rng: np.random.Generator, n_objects: int | None = None, include: tuple[str, str] | None = None,
                  exclude: tuple[tuple[str, str], ...] = HELD_OUT) -> Scene:
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    where = rng.permutation(len(POSITIONS))[:n]
    objects = tuple(_sample_object(rng, POSITIONS[p], exclude, include if i == 0 else None)
                    for i, p in enumerate(where))
    return Scene(objects=objects, background=_sample_background(rng))


def make_scene(seed: Sequence[int], n_objects: int | None = None, include: tuple[str, str] | None = None,
               exclude: tuple[tuple[str, str], ...] = HELD_OUT) -> Scene:
    """The scene of ``seed`` (e.g. ``(base_seed, split_id, index)``): 1-3 objects (or ``n_objects``), none of them
    an ``exclude`` colour-shape combination except the first, which is ``include`` when given."""
    return _random_scene(np.random.default_rng(list(seed)), n_objects, include, exclude)


def scene_key(scene: Scene) -> Key:
    """The retrieval answer: sorted ``(size, colour, shape, position)`` of every object (jitter excluded)."""
    return tuple(sorted(o.attributes for o in scene.objects))


def main_object(scene: Scene) -> SceneObject:
    """The object a class label names: the largest, ties to the first in POSITIONS order (a function of the key)."""
    return min(scene.objects, key=lambda o: (o.size != "large", POSITIONS.index(o.position)))


def label(scene: Scene) -> str:
    """``"<colour> <shape>"`` of the main object, e.g. ``"red star"`` (64 possible classes)."""
    o = main_object(scene)
    return f"{o.colour} {o.shape}"


# ---------------------------------------------------------------------------------------------------- captions


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


N_TEMPLATES = 5


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


# ---------------------------------------------------------------------------------------------------- rendering

_NOISE_SIDE = 512  # backgrounds are made at the output size (<= 512), then upscaled for supersampling


@functools.lru_cache(maxsize=None)
def _noise_bank(sigma: float) -> Image.Image:
    """(512, 512) RGB Gaussian noise around 128, fixed; a scene crops it at its own offset (a C-speed crop)."""
    rng = np.random.default_rng([20240611, int(sigma * 100)])
    noise = rng.standard_normal((_NOISE_SIDE, _NOISE_SIDE, 3), dtype=np.float32) * sigma + 128
    return Image.fromarray(np.clip(np.rint(noise), 0, 255).astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=256)
def _gradient_mask(side: int, angle: float) -> Image.Image:
    """(side, side) "L" ramp from 0 to 255 along ``angle`` degrees (x right, y down)."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    x = (np.arange(side, dtype=np.float64) + 0.5) / side
    t = x[None, :] * c + x[:, None] * s  # (side, side)
    lo, hi = min(0, c) + min(0, s), max(0, c) + max(0, s)
    return Image.fromarray(np.rint((t - lo) * (255 / (hi - lo))).astype(np.uint8), "L")


def _stripes(bg: Background, side: int) -> Image.Image:
    """Every other band of width ``period / 2`` in tone2, drawn as polygons (anti-aliased by the supersampling)."""
    img = Image.new("RGB", (side, side), bg.tone)
    draw = ImageDraw.Draw(img)
    c, s = math.cos(math.radians(bg.angle)), math.sin(math.radians(bg.angle))
    half = bg.period / 2
    reach = 0.75  # > half the diagonal: bands span the whole image
    first = math.floor(-reach / half - bg.phase) - 1
    for k in range(first, first + int(2 * reach / half) + 3):
        if k % 2:
            continue
        t0, t1 = (k + bg.phase) * half, (k + 1 + bg.phase) * half
        corners = [(t0, -reach), (t0, reach), (t1, reach), (t1, -reach)]
        draw.polygon([((0.5 + t * c - u * s) * side, (0.5 + t * s + u * c) * side) for t, u in corners],
                     fill=bg.tone2)
    return img


def _background(bg: Background, size: int, supersample: int) -> Image.Image:
    side = size * supersample
    if bg.kind == "flat":
        return Image.new("RGB", (side, side), bg.tone)
    if bg.kind == "striped":
        return _stripes(bg, side)
    # Noise and gradients at the output size, then pixel-repeated: after the box downscale that is exactly the
    # output-size background, at a quarter of the cost.
    flat = Image.new("RGB", (size, size), bg.tone)
    if bg.kind == "noisy":
        ox, oy = (int(f * (_NOISE_SIDE - size + 1)) for f in bg.noise_at)
        img = ImageChops.add(_noise_bank(bg.noise).crop((ox, oy, ox + size, oy + size)), flat, 1.0, -128)
    else:
        img = Image.composite(Image.new("RGB", (size, size), bg.tone2), flat, _gradient_mask(size, bg.angle))
    return img.resize((side, side), Image.NEAREST) if supersample > 1 else img


def _draw(draw: ImageDraw.ImageDraw, o: SceneObject, side: int) -> None:
    px, py = _POS_XY[o.position]
    cx, cy = (px + o.dx) * side, (py + o.dy) * side
    r = _RADIUS[o.size] * o.scale * side
    rgb = o.rgb
    if o.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    elif o.shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=rgb, width=max(1, round(_RING_WIDTH * r)))
    else:
        a = math.radians(o.angle)
        rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]]) * r
        points = _POLYGONS[o.shape] @ rot + (cx, cy)  # (K, 2)
        draw.polygon(points.ravel().tolist(), fill=rgb)


def render(scene: Scene, size: int = 64, supersample: int = 2) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image, drawn at ``supersample`` times the size and box-downscaled
    (anti-aliased edges; 1 draws directly)."""
    side = size * supersample
    img = _background(scene.background, size, supersample)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, side)
    return img.reduce(supersample) if supersample > 1 else img


# ---------------------------------------------------------------------------------------------------- eval splits


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


def _free(s: Scene) -> list[str]:
    used = {o.position for o in s.objects}
    return [p for p in POSITIONS if p not in used]


def _position_edit(s: Scene, rng: np.random.Generator, ex: tuple) -> Scene | None:
    i = int(rng.integers(len(s.objects)))
    free = _free(s)
    return _with(s, i, replace(s.objects[i], position=free[int(rng.integers(len(free)))]))


def _count_edit(s: Scene, rng: np.random.Generator, ex: tuple) -> Scene | None:
    n = len(s.objects)
    add = n == 1 or (n < MAX_OBJECTS and rng.random() < 0.5)
    if add:
        free = _free(s)
        new = _sample_object(rng, free[int(rng.integers(len(free)))], ex)
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


def _with(s: Scene, i: int, o: SceneObject) -> Scene:
    return replace(s, objects=s.objects[:i] + (o,) + s.objects[i + 1:])


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


_MAX_ATTEMPTS = 1000


def _attempts(split: str) -> Iterator[int]:
    for attempt in range(_MAX_ATTEMPTS):
        yield attempt
    raise UserError(f"could not draw {split} scenes with unique contents after {_MAX_ATTEMPTS} tries; "
                    f"ask for fewer {split} scenes")


def iid_scenes(seed: int, n: int) -> list[tuple[Scene, tuple[int, ...]]]:
    """``n`` val scenes with unique keys and the seed each came from, ``(seed, 1, i, attempt)``."""
    keys: set[Key] = set()
    out = []
    for i in range(n):
        for attempt in _attempts("val"):
            s = (seed, SPLITS["val"], i, attempt)
            scene = make_scene(s)
            if scene_key(scene) not in keys:
                break
        keys.add(scene_key(scene))
        out.append((scene, s))
    return out


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
        for attempt in _attempts(split):
            s = (seed, SPLITS[split], k, attempt)
            rng = np.random.default_rng(list(s))
            n = int(rng.integers(_MIN_OBJECTS.get(edit, 1), MAX_OBJECTS + 1))
            base = _random_scene(rng, n, include)
            twin = edit_scene(base, edit, rng)
            if twin is not None and scene_key(base) not in keys and scene_key(twin) not in keys:
                break
        keys.update((scene_key(base), scene_key(twin)))
        out.append((base, twin, edit, s))
    return out


# ---------------------------------------------------------------------------------------------------- writing

_CHUNK = 128
_JPEG = {"quality": 95, "subsampling": 0}


def _caption_rng(seed: Sequence[int]) -> np.random.Generator:
    """The captions' own stream, so that skipping captions (``captioned``) changes no image."""
    return np.random.default_rng([*seed, 1_000_003])


def _record(image: str, caps: list[str], lab: str) -> str:
    return json.dumps({"image": image, "captions": caps, "label": lab}, ensure_ascii=False) + "\n"


def _work(task: tuple) -> list[str]:
    """Render and save one chunk (in a worker or in-process); train chunks also return their manifest lines."""
    kind, root, split, size, start, payload = task
    folder = Path(root) / "images" / split
    width = payload[-1]
    lines = []
    if kind == "train":
        seed, stop, captioned, _ = payload
        for i in range(start, stop):
            s = (seed, SPLITS["train"], i)
            scene = make_scene(s)
            name = f"{i:0{width}d}.jpg"
            render(scene, size).save(folder / name, **_JPEG)
            caps = captions(scene, _caption_rng(s)) if captioned is None or i < captioned else []
            lines.append(_record(f"images/{split}/{name}", caps, label(scene)))
    else:
        scenes, _ = payload
        for i, scene in enumerate(scenes, start):
            render(scene, size).save(folder / f"{i:0{width}d}.jpg", **_JPEG)
    return lines


def _settings(n: int, seed: int, size: int, n_val: int, n_hard: int, n_ood: int, captioned: int | None) -> dict:
    return {"version": VERSION, "n": n, "seed": seed, "size": size, "n_val": n_val, "n_hard": n_hard,
            "n_ood": n_ood, "captioned": captioned, "held_out": [f"{c} {s}" for c, s in HELD_OUT]}


def _validate(n: int, seed: int, size: int, n_val: int, n_hard: int, n_ood: int, captioned: int | None,
              workers: int) -> None:
    def whole(x: Any) -> bool:
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not whole(n) or n < 1:
        raise UserError(f"scenes: n must be a whole number >= 1, got {n!r}")
    if not whole(size) or not 32 <= size <= 512:
        raise UserError(f"scenes: size must be a whole number of pixels from 32 to 512, got {size!r}")
    for name, value in (("seed", seed), ("n_val", n_val), ("n_hard", n_hard), ("n_ood", n_ood), ("workers", workers)):
        if not whole(value) or value < 0:
            raise UserError(f"scenes: {name} must be a whole number >= 0, got {value!r}")
    if captioned is not None and (not whole(captioned) or not 0 <= captioned <= n):
        raise UserError(f"scenes: captioned must be a whole number from 0 to n={n}, got {captioned!r}")


def _reuse(out: Path, settings: dict) -> dict:
    info_path = out / "scenes.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{out} exists and is not a scenes dataset (no readable scenes.json); "
                        f"choose another --out or delete it") from None
    differ = [f"{k}={info.get(k)!r} there, {v!r} asked" for k, v in settings.items() if info.get(k) != v]
    if differ:
        raise UserError(f"{out} holds scenes made with other settings ({'; '.join(differ)}); "
                        f"choose another --out or delete it")
    return {**info, "reused": True}


def _twin_records(pairs: list, split: str, width: int) -> tuple[list[str], list[dict]]:
    lines, twins = [], []
    for k, (base, twin, edit, s) in enumerate(pairs):
        for j, scene in enumerate((base, twin)):
            # One caption stream per pair: twins get the same phrasing and object order where the edit allows,
            # so their captions differ only by the edit.
            caps = captions(scene, _caption_rng(s))
            lines.append(_record(f"images/{split}/{2 * k + j:0{width}d}.jpg", caps, label(scene)))
        twins.append({"a": 2 * k, "b": 2 * k + 1, "edit": edit})
    return lines, twins


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)


def _width(n: int) -> int:
    return max(5, len(str(max(n - 1, 0))))


def _generate(root: Path, st: dict, workers: int, console: Console | None) -> dict[str, int]:
    seed, size, n = st["seed"], st["size"], st["n"]
    counts = {"train": n, "val": st["n_val"], "hard": 2 * st["n_hard"], "ood": 2 * st["n_ood"]}
    tasks: list[tuple] = []
    # Evaluation scenes are drawn here, in order (unique keys depend on the earlier draws); only rendering and
    # JPEG encoding go to the workers. Their manifests are complete before any image is drawn.
    evals: dict[str, list[Scene]] = {}
    if st["n_val"]:
        val = iid_scenes(seed, st["n_val"])
        w = _width(len(val))
        _write_lines(root / "val.jsonl", [_record(f"images/val/{i:0{w}d}.jpg", captions(sc, _caption_rng(s)),
                                                  label(sc)) for i, (sc, s) in enumerate(val)])
        evals["val"] = [sc for sc, _ in val]
    for split, n_pairs in (("hard", st["n_hard"]), ("ood", st["n_ood"])):
        if n_pairs:
            pairs = twin_scenes(seed, n_pairs, ood=split == "ood")
            lines, twins = _twin_records(pairs, split, _width(2 * n_pairs))
            _write_lines(root / f"{split}.jsonl", lines)
            write_json(root / f"{split}_twins.json", twins)
            evals[split] = [sc for base, twin, _, _ in pairs for sc in (base, twin)]
    for split, scenes in evals.items():
        (root / "images" / split).mkdir(parents=True)
        w = _width(len(scenes))
        tasks += [("scenes", str(root), split, size, a, (scenes[a:a + _CHUNK], w))
                  for a in range(0, len(scenes), _CHUNK)]
    (root / "images" / "train").mkdir(parents=True)
    tasks += [("train", str(root), "train", size, a, (seed, min(a + _CHUNK, n), st["captioned"], _width(n)))
              for a in range(0, n, _CHUNK)]

    def sizes() -> Iterator[int]:
        for t in tasks:
            yield (t[5][1] - t[4]) if t[0] == "train" else len(t[5][0])

    bar, job = None, None
    if console is not None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=console, transient=False)
        job = bar.add_task("scenes", total=sum(counts.values()))
        bar.start()
    pool = multiprocessing.Pool(workers) if workers > 0 else None
    try:
        results = pool.imap(_work, tasks) if pool is not None else map(_work, tasks)
        with atomic_path(root / "train.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            for lines, k in zip(results, sizes()):
                f.writelines(lines)  # train chunks come last and in order (imap keeps the order)
                if bar is not None:
                    bar.advance(job, k)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.stop()
    return counts


def write_scenes(out: str | Path, n: int, seed: int = 0, size: int = 64, n_val: int = 1000, n_hard: int = 500,
                 n_ood: int = 500, captioned: int | None = None, workers: int = 0,
                 progress: Console | None = None) -> dict:
    """Write a scenes dataset to ``out`` (layout in the module docstring) and return its scenes.json content.

    ``n`` training images, ``n_val`` iid val images, ``n_hard`` and ``n_ood`` twin *pairs* (2 images each); a
    count of 0 skips that split. ``captioned``: only the first ``captioned`` training images keep captions (the
    rest are written with ``"captions": []``). ``workers`` > 0 renders in that many processes (same bytes).
    ``progress``: a rich Console to show a progress bar on.

    Built in a sibling ``<out>.tmp-*`` folder renamed to ``out`` when complete, so ``out`` is whole or absent. An
    existing ``out`` with the same settings is reused as is (the result has ``"reused": True``); with other
    settings it is a UserError.
    """
    _validate(n, seed, size, n_val, n_hard, n_ood, captioned, workers)
    st = _settings(int(n), int(seed), int(size), int(n_val), int(n_hard), int(n_ood),
                   None if captioned is None else int(captioned))
    out = Path(out)
    if out.exists():
        return _reuse(out, st)
    writable_dir(out.parent, "--out's parent folder")
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        counts = _generate(tmp, st, workers, progress)
        manifests = {split: f"{split}.jsonl" for split, c in counts.items() if c}
        info = {**st, "counts": {**counts, "train_captioned": n if captioned is None else int(captioned)},
                "manifests": manifests,
                "twins": {s: f"{s}_twins.json" for s in ("hard", "ood") if counts[s]}}
        write_json(tmp / "scenes.json", info)
        if out.exists():  # another process finished first; its copy is as good as ours if the settings match
            shutil.rmtree(tmp)
            return _reuse(out, st)
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "reused": False}


# ------------------------------------------------------------------------------------- out-of-distribution classes

OOD_CLASSES_SPLIT = 5  # split id of the class-level OOD scenes (SPLITS holds 0..3; 4 is left unused)

_SHAPE_FACTS = {
    "circle": "a round shape with no corners", "square": "a shape with four equal sides and four square corners",
    "triangle": "a shape with three straight sides and three pointed corners",
    "star": "a shape with five sharp points around its middle", "cross": "a plus sign with four straight arms",
    "diamond": "a narrow shape with four corners, taller than it is wide",
    "hexagon": "a shape with six equal sides", "ring": "a circle with a round hole in its middle"}
_COLOUR_FACTS = {
    "red": "red like a ripe tomato", "green": "green like fresh grass", "blue": "blue like a clear sky",
    "yellow": "yellow like a lemon", "purple": "purple like a plum", "orange": "orange like an orange",
    "white": "white like snow", "black": "black like coal"}


def class_descriptions() -> dict[str, list[str]]:
    """Attribute sentences for every scenes class ``"<colour> <shape>"`` (all 64, held-out ones included): the
    shape's geometry, the colour, and the object in the captions' own words (``data.class_descriptions``)."""
    return {f"{c} {s}": [f"a {c} {s} is {_SHAPE_FACTS[s]}", f"the {s} is {_COLOUR_FACTS[c]}",
                         f"a large {c} {s} in the center", f"a small {c} {s}"]
            for c in COLOURS for s in SHAPES}


def write_class_descriptions(path: str | Path) -> Path:
    """``class_descriptions()`` as the JSON file ``data.class_descriptions`` reads (written atomically)."""
    write_json(path, class_descriptions())
    return Path(path)


def ood_class_scenes(seed: int, n_per_class: int) -> list[tuple[Scene, tuple[int, ...]]]:
    """``n_per_class`` scenes for each ``HELD_OUT`` combination whose *label* (main object) is that combination,
    classes in turn: classes disjoint from every training label, since no training scene contains them. Other
    objects avoid every held-out combination; scene keys are unique."""
    keys: set[Key] = set()
    out = []
    for j in range(n_per_class):
        for k, combo in enumerate(HELD_OUT):
            for attempt in _attempts("ood_classes"):
                sd = (seed, OOD_CLASSES_SPLIT, k, j, attempt)
                scene = make_scene(sd, include=combo)
                if label(scene) == f"{combo[0]} {combo[1]}" and scene_key(scene) not in keys:
                    break
            keys.add(scene_key(scene))
            out.append((scene, sd))
    return out


def write_ood_classes(root: str | Path, n_per_class: int = 50) -> Path:
    """Add ``ood_classes.jsonl`` (``n_per_class`` captioned images per held-out class, labelled) to the scenes
    dataset at ``root`` (its seed and image size), for ``data.ood_val``; also write ``class_descriptions.json``.

    Reused when it exists with the same settings (``ood_classes.json``); images go to a temporary folder renamed
    into place, and the manifest is written last, so a complete manifest means complete images.
    """
    root = Path(root)
    try:
        info = json.loads((root / "scenes.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{root} is not a scenes dataset (no readable scenes.json); write it with write_scenes "
                        f"first") from None
    if not isinstance(n_per_class, int) or n_per_class < 1:
        raise UserError(f"ood classes: n_per_class must be a whole number >= 1, got {n_per_class!r}")
    settings = {"version": VERSION, "seed": info["seed"], "size": info["size"], "n_per_class": n_per_class,
                "classes": [f"{c} {s}" for c, s in HELD_OUT]}
    manifest = root / "ood_classes.jsonl"
    if manifest.is_file() and (root / "ood_classes.json").is_file():
        if json.loads((root / "ood_classes.json").read_text()) == settings:
            return manifest
        raise UserError(f"{root} holds ood classes made with other settings; delete {manifest} and "
                        f"{root / 'ood_classes.json'} or keep n_per_class")
    scenes = ood_class_scenes(info["seed"], n_per_class)
    width = _width(len(scenes))
    folder = root / "images" / "ood_classes"
    tmp = Path(tempfile.mkdtemp(prefix="ood_classes.tmp-", dir=root / "images"))
    try:
        for i, (scene, _) in enumerate(scenes):
            render(scene, info["size"]).save(tmp / f"{i:0{width}d}.jpg", **_JPEG)
        shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_class_descriptions(root / "class_descriptions.json")
    write_json(root / "ood_classes.json", settings)
    _write_lines(manifest, [_record(f"images/ood_classes/{i:0{width}d}.jpg", captions(sc, _caption_rng(sd)),
                                    label(sc)) for i, (sc, sd) in enumerate(scenes)])
    return manifest

