"""Ground-truth quality benchmark: distillation methods on procedural scenes, against exact answers.

Teacher: the `base` pretrain preset (open_clip ViT 192/4 + text 128/3), trained once on the full track's
scenes and reused. Students: MobileNetV3-Small at 64 px (recipes/scenes_*.yaml), equal steps per method.

Methods:
  supervised   only the ground-truth contrastive loss against the frozen teacher text (recipes/scenes_supervised)
  feature      feature distillation only (recipes/scenes_feature)
  dsmd         the multiscale terms with the self-adaptive balancer (recipes/scenes_dsmd)
  dsmd+NAME    the same terms with balancer NAME (static, magnitude, dwa, uncertainty, gradnorm)
Tracks:
  full         every training image has its captions
  transfer     2,000 captioned pairs + 48,000 images without captions; distillation uses all 50,000 images,
               the supervised baseline only the 2,000 pairs
  short        the full track at a tenth of the steps
Evaluation: iid (held-out scenes), hard and ood (twins differing by one edit; ood scenes hold colour-shape
combinations never trained on): R@1 both ways, RSUM, twin accuracy per edit type, student share of the teacher.

    python benchmarks/quality.py                        # every track, the default method set
    python benchmarks/quality.py --tracks transfer --methods dsmd,supervised --steps 600
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, cpu_model, report  # noqa: E402

BALANCERS = ("static", "magnitude", "dwa", "uncertainty", "gradnorm")
DEFAULT_METHODS = ("supervised", "feature", "dsmd") + tuple(f"dsmd+{b}" for b in BALANCERS)


def prepare(work: Path, n: int, captioned: int, console: Any) -> dict[str, Path]:
    """Scenes for both tracks (same images, same seeds) and the base teacher; all reused when present."""
    from edgedistill.data.scenes import write_scenes
    from edgedistill.pretrain import pretrain_config, pretrain_teacher

    full = work / "scenes"
    transfer = work / "scenes-transfer"
    write_scenes(full, n, seed=0, size=64, progress=console)
    write_scenes(transfer, n, seed=0, size=64, captioned=captioned, progress=console)
    pairs_only = transfer / "train_captioned.jsonl"
    if not pairs_only.exists():  # the supervised baseline's transfer data: only the captioned pairs
        lines = [ln for ln in (transfer / "train.jsonl").read_text().splitlines() if '"captions": []' not in ln]
        pairs_only.write_text("\n".join(lines) + "\n")
    teacher = pretrain_teacher(full / "train.jsonl", full / "val.jsonl", pretrain_config("base"), console=console)
    return {"full": full, "transfer": transfer, "pairs_only": pairs_only, "teacher_json": teacher.config_json,
            "teacher_pt": teacher.checkpoint, "teacher_metrics": teacher.metrics}


def overrides_for(method: str, track: str, paths: dict[str, Path], steps: int, out: Path,
                  cache: Path) -> tuple[Path, list[str]]:
    base = method.split("+")[0]
    recipe = REPO / "recipes" / f"scenes_{base}.yaml"
    data = paths["transfer"] if track == "transfer" else paths["full"]
    train = paths["pairs_only"] if (track == "transfer" and base == "supervised") else data / "train.jsonl"
    run_steps = steps // 10 if track == "short" else steps
    ov = [f"name=q-{track}-{method.replace('+', '-')}", f"out={out}", f"teacher.model={paths['teacher_json']}",
          f"teacher.pretrained={paths['teacher_pt']}", f"data.train={train}", f"data.val={paths['full'] / 'val.jsonl'}",
          f"cache.dir={cache}", f"train.max_steps={run_steps}", f"train.warmup_steps={max(1, run_steps // 20)}",
          f"train.checkpoint_every={run_steps}", "device=cpu"]
    if "+" in method:
        ov.append(f"loss.balancer={method.split('+')[1]}")
    return recipe, ov


_TEACHER_SCORES: dict[tuple[str, Path], dict[str, Any]] = {}


@torch.no_grad()
def split_scores(model: Any, tokenizer: Any, preprocess: Any, manifest_path: Path, twins_path: Path | None,
                 teacher: Any) -> dict[str, Any]:
    """Retrieval and twin accuracy of ``model`` (and the teacher) on one scenes split."""
    from edgedistill.data.images import open_image
    from edgedistill.data.manifest import load_manifest
    from edgedistill.metrics import retrieval_metrics, twin_accuracy

    manifest = load_manifest(manifest_path)
    captions = [c for e in manifest.entries for c in e.captions]
    t2i = torch.tensor([i for i, e in enumerate(manifest.entries) for _ in e.captions])
    out = {}
    if ("teacher", manifest_path) in _TEACHER_SCORES:  # the teacher is the same for every run: score it once
        out["teacher"] = _TEACHER_SCORES[("teacher", manifest_path)]
    for who, (encode_image, encode_text, prep) in {
            "student": (lambda x: model.encode_image(x, normalize=True),
                        lambda t: model.encode_text(tokenizer(t), normalize=True), preprocess),
            "teacher": (teacher.embed_images, teacher.embed_texts, teacher.preprocess)}.items():
        if who in out:
            continue
        images = torch.cat([encode_image(torch.stack([prep(open_image(e.image)) for e in manifest.entries[i:i + 256]]))
                            for i in range(0, len(manifest), 256)]).float()
        texts = torch.cat([encode_text(captions[i:i + 512]) for i in range(0, len(captions), 512)]).float()
        m = retrieval_metrics(images, texts, t2i)
        row = {"i2t_r1": m["i2t_r1"], "t2i_r1": m["t2i_r1"], "rsum": m["rsum"]}
        if twins_path is not None:
            twins = json.loads(twins_path.read_text())
            row["twins"] = twin_accuracy(images, texts, twins, t2i)
        out[who] = row
    _TEACHER_SCORES[("teacher", manifest_path)] = out["teacher"]
    return out


def evaluate_run(run: Path, paths: dict[str, Path], teacher: Any) -> dict[str, Any]:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'student'}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run / 'student'}")
    full = paths["full"]
    return {"iid": split_scores(model, tokenizer, preprocess, full / "val.jsonl", None, teacher),
            "hard": split_scores(model, tokenizer, preprocess, full / "hard.jsonl", full / "hard_twins.json", teacher),
            "ood": split_scores(model, tokenizer, preprocess, full / "ood.jsonl", full / "ood_twins.json", teacher)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "data", help="scenes and runs go here (reused)")
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--captioned", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=1500, help="distillation steps per run (short: a tenth)")
    ap.add_argument("--tracks", default="transfer,full,short")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--balancer-tracks", default="transfer",
                    help="tracks on which the dsmd+BALANCER variants run (the others run everywhere)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    from rich.console import Console

    from edgedistill.recipe import load_recipe
    from edgedistill.teachers import load_teacher
    from edgedistill.train import distill

    console = Console(stderr=True)
    torch.manual_seed(0)
    t_prepare = time.perf_counter()
    paths = prepare(args.work, args.n, args.captioned, console)
    prepare_s = time.perf_counter() - t_prepare
    teacher = None
    results = []
    started = time.perf_counter()
    for track in args.tracks.split(","):
        for method in args.methods.split(","):
            if "+" in method and track not in args.balancer_tracks.split(","):
                continue
            out = args.work / "quality-runs" / f"{track}-{method.replace('+', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            recipe_path, ov = overrides_for(method, track, paths, args.steps, out, args.work / "cache")
            recipe = load_recipe(recipe_path, ov)
            if teacher is None:
                teacher = load_teacher(recipe.teacher, "cpu")
            t0 = time.perf_counter()
            summary = distill(recipe, console=console)
            scores = evaluate_run(out, paths, teacher)
            row = {"track": track, "method": method, "steps": summary["steps"],
                   "train_s": round(time.perf_counter() - t0, 1)}
            for split, s in scores.items():
                row[f"{split}_i2t_r1"] = round(s["student"]["i2t_r1"], 1)
                row[f"{split}_t2i_r1"] = round(s["student"]["t2i_r1"], 1)
                row[f"{split}_rsum_share"] = round(s["student"]["rsum"] / s["teacher"]["rsum"], 3)
                if "twins" in s["student"]:
                    row[f"{split}_twins_all"] = round(s["student"]["twins"]["all"], 1)
                    row[f"{split}_twins"] = json.dumps({k: round(v, 1) for k, v in s["student"]["twins"].items()})
                    row[f"{split}_teacher_twins"] = json.dumps({k: round(v, 1) for k, v in
                                                                s["teacher"]["twins"].items()})
                row[f"{split}_teacher_i2t_r1"] = round(s["teacher"]["i2t_r1"], 1)
                row[f"{split}_teacher_rsum"] = round(s["teacher"]["rsum"], 1)
            console.print(row)
            results.append(row)
    stamp = {"date": dt.date.today().isoformat(), "machine": cpu_model(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "n": args.n, "captioned": args.captioned, "steps": args.steps,
             "prepare_s": round(prepare_s, 1), "benchmark_s": round(time.perf_counter() - started, 1),
             "teacher_held_out": json.dumps({k: round(v, 1) for k, v in paths["teacher_metrics"].items()
                                             if isinstance(v, float)})}
    for row in results:
        report({**stamp, **row}, "quality", record=not args.no_record)
    if not args.no_record:
        (RESULTS / "quality_last.json").write_text(json.dumps({"stamp": stamp, "rows": results}, indent=2) + "\n")
    print(f"{len(results)} runs in {time.perf_counter() - started:.0f} s (+ {prepare_s:.0f} s preparing data and teacher)")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
