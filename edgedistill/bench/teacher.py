"""The teacher's side of a bench on the machine that trained the student: its val scores from the feature cache
and (``--teacher``) its fp32 ONNX image graph, exported once. The training stack (torch, open_clip) is needed
here, and only here: a device benches from a bundle that carries the teacher's scores and graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from edgedistill.distill.cache import caches_for_recipe
from edgedistill.data.manifest import load_manifest
from edgedistill.distill.evaluate import prepare_val, teacher_metrics
from edgedistill.export.graph import IMAGE_INPUT, IMAGE_OUTPUT, ImageEncoder, export_onnx
from edgedistill.core.hashing import sha256_json
from edgedistill.distill.recipe import load_recipe
from edgedistill.runtime.preprocess import image_side
from edgedistill.distill.teachers import load_teacher
from edgedistill.evaluation.split import ClassPrompts


def teacher_from_run(run_dir: Path, prompts: ClassPrompts, val_manifest: Path | None, want_timing: bool,
                     console: Console) -> dict[str, Any]:
    """name, identity, preprocess and the PyTorch module of the run's teacher; ``metrics`` on the val split (its
    embeddings from the feature cache, built when missing); ``onnx_path`` of its fp32 image graph for --teacher."""
    recipe = load_recipe(run_dir / "recipe.yaml", ["device=cpu"])
    with console.status("loading the teacher"):
        teacher = load_teacher(recipe.teacher, "cpu", seed=recipe.seed)
    info: dict[str, Any] = {"name": teacher.source.model_name, "identity": teacher.identity,
                            "preprocess": teacher.preprocess_cfg, "module": teacher.model}
    if val_manifest is not None:
        manifest = load_manifest(val_manifest)
        cache = caches_for_recipe(recipe, teacher, {"val": manifest}, console=console)["val"].cache
        info["metrics"] = teacher_metrics(prepare_val(manifest, teacher, cache, prompts, console=console,
                                                      cache_root=recipe.cache.root))
    if want_timing:
        key = sha256_json(teacher.identity)[:16]
        path = recipe.cache.root / "bench" / f"teacher-{key}" / "image_fp32.onnx"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            size = image_side(teacher.preprocess_cfg)
            with console.status("exporting the teacher's image encoder to ONNX (once)"):
                export_onnx(ImageEncoder(teacher.model.float()), torch.zeros(2, 3, size, size), path, IMAGE_INPUT,
                            IMAGE_OUTPUT)
        info["onnx_path"] = path
        info["onnx"] = path.name
    return info
