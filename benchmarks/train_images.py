"""What the training loader costs per image, and what a training step gains from `data.in_memory`.

Scenes images (64 px JPEGs, the quality benchmark's data). Three loaders of the same items, interleaved over
repeats so the machine's drift hits all alike, the ratio of medians reported:

- `torchvision`: files, the view rendered by torchvision's resized_crop / hflip / to_tensor / normalize (the
  loader before 2026-12-07);
- `files`: files, `render_view` (PIL + numpy, the same bytes);
- `memory`: `data.in_memory` (pixels decoded once), `render_view`.

Then whole training steps of the quality benchmark's compression student (MobileNetV3-Small 0.5x at 32 px,
cached teacher, the default recipe) with `data.in_memory` off and on, alternating: images per second of each.

    python benchmarks/train_images.py                  # appends to results/train_images.csv
    python benchmarks/train_images.py --images 500 --steps 20 --no-record
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from torchvision.transforms import functional as TF

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmarks.common import cpu_model, report  # noqa: E402

from edgedistill.data.images import DecodedImages, open_image  # noqa: E402
from edgedistill.data.manifest import load_manifest  # noqa: E402
from edgedistill.data.scenes import write_scenes  # noqa: E402
from edgedistill.data.transforms import Render  # noqa: E402
from edgedistill.distill.train import TrainImages  # noqa: E402

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


class TorchvisionImages(TrainImages):
    """The loader as it was: files, torchvision's functions per image."""

    def __getitem__(self, index: int):  # type: ignore[override]
        image = open_image(self.paths[index])
        view, k = self.view_of(index, image)
        mode = TF.InterpolationMode(self.student.interpolation)
        crop = TF.resized_crop(image, view.top, view.left, view.height, view.width,
                               [self.student.size, self.student.size], mode)
        crop = TF.hflip(crop) if view.flip else crop
        return index, TF.normalize(TF.to_tensor(crop), list(self.student.mean), list(self.student.std)), None, k, None


def loader_seconds(datasets: dict[str, TrainImages], repeats: int) -> dict[str, float]:
    """Median seconds per image of each loader over all items, the loaders interleaved; items checked equal."""
    seconds: dict[str, list[float]] = {name: [] for name in datasets}
    n = len(next(iter(datasets.values())))
    for r in range(repeats):
        order = list(datasets) if r % 2 == 0 else list(reversed(datasets))
        for name in order:
            t = time.perf_counter()
            for i in range(n):
                datasets[name][i]
            seconds[name].append((time.perf_counter() - t) / n)
    first = [ds[7][1] for ds in datasets.values()]
    assert all(torch.equal(first[0], x) for x in first), "the loaders disagree"
    return {name: statistics.median(v) for name, v in seconds.items()}


def step_images_per_s(work: Path, scenes: Path, steps: int, repeats: int, console: Console) -> dict[str, float]:
    """Training images per second of the compression student's default recipe, data.in_memory off / on."""
    from edgedistill.distill.cache import caches_for_recipe, load_split_manifests
    from edgedistill.distill.pretrain import pretrain_config, pretrain_teacher
    from edgedistill.distill.recipe import load_recipe
    from edgedistill.distill.teachers import load_teacher
    from edgedistill.distill.train import build_trainer

    made = pretrain_teacher(scenes / "train.jsonl", None, pretrain_config("tiny", steps=20), root=work / "teachers",
                            console=console)
    rates: dict[str, list[float]] = {"files": [], "memory": []}
    teacher = caches = None
    for r in range(repeats):
        for mode in (("files", "memory") if r % 2 == 0 else ("memory", "files")):
            recipe = load_recipe(HERE.parent / "recipes" / "scenes_dsmd.yaml", [
                f"name=bench-{mode}-{r}", f"out={work / 'runs' / f'{mode}-{r}'}", f"teacher.model={made.config_json}",
                f"teacher.pretrained={made.checkpoint}", f"data.train={scenes / 'train.jsonl'}", "data.val=null",
                f"cache.dir={work / 'cache'}", "student.vision=mobilenetv3_small_050", "student.image_size=32",
                "loss.balancer=coverage", f"train.max_steps={steps}", "train.checkpoint_every=0", "device=cpu",
                f"data.in_memory={'true' if mode == 'memory' else 'false'}"])
            if teacher is None:
                teacher = load_teacher(recipe.teacher, "cpu")
                caches = {k: v.cache for k, v in caches_for_recipe(recipe, teacher, load_split_manifests(recipe),
                                                                    console=console).items()}
            trainer = build_trainer(recipe, teacher, load_split_manifests(recipe), caches, console)
            trainer.fit()
            rates[mode].append(trainer.state.images / trainer.state.train_seconds)
            console.print(f"{mode}, repeat {r + 1}: {rates[mode][-1]:.0f} training images/s")
    return {mode: statistics.median(v) for mode, v in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="scenes (64 px JPEGs)")
    ap.add_argument("--repeats", type=int, default=4, help="passes per loader / runs per mode, alternating")
    ap.add_argument("--steps", type=int, default=150, help="training steps of each run (batch 64)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(stderr=True, soft_wrap=True)
    with tempfile.TemporaryDirectory(prefix="edgedistill-bench-") as tmp:
        work = Path(tmp)
        scenes = work / "scenes"
        write_scenes(scenes, args.images, seed=0, size=64, n_val=0, n_hard=0, n_ood=0)
        paths = [e.image for e in load_manifest(scenes / "train.jsonl").entries]
        decoded = DecodedImages(paths)
        loaders = {}
        for size in (32, 64):
            student = Render(size, CLIP_MEAN, CLIP_STD)
            kinds = {"torchvision": TorchvisionImages(paths, student, 0, (0.85, 1.0), False),
                     "files": TrainImages(paths, student, 0, (0.85, 1.0), False),
                     "memory": TrainImages(paths, student, 0, (0.85, 1.0), False, decoded=decoded)}
            loaders[size] = loader_seconds(kinds, args.repeats)
            console.print(f"{size} px: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in loaders[size].items()))
        rates = step_images_per_s(work, scenes, args.steps, args.repeats, console)
    row = {"date": datetime.date.today().isoformat(), "machine": f"{cpu_model()}, {os.cpu_count()} cores",
           "torch": torch.__version__, "threads": args.threads, "images": args.images, "repeats": args.repeats,
           **{f"load_{k}_{size}px_ms": round(v * 1e3, 3) for size, per in loaders.items() for k, v in per.items()},
           **{f"load_speedup_{size}px": round(per["torchvision"] / per["memory"], 2) for size, per in loaders.items()},
           "steps": args.steps, "train_files_images_per_s": round(rates["files"], 1),
           "train_memory_images_per_s": round(rates["memory"], 1),
           "train_speedup": round(rates["memory"] / rates["files"], 2)}
    report(row, "train_images", record=not args.no_record)


if __name__ == "__main__":
    main()
