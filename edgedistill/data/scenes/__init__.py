"""Procedural image-caption scenes with exact ground truth, for training and distilling without internet.

Every caption names every object's size, colour, shape and position, so the captions determine the scene's object
set: ``scene_key`` (a sorted tuple of ``(size, colour, shape, position)``) is the retrieval answer, and two scenes
with the same key are the same answer. Evaluation splits:

- ``val`` (iid): held-out seeds from the training distribution.
- ``hard``: base scenes with a twin that differs by exactly one edit (``EDITS``), edit types in turn.
- ``ood``: like hard, but every base scene contains one of ``HELD_OUT``, colour-shape combinations that training
  scenes never contain.
- ``ood_classes`` (``write_ood_classes``, added to an existing dataset): scenes whose label is a ``HELD_OUT``
  combination, with ``class_descriptions.json``.

Modules, each importing only those before it: ``model`` (vocabulary, dataclasses, scenes from seeds, unique
val draws), ``captioning``, ``drawing`` (rendering), ``twins`` (one-edit pairs), ``writer`` (the dataset on disk,
several processes, reuse), ``ood`` (the held-out classes and class descriptions). The twin metric is
``edgedistill.evaluation.metrics.twin_accuracy``.
"""

from edgedistill.data.scenes.captioning import N_TEMPLATES, captions
from edgedistill.data.scenes.drawing import render
from edgedistill.data.scenes.model import (
    BACKGROUNDS, COLOURS, HELD_OUT, MAX_OBJECTS, NOISE_LEVELS, POSITIONS, SHAPES, SIZES, SPLITS, VERSION, Background,
    Key, Scene, SceneObject, iid_scenes, label, main_object, make_scene, scene_key)
from edgedistill.data.scenes.ood import (
    OOD_CLASSES_SPLIT, class_descriptions, ood_class_scenes, write_class_descriptions, write_ood_classes)
from edgedistill.data.scenes.twins import EDITS, edit_scene, twin_scenes
from edgedistill.data.scenes.writer import write_scenes

__all__ = ["BACKGROUNDS", "COLOURS", "EDITS", "HELD_OUT", "MAX_OBJECTS", "NOISE_LEVELS", "N_TEMPLATES",
           "OOD_CLASSES_SPLIT", "POSITIONS", "SHAPES", "SIZES", "SPLITS", "VERSION", "Background", "Key", "Scene",
           "SceneObject", "captions", "class_descriptions", "edit_scene", "iid_scenes", "label", "main_object",
           "make_scene", "ood_class_scenes", "render", "scene_key", "twin_scenes", "write_class_descriptions",
           "write_ood_classes", "write_scenes"]
