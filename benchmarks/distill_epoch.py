"""A training epoch with cached teacher features vs the same epoch running the teacher online.

ViT-B-32 teacher (open_clip architecture, random weights saved to a checkpoint: no download; the weights do
not change the cost) and a MobileNetV3-Large student at 224 px, on JPEG photo stand-ins with two captions each.
The trainer is the real one (`edgedistill.distill.train.build_trainer`, default loss terms and balancer); only
`train.teacher` differs. Epochs alternate cached / online so drift of the machine hits both alike; the ratio
is of the medians. The one-off cache build is reported separately.

    python benchmarks/distill_epoch.py                    # 256 images, batch 32; appends to results/distill_epoch.csv
    python benchmarks/distill_epoch.py --images 64 --repeats 1 --no-record
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_model, random_checkpoint, report, write_dataset  # noqa: E402

from edgedistill.distill.cache import caches_for_recipe, load_split_manifests  # noqa: E402
from edgedistill.distill.recipe import validate_recipe  # noqa: E402
from edgedistill.distill.teachers import load_teacher  # noqa: E402
from edgedistill.distill.train import build_trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", default="500x375", help="JPEG width x height")
    ap.add_argument("--teacher", default="ViT-B-32")
    ap.add_argument("--student", default="mobilenetv3_large_100")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="epochs per mode, alternating")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-malloc-tuning", action="store_true",
                    help="leave glibc's allocator as it is (edgedistill.distill.memory.keep_freed_memory off)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.no_malloc_tuning:
        os.environ["EDGEDISTILL_MALLOC_TUNING"] = "0"
    torch.set_num_threads(args.threads)
    console = Console(stderr=True, soft_wrap=True)
    size = tuple(int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="edgedistill-bench-") as tmp:
        work = Path(tmp)
        write_dataset(work, args.images, size)  # type: ignore[arg-type]
        checkpoint = random_checkpoint(args.teacher, work)
        raw = {"name": "bench", "device": "cpu", "out": str(work / "runs" / "x"),
               "teacher": {"model": args.teacher, "pretrained": str(checkpoint)},
               "student": {"vision": args.student},
               "data": {"train": str(work / "train.jsonl"), "batch_size": args.batch, "workers": args.workers},
               "cache": {"dir": str(work / "cache")},
               "train": {"epochs": 1, "warmup_steps": 1, "tensorboard": False, "checkpoint_every": 0}}
        recipe = validate_recipe(raw)
        manifests = load_split_manifests(recipe)
        teacher = load_teacher(recipe.teacher, "cpu")
        t = time.perf_counter()
        cache = caches_for_recipe(recipe, teacher, manifests, console=console)["train"].cache
        build_s = time.perf_counter() - t

        epoch_s: dict[str, list[float]] = {"cached": [], "online": []}
        for r in range(args.repeats):
            for mode in ("cached", "online"):
                run = validate_recipe({**raw, "out": str(work / "runs" / f"{mode}-{r}"),
                                       "train": {**raw["train"], "teacher": mode}})
                caches = {"train": cache} if mode == "cached" else {}
                trainer = build_trainer(run, teacher, manifests, caches, console)
                trainer.fit()
                epoch_s[mode].append(trainer.state.train_seconds)
                console.print(f"{mode} epoch {r + 1}: {trainer.state.train_seconds:.1f} s "
                              f"({trainer.state.images / trainer.state.train_seconds:.1f} images/s)")

    cached, online = statistics.median(epoch_s["cached"]), statistics.median(epoch_s["online"])
    row = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "teacher": args.teacher, "student": args.student,
        "images": args.images, "size": args.size, "captions_per_image": 2,
        "batch": args.batch, "workers": args.workers, "threads": args.threads, "repeats": args.repeats,
        "malloc_tuning": not args.no_malloc_tuning,
        "cache_build_s": round(build_s, 1),
        "epoch_cached_s": round(cached, 2), "epoch_online_s": round(online, 2),
        "cached_images_per_s": round(args.images // args.batch * args.batch / cached, 1),
        "online_images_per_s": round(args.images // args.batch * args.batch / online, 1),
        "speedup": round(online / cached, 2),
        "break_even_epochs": round(build_s / max(online - cached, 1e-9), 2),
    }
    report(row, "distill_epoch", record=not args.no_record)


if __name__ == "__main__":
    main()
