"""Module selection benchmark: OPTIMA vs uniform vs random vs unlimited-history Thompson, at equal steps.

Teacher: the `base` pretrain preset on the quality benchmark's scenes (benchmarks/quality.py `prepare`, reused
when present). Student: MobileNetV3-Small at 64 px, recipes/scenes_optima.yaml (layerwise distillation of the
four stages + the DSMD-style output terms), only `select.method` differs between runs; every run has the same
steps, pull length K and held batch. Scores: val (iid) RSUM and its share of the teacher's, student-teacher
top-1 agreement and cosine on val, and RSUM share on the hard and ood twin splits.

    python benchmarks/selection.py                                 # full size: 50k scenes, 1500 steps per method
    python benchmarks/selection.py --n 2000 --steps 40 --preset tiny --no-record --work /tmp/sel   # smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, cpu_model, report  # noqa: E402

METHODS = ("optima", "thompson", "random", "uniform")


def prepare_scenes(work: Path, n: int, preset: str, console: Any) -> dict[str, Path]:
    """Scenes and teacher: the quality benchmark's (`base`) or, for smoke runs, a preset trained on ``n`` scenes."""
    if preset == "base":
        from benchmarks.quality import prepare
        return prepare(work, n, min(2000, n), console)
    from edgedistill.data.scenes import write_scenes
    from edgedistill.distill.pretrain import pretrain_config, pretrain_teacher
    full = work / "scenes"
    write_scenes(full, n, seed=0, size=64, n_val=min(1000, max(50, n // 10)), n_hard=min(500, max(20, n // 20)),
                 n_ood=min(500, max(20, n // 20)), progress=console)
    teacher = pretrain_teacher(full / "train.jsonl", full / "val.jsonl", pretrain_config(preset), console=console)
    return {"full": full, "teacher_json": teacher.config_json, "teacher_pt": teacher.checkpoint,
            "teacher_metrics": teacher.metrics}


def overrides(method: str, paths: dict[str, Path], steps: int, out: Path, cache: Path, pull_steps: int,
              window: int, held_batch: int, batch_size: int) -> list[str]:
    select = {"method": method, "pull_steps": pull_steps, "held_batch": held_batch}
    if method == "optima":
        select["window"] = window
    return [f"name=sel-{method}", f"out={out}", f"teacher.model={paths['teacher_json']}",
            f"teacher.pretrained={paths['teacher_pt']}", f"data.train={paths['full'] / 'train.jsonl'}",
            f"data.val={paths['full'] / 'val.jsonl'}", f"data.batch_size={batch_size}", f"cache.dir={cache}",
            f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 20)}",
            f"train.checkpoint_every={steps}", "device=cpu", f"select={json.dumps(select)}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "data", help="scenes and runs go here (reused)")
    ap.add_argument("--n", type=int, default=50000, help="training scenes (the quality benchmark's 50000)")
    ap.add_argument("--steps", type=int, default=1500, help="distillation steps per method (equal for all)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pull-steps", type=int, default=20, help="K")
    ap.add_argument("--window", type=int, default=10, help="W of optima")
    ap.add_argument("--held-batch", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--preset", default="base", help="teacher pretrain preset (tiny: smoke runs only)")
    ap.add_argument("--no-splits", action="store_true", help="skip the hard / ood twin splits (val only)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    from rich.console import Console

    from benchmarks.quality import evaluate_run
    from edgedistill.distill.recipe import load_recipe
    from edgedistill.distill.teachers import load_teacher
    from edgedistill.distill.train import distill

    console = Console(stderr=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    paths = prepare_scenes(args.work, args.n, args.preset, console)
    prepare_s = time.perf_counter() - t0
    teacher, rows = None, []
    started = time.perf_counter()
    for method in args.methods.split(","):
        out = args.work / "selection-runs" / method
        shutil.rmtree(out, ignore_errors=True)
        ov = overrides(method, paths, args.steps, out, args.work / "cache", args.pull_steps, args.window,
                       args.held_batch, args.batch_size)
        recipe = load_recipe(REPO / "recipes" / "scenes_optima.yaml", ov)
        if teacher is None:
            teacher = load_teacher(recipe.teacher, "cpu")
        t_run = time.perf_counter()
        summary = distill(recipe, console=console)
        train_s = time.perf_counter() - t_run
        s, t, sel = summary["student"], summary["teacher"], summary["selection"]
        row: dict[str, Any] = {"method": method, "steps": summary["steps"], "train_s": round(train_s, 1),
                               "val_rsum": round(s["rsum"], 1), "val_rsum_share": round(s["rsum"] / t["rsum"], 3),
                               "val_agreement_top1": round(s["agreement_top1"], 1),
                               "val_cosine_to_teacher": round(s["cosine_to_teacher"], 4),
                               "teacher_val_rsum": round(t["rsum"], 1)}
        if not args.no_splits:
            scores = evaluate_run(out, paths, teacher)
            for split in ("hard", "ood"):
                row[f"{split}_rsum_share"] = round(scores[split]["student"]["rsum"] / scores[split]["teacher"]["rsum"], 3)
        row["pulls"] = json.dumps(sel["counts"])
        row["mean_reward"] = json.dumps({k: round(v, 4) for k, v in sel["mean_reward"].items()})
        console.print(row)
        rows.append(row)
    stamp = {"date": dt.date.today().isoformat(), "machine": cpu_model(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "command": " ".join(["python", "benchmarks/selection.py", *sys.argv[1:]]),
             "n": args.n, "teacher": args.preset, "pull_steps": args.pull_steps, "window": args.window,
             "prepare_s": round(prepare_s, 1), "benchmark_s": round(time.perf_counter() - started, 1)}
    for row in rows:
        report({**stamp, **row}, "selection", record=not args.no_record)
    if not args.no_record:
        (RESULTS / "selection_last.json").write_text(json.dumps({"stamp": stamp, "rows": rows}, indent=2) + "\n")
    print(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s (+ {prepare_s:.0f} s preparing data and teacher)")


if __name__ == "__main__":
    main()
