"""Ground-truth quality benchmark: distillation methods on procedural scenes, against exact answers, with seeds.

Teacher: the `base` pretrain preset (open_clip ViT 192/4 + text 128/3), trained once on the full scenes and
reused. Every track distils on the transfer data (2,000 captioned images among 50,000; the supervised baseline
trains on the 2,000 pairs alone) and evaluates on held-out iid scenes, hard twins and ood twins.

Tracks (students share the teacher's frozen text tower):
  transfer     MobileNetV3-Small at 64 px (recipes/scenes_*.yaml as written)
  compression  a student with at most a tenth of the teacher's image-tower FLOPs, chosen so that feature-only
               distillation stays below saturation (COMPRESSION_STUDENT; FLOPs measured and checked every run)
  full         (optional) the transfer student on fully captioned data
Methods:
  supervised, feature, clipkd   recipes/scenes_supervised, scenes_feature, scenes_clipkd
  dsmd                          the multiscale terms with the official DSMD code's balancer (recipes/scenes_dsmd)
  dsmd+NAME                     the same terms with balancer NAME; dsmd+coverage is the default candidate
  optima, uniform, random       layerwise distillation (recipes/scenes_optima, teacher online), module selector
                                NAME, the multiscale terms under the candidate balancer; compression track
Cells that decide the default (DECIDING) and the selectors run every seed of the plan; the table shows mean ±
std and calls a difference smaller than the seed spread a tie (benchmarks/quality_table.py). Scores: R@1, RSUM
share of the teacher on iid / hard / ood, twin accuracy per edit type.

    python benchmarks/quality.py                 # the deciding table: 2 tracks x 6 methods x 3 seeds + selectors
    python benchmarks/quality.py --quick         # 1 seed, fewer steps, a fifth of the images
    python benchmarks/quality.py --tracks transfer --methods feature,dsmd --seeds 0 --steps 100 --no-record
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, cpu_model, report  # noqa: E402
from benchmarks.quality_table import best_everywhere, cells_of, judge, markdown  # noqa: E402
from benchmarks.quality_table import gather_hits, run_hits, save_all_hits  # noqa: E402

TRANSFER_STUDENT = ("mobilenetv3_small_100", 64)
COMPRESSION_STUDENT = ("mobilenetv3_small_050", 32)
STUDENTS = {"transfer": TRANSFER_STUDENT, "compression": COMPRESSION_STUDENT, "full": TRANSFER_STUDENT}
MAX_COMPUTE_RATIO = 0.1  # compression: student image-tower FLOPs / teacher's
CANDIDATE = "coverage"   # the balancer proposed as the default
ALTERNATIVE = "uncertainty"  # the best other balancer of the 2026-11-23 table (iid 0.987, hard 0.996); --screen
DECIDING = ("supervised", "feature", "clipkd", f"dsmd+{CANDIDATE}", "dsmd", f"dsmd+{ALTERNATIVE}")
SELECTORS = ("optima", "uniform", "random")
OTHER_BALANCERS = ("static", "magnitude", "dwa", "uncertainty", "gradnorm")
LABELS = {"supervised": "supervised (pairs only)", "feature": "feature", "clipkd": "CLIP-KD",
          "dsmd": "multiscale + dsmd (as coded)", **{f"dsmd+{b}": f"multiscale + {b}" for b in OTHER_BALANCERS},
          f"dsmd+{CANDIDATE}": f"multiscale + {CANDIDATE} (candidate)",
          "optima": "layerwise + OPTIMA", "uniform": "layerwise + uniform", "random": "layerwise + random"}


@dataclass(frozen=True)
class Plan:
    """How big a benchmark run is; ``full`` fits 60 minutes on 2 cores after the teacher, ``quick`` 10."""
    steps: int             # distillation steps of every method cell
    seeds: tuple[int, ...]
    selection_steps: int   # steps of a selector cell (the teacher runs online: about 2.3x a cached step)
    pull_steps: int        # K of the selectors
    subset: int            # 1: all training images; k: every k-th (the captioned share stays the same)


PLANS = {"full": Plan(steps=400, seeds=(0, 1, 2), selection_steps=180, pull_steps=10, subset=1),
         "quick": Plan(steps=150, seeds=(0,), selection_steps=60, pull_steps=10, subset=5)}


TEACHER_VAL, SELECTION, SCORING = 1000, 1000, 5000  # the three held-out iid splits, in that order of val.jsonl


def held_out_splits(val: Path) -> dict[str, Path]:
    """Cut the scenes' val.jsonl into three disjoint manifests beside it: ``teacher_val`` (what the teacher's
    pretraining is evaluated on, the only split its preset was tuned against), ``selection`` (checkpoints and
    every setting a cell chooses) and ``scoring`` (read once, at the end of a cell). Rewritten only when absent."""
    lines = val.read_text(encoding="utf-8").splitlines()
    if len(lines) < TEACHER_VAL + SELECTION + SCORING:
        sys.exit(f"error: {val} has {len(lines)} scenes; the held-out splits need "
                 f"{TEACHER_VAL + SELECTION + SCORING}")
    bounds = {"teacher_val": (0, TEACHER_VAL), "selection": (TEACHER_VAL, TEACHER_VAL + SELECTION),
              "scoring": (TEACHER_VAL + SELECTION, TEACHER_VAL + SELECTION + SCORING)}
    out = {}
    for name, (a, b) in bounds.items():
        out[name] = val.with_name(f"{name}.jsonl")
        if not out[name].exists():
            out[name].write_text("\n".join(lines[a:b]) + "\n", encoding="utf-8")
    return out


def prepare(work: Path, n: int, captioned: int, console: Any, preset: str = "base") -> dict[str, Path]:
    """Scenes for both data variants (same training images, same seeds), the held-out splits and the teacher
    (pretrain ``preset``; the benchmark's is ``base``, others are for smoke runs); all reused when present."""
    from edgedistill.data.scenes import write_scenes
    from edgedistill.distill.pretrain import pretrain_config, pretrain_teacher

    full = work / "scenes"
    transfer = work / "scenes-transfer"
    write_scenes(full, n, seed=0, size=64, n_val=TEACHER_VAL + SELECTION + SCORING, progress=console)
    write_scenes(transfer, n, seed=0, size=64, n_val=0, n_hard=0, n_ood=0, captioned=captioned, progress=console)
    held = held_out_splits(full / "val.jsonl")
    pairs_only = transfer / "train_captioned.jsonl"
    if not pairs_only.exists():  # the supervised baseline's transfer data: only the captioned pairs
        lines = [ln for ln in (transfer / "train.jsonl").read_text().splitlines() if '"captions": []' not in ln]
        pairs_only.write_text("\n".join(lines) + "\n")
    teacher = pretrain_teacher(full / "train.jsonl", held["teacher_val"], pretrain_config(preset), console=console)
    return {"full": full, "transfer": transfer, "pairs_only": pairs_only, **held,
            "teacher_json": teacher.config_json, "teacher_pt": teacher.checkpoint, "teacher_metrics": teacher.metrics}


def subset(manifest: Path, k: int) -> Path:
    """Every k-th line of ``manifest`` in a sibling file (relative image paths stay valid); k = 1: itself."""
    if k == 1:
        return manifest
    out = manifest.with_name(f"{manifest.stem}_every{k}.jsonl")
    if not out.exists():
        lines = manifest.read_text().splitlines()[::k]
        out.write_text("\n".join(lines) + "\n")
    return out


def train_manifest(track: str, method: str, paths: dict[str, Path], plan: Plan) -> Path:
    if track == "full":
        return subset(paths["full"] / "train.jsonl", plan.subset)
    if method == "supervised":
        return subset(paths["pairs_only"], plan.subset)
    return subset(paths["transfer"] / "train.jsonl", plan.subset)


def overrides_for(track: str, method: str, seed: int, paths: dict[str, Path], plan: Plan, out: Path,
                  cache: Path) -> tuple[Path, list[str]]:
    """The recipe and its command-line overrides for one cell and seed."""
    base = method.split("+")[0]
    selector = method in SELECTORS
    recipe = REPO / "recipes" / f"scenes_{'optima' if selector else base}.yaml"
    steps = plan.selection_steps if selector else plan.steps
    vision, size = STUDENTS[track]
    ov = [f"name=q-{track}-{method.replace('+', '-')}-s{seed}", f"out={out}", f"seed={seed}",
          f"teacher.model={paths['teacher_json']}", f"teacher.pretrained={paths['teacher_pt']}",
          f"data.train={train_manifest(track, method, paths, plan)}", f"data.val={paths['full'] / 'val.jsonl'}",
          f"cache.dir={cache}", f"student.vision={vision}", f"student.image_size={size}",
          f"train.max_steps={steps}", f"train.warmup_steps={max(1, steps // 20)}",
          f"train.checkpoint_every={steps}", "device=cpu"]
    if "+" in method:
        ov.append(f"loss.balancer={method.split('+')[1]}")
    if selector:
        ov += [f"loss.balancer={CANDIDATE}", "select=" + json.dumps(
            {"name": method, "pull_steps": plan.pull_steps, "held_batch": 64})]
    return recipe, ov


_TEACHER_SCORES: dict[Path, dict[str, Any]] = {}
HITS: dict[tuple[str, str, int], dict[str, Any]] = {}  # (track, method, seed) -> per-query hits of each split


@torch.no_grad()
def split_scores(model: Any, tokenizer: Any, preprocess: Any, manifest_path: Path, twins_path: Path | None,
                 teacher: Any) -> dict[str, Any]:
    """Retrieval and twin accuracy of ``model`` (and the teacher, scored once) on one scenes split."""
    from edgedistill.data.images import open_image
    from edgedistill.data.manifest import load_manifest
    from edgedistill.evaluation.metrics import retrieval_metrics, twin_accuracy
    from edgedistill.evaluation.paired import retrieval_hits

    manifest = load_manifest(manifest_path)
    captions = [c for e in manifest.entries for c in e.captions]
    t2i = torch.tensor([i for i, e in enumerate(manifest.entries) for _ in e.captions])
    out = {"teacher": _TEACHER_SCORES[manifest_path]} if manifest_path in _TEACHER_SCORES else {}
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
        row = {"i2t_r1": m["i2t_r1"], "t2i_r1": m["t2i_r1"], "rsum": m["rsum"],
               "hits": retrieval_hits(images, texts, t2i)}  # per query, for the paired comparison
        if twins_path is not None:
            row["twins"] = twin_accuracy(images, texts, json.loads(twins_path.read_text()), t2i)
        out[who] = row
    _TEACHER_SCORES[manifest_path] = out["teacher"]
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


def score_row(scores: dict[str, Any]) -> dict[str, Any]:
    """R@1, RSUM share, twin accuracy (all, bind, swap-position and every edit as JSON) per split."""
    row: dict[str, Any] = {}
    for split, s in scores.items():
        student, teacher = s["student"], s["teacher"]
        row[f"{split}_i2t_r1"] = round(student["i2t_r1"], 1)
        row[f"{split}_t2i_r1"] = round(student["t2i_r1"], 1)
        row[f"{split}_rsum_share"] = round(student["rsum"] / teacher["rsum"], 4)
        if "twins" in student:
            for edit in ("all", "bind", "swap-position"):
                row[f"{split}_twins_{edit}"] = round(student["twins"].get(edit, float("nan")), 1)
            row[f"{split}_twins"] = json.dumps({k: round(v, 1) for k, v in student["twins"].items()})
            row[f"{split}_teacher_twins"] = json.dumps({k: round(v, 1) for k, v in teacher["twins"].items()})
        row[f"{split}_teacher_i2t_r1"] = round(teacher["i2t_r1"], 1)
        row[f"{split}_teacher_rsum"] = round(teacher["rsum"], 1)
    return row


def image_flops(module: torch.nn.Module, size: int) -> int:
    """FLOPs of one (1, 3, size, size) forward of an image tower (torch's FLOP counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module.eval()(torch.zeros(1, 3, size, size))
    return int(counter.get_total_flops())


def compute_of(recipe_for: Any, teacher: Any, tracks: list[str], strict: bool = True) -> dict[str, Any]:
    """Image-tower FLOPs and parameters of the teacher and each track's student; the compression ratio checked
    (``strict``: a ratio above MAX_COMPUTE_RATIO stops the benchmark; else a warning, for smoke teachers)."""
    from edgedistill.runtime.preprocess import image_side
    from edgedistill.distill.students import build_student

    t_size = image_side(teacher.preprocess_cfg)
    out: dict[str, Any] = {"teacher_image_mflops": round(image_flops(teacher.model.visual, t_size) / 1e6, 2),
                           "teacher_image_params_m": round(sum(p.numel() for p in teacher.model.visual.parameters())
                                                           / 1e6, 3)}
    for track in tracks:
        recipe = recipe_for(track)
        student = build_student(recipe.student, teacher, f"flops-{track}")
        out[f"{track}_student"] = f"{recipe.student.vision} {recipe.student.image_size} px"
        out[f"{track}_image_mflops"] = round(image_flops(student.model.visual, recipe.student.image_size) / 1e6, 2)
        out[f"{track}_image_params_m"] = round(sum(p.numel() for p in student.model.visual.parameters()) / 1e6, 3)
        out[f"{track}_compute_ratio"] = round(out[f"{track}_image_mflops"] / out["teacher_image_mflops"], 4)
    ratio = out.get("compression_compute_ratio")
    if ratio is not None and not ratio <= MAX_COMPUTE_RATIO:  # NaN fails too
        message = (f"the compression student has {ratio:.3f} of the teacher's image-tower FLOPs, more than "
                   f"{MAX_COMPUTE_RATIO}; choose a smaller COMPRESSION_STUDENT")
        if strict:
            sys.exit(f"error: {message}")
        print(f"warning: {message} (a smoke teacher: not a compression track)", file=sys.stderr)
    return out


def cells(args: argparse.Namespace, plan: Plan) -> list[tuple[str, str, int]]:
    """(track, method, seed) of every run, in run order: seeds innermost, so a cell's seeds run together."""
    out = []
    for track in args.tracks.split(","):
        for method in args.methods.split(","):
            if method in SELECTORS and track not in args.selection_tracks.split(","):
                continue
            out += [(track, method, seed) for seed in plan.seeds]
    return out


def build_caches(jobs: list[tuple[str, str, int]], make_recipe: Any, teacher: Any, console: Any) -> float:
    """Build (or load) the teacher feature cache of every training manifest the runs use, once, up front."""
    from edgedistill.distill.cache import caches_for_recipe, load_split_manifests

    t0, done = time.perf_counter(), set()
    for track, method, seed in jobs:
        recipe = make_recipe(track, method, seed)
        if recipe.train.teacher != "cached" or recipe.data.train in done:
            continue
        caches_for_recipe(recipe, teacher, load_split_manifests(recipe), console)
        done.add(recipe.data.train)
    return time.perf_counter() - t0


def run_one(track: str, method: str, seed: int, make_recipe: Any, paths: dict[str, Path], teacher: Any,
            console: Any) -> dict[str, Any]:
    from edgedistill.distill.train import distill

    recipe = make_recipe(track, method, seed)
    shutil.rmtree(recipe.out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = distill(recipe, console=console)
    row: dict[str, Any] = {"track": track, "method": method, "seed": seed, "steps": summary["steps"],
                           "train_s": round(time.perf_counter() - t0, 1)}
    scores = evaluate_run(recipe.out, paths, teacher)
    row.update(score_row(scores))
    HITS[(track, method, seed)] = run_hits(scores)
    selection = summary.get("selection") or {}
    row["pulls"] = json.dumps(selection.get("counts", {}))
    row["run_s"] = round(time.perf_counter() - t0, 1)
    console.print({k: v for k, v in row.items() if not k.endswith("twins")})
    return row


def screen(make_recipe: Any, paths: dict[str, Path], teacher: Any, console: Any) -> str:
    """--screen: every other balancer once (seed 0) on the compression track; the best by iid share."""
    rows = [run_one("compression", f"dsmd+{b}", 0, make_recipe, paths, teacher, console) for b in OTHER_BALANCERS]
    best = max(rows, key=lambda r: r["iid_rsum_share"])
    console.print(f"screen: {[(r['method'], r['iid_rsum_share']) for r in rows]} -> {best['method']}")
    return best["method"].split("+")[1]


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "data", help="scenes, caches and runs go here (reused)")
    ap.add_argument("--quick", action="store_true", help="the quick plan: 1 seed, fewer steps, fewer images")
    ap.add_argument("--n", type=int, default=50000, help="training scenes (the teacher trains on all of them)")
    ap.add_argument("--captioned", type=int, default=2000, help="captioned images of the transfer data")
    ap.add_argument("--steps", type=int, help="override the plan's steps per method cell")
    ap.add_argument("--selection-steps", type=int, help="override the plan's steps per selector cell")
    ap.add_argument("--seeds", help="override the plan's seeds, e.g. 0,1,2")
    ap.add_argument("--subset", type=int, help="override the plan's subset (every k-th training image)")
    ap.add_argument("--tracks", default="transfer,compression")
    ap.add_argument("--methods", help="methods to run (default: the deciding cells and the selectors)")
    ap.add_argument("--selection-tracks", default="compression", help="tracks on which the selectors run")
    ap.add_argument("--screen", action="store_true",
                    help=f"first pick the alternative balancer (default {ALTERNATIVE}) by one compression run each")
    ap.add_argument("--compression-student", help="NAME:SIZE, a timm tower and its input size (default "
                                                  f"{COMPRESSION_STUDENT[0]}:{COMPRESSION_STUDENT[1]})")
    ap.add_argument("--preset", default="base", help="teacher pretrain preset (others: smoke runs only)")
    ap.add_argument("--no-record", action="store_true")
    return ap.parse_args()


def plan_of(args: argparse.Namespace) -> Plan:
    plan = PLANS["quick" if args.quick else "full"]
    return Plan(steps=args.steps or plan.steps,
                seeds=tuple(int(s) for s in args.seeds.split(",")) if args.seeds else plan.seeds,
                selection_steps=args.selection_steps or plan.selection_steps, pull_steps=plan.pull_steps,
                subset=args.subset or plan.subset)


def record(stamp: dict[str, Any], rows: list[dict[str, Any]], deciding: list[str], record_it: bool) -> str:
    """Append every run to results/quality_seeds.csv; the cells, verdicts and table to quality_seeds_last.*."""
    table = judge(cells_of(rows, gather_hits(HITS)))
    text = markdown(table, LABELS)
    winners = best_everywhere(table, candidates=[m for m in deciding if m != "supervised"])
    for row in rows:
        report({**stamp, **row}, "quality_seeds", record=record_it)
    if record_it:
        save_all_hits(RESULTS / "quality_seeds_last.json", table)  # quality_seeds_last_hits/, one .npz per cell
        cells_json = [c.as_json() for c in table]
        (RESULTS / "quality_seeds_last.json").write_text(json.dumps(
            {"stamp": stamp, "rows": rows, "cells": cells_json, "best_or_tied_everywhere": winners},
            indent=2) + "\n")
        (RESULTS / "quality_seeds_last.md").write_text(text)
    return text + f"\nbest or tied with the best on every track: {', '.join(winners) or 'none'}\n"


def main() -> None:
    args = parse()
    plan = plan_of(args)
    from rich.console import Console

    from edgedistill.distill.recipe import load_recipe
    from edgedistill.distill.teachers import load_teacher

    console = Console(stderr=True)
    torch.manual_seed(0)
    if args.compression_student:
        name, size = args.compression_student.split(":")
        STUDENTS["compression"] = (name, int(size))
    t0 = time.perf_counter()
    paths = prepare(args.work, args.n, args.captioned, console, args.preset)
    prepare_s = time.perf_counter() - t0
    started = time.perf_counter()

    def make_recipe(track: str, method: str, seed: int) -> Any:
        out = args.work / "quality-runs" / f"{track}-{method.replace('+', '-')}-s{seed}"
        return load_recipe(*overrides_for(track, method, seed, paths, plan, out, args.work / "cache"))

    teacher = load_teacher(make_recipe("transfer", "feature", 0).teacher, "cpu")
    compute = compute_of(lambda track: make_recipe(track, "feature", 0), teacher, args.tracks.split(","),
                         strict=args.preset == "base")
    alternative = screen(make_recipe, paths, teacher, console) if args.screen else ALTERNATIVE
    deciding = [*DECIDING[:-1], f"dsmd+{alternative}"]
    methods = args.methods or ",".join((*deciding, *SELECTORS))
    jobs = cells(argparse.Namespace(**{**vars(args), "methods": methods}), plan)
    cache_s = build_caches(jobs, make_recipe, teacher, console)
    rows = [run_one(*job, make_recipe, paths, teacher, console) for job in jobs]
    stamp = {"date": dt.date.today().isoformat(), "machine": cpu_model(), "threads": torch.get_num_threads(),
             "torch": torch.__version__, "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
             "plan": json.dumps(plan.__dict__), "n": args.n, "captioned": args.captioned,
             "alternative": alternative, **compute, "prepare_s": round(prepare_s, 1), "cache_s": round(cache_s, 1),
             "benchmark_s": round(time.perf_counter() - started, 1),
             "teacher_held_out": json.dumps({k: round(v, 1) for k, v in paths["teacher_metrics"].items()
                                             if isinstance(v, float)})}
    print(record(stamp, rows, deciding, not args.no_record))
    print(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s after the teacher (cache {cache_s:.0f} s; "
          f"+ {prepare_s:.0f} s preparing data and teacher)")


if __name__ == "__main__":
    main()
