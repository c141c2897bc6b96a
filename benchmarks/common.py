"""What the benchmarks share: the machine's name, recording a result row, and the synthetic workload."""

from __future__ import annotations

import csv
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(row: dict[str, Any], name: str, record: bool = True) -> None:
    """Print ``row`` and, with ``record``, append it to ``results/<name>.csv`` (header on first write)."""
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:>{width}}: {value}")
    if not record:
        return
    out = RESULTS / f"{name}.csv"
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    print(f"appended to {out}")


COLOURS = {"red": (200, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 200), "yellow": (230, 210, 40),
           "purple": (130, 40, 160), "orange": (240, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}


def write_scenes(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[tuple[Path, list[str]]]:
    """Photo stand-ins (gradient, shapes, sensor-like noise) with two COCO-length captions (10-25 words) each."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 1, w)[None, :, None]
    out = []
    for i in range(n):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        base = (top * (1 - ramp) + bottom * ramp) * np.ones((h, 1, 1))
        base += rng.normal(0, 8, size=(h, w, 3))
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        things = []
        for _ in range(rng.integers(2, 5)):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            box = [x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))]
            colour = str(rng.choice(list(COLOURS)))
            shape = "ellipse" if rng.random() < 0.5 else "rectangle"
            (draw.ellipse if shape == "ellipse" else draw.rectangle)(box, fill=COLOURS[colour])
            side = "left" if x0 < w / 2 else "right"
            things.append(f"a {colour} {shape} on the {side}")
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        captions = [f"a picture of {', '.join(things[:-1])} and {things[-1]} over a smooth background",
                    f"{len(things)} coloured shapes: {' and '.join(things[:2])}"]
        out.append((path, captions))
    return out


def write_dataset(work: Path, n: int, size: tuple[int, int]) -> Path:
    """``n`` scenes under ``work/images`` and their manifest ``work/train.jsonl``."""
    manifest = work / "train.jsonl"
    with open(manifest, "w") as f:
        for path, captions in write_scenes(work / "images", n, size):
            f.write(json.dumps({"image": str(path), "captions": captions}) + "\n")
    return manifest


def random_checkpoint(model: str, folder: Path, seed: int = 0) -> Path:
    """An open_clip architecture with seeded random weights, saved as a checkpoint (no download)."""
    torch.manual_seed(seed)
    path = folder / f"{model}.pt"
    torch.save(open_clip.create_model(model).state_dict(), path)
    return path
