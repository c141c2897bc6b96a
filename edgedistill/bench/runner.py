"""``edgedistill bench``: every artifact of an export on every backend of a device, latency and accuracy.

One pass per (artifact, backend): check the sha256 against export.json, build the runner, score accuracy on
the val split, then time each batch size (warm-up, N iterations, inputs staged in advance; ``--e2e`` times
decode + preprocessing + inference instead). A fault that belongs to one artifact (missing file, sha256
mismatch, an engine built for another GPU) becomes a failed row and the others are still measured; the
command then ends with one line per failure and exit status 2. ``--host`` runs all of it on a remote target
(bench/remote.py) with a bundle of the artifacts, the student folder, the val split and the teacher's scores.

With ``--teacher``, the teacher and the student image encoders on each backend are then timed again taking turns
(bench/timing.py ``interleave``): their ratio comes from those rounds, with its spread. The 1-minute load average
is recorded around all the timing, with a warning when other work shared the CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from rich.console import Console

import edgedistill.core.atomic as atomic
from edgedistill.bench import report as rep
from edgedistill.bench.accuracy import (BenchVal, References, class_prompts, image_accuracy, load_bench_val,
                                       reference_texts, text_accuracy)
from edgedistill.bench.torch_runners import TorchRunner
from edgedistill.runtime.backends import OPENVINO_HINTS, Candidate, OrtRunner, RunOptions, Runner, candidates
from edgedistill.bench.devices import DEVICES, describe_device, describe_short
from edgedistill.bench.remote import run_remote_bench
from edgedistill.bench.timing import (ROUNDS, busy_by_others, cpu_load, interleave, load_average, ratio_spread,
                                     summarize, time_cpu, time_cuda)
from edgedistill.data.images import open_image
from edgedistill.data.manifest import load_manifest
from edgedistill.core.documents import BenchReport, BundleContext, BundleTeacher, read_document
from edgedistill.core.errors import UserError
import edgedistill.runtime.manifest as artifacts
from edgedistill.runtime.formats import BACKENDS
from edgedistill.runtime.jetson import TegrastatsSampler, measure_power
import edgedistill.runtime.limits as limits
from edgedistill.runtime.preprocess import Preprocess, PreprocessConfig, image_side
from edgedistill.runtime.tokenizer import load_tokenizer
from edgedistill.core.terminal import make_console, safe, warn
from edgedistill.evaluation.split import ClassPrompts

BUNDLE_TEACHER = "teacher"   # bundle folder: teacher.json (scores, preprocess) and image_fp32.onnx
BUNDLE_VAL = "val"           # bundle folder: val.jsonl + images/
BUNDLE_STUDENT = "student"   # bundle folder: the open_clip student (tokenizer, PyTorch backend)
BUNDLE_CONTEXT = "bench_context.json"
TOKENIZER_FOLDER = "tokenizer"  # the export's tokenizer files (runtime.tokenizer), next to the artifacts


@dataclass
class BenchOptions:
    export_dir: Path
    device: str = "cpu"
    batches: list[int] = field(default_factory=lambda: [1, 8, 32])
    warmup: int = 10
    iters: int = 50
    threads: int | None = None
    teacher: bool = False
    e2e: bool = False
    out: Path | None = None
    val: Path | None = None
    host: str | None = None
    port: int | None = None
    remote_cmd: str = "edgedistill"
    ssh_options: list[str] = field(default_factory=list)
    timeout_s: float = 3600.0
    load: int = 0                        # busy processes beside the timed runs (latency under contention)
    spin: bool | None = None             # onnxruntime's spinning intra-op threads (None: its default, on)
    openvino_hint: str | None = None     # OpenVINO's performance hint (None: latency)


def parse_batches(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32] (UserError on anything else)."""
    try:
        values = [int(x) for x in str(text).replace(" ", "").split(",") if x]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"--batch {text!r}: give positive batch sizes separated by commas, e.g. 1,8,32")
    return sorted(set(values))


def check_options(opts: BenchOptions) -> None:
    if opts.device not in DEVICES:
        raise UserError(f"--device {opts.device!r} is not one of {', '.join(DEVICES)}")
    if opts.iters < 2:
        raise UserError(f"--iters {opts.iters}: time at least 2 iterations (percentiles need a sample)")
    if opts.warmup < 0:
        raise UserError(f"--warmup {opts.warmup} must be 0 or more")
    if opts.val is not None and not Path(opts.val).is_file():
        raise UserError(f"--val {opts.val} does not exist; give a val manifest (.jsonl or .csv)")
    if opts.threads is not None and opts.threads < 1:
        raise UserError(f"--threads {opts.threads} must be 1 or more")
    if opts.load < 0:
        raise UserError(f"--load {opts.load} must be 0 or more (busy processes beside the timed runs)")
    if opts.openvino_hint is not None and opts.openvino_hint not in OPENVINO_HINTS:
        raise UserError(f"--openvino-hint {opts.openvino_hint!r}: choose {' or '.join(OPENVINO_HINTS)}")


def check_local_limits(opts: BenchOptions, doc: dict[str, Any]) -> None:
    """--threads within the CPUs this process may use, and every --batch's tensors within a share of free memory
    (on this machine: a remote bench checks on its own)."""
    limits.check_threads(opts.threads, "--threads")
    size = PreprocessConfig.from_dict(doc.get("preprocess") or {}).size
    for batch in opts.batches:
        limits.check_batch(batch, (3, *size), int(doc.get("embed_dim") or 0), flag="--batch")


# ------------------------------------------------------------------------------------------------ sources
@dataclass
class Sources:
    """Where the student, the val split, the class prompt and the teacher come from for this export."""
    export_dir: Path
    doc: dict[str, Any]
    student_dir: Path | None
    run_dir: Path | None
    val: Path | None
    prompts: ClassPrompts                   # how class names become prompts (recorded by the export)
    teacher: dict[str, Any] | None          # bundle teacher.json: metrics, preprocess, onnx file
    notes: list[str] = field(default_factory=list)


def resolve_sources(export_dir: Path, doc: dict[str, Any], val: Path | None) -> Sources:
    export_dir = Path(export_dir)
    context = read_document(export_dir / BUNDLE_CONTEXT, BundleContext, "bench bundle file",
                            "bench again").model_dump() if (export_dir / BUNDLE_CONTEXT).is_file() else {}
    # a bundle (made by --host for a remote target) carries everything itself: never reach for the run folder
    run_dir = Path(doc["run_dir"]) if doc.get("run_dir") and not context else None
    if run_dir is not None and not (run_dir / "recipe.yaml").is_file():
        run_dir = None
    student = export_dir / BUNDLE_STUDENT
    if not student.is_dir():
        student = run_dir / "student" if run_dir is not None and (run_dir / "student").is_dir() else None
    fallback = context.get("prompt")  # exports made before export.json recorded the class prompts
    if run_dir is not None and not (doc.get("val") or {}).get("prompts"):
        fallback = _recipe_prompt(run_dir) or fallback
    prompts = class_prompts(doc.get("val"), fallback)
    notes = []
    if val is None:
        for cand in (export_dir / BUNDLE_VAL / "val.jsonl", Path((doc.get("val") or {}).get("manifest") or "")):
            if str(cand) and cand.is_file():
                val = cand
                break
        else:
            notes.append("no val split found (export.json's val manifest is gone and no --val given): "
                         "accuracy not measured")
    teacher_json = export_dir / BUNDLE_TEACHER / "teacher.json"
    teacher = read_document(teacher_json, BundleTeacher, "bench bundle file", "bench again").model_dump() \
        if teacher_json.is_file() else None
    return Sources(export_dir, doc, student, run_dir, Path(val) if val else None, prompts, teacher, notes)


# ------------------------------------------------------------------------------------------------ teacher
def teacher_side(src: Sources, val_manifest: Path | None, want_timing: bool,
                 console: Console) -> dict[str, Any] | None:
    """The teacher's val scores and preprocess, and (for ``--teacher``) its fp32 ONNX image graph.

    From the bundle on a remote target; else from the run's recipe, with the teacher's val embeddings taken
    from the feature cache (built when missing) so scoring costs no teacher pass over the val images.
    """
    if src.teacher is not None:
        info = dict(src.teacher)
        if info.get("onnx"):
            info["onnx_path"] = src.export_dir / BUNDLE_TEACHER / info["onnx"]
        return info
    if src.run_dir is None:
        src.notes.append("teacher not scored: the export's run folder is not on this machine")
        return None

    try:  # deferred: the training stack (torch, open_clip), needed only where the run folder is here
        from edgedistill.bench.teacher import teacher_from_run
    except ImportError as e:
        src.notes.append(f"teacher not scored: the training stack is not installed here ({e.name})")
        return None
    return teacher_from_run(src.run_dir, src.prompts, val_manifest, want_timing, console)


# ------------------------------------------------------------------------------------------------ jobs
@dataclass
class Job:
    """One model to run: an export artifact, the PyTorch student, or the teacher; on one backend."""
    name: str
    role: str                  # student | teacher
    encoder: str               # image | text
    fmt: str
    precision: str
    size_mb: float | None
    candidate: Candidate


def plan_jobs(src: Sources, opts: BenchOptions, teacher: dict[str, Any] | None,
              failures: list[tuple[dict[str, Any], str]]) -> list[Job]:
    """Every (model, backend) this device can run; artifacts that fail their checks go to ``failures``."""
    jobs: list[Job] = []
    device = opts.device
    low, opt, high = src.doc.get("batch_profile") or (1, 8, 32)  # the export's; widened to the batches timed
    batch_range = (min(low, *opts.batches), opt, max(high, *opts.batches))
    for entry in src.doc["artifacts"]:
        try:
            path = artifacts.verify_artifact(src.export_dir, entry)
        except UserError as e:
            failures.append((entry, str(e)))
            continue
        for cand in candidates(entry, path, device, opts.threads, batch_range, spin=opts.spin,
                               hint=opts.openvino_hint):
            jobs.append(Job(entry.get("name", entry["path"]), "student", entry.get("encoder", "image"),
                            entry.get("format", "?"), entry.get("precision", "fp32"), entry.get("size_mb"), cand))
    if src.student_dir is not None:  # the student as trained: the "pytorch" format of the table
        weights = src.student_dir / "open_clip_model.safetensors"
        size = round(weights.stat().st_size / 2**20, 3) if weights.is_file() else None
        for encoder in ("image", "text"):
            art = {"name": f"{encoder}_fp32_pytorch", "encoder": encoder, "format": "pytorch", "precision": "fp32"}
            for cand in candidates(art, src.student_dir, device, opts.threads, batch_range, spin=opts.spin,
                                   hint=opts.openvino_hint):
                jobs.append(Job(art["name"], "student", encoder, "pytorch", "fp32", size, cand))
    if opts.teacher and teacher is not None:

        art = {"name": "teacher_image_fp32", "encoder": "image", "format": "pytorch", "precision": "fp32"}
        if teacher.get("module") is not None:
            jobs.append(Job("teacher_image_pytorch", "teacher", "image", "pytorch", "fp32", None, Candidate(
                art, f"pytorch-{'cuda' if device != 'cpu' else 'cpu'}",
                make=lambda: TorchRunner(_image_encoder(teacher["module"]), device))))
        onnx_path = teacher.get("onnx_path")
        if onnx_path is not None and Path(onnx_path).is_file():
            entry = {"name": "teacher_image_fp32_onnx", "encoder": "image", "format": "onnx", "precision": "fp32",
                     "size_mb": round(Path(onnx_path).stat().st_size / 2**20, 3)}
            for cand in candidates(entry, Path(onnx_path), device, opts.threads, batch_range, spin=opts.spin,
                                   hint=opts.openvino_hint):
                jobs.append(Job(entry["name"], "teacher", "image", "onnx", "fp32", entry["size_mb"], cand))
    return jobs


# ------------------------------------------------------------------------------------------------ references
def references(src: Sources, val: BenchVal, threads: int | None) -> References:
    """fp32 embeddings of both towers on the CPU: the PyTorch student's (what distill and eval report) where its
    folder is here, else the fp32 ONNX graphs on onnxruntime."""
    ref = References()
    for encoder in ("image", "text"):
        runner, source = _reference_runner(src, encoder, threads)
        if runner is None:
            continue
        ref.source += f"{encoder}: {source}; "
        if encoder == "image":
            ref.image = runner.embed(val.images)
        else:
            ref.text, ref.class_text = reference_texts(val, runner.embed)
    return ref


def _reference_runner(src: Sources, encoder: str, threads: int | None) -> tuple[Runner | None, str]:
    art = {"name": f"{encoder}_fp32_pytorch", "encoder": encoder, "format": "pytorch", "precision": "fp32"}
    if src.student_dir is not None and BACKENDS["pytorch-cpu"].missing() is None:
        return TorchRunner.open("pytorch-cpu", src.student_dir, art, RunOptions("cpu", threads)), \
            "PyTorch student fp32"
    entry = next((e for e in src.doc["artifacts"] if (e.get("encoder"), e.get("format"), e.get("precision"))
                  == (encoder, "onnx", "fp32")), None)
    if entry is None:
        return None, ""
    try:
        path = artifacts.verify_artifact(src.export_dir, entry)
    except UserError:
        return None, ""
    return OrtRunner(path, "fp32", "onnxruntime-cpu", threads), f"{entry['name']} on onnxruntime-cpu"


def accuracy(job: Job, runner: Runner, val: BenchVal, ref: References) -> dict[str, float]:
    what = f"{job.name} on {job.candidate.backend}"
    if job.encoder == "image":
        return image_accuracy(val, runner.embed(val.images), ref, what)
    return text_accuracy(val, runner.embed, ref, what)


# ------------------------------------------------------------------------------------------------ timing
def _tile(x: np.ndarray, batch: int) -> np.ndarray:
    reps = -(-batch // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch])


def _inputs(job: Job, val: BenchVal | None, preprocess: dict[str, Any], context: int) -> np.ndarray:
    """The batch source for timing: real val images/captions when there are some, else seeded noise / tokens."""
    if job.encoder == "image":
        if val is not None and (job.role == "student"):
            return val.images
        size = image_side(preprocess)
        return np.random.default_rng(0).standard_normal((8, 3, size, size)).astype(np.float32)
    if val is not None and val.has_captions:
        return val.tokens
    tokens = np.zeros((8, context), np.int64)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, 320, 49407   # <start> "a a a a a" <end>
    return tokens


def time_job(job: Job, runner: Runner, opts: BenchOptions, batch: int, source: np.ndarray,
             e2e_call: Callable[[int], Any] | None, power: Any) -> dict[str, Any]:
    """Latency of one batch size: staged input (or ``e2e_call`` timing decode + preprocessing too)."""
    if e2e_call is not None:
        call = lambda: e2e_call(batch)  # noqa: E731
    else:
        staged = runner.stage(_tile(source, batch))
        call = lambda: runner.call(staged)  # noqa: E731
    timer = time_cuda if runner.timer == "cuda" else time_cpu
    runner.peak_memory_reset()
    summary = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(cpu_load(opts.load))  # --load N: busy processes beside the timed runs
        if power is not None:  # started before the warm-up, so tegrastats is already printing when timing starts
            sampler = stack.enter_context(power())
        for _ in range(opts.warmup):
            call()
        times = timer(call, 0, opts.iters)
        if power is not None:  # a window of its own, long enough to hold tegrastats samples
            summary = measure_power(sampler, call, batch, _sync(runner))
    lat = summarize(times, batch, opts.warmup)
    out = lat.as_dict()
    out["peak_mem_mb"], out["peak_mem_kind"] = runner.peak_memory()
    if summary is not None:
        out["avg_power_w"] = summary.get("avg_board_power_w")
        out["energy_mj_per_item"] = summary.get("energy_per_image_mj")
        out["power"] = {k: summary.get(k) for k in ("board_rail", "board_power_is_sum", "sample_count",
                                                     "rails_avg_mw", "avg_gpu_load_pct")}
    return out


def _sync(runner: Runner) -> Callable[[], None]:
    if runner.timer != "cuda":
        return lambda: None
    import torch  # deferred: CUDA runners only; a CPU device may have no torch

    return torch.cuda.synchronize


def _image_encoder(model: Any) -> Any:
    from edgedistill.export.graph import ImageEncoder  # deferred: torch (the teacher's PyTorch row)

    return ImageEncoder(model.float())


def _e2e(job: Job, runner: Runner, val: BenchVal | None, preprocess: dict[str, Any], tokenizer: Any,
         captions: list[str]) -> Callable[[int], Any] | None:
    """Decode + preprocess + stage + run, for ``--e2e`` (image files, or caption strings to tokenize)."""
    if val is None:
        return None
    if job.encoder == "image":
        pre = Preprocess(preprocess)
        paths = val.paths

        def call(batch: int) -> Any:
            picks = [paths[i % len(paths)] for i in range(batch)]
            return runner.call(runner.stage(pre.batch([open_image(p) for p in picks])))
        return call
    if tokenizer is None or not captions:
        return None

    def call_text(batch: int) -> Any:
        texts = [captions[i % len(captions)] for i in range(batch)]
        return runner.call(runner.stage(np.asarray(tokenizer(texts), dtype=np.int64)))
    return call_text


# ------------------------------------------------------------------------------------------------ main
def run_bench(opts: BenchOptions, console: Console | None = None,
              emit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Measure every artifact; write bench.json, bench.md and pareto.png into ``opts.out``; return the report.
    ``emit`` gets the report once it is written, before failed artifacts end the command (``bench --json``)."""
    console = console or make_console(stderr=True, soft_wrap=True)
    check_options(opts)
    export_dir = Path(opts.export_dir)
    doc = artifacts.read_manifest(export_dir)
    out = atomic.writable_dir(Path(opts.out) if opts.out else export_dir / "bench", "--out")  # before measuring
    if opts.host:
        return run_remote(opts, export_dir, doc, out, console, emit)
    check_local_limits(opts, doc)
    with torch_threads(opts.threads) as threads:
        return _bench_here(opts, export_dir, doc, out, threads, console, emit)


@dataclass
class Session:
    """One local bench: its options, where things come from, the staged val data and the fp32 references."""
    opts: BenchOptions
    doc: dict[str, Any]
    src: Sources
    threads: int
    console: Console
    val: BenchVal | None = None
    ref: References = field(default_factory=References)
    tokenizer: Any = None
    captions: list[str] = field(default_factory=list)
    power: Any = None
    failures: list[tuple[dict[str, Any], str]] = field(default_factory=list)

    @property
    def common(self) -> dict[str, Any]:
        return {"device": self.opts.device, "threads": self.threads, "warmup": self.opts.warmup,
                "iters": self.opts.iters, "mode": "e2e" if self.opts.e2e else "inference", "load": self.opts.load}


def _bench_here(opts: BenchOptions, export_dir: Path, doc: dict[str, Any], out: Path, threads: int,
                console: Console, emit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    device_info = describe_device(opts.device, threads)
    console.print(f"bench {safe(export_dir)} on {describe_short(device_info)}", highlight=False)
    ses = Session(opts, doc, resolve_sources(export_dir, doc, opts.val), threads, console)
    _stage_val(ses)
    teacher = teacher_side(ses.src, ses.val.split.manifest.path if ses.val is not None else None, opts.teacher,
                           console)
    jobs = plan_jobs(ses.src, opts, teacher, ses.failures)
    ses.power = _power_sampler(opts.device)
    rows = [rep.make_row(artifact=entry.get("name", entry.get("path")), role="student", encoder=entry.get("encoder"),
                         format=entry.get("format"), precision=entry.get("precision"), size_mb=entry.get("size_mb"),
                         status="failed", reason=why, device=opts.device) for entry, why in ses.failures]
    if teacher is not None and teacher.get("metrics"):
        rows.append(rep.make_row(artifact="teacher", role="teacher", encoder="image", format="-", precision="fp32",
                                 backend="(scores)", device=opts.device, status="ok",
                                 reason="val scores of the teacher (cached embeddings); time it with --teacher",
                                 **{k: v for k, v in teacher["metrics"].items() if k in rep.ACCURACY}))
    load_before = load_average()
    for job in jobs:
        rows += _measure(ses, job, teacher)
    versus = _versus_teacher(ses, jobs, rows, teacher)
    cpus = limits.usable_cpus()[0]
    load = busy_by_others(load_before, load_average(), cpus, min(threads, cpus) + opts.load)
    report = _report(ses, export_dir, device_info, teacher, rows)
    report["timing_load"] = load
    report["footprint"] = _footprint(ses.src, rows)
    report["versus_teacher"] = [_with_size(v, report["footprint"]) for v in versus]
    paths = save_report(out, report)
    rep.print_table(report, console)
    if load["warning"]:
        warn(console, load["warning"])
    console.print(f"report: {safe(paths['md'])}  json: {safe(paths['json'])}  plot: {safe(paths['png'])}",
                  highlight=False)
    if emit is not None:
        emit(report)
    if ses.failures:
        for entry, why in ses.failures:
            console.print(f"error: {safe(entry.get('name'))}: {safe(why)}", highlight=False, markup=False)
        raise UserError(f"{len(ses.failures)} artifact(s) failed (listed above); the report in {out} has the rest")
    return report


def _versus_teacher(ses: Session, jobs: list[Job], rows: list[dict[str, Any]],
                    teacher: dict[str, Any] | None) -> list[dict[str, Any]]:
    """For each backend the teacher's image encoder was timed on: it and the student image encoders timed there,
    taking turns for ROUNDS rounds of ``iters`` calls at the smallest batch; the teacher / student p50 ratio per
    round, as median and range. A model that fails to load here again leaves its comparison out, with a note."""
    timed = {(r["artifact"], r["backend"]) for r in rows if r["status"] == "ok" and r["p50_ms"] is not None}
    batch = min(ses.opts.batches)
    out: list[dict[str, Any]] = []
    for tjob in [j for j in jobs if j.role == "teacher" and (j.name, j.candidate.backend) in timed]:
        backend = tjob.candidate.backend
        students = [j for j in jobs if j.role == "student" and j.encoder == "image"
                    and j.candidate.backend == backend and (j.name, backend) in timed]
        if not students:
            continue
        try:
            with ses.console.status(f"{len(students)} student(s) and the teacher on {backend}: {ROUNDS} rounds, "
                                    "taking turns"):
                blocks = {job.name: _block(ses, job, teacher, batch) for job in [tjob, *students]}
                with cpu_load(ses.opts.load):
                    p50s = interleave(blocks, ROUNDS)
        except UserError as e:
            ses.src.notes.append(f"student vs teacher on {backend} not timed ({e})")
            continue
        for job in students:
            ratio = ratio_spread(p50s[tjob.name], p50s[job.name])
            out.append({"student": job.name, "teacher": tjob.name, "backend": backend, "batch": batch,
                        "iters_per_round": ses.opts.iters, "teacher_p50_ms": p50s[tjob.name],
                        "student_p50_ms": p50s[job.name], "latency_ratio": ratio.as_dict() if ratio else None})
    return out


def _block(ses: Session, job: Job, teacher: dict[str, Any] | None, batch: int) -> Callable[[], list[float]]:
    """A warmed-up model's turn: ``iters`` timed calls on staged inputs."""
    runner = job.candidate.make()  # type: ignore[misc]
    preprocess = ((teacher or {}).get("preprocess") if job.role == "teacher" else None) or ses.doc["preprocess"]
    source = _inputs(job, ses.val, preprocess, int((ses.doc.get("tokenizer") or {}).get("context_length") or 77))
    staged = runner.stage(_tile(source, batch))
    timer = time_cuda if runner.timer == "cuda" else time_cpu
    timer(lambda: runner.call(staged), ses.opts.warmup, 1)
    return lambda: timer(lambda: runner.call(staged), 0, ses.opts.iters)


def _footprint(src: Sources, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``report.footprint`` of this export: its artifacts, its tokenizer files, the timed teacher graph."""
    tokenizer = src.doc.get("tokenizer") or {}
    folder = src.export_dir / str(tokenizer.get("folder") or TOKENIZER_FOLDER)
    files = [folder / name for name in (tokenizer.get("files") or {})]
    tokenizer_mb = round(sum(f.stat().st_size for f in files) / 2**20, 3) if files and all(
        f.is_file() for f in files) else None
    teacher_mb = next((r["size_mb"] for r in rows if r["artifact"] == "teacher_image_fp32_onnx"), None)
    return rep.footprint(src.doc["artifacts"], tokenizer_mb, bool(src.doc.get("text_is_teacher")), teacher_mb)


def _with_size(versus: dict[str, Any], foot: dict[str, Any]) -> dict[str, Any]:
    return {**versus, "size": rep.size_ratio(foot.get("teacher"), (foot.get("students") or {}).get(versus["student"]))}


def _stage_val(ses: Session) -> None:
    """Decode and tokenize the val split once, and embed it with the fp32 references."""
    src = ses.src
    ses.tokenizer = _tokenizer(src)
    if src.val is None:
        return
    if ses.tokenizer is None:
        src.notes.append("accuracy not measured: no tokenizer (the student folder is not on this machine)")
        return
    with ses.console.status(f"reading val images from {src.val}"):
        ses.val = load_bench_val(src.val, ses.doc["preprocess"], ses.tokenizer, src.prompts, ses.console)
    with ses.console.status("val embeddings of the fp32 references"):
        ses.ref = references(src, ses.val, ses.threads)
    ses.captions = ses.val.split.captions if ses.opts.e2e else []


def _measure(ses: Session, job: Job, teacher: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The rows of one (model, backend): accuracy once, then latency per batch size; a fault fails this job only."""
    opts, doc = ses.opts, ses.doc
    base = dict(artifact=job.name, role=job.role, encoder=job.encoder, format=job.fmt, precision=job.precision,
                backend=job.candidate.backend, size_mb=job.size_mb, **ses.common)
    if job.candidate.reason is not None:
        return [rep.make_row(**base, status="skipped", reason=job.candidate.reason)]
    try:
        with ses.console.status(f"{job.name} on {job.candidate.backend}: loading"):
            runner = job.candidate.make()  # type: ignore[misc]
        base["backend_version"] = runner.version
        acc: dict[str, float] = {}
        if job.role == "teacher" and teacher is not None:
            acc = {k: v for k, v in (teacher.get("metrics") or {}).items() if k in rep.ACCURACY}
        elif ses.val is not None:
            with ses.console.status(f"{job.name} on {job.candidate.backend}: val accuracy"):
                acc = accuracy(job, runner, ses.val, ses.ref)
        preprocess = ((teacher or {}).get("preprocess") if job.role == "teacher" else None) or doc["preprocess"]
        source = _inputs(job, ses.val, preprocess, int((doc.get("tokenizer") or {}).get("context_length") or 77))
        e2e = _e2e(job, runner, ses.val if job.role == "student" else None, preprocess, ses.tokenizer,
                   ses.captions) if opts.e2e else None
        return [_batch_row(ses, job, runner, base, acc, batch, source, e2e) for batch in opts.batches]
    except UserError as e:
        ses.failures.append(({"name": job.name}, str(e)))
        return [rep.make_row(**base, status="failed", reason=str(e))]


def _batch_row(ses: Session, job: Job, runner: Runner, base: dict[str, Any], acc: dict[str, float], batch: int,
               source: np.ndarray, e2e: Callable[[int], Any] | None) -> dict[str, Any]:
    if not runner.min_batch <= batch <= (runner.max_batch or batch):
        return rep.make_row(**base, batch=batch, status="skipped", reason=(
            f"batch {batch} is outside the engine's profile {runner.min_batch}..{runner.max_batch}"))
    if ses.opts.e2e and e2e is None:
        return rep.make_row(**base, batch=batch, status="skipped", reason="--e2e needs the val images and captions")
    with ses.console.status(f"{job.name} on {job.candidate.backend}: batch {batch}"):
        lat = time_job(job, runner, ses.opts, batch, source, e2e, ses.power)
    lat.pop("min_ms", None)
    ses.console.print(f"  {safe(job.name):<28} {job.candidate.backend:<22} batch {batch:>3}: "
                      f"p50 {lat['p50_ms']:.3f} ms", highlight=False)
    return rep.make_row(**{**base, **{k: v for k, v in lat.items() if k in rep.ROW_FIELDS}, **acc, "status": "ok"})


def _report(ses: Session, export_dir: Path, device_info: dict[str, Any], teacher: dict[str, Any] | None,
            rows: list[dict[str, Any]]) -> dict[str, Any]:
    src, val = ses.src, ses.val
    note = "; ".join(src.notes) or (f"val split {src.val}; the other tower from {ses.ref.source.strip('; ')}"
                                    if val is not None else None)
    return {"export_dir": str(export_dir.resolve()), "device_info": device_info,
            "device_line": describe_short(device_info),
            "conditions": {"warmup": ses.opts.warmup, "iters": ses.opts.iters, "threads": ses.threads,
                           "mode": ses.common["mode"], "batches": ses.opts.batches, "load": ses.opts.load,
                           "onnxruntime_spinning": ses.opts.spin, "openvino_hint": ses.opts.openvino_hint},
            "val": str(src.val) if src.val else None, "val_images": int(len(val.images)) if val is not None else 0,
            "accuracy_note": note,
            "teacher": {k: v for k, v in (teacher or {}).items() if k in ("name", "identity", "metrics")},
            "rows": rows, "failures": [{"artifact": e.get("name"), "reason": why} for e, why in ses.failures]}


def save_report(out: Path, report: dict[str, Any]) -> dict[str, Path]:
    """Write the report into ``out``; if that fails after all (the disk filled, the folder went away), keep the
    measurements in a new temporary folder and say where, rather than lose them."""
    try:
        return rep.write_report(out, report)
    except OSError as e:
        rescue = Path(tempfile.mkdtemp(prefix="edgedistill-bench-"))
        rep.write_report(rescue, report)
        raise UserError(f"could not write the bench report to {out} ({e.strerror or e}); the measurements are "
                        f"saved in {rescue}") from e


def _recipe_prompt(run_dir: Path) -> str | None:
    """eval.prompt of the run (exports made before export.json recorded the class prompts); None without the
    training stack."""
    try:
        from edgedistill.distill.recipe import load_recipe  # deferred: the training stack
    except ImportError:
        return None
    return load_recipe(run_dir / "recipe.yaml", ["device=cpu"]).eval.prompt


def _tokenizer(src: Sources) -> Any:
    """The export's own tokenizer (no torch); for exports made before it was saved, open_clip's."""
    folder = src.export_dir / str((src.doc.get("tokenizer") or {}).get("folder") or TOKENIZER_FOLDER)
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    if src.student_dir is None:
        return None
    try:
        import open_clip  # deferred: only older exports without a saved tokenizer need it
    except ImportError:
        return None
    return open_clip.get_tokenizer(f"local-dir:{src.student_dir}")


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """torch's CPU threads set for the bench and put back after (a process-wide setting; the demo and tests bench
    in-process); without torch, the number asked for (or the CPU count)."""
    try:
        import torch  # deferred: a device may have no torch
    except ImportError:
        yield threads or (os.cpu_count() or 1)
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        yield threads or previous
    finally:
        torch.set_num_threads(previous)


def _power_sampler(device: str) -> Any:
    """A TegrastatsSampler factory on a Jetson, None elsewhere (power is measured only on Jetsons)."""
    if device != "jetson":
        return None
    return TegrastatsSampler


# ------------------------------------------------------------------------------------------------ remote
def make_bundle(export_dir: Path, doc: dict[str, Any], src: Sources, teacher: dict[str, Any] | None,
                dest: Path) -> Path:
    """A self-contained folder for a remote target: artifacts + export.json, student/, val/, teacher/."""
    dest.mkdir(parents=True)
    for entry in doc["artifacts"]:
        path = export_dir / entry["path"]
        if path.is_file():  # a missing one is reported by the remote bench like a local one
            (dest / entry["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / entry["path"])
            for side in (path.with_name(path.name + ".json"),):  # engine sidecars
                if side.is_file():
                    shutil.copy2(side, dest / (entry["path"] + ".json"))
    shutil.copy2(export_dir / artifacts.MANIFEST, dest / artifacts.MANIFEST)
    tokenizer = export_dir / str((doc.get("tokenizer") or {}).get("folder") or TOKENIZER_FOLDER)
    if tokenizer.is_dir():
        shutil.copytree(tokenizer, dest / tokenizer.name)
    if src.student_dir is not None:
        shutil.copytree(src.student_dir, dest / BUNDLE_STUDENT)
    if src.val is not None:

        manifest = load_manifest(src.val)
        images = dest / BUNDLE_VAL / "images"
        images.mkdir(parents=True)
        lines = []
        for i, entry in enumerate(manifest.entries):
            name = f"{i:06d}{Path(str(entry.image)).suffix.lower() or '.jpg'}"
            if Path(entry.image).is_file():
                shutil.copy2(entry.image, images / name)
            record: dict[str, Any] = {"image": f"images/{name}", "captions": list(entry.captions)}
            if entry.label is not None:
                record["label"] = entry.label
            lines.append(json.dumps(record))
        (dest / BUNDLE_VAL / "val.jsonl").write_text("\n".join(lines) + "\n")
    if teacher is not None:
        (dest / BUNDLE_TEACHER).mkdir()
        info = {k: v for k, v in teacher.items() if k in ("name", "identity", "metrics", "preprocess")}
        if teacher.get("onnx_path") is not None:
            shutil.copy2(teacher["onnx_path"], dest / BUNDLE_TEACHER / "image_fp32.onnx")
            info["onnx"] = "image_fp32.onnx"
        (dest / BUNDLE_TEACHER / "teacher.json").write_text(json.dumps(info, indent=1, default=str))
    (dest / BUNDLE_CONTEXT).write_text(json.dumps({"prompt": src.prompts.prompt, "from": str(export_dir.resolve())}))
    return dest


def remote_args(opts: BenchOptions) -> list[str]:
    """The bench options the remote command gets (the bundle path and --out are added by bench/remote.py)."""
    args = ["--device", opts.device, "--batch", ",".join(str(b) for b in opts.batches), "--warmup",
            str(opts.warmup), "--iters", str(opts.iters)]
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    if opts.teacher:
        args.append("--teacher")
    if opts.e2e:
        args.append("--e2e")
    if opts.load:
        args += ["--load", str(opts.load)]
    if opts.spin is not None:
        args.append("--spin" if opts.spin else "--no-spin")
    if opts.openvino_hint:
        args += ["--openvino-hint", opts.openvino_hint]
    return args


def run_remote(opts: BenchOptions, export_dir: Path, doc: dict[str, Any], out: Path,
               console: Console, emit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:

    src = resolve_sources(export_dir, doc, opts.val)
    scored = src.val if _tokenizer(src) is not None else None  # as a local bench: scores need the tokenizer too
    teacher = teacher_side(src, scored, opts.teacher, console)
    with tempfile.TemporaryDirectory(prefix="edgedistill-bundle-") as tmp:
        with console.status("packing the export for the target"):
            bundle = make_bundle(export_dir, doc, src, teacher, Path(tmp) / "bundle")
        run_remote_bench(opts.host, bundle, remote_args(opts), out, remote_cmd=opts.remote_cmd, port=opts.port,
                         ssh_options=opts.ssh_options, timeout_s=opts.timeout_s, console=console)
    report = read_document(out / rep.REPORT_JSON, BenchReport, f"the report from {opts.host}",
                           "bench again").model_dump()
    report["remote"] = {"host": opts.host, "from": str(export_dir.resolve())}
    atomic.write_text(out / rep.REPORT_JSON, json.dumps(report, indent=2, default=str) + "\n")
    rep.print_table(report, console)
    console.print(f"report from {opts.host}: {safe(out / rep.REPORT_MD)}  plot: {safe(out / rep.PARETO_PNG)}",
                  highlight=False)
    if emit is not None:
        emit(report)
    if report.get("failures"):
        raise UserError(f"{len(report['failures'])} artifact(s) failed on {opts.host}; the report in {out} says why")
    return report

