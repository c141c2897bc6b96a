"""Teacher feature cache: cold build throughput and the time of a cache hit, on this machine.

A ViT-B-32 teacher (open_clip architecture, random weights saved to a checkpoint: no download) embeds a few
hundred JPEGs of realistic size (500x375 by default) and two captions each. Measured in one run:

- teacher load (checkpoint -> frozen model), cold build (decode + preprocess + forward + write), images/s;
- cache hit in process (open + verify counts, shapes and sha256 of every array);
- cache hit as a user sees it: the whole `edgedistill cache RECIPE` command a second time
  (Python start-up, imports, teacher load, verification);
- the text tower side by side on the same captions: open_clip's full 77-token context vs the padding cut
  after the batch's last end-of-text token (what the cache build uses; exact for causal CLIP text towers).

    python benchmarks/cache_build.py                      # 300 images, appends a row to results/cache_build.csv
    python benchmarks/cache_build.py --images 100 --no-record
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console

from common import cpu_model, random_checkpoint, report, write_dataset

from edgedistill.distill.cache import caches_for_recipe, load_split_manifests
from edgedistill.distill.recipe import validate_recipe
from edgedistill.distill.teachers import load_teacher

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", default="500x375", help="JPEG width x height")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-record", action="store_true", help="do not append to results/cache_build.csv")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.split("x"))
    console = Console(stderr=True)

    with tempfile.TemporaryDirectory(prefix="edgedistill-bench-") as tmp:
        work = Path(tmp)
        write_dataset(work, args.images, size)  # type: ignore[arg-type]
        checkpoint = random_checkpoint(args.model, work)
        raw = {"name": "bench", "device": "cpu",
               "teacher": {"model": args.model, "pretrained": str(checkpoint)},
               "data": {"train": str(work / "train.jsonl"), "batch_size": args.batch, "workers": args.workers},
               "cache": {"dir": str(work / "cache")}}
        (work / "recipe.yaml").write_text(yaml.safe_dump(raw))
        recipe = validate_recipe(raw)
        manifests = load_split_manifests(recipe)

        t = time.perf_counter()
        teacher = load_teacher(recipe.teacher, "cpu")
        teacher_load_s = time.perf_counter() - t
        cold = caches_for_recipe(recipe, teacher, manifests, console=console)["train"]
        warm = caches_for_recipe(recipe, teacher, manifests, console=console)["train"]
        assert not cold.hit and warm.hit and warm.forward_batches == 0
        cache_mb = sum(f.stat().st_size for f in cold.cache.path.iterdir()) / 2**20

        # Text tower side by side: the full 77-token context vs padding cut after the last end-of-text token.
        captions = manifests["train"].all_captions()
        text_s = {}
        for trim in (False, True):
            teacher.trim_text = trim
            t = time.perf_counter()
            for b in range(0, len(captions), args.batch):
                teacher.embed_texts(captions[b:b + args.batch])
            text_s[trim] = time.perf_counter() - t

        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "edgedistill", "cache", str(work / "recipe.yaml")],
                              capture_output=True, text=True, env=env)
        cli_hit_s = time.perf_counter() - t
        assert proc.returncode == 0 and "reused" in proc.stdout, proc.stderr

    row = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "model": args.model,
        "images": args.images,
        "size": args.size,
        "captions": 2 * args.images,
        "batch": args.batch,
        "workers": args.workers,
        "threads": args.threads,
        "teacher_load_s": round(teacher_load_s, 2),
        "build_s": round(cold.seconds, 2),
        "image_phase_s": round(cold.phase_seconds["images"], 2),
        "images_per_s": round(args.images / cold.phase_seconds["images"], 1),
        "captions_per_s": round(2 * args.images / cold.phase_seconds["texts"], 1),
        "captions_per_s_full_context": round(len(captions) / text_s[False], 1),
        "captions_per_s_trimmed": round(len(captions) / text_s[True], 1),
        "hit_in_process_s": round(warm.seconds, 3),
        "hit_cli_command_s": round(cli_hit_s, 2),
        "cache_mb": round(cache_mb, 2),
    }
    report(row, "cache_build", record=not args.no_record)


if __name__ == "__main__":
    main()
