"""Training step throughput: 2 processes (DDP, gloo) vs 1 process, same global batch, on the CPU.

The real command runs both ways on one recipe: ``edgedistill distill RECIPE`` (one process, all cores as torch
threads) and ``edgedistill distill RECIPE --nproc 2`` (torchrun, two processes of one thread each: together the
same cores). ViT-B-32 teacher (open_clip architecture, random weights from a checkpoint), MobileNetV3-Large
student at 224 px, default loss terms and balancer, cached teacher features (the cache is built once, before
the timed runs, and reused by both). The throughput is the run's own ``train_images_per_s`` (global images per
second of training steps, data loading included, evaluation and start-up excluded); runs alternate 1 / 2
processes. Both the medians and the best runs are recorded, with every run and the load average: on a machine
shared with other work a 2-thread process slows down far more than two 1-thread ones (its threads wait for each
other at every parallel region), so the best run is the fair comparison there.

    python benchmarks/distributed_step.py                    # appends to results/distributed_step.csv
    python benchmarks/distributed_step.py --images 64 --repeats 1 --no-record
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from rich.console import Console

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_model, random_checkpoint, report, write_dataset  # noqa: E402

from edgedistill.distill.cache import caches_for_recipe, load_split_manifests  # noqa: E402
from edgedistill.distill.recipe import validate_recipe  # noqa: E402
from edgedistill.distill.teachers import load_teacher  # noqa: E402


def run(recipe: Path, out: Path, nproc: int, threads: int) -> dict:
    """One `edgedistill distill` run in a subprocess; its summary.json."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "edgedistill", "distill", str(recipe), f"out={out}"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--size", default="320x240", help="JPEG width x height")
    ap.add_argument("--teacher", default="ViT-B-32")
    ap.add_argument("--student", default="mobilenetv3_large_100")
    ap.add_argument("--batch", type=int, default=32, help="global batch (16 per process with 2)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 2
    load_before = round(os.getloadavg()[0], 2)
    console = Console(stderr=True, soft_wrap=True)
    size = tuple(int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory(prefix="edgedistill-bench-") as tmp:
        work = Path(tmp)
        write_dataset(work, args.images, size)  # type: ignore[arg-type]
        checkpoint = random_checkpoint(args.teacher, work)
        raw = {"name": "bench", "device": "cpu", "out": str(work / "runs" / "x"),
               "teacher": {"model": args.teacher, "pretrained": str(checkpoint)},
               "student": {"vision": args.student},
               "data": {"train": str(work / "train.jsonl"), "batch_size": args.batch, "workers": 0},
               "cache": {"dir": str(work / "cache")},
               "train": {"epochs": args.epochs, "warmup_steps": 1, "tensorboard": False, "checkpoint_every": 0,
                         "log_every": 1000}}
        recipe = validate_recipe(raw)
        recipe_path = work / "bench.yaml"
        recipe_path.write_text(yaml.safe_dump(raw))
        with console.status("building the teacher feature cache once"):
            caches_for_recipe(recipe, load_teacher(recipe.teacher, "cpu"), load_split_manifests(recipe),
                              Console(quiet=True))
        rates: dict[int, list[float]] = {1: [], 2: []}
        steps = 0
        for r in range(args.repeats):
            for nproc in (1, 2):
                summary = run(recipe_path, work / "runs" / f"{nproc}-{r}", nproc, cores // nproc)
                rates[nproc].append(summary["train_images_per_s"])
                steps = summary["steps"]
                console.print(f"{nproc} process(es), run {r + 1}: {summary['train_images_per_s']:.1f} images/s "
                              f"({summary['wall_s']:.1f} s for {steps} steps)")

    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    best1, best2 = max(rates[1]), max(rates[2])
    row = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{cpu_model()}, {cores} cores",
        "torch": torch.__version__,
        "command": "python benchmarks/distributed_step.py" + "".join(f" {a}" for a in sys.argv[1:]),
        "teacher": args.teacher, "student": args.student, "images": args.images, "size": args.size,
        "global_batch": args.batch, "steps": steps, "repeats": args.repeats,
        "threads_1proc": cores, "threads_per_proc_2proc": cores // 2,
        "load_avg_1min_before": load_before,
        "runs_1proc": " ".join(f"{v:.1f}" for v in rates[1]), "runs_2proc": " ".join(f"{v:.1f}" for v in rates[2]),
        "median_images_per_s_1proc": round(one, 1), "median_images_per_s_2proc": round(two, 1),
        "best_images_per_s_1proc": round(best1, 1), "best_images_per_s_2proc": round(best2, 1),
        "best_step_s_1proc": round(args.batch / best1, 3), "best_step_s_2proc": round(args.batch / best2, 3),
        "speedup_2proc_median": round(two / one, 2), "speedup_2proc_best": round(best2 / best1, 2),
    }
    report(row, "distributed_step", record=not args.no_record)


if __name__ == "__main__":
    main()
