"""Out-of-distribution classes: scenes whose label is a ``HELD_OUT`` combination, so their classes are disjoint
from every training label (``data.ood_val``), and attribute sentences for every class (``data.class_descriptions``).

``write_ood_classes`` adds them to an existing scenes dataset::

    <root>/ood_classes.jsonl, ood_classes.json   labelled manifest, its settings (a reuse check compares them)
    <root>/class_descriptions.json               class name -> attribute sentences
    <root>/images/ood_classes/00000.jpg
"""

from __future__ import annotations

import json
from pathlib import Path

from edgedistill.core.atomic import replace_dir, staging_dir, write_json
from edgedistill.data.scenes.captioning import caption_rng, captions
from edgedistill.data.scenes.model import (
    COLOURS, HELD_OUT, SHAPES, VERSION, Key, Scene, attempts, label, make_scene, scene_key)
from edgedistill.data.scenes.drawing import render
from edgedistill.data.scenes.writer import JPEG_OPTIONS, index_width, manifest_line, write_lines
from edgedistill.core.errors import UserError

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
            for attempt in attempts("ood_classes"):
                sd = (seed, OOD_CLASSES_SPLIT, k, j, attempt)
                scene = make_scene(sd, include=combo)
                if label(scene) == f"{combo[0]} {combo[1]}" and scene_key(scene) not in keys:
                    break
            keys.add(scene_key(scene))
            out.append((scene, sd))
    return out


def _render_folder(scenes: list[tuple[Scene, tuple[int, ...]]], size: int, folder: Path, width: int) -> None:
    """The images of ``scenes`` in a temporary sibling folder, moved to ``folder`` (replacing it) when complete."""
    with staging_dir(folder) as tmp:
        for i, (scene, _) in enumerate(scenes):
            render(scene, size).save(tmp / f"{i:0{width}d}.jpg", **JPEG_OPTIONS)
        replace_dir(tmp, folder)


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
    width = index_width(len(scenes))
    _render_folder(scenes, info["size"], root / "images" / "ood_classes", width)
    write_class_descriptions(root / "class_descriptions.json")
    write_json(root / "ood_classes.json", settings)
    write_lines(manifest, [manifest_line(f"images/ood_classes/{i:0{width}d}.jpg", captions(sc, caption_rng(sd)),
                                         label(sc)) for i, (sc, sd) in enumerate(scenes)])
    return manifest
