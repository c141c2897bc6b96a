"""``edgedistill demo``: the whole job offline, on built-in data, from a fresh install.

scenes (procedural images with exact captions) -> an open_clip CLIP teacher trained on them (once per machine,
then reused) -> teacher feature cache -> a distilled MobileNetV3 student, smaller and faster than the teacher ->
ONNX FP32 and calibrated INT8 -> ``bench`` on the CPU -> a table of teacher vs student artifacts: retrieval
Recall@1/5/10, RSUM, size, CPU latency, the compression (size and latency ratios), with bench's full report
(bench.json, bench.md, pareto.png) beside it.

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
from rich.console import Console
from rich.table import Table

import edgedistill.core.atomic as atomic
from edgedistill.runtime.loader import load
from edgedistill.bench.runner import BenchOptions, run_bench
from edgedistill.data.scenes import write_scenes
from edgedistill.export.exporter import ExportOptions, run_export
from edgedistill.core.gates import finite
from edgedistill.runtime.index import build_index, open_index
from edgedistill.core.locations import default_cache_root
from edgedistill.distill.pretrain import pretrain_config, pretrain_teacher
from edgedistill.distill.recipe import validate_recipe
from edgedistill.runtime.sheets import Hit, png_sheet
from edgedistill.core.terminal import make_console
from edgedistill.distill.train import distill
from edgedistill.core.errors import UserError

MARKER = "demo.json"  # a folder holding this is a demo run the next demo may replace


@dataclass(frozen=True)
class DemoSize:
    """How big each stage is; ``full`` fits 10 minutes on 2 CPU cores, ``quick`` a minute (CI)."""
    name: str
    scenes: int             # training images
    val: int                # held-out images
    teacher: str            # pretrain preset
    student: str            # timm vision tower
    steps: int              # distillation steps
    batch: int
    lr: float
    calib: int              # INT8 calibration images
    latency_iters: int


SIZES = {
    # The full demo's teacher (preset medium: a 0.99M-parameter ViT) is larger and slower than its student's
    # image tower (MobileNetV3-Small 0.5x at 64 px, 0.70M); the quick one is a pipeline check whose tiny teacher
    # is smaller than any student.
    "full": DemoSize("full", scenes=20000, val=1000, teacher="medium", student="mobilenetv3_small_050", steps=1200,
                     batch=64, lr=3e-3, calib=256, latency_iters=50),
    "quick": DemoSize("quick", scenes=3000, val=200, teacher="tiny", student="mobilenetv3_small_050", steps=120,
                      batch=32, lr=3e-3, calib=32, latency_iters=10),
}
IMAGE_SIZE = 64


def _recipe(size: DemoSize, data: Path, teacher: dict[str, str], out: Path, cache_dir: Path) -> dict[str, Any]:
    return {
        "name": f"demo-{size.name}",
        "seed": 0,
        "out": str(out),
        "device": "auto",
        "teacher": teacher,
        "student": {"vision": size.student, "text": "teacher", "image_size": IMAGE_SIZE},
        "data": {"train": str(data / "train.jsonl"), "val": str(data / "val.jsonl"), "batch_size": size.batch,
                 "workers": 0,  # 64 px JPEGs decode faster in-process than through worker pipes on 2 cores
                 # captions name positions and left/right: no flips, crops that keep objects where they were
                 "augment": {"scale": [0.85, 1.0], "hflip": False}},
        "cache": {"dir": str(cache_dir)},
        "train": {"epochs": 1000, "max_steps": size.steps, "lr": size.lr, "warmup_steps": max(1, size.steps // 20),
                  "log_every": 20, "eval_every": 0, "checkpoint_every": max(50, size.steps // 4),
                  "tensorboard": False},
        "eval": {"prompt": "a photo of a {label}."},
    }


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
    with stage("scenes", f"1/6 scenes: {size.scenes} training images, {size.val} held out ({IMAGE_SIZE} px)"):
        write_scenes(data, size.scenes, seed=0, size=IMAGE_SIZE, n_val=size.val, n_hard=0, n_ood=0,
                     progress=console)
    with stage("teacher", f"2/6 teacher: open_clip CLIP, preset {size.teacher} (trained once, then reused)"):
        teacher = pretrain_teacher(data / "train.jsonl", data / "val.jsonl", pretrain_config(size.teacher),
                                   console=console)
        console.print(f"teacher {'reused from' if teacher.reused else 'saved to'} {teacher.folder}; held-out "
                      f"image->text R@1 {teacher.metrics.get('i2t_r1', float('nan')):.1f}%", highlight=False)
    with stage("distill", f"3/6 distill: {size.student} student, {size.steps} steps"):
        summary = distill(validate_recipe(_recipe(size, data, teacher.teacher_config(), out, root), "demo recipe"),
                          console=console)
    with stage("export", "4/6 export: ONNX FP32 and calibrated INT8, checked against PyTorch"):
        run_export(ExportOptions(run_dir=out, format="onnx", int8=True, int8_required=False, calib_size=size.calib,
                                 out=out / "export"), console)
    threads = torch.get_num_threads()
    with stage("bench", "5/6 bench: every artifact and the teacher on onnxruntime / PyTorch CPU"):
        bench = run_bench(BenchOptions(export_dir=out / "export", device="cpu", batches=[1, 8], warmup=5,
                                       iters=size.latency_iters, threads=threads, teacher=True, out=out / "bench"),
                          console)
    with stage("search", "6/6 search: the held-out scenes embedded by the student load() picks, searched by text"):
        searches, picked = _search(data / "val.jsonl", out, console)
    dropped = json.loads((out / "export" / "export.json").read_text(encoding="utf-8")).get("dropped") or []
    rows = _rows(summary, bench)
    report = {"size": size.name, "seconds": round(time.perf_counter() - started, 1), "stages": stage.seconds,
              "teacher": {"folder": str(teacher.folder), "preset": size.teacher, "reused": teacher.reused,
                          "held_out": teacher.metrics},
              "summary": str(out / "summary.json"), "export": str(out / "export" / "export.json"),
              "latency": {"backend": "onnxruntime CPU (PyTorch for the PyTorch student)", "batch": 1,
                          "threads": threads, "iterations": size.latency_iters, "statistic": "p50 ms"},
              "bench": {"json": str(out / "bench" / "bench.json"), "md": str(out / "bench" / "bench.md"),
                        "plot": str(out / "bench" / "pareto.png")},
              "rows": rows, "compression": compression(rows),
              "retention_rsum": (summary.get("retention") or {}).get("rsum"), "search": searches,
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
    console.print(f"load() chose {encoder.info.image['artifact']} on {encoder.info.image['backend']} "
                  f"({encoder.info.chosen_by})", highlight=False)
    build_index(val, encoder, out / "val.index", console=console)
    index = open_index(out / "val.index")
    results, hits = [], []
    for query in SEARCH_QUERIES:
        top = index.search(encoder.encode_text([query])[0], 5)
        found = [{"rank": r + 1, "score": round(s, 4), "path": index.items[i]["path"],
                  "caption": (index.items[i].get("captions") or [""])[0]} for r, (i, s) in enumerate(top)]
        results.append({"query": query, "hits": found})
        hits += [Hit(h["rank"], h["score"], h["path"], f"{query!r}: {h['caption']}") for h in found]
        table = Table(title=f"{query!r}: top 5 of {len(index.items)} held-out scenes ({encoder.info.image['artifact']} "
                            f"on {encoder.info.image['backend']})")
        for col in ("#", "score", "caption of the hit"):
            table.add_column(col)
        for h in found:
            table.add_row(str(h["rank"]), f"{h['score']:.3f}", h["caption"])
        console.print(table)
    png_sheet(hits, " | ".join(repr(q) for q in SEARCH_QUERIES), out / "search.png")
    return results, {**encoder.info.image, "chosen_by": encoder.info.chosen_by}


def _rows(summary: dict[str, Any], bench: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per image model at batch 1: the teacher, the PyTorch student, each ONNX image artifact."""
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "rsum")
    timed = {r["artifact"]: r for r in bench["rows"]  # the backends the table names (not OpenVINO's rows)
             if r["status"] == "ok" and r["batch"] == 1 and r["encoder"] == "image"
             and r["backend"] in ("onnxruntime-cpu", "pytorch-cpu")}
    teacher = timed.get("teacher_image_fp32_onnx") or {}
    rows = [{"model": "teacher (open_clip ViT, ONNX)", "precision": "fp32", "size_mb": teacher.get("size_mb"),
             "latency_ms": teacher.get("p50_ms"), **{k: summary["teacher"].get(k) for k in keys}}]
    student = timed.get("image_fp32_pytorch") or {}
    rows.append({"model": "student (PyTorch)", "precision": "fp32", "size_mb": None,
                 "latency_ms": student.get("p50_ms"), **{k: summary["student"].get(k) for k in keys}})
    for name, r in timed.items():
        if r["role"] == "student" and r["format"] == "onnx":
            rows.append({"model": f"student ONNX ({name})", "precision": r["precision"], "size_mb": r["size_mb"],
                         "latency_ms": r["p50_ms"], **{k: r.get(k) for k in keys}})
    return rows


def compression(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Teacher vs student fp32 ONNX image encoders: size and batch-1 p50 ratios (teacher / student), and whether
    the student is smaller and faster (False when a number is missing or not finite)."""
    teacher = rows[0]
    student = next((r for r in rows if r["model"].startswith("student ONNX") and r["precision"] == "fp32"), {})
    out: dict[str, Any] = {}
    for key, name in (("size_mb", "size"), ("latency_ms", "latency")):
        t, s = teacher.get(key), student.get(key)
        ok = finite(t) and finite(s) and s > 0
        out[f"{name}_ratio"] = round(t / s, 2) if ok else None
        out["smaller" if name == "size" else "faster"] = bool(ok and s < t)
    return out


COLUMNS = (("model", "model"), ("precision", "precision"), ("i2t_r1", "i2t R@1"), ("i2t_r5", "i2t R@5"),
           ("i2t_r10", "i2t R@10"), ("t2i_r1", "t2i R@1"), ("rsum", "RSUM"), ("size_mb", "MB"),
           ("latency_ms", "p50 ms"))


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}" if isinstance(value, float) else str(value)


def _markdown(report: dict[str, Any]) -> str:
    lat = report["latency"]
    lines = [f"# edgedistill demo ({report['size']})", "",
             f"Val: held-out scenes; recall in %. Latency: {lat['backend']}, batch {lat['batch']}, "
             f"{lat['threads']} threads, {lat['iterations']} iterations, {lat['statistic']} (image encoder).", "",
             "| " + " | ".join(label for _, label in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k, _ in COLUMNS) + " |")
    retention = report.get("retention_rsum")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in report["stages"].items())
    lines += ["", f"Student RSUM retention: {retention:.1%}" if retention else "", "", _compression_line(report), "",
              f"Total time: {report['seconds']:.0f} s ({stages})."]
    for d in report.get("dropped") or []:
        lines += ["", f"Left out of the export: {d['name']} ({d['reason']})."]
    loaded = report.get("loaded") or {}
    for search in report.get("search") or []:
        lines += ["", f"Search {search['query']!r} ({loaded.get('artifact', 'student')}), top 5: " + "; ".join(
            f"{h['score']:.3f} {h['caption']}" for h in search["hits"])]
    if report.get("search"):
        lines += ["", "![search hits](search.png)"]
    return "\n".join(lines) + "\n"


def _compression_line(report: dict[str, Any]) -> str:
    c = report.get("compression") or {}
    if c.get("size_ratio") is None or c.get("latency_ratio") is None:
        return "Compression: not measured (an fp32 ONNX size or latency is missing)."
    return (f"Compression (fp32 ONNX image encoders): the student is {c['size_ratio']:.1f}x smaller and "
            f"{c['latency_ratio']:.1f}x faster at batch 1 than the teacher"
            + ("." if c["smaller"] and c["faster"] else " (a ratio below 1 means it is not)."))


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    lat = report["latency"]
    table = Table(title=f"teacher vs student on held-out scenes (recall in %; latency {lat['backend']}, batch "
                        f"{lat['batch']}, {lat['threads']} threads, p50)")
    for key, label in COLUMNS:
        table.add_column(label, justify="left" if key in ("model", "precision") else "right")
    for row in report["rows"]:
        table.add_row(*[_cell(row.get(k)) for k, _ in COLUMNS])
    console.print(table)
    console.print(_compression_line(report), highlight=False)
