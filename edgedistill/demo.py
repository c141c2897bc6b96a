"""``edgedistill demo``: the whole job offline, on built-in data, from a fresh install.

scenes (procedural images with exact captions) -> an open_clip CLIP teacher trained on them (once per machine,
then reused) -> teacher feature cache -> a MobileNetV3 student distilled with the default recipe on the user's
case (a few captioned pairs among many uncaptioned images), and the same student trained on the captioned pairs
alone, so the report shows what the teacher gave -> ONNX FP32 and calibrated INT8 -> ``bench`` on the CPU -> a
table of teacher vs student artifacts: retrieval Recall@1/5/10, RSUM, size, CPU latency, the compression (size and
latency ratios), with bench's full report (bench.json, bench.md, pareto.png) beside it.

The compression claim is bench's: the latency ratio from teacher and student taking turns over several rounds
(median and range), the size ratio of everything a device holds (image encoder, text encoder, tokenizer files),
and the load average around the timing with a warning when other work shared the CPU.

Every stage is the toolkit's ordinary code path (the same functions ``data scenes``, ``distill`` and
``export`` and ``bench`` run), so the demo is also an end-to-end check of a machine.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from rich import box
from rich.console import Console
from rich.table import Table

import edgedistill.core.atomic as atomic
from edgedistill.runtime.loader import load
from edgedistill.bench.report import size_ratio
from edgedistill.bench.runner import BenchOptions, run_bench
from edgedistill.bench.timing import ratio_text
from edgedistill.data.scenes import write_scenes
from edgedistill.export.exporter import ExportOptions, run_export
from edgedistill.core.gates import finite
from edgedistill.runtime.index import build_index, open_index
from edgedistill.core.locations import default_cache_root
from edgedistill.distill.pretrain import pretrain_config, pretrain_teacher
from edgedistill.distill.recipe import validate_recipe
from edgedistill.runtime.sheets import Hit, png_sheet
from edgedistill.core.terminal import make_console, safe
from edgedistill.distill.train import distill
from edgedistill.core.errors import UserError

MARKER = "demo.json"  # a folder holding this is a demo run the next demo may replace


@dataclass(frozen=True)
class DemoSize:
    """How big each stage is; ``full`` fits 10 minutes on 2 CPU cores, ``quick`` two (the tests)."""
    name: str
    scenes: int             # training images
    val: int                # held-out images
    teacher: str            # pretrain preset
    student: str            # timm vision tower
    captioned: int          # training images that keep their captions (the rest are uncaptioned)
    steps: int              # distillation steps
    batch: int
    lr: float
    calib: int              # INT8 calibration images
    latency_iters: int


SIZES = {
    # The full demo's teacher (preset medium: a 0.99M-parameter ViT) is larger and slower than its student's
    # image tower (MobileNetV3-Small 0.5x at 64 px, 0.70M); the quick one is a pipeline check whose tiny teacher
    # is smaller than any student.
    "full": DemoSize("full", scenes=20000, val=1000, teacher="medium", student="mobilenetv3_small_050", captioned=2000,
                     steps=1200,
                     batch=64, lr=3e-3, calib=256, latency_iters=50),
    "quick": DemoSize("quick", scenes=3000, val=200, teacher="tiny", student="mobilenetv3_small_050", captioned=300,
                      steps=120,
                      batch=32, lr=3e-3, calib=32, latency_iters=10),
}
IMAGE_SIZE = 64


def _recipe(size: DemoSize, train: Path, val: Path, teacher: dict[str, str], out: Path, cache_dir: Path,
            loss: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo's recipe: the recipe defaults' loss (``loss`` None) or the given one."""
    return {
        "name": f"demo-{size.name}" + ("" if loss is None else "-without-teacher"),
        "seed": 0,
        "out": str(out),
        "device": "auto",
        "teacher": teacher,
        "student": {"vision": size.student, "text": "teacher", "image_size": IMAGE_SIZE},
        "data": {"train": str(train), "val": str(val), "batch_size": size.batch,
                 "workers": 0,  # 64 px JPEGs decode faster in-process than through worker pipes on 2 cores
                 "in_memory": True,  # ... and once, not at every step (the same training)
                 # captions name positions and left/right: no flips, crops that keep objects where they were
                 "augment": {"scale": [0.85, 1.0], "hflip": False}},
        "cache": {"dir": str(cache_dir)},
        "train": {"epochs": 1000, "max_steps": size.steps, "lr": size.lr, "warmup_steps": max(1, size.steps // 20),
                  "log_every": 20, "eval_every": 0, "checkpoint_every": max(50, size.steps // 4),
                  "tensorboard": False},
        "eval": {"prompt": "a photo of a {label}."},
        **({} if loss is None else {"loss": loss}),
    }


WITHOUT_TEACHER = {"terms": ["clip"], "balancer": "static"}  # the captioned pairs' own contrastive loss, no teacher


def user_data(data: Path, captioned: int) -> tuple[Path, Path]:
    """The user's case cut from the scenes' train.jsonl (beside it, reused): (every image, only the first
    ``captioned`` keeping their captions; the captioned pairs alone)."""
    lines = (data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    few, pairs = data / f"train_captioned{captioned}.jsonl", data / f"train_pairs{captioned}.jsonl"
    if not few.is_file():
        blank = [json.dumps({**json.loads(line), "captions": []}, ensure_ascii=False) for line in lines[captioned:]]
        atomic.write_text(few, "\n".join(lines[:captioned] + blank) + "\n")
    if not pairs.is_file():
        atomic.write_text(pairs, "\n".join(lines[:captioned]) + "\n")
    return few, pairs


def _prepare_out(out: Path) -> None:
    """Replace a previous demo in ``out``; refuse to touch a folder that is something else."""
    atomic.writable_dir(out, "--out")
    if any(out.iterdir()):
        if not (out / MARKER).is_file() and not (out / "recipe.yaml").is_file():
            raise UserError(f"{out} exists and is not a demo run; choose another --out or delete it")
        if (out / "recipe.yaml").is_file() and not (out / MARKER).is_file():
            raise UserError(f"{out} holds a distill run that is not a demo; choose another --out")
        shutil.rmtree(out)


class _Stages:
    """Times each stage under its rule line: ``with stages("scenes", "1/6 scenes: ..."):``."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, title: str) -> Iterator[None]:
        self.console.rule(title)
        t0 = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t0, 1)
        self.console.print(f"{name} done in {self.seconds[name]:.1f} s", highlight=False, markup=False)


def run_demo(out: Path = Path("runs/demo"), quick: bool = False, console: Console | None = None) -> dict[str, Any]:
    """Run every stage; returns the report written to ``out/demo.json``."""
    console = console or make_console(stderr=True, soft_wrap=True)
    size = SIZES["quick" if quick else "full"]
    out = Path(out)
    _prepare_out(out)
    started = time.perf_counter()
    stage = _Stages(console)
    root = default_cache_root()
    data = root / "scenes" / f"demo-{size.name}-{size.scenes}-{IMAGE_SIZE}px"
    with stage("scenes", f"1/7 scenes: {size.scenes} training images, {size.val} held out ({IMAGE_SIZE} px)"):
        write_scenes(data, size.scenes, seed=0, size=IMAGE_SIZE, n_val=size.val, n_hard=0, n_ood=0,
                     progress=console)
    with stage("teacher", f"2/7 teacher: open_clip CLIP, preset {size.teacher} (trained once, then reused)"):
        teacher = pretrain_teacher(data / "train.jsonl", data / "val.jsonl", pretrain_config(size.teacher),
                                   console=console)
        console.print(f"teacher {'reused from' if teacher.reused else 'saved to'} {teacher.folder}; held-out "
                      f"image->text R@1 {teacher.metrics.get('i2t_r1', float('nan')):.1f}%", highlight=False)
    few, pairs = user_data(data, size.captioned)
    with stage("distill", f"3/7 distill: {size.student} student, default recipe, {size.steps} steps, "
                          f"{size.captioned} of {size.scenes} images captioned"):
        summary = distill(validate_recipe(_recipe(size, few, data / "val.jsonl", teacher.teacher_config(), out, root),
                                          "demo recipe"), console=console)
    with stage("without_teacher", f"4/7 without the teacher: the same student on the {size.captioned} captioned "
                                  f"pairs alone, {size.steps} steps"):
        alone = distill(validate_recipe(_recipe(size, pairs, data / "val.jsonl", teacher.teacher_config(),
                                                out / "without-teacher", root, WITHOUT_TEACHER), "demo recipe"),
                        console=console)
    with stage("export", "5/7 export: ONNX FP32 and calibrated INT8, checked against PyTorch"):
        run_export(ExportOptions(run_dir=out, format="onnx", int8=True, int8_required=False, calib_size=size.calib,
                                 out=out / "export"), console)
    threads = torch.get_num_threads()
    with stage("bench", "6/7 bench: every artifact and the teacher on onnxruntime / PyTorch CPU"):
        bench = run_bench(BenchOptions(export_dir=out / "export", device="cpu", batches=[1, 8], warmup=5,
                                       iters=size.latency_iters, threads=threads, teacher=True, out=out / "bench"),
                          console)
    with stage("search", "7/7 search: the held-out scenes embedded by the student load() picks, searched by text"):
        searches, picked = _search(data / "val.jsonl", out, console)
    dropped = json.loads((out / "export" / "export.json").read_text(encoding="utf-8")).get("dropped") or []
    rows = _rows(summary, bench, alone)
    comp = compression(bench)
    report = {"size": size.name, "seconds": round(time.perf_counter() - started, 1), "stages": stage.seconds,
              "teacher": {"folder": str(teacher.folder), "preset": size.teacher, "reused": teacher.reused,
                          "held_out": teacher.metrics},
              "summary": str(out / "summary.json"), "export": str(out / "export" / "export.json"),
              "latency": {"backend": "onnxruntime CPU (PyTorch for the PyTorch student)", "batch": 1,
                          "threads": threads, "iterations": size.latency_iters, "statistic": "p50 ms"},
              "bench": {"json": str(out / "bench" / "bench.json"), "md": str(out / "bench" / "bench.md"),
                        "plot": str(out / "bench" / "pareto.png")},
              "rows": rows, "compression": comp, "timing_load": bench.get("timing_load"),
              "retention_rsum": (summary.get("retention") or {}).get("rsum"),
              "versus_without_teacher": versus_without_teacher(summary, alone, size), "search": searches,
              "loaded": picked, "dropped": dropped}
    atomic.write_json(out / MARKER, report)
    atomic.write_text(out / "demo.md", _markdown(report))
    return report


SEARCH_QUERIES = ("a large red circle on the left", "a small blue square")


def _search(val: Path, out: Path, console: Console) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Embed the val scenes with the export as an application loads it (edgedistill.load: the artifact that is
    accurate and fastest on this CPU, or what bench measured here), search two texts, print the top 5 of each with
    their captions and draw them in ``out/search.png``."""
    encoder = load(out / "export", device="cpu")
    console.print(f"load() chose {safe(encoder.info.image['artifact'])} on {encoder.info.image['backend']} "
                  f"({encoder.info.chosen_by})", highlight=False)
    build_index(val, encoder, out / "val.index", console=console)
    index = open_index(out / "val.index")
    results, hits = [], []
    for query in SEARCH_QUERIES:
        top = index.search(encoder.encode_text([query])[0], 5)
        found = [{"rank": r + 1, "score": round(s, 4), "path": index.items[i]["path"],
                  "caption": (index.items[i].get("captions") or [""])[0]} for r, (i, s) in enumerate(top)]
        results.append({"query": query, "hits": found})
        hits += [Hit(h["rank"], h["score"], h["path"], h["caption"], group=f"query {query!r}") for h in found]
        table = Table(title=f"{query!r}: top 5 of {len(index.items)} held-out scenes "
                            f"({safe(encoder.info.image['artifact'])} on {encoder.info.image['backend']})")
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("score", justify="right", no_wrap=True)
        table.add_column("caption of the hit", overflow="fold")
        for h in found:
            table.add_row(str(h["rank"]), f"{h['score']:.3f}", safe(h["caption"]))
        console.print(table)
    png_sheet(hits, f"held-out scenes found by text, top 5 per query ({encoder.info.image['artifact']})",
              out / "search.png")
    return results, {**encoder.info.image, "chosen_by": encoder.info.chosen_by}


TEACHER_ONNX, STUDENT_FP32 = "teacher_image_fp32_onnx", "image_fp32_onnx"  # the pair the claim compares


def versus_without_teacher(summary: dict[str, Any], alone: dict[str, Any], size: DemoSize) -> dict[str, Any]:
    """The distilled student against the same student trained on the captioned pairs alone (held-out RSUM and R@1,
    each run's best checkpoint on the val scenes; one seed)."""
    keys = ("i2t_r1", "t2i_r1", "rsum")
    distilled = {k: summary["student"].get(k) for k in keys}
    without = {k: alone["student"].get(k) for k in keys}
    gain = distilled["rsum"] - without["rsum"] if finite(distilled["rsum"]) and finite(without["rsum"]) else None
    return {"distilled": distilled, "without_teacher": without, "rsum_gain": gain, "captioned": size.captioned,
            "images": size.scenes, "steps": size.steps, "seeds": 1}


def _gain_line(report: dict[str, Any]) -> str:
    v = report.get("versus_without_teacher")
    if not v:
        return ""
    d, w = v["distilled"], v["without_teacher"]
    if v["rsum_gain"] is None:
        return "What the teacher gave: not measured (a RSUM is missing or not finite)."
    return (f"What the teacher gave: the distilled student reaches RSUM {d['rsum']:.1f} (i2t R@1 {d['i2t_r1']:.1f}%), "
            f"the same student trained on the {v['captioned']} captioned pairs alone {w['rsum']:.1f} "
            f"(i2t R@1 {w['i2t_r1']:.1f}%): {v['rsum_gain']:+.1f} RSUM, one seed, {v['steps']} steps each "
            f"(paired statistics over seeds: benchmarks/README.md).")


def _rows(summary: dict[str, Any], bench: dict[str, Any], alone: dict[str, Any] | None = None
          ) -> list[dict[str, Any]]:
    """One row per image model at batch 1: the teacher, the PyTorch student (and the same student trained without
    the teacher), each ONNX image artifact. ``size_mb`` is the image encoder's file, ``total_mb`` everything a
    device holds with it (bench's footprint)."""
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "rsum")
    timed = {r["artifact"]: r for r in bench["rows"]  # the backends the table names (not OpenVINO's rows)
             if r["status"] == "ok" and r["batch"] == 1 and r["encoder"] == "image"
             and r["backend"] in ("onnxruntime-cpu", "pytorch-cpu")}
    foot = bench.get("footprint") or {}
    teacher = timed.get(TEACHER_ONNX) or {}
    rows = [{"model": "teacher (open_clip ViT, ONNX)", "label": "teacher ONNX", "precision": "fp32",
             "size_mb": teacher.get("size_mb"), "total_mb": (foot.get("teacher") or {}).get("total_mb"),
             "latency_ms": teacher.get("p50_ms"), **{k: summary["teacher"].get(k) for k in keys}}]
    student = timed.get("image_fp32_pytorch") or {}
    rows.append({"model": "student (PyTorch)", "label": "student PyTorch", "precision": "fp32", "size_mb": None,
                 "total_mb": None, "latency_ms": student.get("p50_ms"), **{k: summary["student"].get(k) for k in keys}})
    if alone is not None:
        rows.append({"model": "student without the teacher (PyTorch)", "label": "without teacher",
                     "precision": "fp32", "size_mb": None, "total_mb": None, "latency_ms": None,
                     **{k: alone["student"].get(k) for k in keys}})
    for name, r in timed.items():
        if r["role"] == "student" and r["format"] == "onnx":
            rows.append({"model": f"student ONNX ({name})", "label": f"student ONNX {r['precision']}",
                         "precision": r["precision"], "size_mb": r["size_mb"],
                         "total_mb": ((foot.get("students") or {}).get(name) or {}).get("total_mb"),
                         "latency_ms": r["p50_ms"], **{k: r.get(k) for k in keys}})
    return rows


def compression(bench: dict[str, Any]) -> dict[str, Any]:
    """Teacher vs student fp32 ONNX on onnxruntime, from bench's report: the size ratio of everything a device holds
    (image encoder + text encoder + tokenizer files; the image encoders alone as ``image_size_ratio``), the batch-1
    latency ratio from interleaved rounds (median, range), and whether the student is smaller (total ratio > 1) and
    faster (every round > 1). False, and None ratios, where a number is missing or not finite."""
    foot = bench.get("footprint") or {}
    teacher, student = foot.get("teacher"), (foot.get("students") or {}).get(STUDENT_FP32)
    size = size_ratio(teacher, student)
    versus = next((v for v in bench.get("versus_teacher") or [] if (v["teacher"], v["student"], v["backend"])
                   == (TEACHER_ONNX, STUDENT_FP32, "onnxruntime-cpu")), {})
    lat = versus.get("latency_ratio") or {}
    return {"size_ratio": size["total_ratio"], "size_basis": "image encoder + text encoder + tokenizer files",
            "image_size_ratio": size["image_ratio"], "smaller": finite(size["total_ratio"]) and size["total_ratio"] > 1,
            "latency_ratio": lat.get("median"), "latency_ratio_min": lat.get("min"),
            "latency_ratio_max": lat.get("max"), "latency_rounds": lat.get("rounds"),
            "faster": finite(lat.get("min")) and lat["min"] > 1, "teacher_mb": teacher, "student_mb": student}


COLUMNS = (("label", "model"), ("precision", "prec"), ("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"),
           ("i2t_r10", "i2t R@10"), ("t2i_r1", "t2i R@1"), ("rsum", "RSUM"), ("size_mb", "image MB"),
           ("total_mb", "total MB"), ("latency_ms", "p50 ms"))
NARROW = ("label", "precision", "i2t_r1", "t2i_r1", "rsum", "total_mb", "latency_ms")  # below WIDE columns
WIDE = 110


def _cell(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _markdown(report: dict[str, Any]) -> str:
    lat = report["latency"]
    lines = [f"# edgedistill demo ({report['size']})", "",
             f"Val: held-out scenes; recall in %. Latency: {lat['backend']}, batch {lat['batch']}, "
             f"{lat['threads']} threads, {lat['iterations']} iterations, {lat['statistic']} (image encoder). "
             "Image MB: the image encoder; total MB: with the text encoder and tokenizer files a device needs too.",
             "", "| " + " | ".join(label for _, label in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k, _ in COLUMNS) + " |")
    retention = report.get("retention_rsum")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report["stages"].items())
    lines += ["", f"Student RSUM retention: {retention:.1%}" if retention else "", "", _gain_line(report), ""]
    lines += ["Size on the device (MB):", "", "| part | teacher | student |", "|---|---:|---:|"]
    lines += [f"| {part} | {t} | {s} |" for part, t, s in _size_lines(report.get("compression") or {})]
    lines += ["", _compression_line(report), "", f"Total time: {report['seconds']:.0f} s ({stages})."]
    for d in report.get("dropped") or []:
        lines += ["", f"Left out of the export: {d['name']} ({d['reason']})."]
    loaded = report.get("loaded") or {}
    for search in report.get("search") or []:
        lines += ["", f"Search {search['query']!r} ({loaded.get('artifact', 'student')}), top 5: " + "; ".join(
            f"{h['score']:.3f} {h['caption']}" for h in search["hits"])]
    if report.get("search"):
        lines += ["", "![search hits](search.png)"]
    return "\n".join(lines) + "\n"


def _size_lines(c: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(part, teacher MB, student MB) for each part a device holds, then the totals."""
    teacher, student = c.get("teacher_mb") or {}, c.get("student_mb") or {}
    t_parts = {p["part"]: p for p in teacher.get("parts") or []}
    lines = []
    for p in student.get("parts") or []:
        t = t_parts.get(p["part"]) or {}
        shared = " (the same file)" if p["part"] == "text encoder" and t.get("name") == p["name"] else ""
        lines.append((f"{p['part']}{shared}", _cell(t.get("mb")), _cell(p["mb"])))
    return lines + [("total", _cell(teacher.get("total_mb")), _cell(student.get("total_mb")))] if lines else []


def _compression_line(report: dict[str, Any]) -> str:
    c = report.get("compression") or {}
    if c.get("size_ratio") is None or c.get("latency_ratio") is None:
        return "Compression: not measured (the teacher's or the student's fp32 ONNX size or latency is missing)."
    latency = ratio_text({"median": c["latency_ratio"], "min": c["latency_ratio_min"],
                          "max": c["latency_ratio_max"], "rounds": c["latency_rounds"]})
    image = f"; its image encoder alone {c['image_size_ratio']:.2f}x" if finite(c.get("image_size_ratio")) else ""
    caveats = [why for ok, why in ((c["smaller"], "so it is not smaller in total"),
                                   (c["faster"], "so it is not faster in every round")) if not ok]
    verdict = f" ({'; '.join(caveats)})." if caveats else "."
    load = report.get("timing_load") or {}
    busy = f" Timed on a busy machine: {load['warning']}." if load.get("warning") else ""
    return (f"Compression (fp32 ONNX, teacher vs student): the student is {c['size_ratio']:.2f}x smaller in total "
            f"(image encoder + text encoder + tokenizer files{image}) and {latency} at batch 1 than the teacher"
            + verdict + busy)


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    """The table (every column from WIDE terminal columns up, the main ones below), the size on the device part by
    part, and the compression line."""
    console = console or make_console()
    lat = report["latency"]
    wide = console.width >= WIDE
    table = Table(title="teacher vs student, held-out scenes", box=box.SIMPLE_HEAD, pad_edge=False)
    shown = [(k, label) for k, label in COLUMNS if wide or k in NARROW]
    for key, label in shown:
        table.add_column(label, justify="left" if key in ("label", "precision") else "right",
                         no_wrap=key != "label", overflow="fold")
    for row in report["rows"]:
        table.add_row(*[_cell(row.get(k), 2 if k == "latency_ms" else 1) for k, _ in shown])
    console.print(table)
    console.print(f"recall in %; total MB: what a device holds (image + text encoder + tokenizer files); p50 ms: "
                  f"{lat['backend']}, batch {lat['batch']}, {lat['threads']} threads, {lat['iterations']} calls",
                  highlight=False)
    sizes = Table(title="size on the device (MB)", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("part", "teacher", "student"):
        sizes.add_column(col, justify="left" if col == "part" else "right", no_wrap=col != "part")
    for line in _size_lines(report.get("compression") or {}):
        sizes.add_row(*line)
    if sizes.row_count:
        console.print(sizes)
    console.print(_compression_line(report), highlight=False)
    if report.get("versus_without_teacher"):
        console.print(_gain_line(report), highlight=False)
