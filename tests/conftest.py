"""Shared fixtures: a tiny real open_clip teacher saved to files, synthetic JPEG datasets, recipes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import yaml
from PIL import Image

# A real open_clip CLIP (ViT + text transformer), small enough to build and run in well under a second.
TINY_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}

WORDS = ["red", "blue", "green", "circle", "square", "star", "small", "large", "left", "right"]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config JSON, checkpoint) of a randomly initialised tiny open_clip model, written by the test."""
    folder = tmp_path_factory.mktemp("teacher")
    config = folder / "tiny-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1234)
    model = open_clip.create_model("tiny-clip")
    checkpoint = folder / "tiny-clip.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint


def write_images(folder: Path, n: int, size: tuple[int, int] = (48, 40), seed: int = 0,
                 start: int = 0) -> list[Path]:
    """n JPEG files with random blocky content (distinct images give distinct embeddings)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(start, start + n):
        small = rng.integers(0, 256, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size, Image.NEAREST)
        path = folder / f"img_{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def captions_for(i: int, k: int = 2) -> list[str]:
    rng = np.random.default_rng(i)
    return [" ".join(rng.choice(WORDS, size=4)) + f" number {i} v{j}" for j in range(k)]


def write_manifest(path: Path, images: list[Path], captions_per_image: int = 2, relative: bool = True) -> Path:
    """A JSON Lines manifest for ``images`` (paths relative to the manifest's folder by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, img in enumerate(images):
            name = str(img.relative_to(path.parent)) if relative else str(img)
            f.write(json.dumps({"image": name, "captions": captions_for(i, captions_per_image),
                                "label": WORDS[i % 3]}) + "\n")
    return path


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Path]:
    """A small train/val dataset: 40 + 12 JPEGs with two captions each."""
    train = write_manifest(tmp_path / "data" / "train.jsonl", write_images(tmp_path / "data" / "images", 40))
    val = write_manifest(tmp_path / "data" / "val.jsonl",
                         write_images(tmp_path / "data" / "val_images", 12, seed=1))
    return {"train": train, "val": val, "root": tmp_path}


def write_recipe(path: Path, teacher: tuple[Path, Path], train_manifest: Path, val_manifest: Path | None = None,
                 cache_dir: Path | None = None, **sections: dict[str, Any]) -> Path:
    """A recipe for the tiny teacher; ``sections`` are merged over the defaults (e.g. data={"workers": 0})."""
    recipe: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "out": str(path.parent / "runs" / "tiny"),
        "device": "cpu",
        "teacher": {"model": str(teacher[0]), "pretrained": str(teacher[1])},
        "student": {"vision": "mobilenetv3_small_100", "text": "teacher"},
        "data": {"train": str(train_manifest), "val": str(val_manifest) if val_manifest else None,
                 "batch_size": 8, "workers": 0},
        "cache": {"dir": str(cache_dir or path.parent / "cache"), "chunk_size": 16},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
