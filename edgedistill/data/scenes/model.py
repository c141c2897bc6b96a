"""The scene vocabulary, the scene dataclasses, and drawing scenes from seeds.

The world: 8 shapes x 8 colours x 2 sizes at 5 positions; a scene holds 1 to 3 objects at distinct positions on a
flat, noisy, gradient or striped background. Jitter that captions never mention (a small offset, +-12 % size,
+-6 RGB units, +-15 degrees of rotation for polygons) keeps the images from being pixel-identical per caption.

Each scene comes from its own seed, ``np.random.default_rng([base_seed, split_id, index, ...])``, so the order in
which scenes are made and the number of worker processes do not change a single pixel.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from edgedistill.core.errors import UserError

VERSION = 1  # written into scenes.json and ood_classes.json

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "ring")
# Saturated, far apart, and all far from the desaturated mid-grey backgrounds (Euclidean RGB distance > 60).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 165, 60), "blue": (40, 75, 215), "yellow": (240, 215, 35),
    "purple": (135, 50, 175), "orange": (245, 135, 25), "white": (250, 250, 250), "black": (12, 12, 12)}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS = ("flat", "noisy", "gradient", "striped")
# Colour-shape combinations no training (or val/hard) scene contains; one colour and one shape each, so every
# colour and every shape is still seen in training, only never in these pairings.
HELD_OUT: tuple[tuple[str, str], ...] = (("purple", "star"), ("orange", "hexagon"), ("green", "triangle"),
                                         ("white", "cross"), ("blue", "ring"), ("yellow", "diamond"))
SPLITS = {"train": 0, "val": 1, "hard": 2, "ood": 3}
MAX_OBJECTS = 3

Key = tuple[tuple[str, str, str, str], ...]

# Jitter, in fractions of the image side (offset), of the radius (scale), degrees and RGB units.
_SCALE_JITTER = 0.12
_OFFSET_JITTER = 0.012
_ANGLE_JITTER = 15.0  # degrees; more would turn a square into a diamond or a cross into an x
_TINT_JITTER = 6
NOISE_LEVELS = (5.0, 8.0, 11.0)  # noise standard deviations in RGB units: one fixed noise bank each
_GRADIENT_ANGLES = 32  # gradient directions are quantised so that their masks can be cached


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


def sample_object(rng: np.random.Generator, position: str, exclude: tuple[tuple[str, str], ...],
                  combo: tuple[str, str] | None = None) -> SceneObject:
    """An object at ``position``: ``combo`` (colour, shape) when given, else a combination not in ``exclude``."""
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


def random_scene(rng: np.random.Generator, n_objects: int | None = None, include: tuple[str, str] | None = None,
                 exclude: tuple[tuple[str, str], ...] = HELD_OUT) -> Scene:
    """A scene drawn from ``rng`` (which it advances); the arguments as in ``make_scene``."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    where = rng.permutation(len(POSITIONS))[:n]
    objects = tuple(sample_object(rng, POSITIONS[p], exclude, include if i == 0 else None)
                    for i, p in enumerate(where))
    return Scene(objects=objects, background=_sample_background(rng))


def make_scene(seed: Sequence[int], n_objects: int | None = None, include: tuple[str, str] | None = None,
               exclude: tuple[tuple[str, str], ...] = HELD_OUT) -> Scene:
    """The scene of ``seed`` (e.g. ``(base_seed, split_id, index)``): 1-3 objects (or ``n_objects``), none of them
    an ``exclude`` colour-shape combination except the first, which is ``include`` when given."""
    return random_scene(np.random.default_rng(list(seed)), n_objects, include, exclude)


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


# ---------------------------------------------------------------------------------------------------- unique draws

_MAX_ATTEMPTS = 1000


def attempts(split: str) -> Iterator[int]:
    """Attempt numbers 0, 1, ... for redrawing a scene whose key is taken; a UserError after ``_MAX_ATTEMPTS``."""
    for attempt in range(_MAX_ATTEMPTS):
        yield attempt
    raise UserError(f"could not draw {split} scenes with unique contents after {_MAX_ATTEMPTS} tries; "
                    f"ask for fewer {split} scenes")


def iid_scenes(seed: int, n: int) -> list[tuple[Scene, tuple[int, ...]]]:
    """``n`` val scenes with unique keys and the seed each came from, ``(seed, 1, i, attempt)``."""
    keys: set[Key] = set()
    out = []
    for i in range(n):
        for attempt in attempts("val"):
            s = (seed, SPLITS["val"], i, attempt)
            scene = make_scene(s)
            if scene_key(scene) not in keys:
                break
        keys.add(scene_key(scene))
        out.append((scene, s))
    return out
