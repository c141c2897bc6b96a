"""Out-of-distribution benchmark: attribute-enriched class prompts vs plain class names.

Teacher: the `base` pretrain preset on the quality benchmark's scenes (benchmarks/quality.py `prepare`, reused).
Data: the scenes dataset plus `ood_classes.jsonl` (`write_ood_classes`: images of the six held-out colour-shape
classes that no training image contains, labelled, disjoint from the 58 training classes) and
`class_descriptions.json` (attribute sentences of every class). Student: MobileNetV3-Small at 64 px,
recipes/scenes_ood.yaml (the terms of Li et al. ICCV 2023: feature matching, image contrastive, vl_align over the
teacher's class texts with the wrong-teacher filter, classification). The two variants differ only in
`data.class_descriptions` (the file, or null = plain "a photo of a {label}."), which changes the class texts the
terms train against and the class texts of the zero-shot evaluation. Scores (mean per-class top-1): OOD zero-shot
for student and teacher, OOD few-shot (prototype and Tip-Adapter, k images per class), and val RSUM share.

    python benchmarks/ood_prompts.py                               # full size: 50k scenes, 1500 steps per variant
    python benchmarks/ood_prompts.py --n 2000 --steps 40 --per-class 10 --preset tiny --no-record --work /tmp/ood
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
from benchmarks.selection import prepare_scenes  # noqa: E402

VARIANTS = ("descriptions", "plain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "data", help="scenes and runs go here (reused)")
    ap.add_argument("--n", type=int, default=50000, help="training scenes (the quality benchmark's 50000)")
    ap.add_argument("--per-class", type=int, default=50, help="ood_val images per held-out class")
    ap.add_argument("--steps", type=int, default=1500, help="distillation steps per variant")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--few-shot", default="1,4,16", help="k images per class for the few-shot evaluation")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--preset", default="base", help="teacher pretrain preset (tiny: smoke runs only)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    from rich.console import Console

    from edgedistill.data.scenes import write_ood_classes
    from edgedistill.distill.recipe import load_recipe
    from edgedistill.distill.train import distill

    console = Console(stderr=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    paths = prepare_scenes(args.work, args.n, args.preset, console)
    ood = write_ood_classes(paths["full"], args.per_class)
    prepare_s = time.perf_counter() - t0
    rows = []
    started = time.perf_counter()
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant}; use {', '.join(VARIANTS)}")
        out = args.work / "ood-runs" / variant
        shutil.rmtree(out, ignore_errors=True)
        descriptions = paths["full"] / "class_descriptions.json" if variant == "descriptions" else "null"
        ov = [f"name=ood-{variant}", f"out={out}", f"teacher.model={paths['teacher_json']}",
              f"teacher.pretrained={paths['teacher_pt']}", f"data.train={paths['full'] / 'train.jsonl'}",
              f"data.val={paths['full'] / 'val.jsonl'}", f"data.ood_val={ood}",
              f"data.class_descriptions={descriptions}", f"data.batch_size={args.batch_size}",
              f"cache.dir={args.work / 'cache'}", f"train.max_steps={args.steps}",
              f"train.warmup_steps={max(1, args.steps // 20)}", f"train.checkpoint_every={args.steps}",
              f"eval.few_shot=[{args.few_shot}]", "device=cpu"]
        recipe = load_recipe(REPO / "recipes" / "scenes_ood.yaml", ov)
        t_run = time.perf_counter()
        summary = distill(recipe, console=console)
        train_s = time.perf_counter() - t_run
        zs, few = summary["ood_zero_shot"], summary["ood_few_shot"]
        s, t = summary["student"], summary["teacher"]
        row: dict[str, Any] = {"variant": variant, "steps": summary["steps"], "train_s": round(train_s, 1),
                               "ood_classes": zs["classes"], "ood_images": zs["images"],
                               "ood_zs_student": round(zs["student_mean_class"], 1),
                               "ood_zs_teacher": round(zs["teacher_mean_class"], 1),
                               "val_zs_student": round(s.get("zs_mean_class", float("nan")), 1),
                               "val_zs_teacher": round(t.get("zs_mean_class", float("nan")), 1),
                               "val_rsum_share": round(s["rsum"] / t["rsum"], 3)}
        for k, r in few["k"].items():
            row[f"fs{k}_prototype"] = round(r["prototype"], 1)
            row[f"fs{k}_tip"] = round(r["tip_adapter"], 1)
            row[f"fs{k}_teacher_prototype"] = round(r["teacher_prototype"], 1)
        console.print(row)
        rows.append(row)
    stamp = {"date": dt.date.today().isoformat(), "machine": cpu_model(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "command": " ".join(["python", "benchmarks/ood_prompts.py", *sys.argv[1:]]),
             "n": args.n, "per_class": args.per_class, "teacher": args.preset,
             "prepare_s": round(prepare_s, 1), "benchmark_s": round(time.perf_counter() - started, 1)}
    for row in rows:
        report({**stamp, **row}, "ood_prompts", record=not args.no_record)
    if not args.no_record:
        (RESULTS / "ood_prompts_last.json").write_text(json.dumps({"stamp": stamp, "rows": rows}, indent=2) + "\n")
    print(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s (+ {prepare_s:.0f} s preparing data and teacher)")


if __name__ == "__main__":
    main()
