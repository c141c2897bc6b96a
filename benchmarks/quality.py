"""Ground-truth quality benchmark: distillation against training without the teacher, on procedural scenes, with
verdicts that hold statistically (docs in benchmarks/README.md#ground-truth-quality-on-procedural-scenes-qualitypy).

Teacher: the `base` pretrain preset (open_clip ViT 192/4 + text 128/3), trained once on the full scenes and
reused. Every track distils on the transfer data (2,000 captioned images among 50,000; the full plan takes every
5th: 400 among 10,000; the supervised baseline trains on the captioned pairs alone). Three disjoint held-out iid
splits: the teacher's own val (the only split its preset was tuned on), ``selection`` (checkpoints: every run
evaluates it the same number of times) and ``scoring`` (5,000 scenes, read once at the end of a run), plus the
hard and ood twins (also read once).

Tracks (students share the teacher's frozen text tower):
  transfer     MobileNetV3-Small at 64 px
  compression  MobileNetV3-Small 0.5x at 32 px (at most a tenth of the teacher's image-tower FLOPs, checked)
Methods (recipes/scenes_*.yaml):
  supervised, feature, clipkd, caption_rank    the baselines and challengers
  dsmd+NAME                                    the multiscale terms under balancer NAME; dsmd+coverage: the default
  METHOD:consistent                            the same with train.teacher_view consistent (the reinforced cache)
  caption_rank@T                               caption_rank at temperature T (chosen on the selection split)
  optima, uniform, random                      layerwise distillation (teacher online), compression track

Every cell of a track sees the same number of images (steps x 64), evaluates the selection split the same number
of times, and is paired by seed (same initialisation and data order). Convergence: a separate run at half the
budget (its own full schedule) for the deciding methods; the table compares every method with the default by a
paired bootstrap over seeds and scoring queries (benchmarks/quality_table.py). Each finished run is saved under
<work>/quality-cells/, so an interrupted benchmark resumes where it stopped, even days later; ``--restore NAME``
fills an empty store from a recorded benchmark (benchmarks/quality_store.py), so that a new machine adds seeds or
cells to it instead of training every run again. ``--jobs J`` trains J
runs at a time, each in its own process with cpu_count / J threads (on 2 cores the scenes students train as fast
on one thread as on two, so 2 jobs double the throughput: benchmarks/README.md).

    python benchmarks/quality.py --work data         # the deciding table (plan "full")
    python benchmarks/quality.py --work data --quick # a smoke run of every cell in 10 minutes: 2 seeds, 120 steps
    python benchmarks/quality.py --work data --jobs 2  # two runs at a time, one thread each
    python benchmarks/quality.py --tracks transfer --methods feature,dsmd+coverage --seeds 0 --no-record
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.common import RESULTS, cpu_model, report  # noqa: E402
from benchmarks.quality_table import at_half, best_everywhere, cells_of, judge, mark_convergence  # noqa: E402
from benchmarks.quality_table import markdown, pairwise, pairwise_markdown, with_half_budget  # noqa: E402
from benchmarks.quality_table import gather_hits, run_hits, save_all_hits  # noqa: E402
from benchmarks.quality_store import Restored, check_restored, load_run, restore, save_run  # noqa: E402

TRANSFER_STUDENT = ("mobilenetv3_small_100", 64)
COMPRESSION_STUDENT = ("mobilenetv3_small_050", 32)
STUDENTS = {"transfer": TRANSFER_STUDENT, "compression": COMPRESSION_STUDENT}
MAX_COMPUTE_RATIO = 0.1  # compression: student image-tower FLOPs / teacher's
CANDIDATE = "coverage"   # the balancer of the default recipe
DEFAULT_METHOD = f"dsmd+{CANDIDATE}"
# At most two challengers may decide beside the baselines and the default. Both ran below the default at 3 seeds
# (benchmarks/README.md, "Transfer challengers"), so they run at the side seeds and the deciding cells are three:
# 5 seeds and B/2 runs of five methods took ~165 minutes a track on 2 cores, of three about 85.
CHALLENGERS = ("caption_rank", "clipkd")
DECIDING = ("supervised", "feature", DEFAULT_METHOD)
# the consistent teacher against the clean one, and the challengers, at the side seeds
SIDE = (f"{DEFAULT_METHOD}:consistent", *CHALLENGERS)
SELECTORS = ("optima", "uniform", "random")
OTHER_BALANCERS = ("static", "magnitude", "dwa", "uncertainty", "gradnorm", "dsmd")
LABELS = {"supervised": "supervised (pairs only)", "feature": "feature", "clipkd": "CLIP-KD",
          "caption_rank": "feature + caption ranking", "dsmd": "multiscale + dsmd (as coded)",
          **{f"dsmd+{b}": f"multiscale + {b}" for b in OTHER_BALANCERS},
          DEFAULT_METHOD: f"multiscale + {CANDIDATE} (default)",
          f"{DEFAULT_METHOD}:consistent": f"multiscale + {CANDIDATE}, consistent teacher",
          "optima": "layerwise + OPTIMA", "uniform": "layerwise + uniform", "random": "layerwise + random"}
BATCH = 64
RECORD = "quality_runs"  # results/quality_runs.csv, _last.json, _last.md, _last_hits/ (the 2026-11-30 protocol's
                         # records are results/quality_seeds*, kept as they were)


@dataclass(frozen=True)
class Plan:
    """How big a benchmark run is. Budgets are steps of BATCH images, the same for every method of a track."""
    budget: dict[str, int]             # track -> steps of a deciding cell
    seeds: tuple[int, ...]             # deciding cells
    side_seeds: tuple[int, ...]        # SIDE cells, selectors, other methods
    half_seeds: tuple[int, ...]        # seeds of the budget-B/2 runs of the convergence check
    looks: int                         # evaluations of the selection split in every run
    selector_budget: float             # selector cells: this fraction of the track's budget (the teacher online)
    pull_steps: int                    # K of the selectors
    subset: int                        # 1: all training images; k: every k-th (the captioned share stays)
    converge: tuple[str, ...] = DECIDING  # methods whose convergence is checked
    held_out_every: int = 1            # selection and scoring: every k-th scene (the quick plan's smoke runs only)


# The full plan is the protocol the recorded tables ran (results/quality_runs_transfer_last.json, _compression_):
# 3,000 and 6,000 steps on every 5th training image (10,000 scenes, 400 captioned), the budgets benchmarks/README.md
# measured against half of them.
PLANS = {"full": Plan(budget={"transfer": 3000, "compression": 6000}, seeds=(0, 1, 2, 3, 4), side_seeds=(0, 1, 2),
                      half_seeds=(0, 1, 2), looks=6, selector_budget=0.25, pull_steps=10, subset=5),
         "quick": Plan(budget={"transfer": 120, "compression": 120}, seeds=(0, 1), side_seeds=(0,),
                       half_seeds=(0, 1), looks=4, selector_budget=0.5, pull_steps=10, subset=5,
                       converge=("supervised", DEFAULT_METHOD), held_out_every=5)}


# The three held-out iid splits, in that order of val.jsonl. Selection is as large as scoring: at 1,000 scenes the
# distillation cells reached its ceiling (0.996 of the teacher), where B and B/2 can no longer be told apart.
TEACHER_VAL, SELECTION, SCORING = 1000, 5000, 5000


def held_out_splits(val: Path) -> dict[str, Path]:
    """Cut the scenes' val.jsonl into three disjoint manifests beside it: ``teacher_val`` (what the teacher's
    pretraining is evaluated on, the only split its preset was tuned against), ``selection`` (checkpoints and
    every setting a cell chooses) and ``scoring`` (read once, at the end of a cell); rewritten when they differ from
    what val.jsonl gives (new scenes, other split sizes)."""
    lines = val.read_text(encoding="utf-8").splitlines()
    if len(lines) < TEACHER_VAL + SELECTION + SCORING:
        sys.exit(f"error: {val} has {len(lines)} scenes; the held-out splits need "
                 f"{TEACHER_VAL + SELECTION + SCORING}")
    bounds = {"teacher_val": (0, TEACHER_VAL), "selection": (TEACHER_VAL, TEACHER_VAL + SELECTION),
              "scoring": (TEACHER_VAL + SELECTION, TEACHER_VAL + SELECTION + SCORING)}
    out = {}
    for name, (a, b) in bounds.items():
        out[name] = write_if_changed(val.with_name(f"{name}.jsonl"), "\n".join(lines[a:b]) + "\n")
    return out


def write_if_changed(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (by rename: a killed run leaves no half-written manifest) unless it holds it
    already: a derived manifest follows its source when that changes, and keeps its file when it does not."""
    from edgedistill.core.atomic import write_text

    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        write_text(path, text)
    return path


def prepare(work: Path, n: int, captioned: int, console: Any, preset: str = "base") -> dict[str, Path]:
    """Scenes for both data variants (same training images, same seeds), the held-out splits and the teacher
    (pretrain ``preset``; the benchmark's is ``base``, others are for smoke runs); all reused when present."""
    from edgedistill.core.hashing import sha256_file
    from edgedistill.data.scenes import write_scenes
    from edgedistill.distill.pretrain import pretrain_config, pretrain_teacher

    full = work / "scenes"
    transfer = work / "scenes-transfer"
    write_scenes(full, n, seed=0, size=64, n_val=TEACHER_VAL + SELECTION + SCORING, progress=console)
    write_scenes(transfer, n, seed=0, size=64, n_val=0, n_hard=0, n_ood=0, captioned=captioned, progress=console)
    held = held_out_splits(full / "val.jsonl")
    pairs_only = transfer / "train_captioned.jsonl"
    lines = [ln for ln in (transfer / "train.jsonl").read_text().splitlines() if '"captions": []' not in ln]
    write_if_changed(pairs_only, "\n".join(lines) + "\n")  # the supervised baseline's data: the captioned pairs
    teacher = pretrain_teacher(full / "train.jsonl", held["teacher_val"], pretrain_config(preset), console=console)
    return {"full": full, "transfer": transfer, "pairs_only": pairs_only, **held,
            "teacher_json": teacher.config_json, "teacher_pt": teacher.checkpoint, "teacher_metrics": teacher.metrics,
            "teacher_scores": work / "teacher-scores" / sha256_file(teacher.checkpoint)[:16]}


def held_out_of(plan: Plan, paths: dict[str, Any]) -> dict[str, Any]:
    """``paths`` with the plan's selection and scoring splits (every ``plan.held_out_every``-th scene)."""
    k = plan.held_out_every
    return {**paths, "selection": subset(paths["selection"], k), "scoring": subset(paths["scoring"], k)}


def subset(manifest: Path, k: int) -> Path:
    """Every k-th line of ``manifest`` in a sibling file (relative image paths stay valid); k = 1: itself."""
    if k == 1:
        return manifest
    return write_if_changed(manifest.with_name(f"{manifest.stem}_every{k}.jsonl"),
                            "\n".join(manifest.read_text(encoding="utf-8").splitlines()[::k]) + "\n")


@dataclass(frozen=True)
class Run:
    """One training run of the benchmark: a method on a track with a seed and a budget in steps."""
    track: str
    method: str   # a METHOD, or METHOD:consistent
    seed: int
    steps: int

    @property
    def name(self) -> str:
        slug = self.method.replace("+", "-").replace(":", "-").replace("@", "-t")
        return f"{self.track}-{slug}-B{self.steps}-s{self.seed}"

    @property
    def base(self) -> str:
        return self.method.split("@")[0].split(":")[0]

    @property
    def temperature(self) -> float | None:
        """caption_rank's temperature of a ``caption_rank@T`` run (None: the recipe's)."""
        return float(self.method.split("@")[1]) if "@" in self.method else None


def train_manifest(method: str, paths: dict[str, Path], plan: Plan) -> Path:
    if method == "supervised":
        return subset(paths["pairs_only"], plan.subset)
    return subset(paths["transfer"] / "train.jsonl", plan.subset)


def overrides_for(run: Run, paths: dict[str, Path], plan: Plan, out: Path, cache: Path) -> tuple[Path, list[str]]:
    """The recipe and its command-line overrides for one run. Every run evaluates the selection split
    ``plan.looks`` times (at equal steps) and keeps its best checkpoint there."""
    base = run.base.split("+")[0]
    selector = run.base in SELECTORS
    recipe = REPO / "recipes" / f"scenes_{'optima' if selector else base}.yaml"
    vision, size = STUDENTS[run.track]
    if run.steps % plan.looks:
        raise ValueError(f"{run.name}: {run.steps} steps do not split into {plan.looks} equal looks")
    ov = [f"name=q-{run.name}", f"out={out}", f"seed={run.seed}",
          f"teacher.model={paths['teacher_json']}", f"teacher.pretrained={paths['teacher_pt']}",
          f"data.train={train_manifest(run.base, paths, plan)}", f"data.val={paths['selection']}",
          f"data.batch_size={BATCH}", f"cache.dir={cache}", f"student.vision={vision}", f"student.image_size={size}",
          f"train.max_steps={run.steps}", "train.epochs=1000000", f"train.warmup_steps={max(1, run.steps // 20)}",
          f"train.eval_every={run.steps // plan.looks}", f"train.checkpoint_every={run.steps}", "device=cpu"]
    if "+" in run.base:
        ov.append(f"loss.balancer={run.base.split('+')[1]}")
    if ":consistent" in run.method:
        ov.append("train.teacher_view=consistent")
    if run.temperature is not None:
        if run.base != "caption_rank":
            raise ValueError(f"{run.method}: a temperature is caption_rank's (caption_rank@T)")
        ov.append(f"loss.terms.caption_rank.temperature={run.temperature}")
    if selector:
        ov += [f"loss.balancer={CANDIDATE}", "select=" + json.dumps(
            {"name": run.base, "pull_steps": plan.pull_steps, "held_batch": 64})]
    return recipe, ov


_TEACHER_SCORES: dict[Path, dict[str, Any]] = {}


@torch.no_grad()
def embed_and_score(encode_image: Any, encode_text: Any, prep: Any, manifest_path: Path,
                    twins_path: Path | None) -> dict[str, Any]:
    """Retrieval R@1, RSUM, per-query hits and (with ``twins_path``) twin accuracy of one model on one split."""
    from edgedistill.data.images import open_image
    from edgedistill.data.manifest import load_manifest
    from edgedistill.evaluation.metrics import retrieval_metrics, twin_accuracy
    from edgedistill.evaluation.paired import retrieval_hits

    manifest = load_manifest(manifest_path)
    captions = [c for e in manifest.entries for c in e.captions]
    t2i = torch.tensor([i for i, e in enumerate(manifest.entries) for _ in e.captions])
    images = torch.cat([encode_image(torch.stack([prep(open_image(e.image)) for e in manifest.entries[i:i + 256]]))
                        for i in range(0, len(manifest), 256)]).float()
    texts = torch.cat([encode_text(captions[i:i + 512]) for i in range(0, len(captions), 512)]).float()
    m = retrieval_metrics(images, texts, t2i)
    row = {"i2t_r1": m["i2t_r1"], "t2i_r1": m["t2i_r1"], "rsum": m["rsum"],
           "hits": retrieval_hits(images, texts, t2i)}  # per query, for the paired comparison
    if twins_path is not None:
        row["twins"] = twin_accuracy(images, texts, json.loads(twins_path.read_text()), t2i)
    return row


def teacher_scores(teacher: Any, manifest_path: Path, twins_path: Path | None, store: Path | None) -> dict[str, Any]:
    """The teacher's scores on one split, computed once: kept in memory and, with ``store`` (a folder per teacher
    checkpoint, ``paths["teacher_scores"]``), on disk, so that no --jobs child embeds the split with the teacher
    again. Without per-query hits: only the students' hits are compared."""
    if manifest_path in _TEACHER_SCORES:
        return _TEACHER_SCORES[manifest_path]
    from edgedistill.core.atomic import write_json
    from edgedistill.core.hashing import sha256_file

    saved = None if store is None else store / f"{manifest_path.stem}-{sha256_file(manifest_path)[:16]}.json"
    if saved is not None and saved.is_file():
        scores = json.loads(saved.read_text(encoding="utf-8"))
    else:
        scores = embed_and_score(teacher.embed_images, teacher.embed_texts, teacher.preprocess, manifest_path,
                                 twins_path)
        scores.pop("hits")
        if saved is not None:
            saved.parent.mkdir(parents=True, exist_ok=True)
            write_json(saved, scores)  # by rename: a reader sees the whole file or none
    _TEACHER_SCORES[manifest_path] = scores
    return scores


def split_scores(model: Any, tokenizer: Any, preprocess: Any, manifest_path: Path, twins_path: Path | None,
                 teacher: Any, store: Path | None = None) -> dict[str, Any]:
    """Retrieval and twin accuracy of ``model`` and of the teacher (``teacher_scores``) on one scenes split."""
    student = embed_and_score(lambda x: model.encode_image(x, normalize=True),
                              lambda t: model.encode_text(tokenizer(t), normalize=True), preprocess, manifest_path,
                              twins_path)
    return {"student": student, "teacher": teacher_scores(teacher, manifest_path, twins_path, store)}


def scored_splits(paths: dict[str, Path]) -> dict[str, tuple[Path, Path | None]]:
    """The splits every run is scored on once, at its end: {name: (manifest, twins or None)}."""
    full = paths["full"]
    return {"scoring": (paths["scoring"], None), "hard": (full / "hard.jsonl", full / "hard_twins.json"),
            "ood": (full / "ood.jsonl", full / "ood_twins.json")}


def evaluate_run(run: Path, paths: dict[str, Path], teacher: Any) -> dict[str, Any]:
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{run / 'student'}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{run / 'student'}")
    return {name: split_scores(model, tokenizer, preprocess, manifest, twins, teacher, paths.get("teacher_scores"))
            for name, (manifest, twins) in scored_splits(paths).items()}


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


def runs_of(tracks: list[str], methods: list[str], selection_tracks: list[str], plan: Plan) -> list[Run]:
    """Every run, in run order: per track the deciding and side cells (seeds innermost), then the budget-B/2 runs
    of the convergence check."""
    out = []
    for track in tracks:
        budget = plan.budget[track]
        for method in methods:
            if method in SELECTORS:
                if track in selection_tracks:
                    steps = max(1, round(budget * plan.selector_budget / plan.looks)) * plan.looks
                    out += [Run(track, method, s, steps) for s in plan.side_seeds]
                continue
            seeds = plan.seeds if method in DECIDING else plan.side_seeds
            out += [Run(track, method, s, budget) for s in seeds]
        out += [Run(track, m, s, budget // 2) for m in plan.converge if m in methods for s in plan.half_seeds]
    return out


def build_caches(runs: list[Run], make_recipe: Any, teacher: Any, console: Any) -> float:
    """Build (or load) the teacher feature cache of every training manifest the runs use, and the reinforced
    view store where a run needs one, once, up front."""
    from edgedistill.distill.cache import caches_for_recipe, load_split_manifests
    from edgedistill.distill.views import views_for_recipe

    t0, done = time.perf_counter(), set()
    for run in runs:
        recipe, _ = make_recipe(run)
        key = (recipe.data.train, recipe.train.teacher_view)
        if recipe.train.teacher != "cached" or key in done:
            continue
        manifests = load_split_manifests(recipe)
        caches = caches_for_recipe(recipe, teacher, manifests, console)
        if recipe.train.teacher_view == "consistent":
            views_for_recipe(recipe, teacher, manifests["train"], caches["train"].cache, console)
        done.add(key)
    return time.perf_counter() - t0


def run_one(run: Run, make_recipe: Any, paths: dict[str, Path], teacher: Any, console: Any,
            store: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(row, per-query hits) of one run: from ``store`` when it finished before with the same overrides, else
    trained, scored on the held-out splits once, and saved there."""
    from edgedistill.distill.train import distill

    recipe, overrides = make_recipe(run)
    saved = load_run(store, run, overrides)
    if saved is not None:
        return saved
    shutil.rmtree(recipe.out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = distill(recipe, console=console)
    row: dict[str, Any] = {"track": run.track, "method": run.method, "seed": run.seed, "steps": summary["steps"],
                           "images_seen": summary["steps"] * BATCH, "best_step": summary.get("best_step"),
                           "selection_share": round(summary["student"]["rsum"] / summary["teacher"]["rsum"], 5),
                           "train_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}
    scores = evaluate_run(recipe.out, paths, teacher)
    row.update(score_row(scores))
    row["pulls"] = json.dumps((summary.get("selection") or {}).get("counts", {}))
    row["looks"] = sum('"eval"' in line for line in (recipe.out / "metrics.jsonl").read_text().splitlines())
    row["run_s"] = round(time.perf_counter() - t0, 1)
    hits = run_hits(scores)
    save_run(store, run, overrides, row, hits)
    shutil.rmtree(recipe.out, ignore_errors=True)  # the row and hits are what the benchmark keeps
    console.print({k: v for k, v in row.items() if not k.endswith("twins")})
    return row, hits


def child_command(argv: list[str], name: str) -> list[str]:
    """The command that trains the one run ``name`` of this invocation in a process of its own: the parent's
    options without ``--jobs``, plus ``--only NAME --no-record``."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--jobs="):
            skip = False
            continue
        skip = arg == "--jobs"
        if not skip:
            out.append(arg)
    return [sys.executable, str(Path(__file__).resolve()), *out, "--only", name, "--no-record"]


def run_parallel(runs: list[Run], jobs: int, argv: list[str], logs: Path, console: Any) -> list[str]:
    """Train ``runs`` ``jobs`` at a time, each in its own process (``child_command``) with cpu_count // jobs
    threads, its output in ``logs/<run>.log``; every finished run lands in the store. Returns the failed runs'
    names (their logs say why); the others keep running."""
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    logs.mkdir(parents=True, exist_ok=True)

    def train(run: Run) -> int:
        with open(logs / f"{run.name}.log", "w", encoding="utf-8") as log:
            return subprocess.run(child_command(argv, run.name), stdout=log, stderr=subprocess.STDOUT,
                                  env=env).returncode

    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(train, run): run for run in runs}
        for done, future in enumerate(as_completed(futures), 1):
            run, rc = futures[future], future.result()
            console.print(f"[{done}/{len(runs)}] {run.name}: " + ("done" if rc == 0 else
                          f"failed (exit {rc}; {logs / (run.name + '.log')})"), highlight=False)
            if rc != 0:
                failed.append(run.name)
    return failed


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "data", help="scenes, caches, runs and finished cells go "
                                                                     "here (reused: an interrupted run resumes)")
    ap.add_argument("--quick", action="store_true", help="the quick plan, a smoke run of every cell: 2 seeds (side "
                    "cells 1), 120 steps, a fifth of the images and held-out scenes")
    ap.add_argument("--n", type=int, default=50000, help="training scenes (the teacher trains on all of them)")
    ap.add_argument("--captioned", type=int, default=2000, help="captioned images of the transfer data")
    ap.add_argument("--budget", help="override the plan's steps per deciding cell: N, or TRACK=N,TRACK=N")
    ap.add_argument("--seeds", help="override the plan's deciding seeds, e.g. 0,1,2,3,4")
    ap.add_argument("--side-seeds", help="override the plan's seeds of the side cells and selectors")
    ap.add_argument("--half-seeds", help="override the seeds of the budget-B/2 runs ('' for none)")
    ap.add_argument("--converge", help="override the methods that get budget-B/2 runs (default: the deciding ones)")
    ap.add_argument("--subset", type=int, help="override the plan's subset (every k-th training image)")
    ap.add_argument("--tracks", default="transfer,compression")
    ap.add_argument("--methods", help="methods to run (default: the deciding cells, the side cells, the selectors)")
    ap.add_argument("--selection-tracks", default="compression", help="tracks on which the selectors run")
    ap.add_argument("--preset", default="base", help="teacher pretrain preset (others: smoke runs only)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at a time, each in its own process with "
                                                        "cpu_count / jobs threads")
    ap.add_argument("--only", help=argparse.SUPPRESS)  # a --jobs child: train this one run into the store, no table
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--restore", metavar="NAME", help="first put the runs that results/NAME_last.json records into "
                    "the store, where it was made on this CPU model with this teacher and plan; one of them is "
                    "trained again and must match its record (benchmarks/quality_store.py)")
    ap.add_argument("--record", default=RECORD, help="results/NAME.csv, NAME_last.json / .md / _hits/ (another name "
                                                     "keeps an earlier run's table, e.g. one per track)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, not {args.jobs}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", args.record):
        ap.error(f"--record is a file name stem (letters, digits, _ and -), not {args.record!r}")
    if args.restore is not None and not (re.fullmatch(r"[A-Za-z0-9_-]+", args.restore)
                                         and (RESULTS / f"{args.restore}_last.json").is_file()):
        ap.error(f"--restore names a recorded benchmark (results/NAME_last.json): {args.restore!r} is none")
    return args


def identity_of(args: argparse.Namespace, plan: Plan, paths: dict[str, Any]) -> dict[str, Any]:
    """What makes two benchmarks' runs the same runs (quality_store.IDENTITY), as the stamp records it."""
    return {"machine": cpu_model(), "torch": torch.__version__, "n": args.n, "captioned": args.captioned,
            "teacher_held_out": json.dumps({k: round(v, 1) for k, v in paths["teacher_metrics"].items()
                                            if isinstance(v, float)}), "plan": plan.__dict__}


def _seeds(text: str | None, default: tuple[int, ...]) -> tuple[int, ...]:
    return default if text is None else tuple(int(s) for s in text.split(",") if s.strip())


def plan_of(args: argparse.Namespace) -> Plan:
    plan = PLANS["quick" if args.quick else "full"]
    budget = dict(plan.budget)
    if args.budget:
        parts = [b.split("=") for b in args.budget.split(",")]
        budget = {t: int(parts[0][0]) for t in budget} if len(parts[0]) == 1 else \
            {**budget, **{t: int(n) for t, n in parts}}
    return replace(plan, budget=budget, seeds=_seeds(args.seeds, plan.seeds),
                   side_seeds=_seeds(args.side_seeds, plan.side_seeds),
                   half_seeds=_seeds(args.half_seeds, plan.half_seeds), subset=args.subset or plan.subset,
                   converge=tuple(args.converge.split(",")) if args.converge else plan.converge)


def convergence(rows: list[dict[str, Any]], plan: Plan) -> list[dict[str, Any]]:
    """Per (track, method) with budget-B/2 runs: the convergence check on the selection split, seeds paired."""
    from edgedistill.evaluation.paired import convergence_check

    out = []
    for track, budget in plan.budget.items():
        for method in plan.converge:
            full = {r["seed"]: r["selection_share"] for r in rows
                    if (r["track"], r["method"], r["steps"]) == (track, method, budget)}
            half = {r["seed"]: r["selection_share"] for r in rows
                    if (r["track"], r["method"], r["steps"]) == (track, method, budget // 2)}
            seeds = sorted(set(full) & set(half))
            if not seeds:
                continue
            check = convergence_check([full[s] for s in seeds], [half[s] for s in seeds])
            out.append({"track": track, "method": method, "budget": budget, "seeds": seeds,
                        "mean_B": float(np.mean([full[s] for s in seeds])),
                        "mean_half": float(np.mean([half[s] for s in seeds])),
                        "difference": check.mean_difference, "seed_spread": check.seed_spread,
                        "converged": check.converged, "reason": check.reason})
    return out


def convergence_markdown(checks: list[dict[str, Any]]) -> str:
    lines = ["| track | method | budget B (images) | seeds | selection share at B | at B/2 | B - B/2 | seed spread "
             "at B | converged |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in checks:
        lines.append(f"| {c['track']} | {LABELS.get(c['method'], c['method'])} | {c['budget']} "
                     f"({c['budget'] * BATCH:,}) | {len(c['seeds'])} | {c['mean_B']:.4f} | {c['mean_half']:.4f} | "
                     f"{c['difference']:+.4f} | {c['seed_spread']:.4f} | "
                     f"{'yes' if c['converged'] else 'no: ' + c['reason']} |")
    return "\n".join(lines) + "\n"


def record(stamp: dict[str, Any], rows: list[dict[str, Any]], hits: dict[tuple[str, str, int, str], Any],
           plan: Plan, record_it: bool, name: str = RECORD, skip_csv: Iterable[str] = ()) -> str:
    """Every run to results/<name>.csv (but those named in ``skip_csv``: restored from it); the table of the
    full-budget runs (each method against the default, paired), the convergence checks and the verdicts to
    <name>_last.json / .md, the hits to <name>_last_hits/."""
    full = [r for r in rows if r["steps"] == plan.budget[r["track"]] or r["method"] in SELECTORS]
    half = [r for r in rows if r not in full]
    checks = convergence(rows, plan)
    cell_hits = gather_hits({(track, method if budget == "full" else at_half(method), seed): v
                             for (track, method, seed, budget), v in hits.items()})
    table = judge(mark_convergence(cells_of(with_half_budget(full, half), cell_hits), checks))
    labels = {**LABELS, **{at_half(k): f"{v}, B/2" for k, v in LABELS.items()}}
    text = markdown(table, labels)
    if checks:  # a run without B/2 runs (the selectors, a side run) has no check to print
        text += "\nConvergence (selection split):\n\n" + convergence_markdown(checks)
    selectors = pairwise(table, SELECTORS)
    if selectors:
        text += (f"\nSelectors among themselves (paired by seed; {plan.selector_budget:g} of the track's budget, "
                 f"the teacher online):\n\n" + pairwise_markdown(selectors, labels))
    winners = best_everywhere(table, candidates=[m for m in DECIDING if m != "supervised"])
    skip = set(skip_csv)
    for row in rows:
        if Run(row["track"], row["method"], row["seed"], row["steps"]).name not in skip:
            report({**stamp, **row}, name, record=record_it)
    if record_it:
        save_all_hits(RESULTS / f"{name}_last.json", table)  # <name>_last_hits/, one .npz per cell
        (RESULTS / f"{name}_last.json").write_text(json.dumps(
            {"stamp": stamp, "rows": full, "half_budget_rows": half,
             "cells": [c.as_json() for c in table], "convergence": checks,
             "selectors": [pair_json(a, b, c) for a, b, c in selectors],
             "best_or_tied_everywhere": winners}, indent=2) + "\n")
        (RESULTS / f"{name}_last.md").write_text(text)
    return text + winners_line(winners, list(dict.fromkeys(c.track for c in table)))


def pair_json(a: Any, b: Any, c: Any) -> dict[str, Any]:
    """One of quality_table.pairwise's comparisons as the results file records it (A - B)."""
    out: dict[str, Any] = {"track": a.track, "a": a.method, "b": b.method}
    if c is not None:
        out.update({"estimate": c.estimate, "ci95": [c.low, c.high], "verdict": c.verdict, "reason": c.reason,
                    "seeds": c.n_seeds})
    return out


def winners_line(winners: list[str], tracks: list[str]) -> str:
    """The closing line: which deciding methods no cell beats on the tracks this run has (a cell whose budget is
    short of convergence does not qualify, quality_table.best_everywhere)."""
    where = f"on the {tracks[0]} track" if len(tracks) == 1 else "on every track"
    return (f"\nbest, or no difference shown from the best, {where} (cells past convergence only): "
            f"{', '.join(winners) or 'none'}\n")


def main() -> None:
    args = parse()
    plan = plan_of(args)
    from rich.console import Console

    from edgedistill.distill.recipe import load_recipe
    from edgedistill.distill.teachers import load_teacher

    console = Console(stderr=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    paths = held_out_of(plan, prepare(args.work, args.n, args.captioned, console, args.preset))
    prepare_s = time.perf_counter() - t0
    started = time.perf_counter()

    def make_recipe(run: Run) -> tuple[Any, list[str]]:
        recipe, ov = overrides_for(run, paths, plan, args.work / "quality-runs" / run.name, args.work / "cache")
        return load_recipe(recipe, ov), ov

    teacher = load_teacher(make_recipe(Run("transfer", "feature", 0, plan.looks))[0].teacher, "cpu")
    tracks = args.tracks.split(",")
    compute = compute_of(lambda track: make_recipe(Run(track, "feature", 0, plan.looks))[0], teacher, tracks,
                         strict=args.preset == "base")
    methods = (args.methods or ",".join((*DECIDING, *SIDE, *SELECTORS))).split(",")
    runs = runs_of(tracks, methods, args.selection_tracks.split(","), plan)
    if args.only:  # a --jobs child
        runs = [r for r in runs if r.name == args.only]
        if not runs:
            sys.exit(f"error: no run named {args.only} in this plan")
    cache_s = build_caches(runs, make_recipe, teacher, console)
    store = args.work / "quality-cells"
    if args.only:
        run_one(runs[0], make_recipe, paths, teacher, console, store)
        return
    identity = identity_of(args, plan, paths)
    restored = Restored(runs=[])
    if args.restore:
        try:
            restored = restore(store, RESULTS / f"{args.restore}_last.json", runs, lambda r: make_recipe(r)[1],
                               identity)
        except ValueError as e:
            console.print(f"error: {e}", highlight=False)
            sys.exit(2)
        console.print(f"restored {len(restored.runs)} runs from {args.restore}; {restored.check} is trained again "
                      "as the check", highlight=False)
    pending = [r for r in runs if load_run(store, r, make_recipe(r)[1]) is None] if args.jobs > 1 else []
    pending.sort(key=lambda r: r.seed)  # seed by seed: a benchmark cut short still holds whole seed pairs
    if pending:  # trained in child processes into the store; the loop below reads them back
        for manifest, twins in scored_splits(paths).values():  # once, here, for every child to read
            teacher_scores(teacher, manifest, twins, paths["teacher_scores"])
        failed = run_parallel(pending, args.jobs, sys.argv[1:], args.work / "quality-logs", console)
        if failed:
            sys.exit(f"error: {len(failed)} runs failed: {', '.join(failed)} (logs in {args.work / 'quality-logs'})")
    rows, hits = [], {}
    for i, run in enumerate(runs):
        console.print(f"[{i + 1}/{len(runs)}] {run.name}", highlight=False)
        row, run_hits_ = run_one(run, make_recipe, paths, teacher, console, store)
        rows.append(row)
        full = run.steps == plan.budget[run.track] or run.method in SELECTORS
        hits[(run.track, run.method, run.seed, "full" if full else "half")] = run_hits_
        if run.name == restored.check:
            try:
                check_restored(store, restored, (row, run_hits_))
            except ValueError as e:
                console.print(f"error: {e}", highlight=False)
                sys.exit(2)
    stamp = {"date": dt.date.today().isoformat(), **identity, "threads": torch.get_num_threads(),
             "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
             "plan": json.dumps(plan.__dict__), **compute,
             "prepare_s": round(prepare_s, 1), "cache_s": round(cache_s, 1),
             "benchmark_s": round(time.perf_counter() - started, 1),
             "train_s_sum": round(sum(r["run_s"] for r in rows), 1),
             "restored_from": args.restore or "", "restored_runs": len(restored.runs),
             "restore_check": restored.check or ""}
    print(record(stamp, rows, hits, plan, not args.no_record, args.record, skip_csv=restored.runs))
    print(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s after the teacher (cache {cache_s:.0f} s; "
          f"+ {prepare_s:.0f} s preparing data and teacher)")


if __name__ == "__main__":
    main()
