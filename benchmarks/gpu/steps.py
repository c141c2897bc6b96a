"""The steps of the GPU check (check.py runs them, each in a time box). Each takes a Context and returns a dict:
``status`` ("ok", "failed", "skipped"), ``message``, and the step's figures (``rows`` become CSV files).

On a GPU: ViT-B-32 teacher (random weights) and MobileNetV3-Large student at 224 px, bf16 autocast. With
``--dry-run`` (any machine): a tiny open_clip teacher, MobileNetV3-Small at 32 px, a few steps on the CPU, and
every CUDA-only measurement skipped with a message, so the script's own logic runs everywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
# A real open_clip CLIP small enough for a CPU (the tests' tiny teacher)
TINY_TEACHER = {"embed_dim": 32,
                "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
                "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
PACKAGES = ("torch", "torchvision", "timm", "open_clip_torch", "pydantic", "pydantic_core", "webdataset", "onnxslim",
            "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torch_tensorrt", "cuda-python",
            "cuda-bindings", "numpy")


@dataclass
class Sizes:
    """How big each step is: the GPU run, or the dry run's tiny version."""
    scenes: int = 4096
    scenes_val: int = 256
    scene_px: int = 64
    teacher: str = "ViT-B-32"
    student: str = "mobilenetv3_large_100"
    image_px: int = 224
    batch: int = 64
    workers: int = 8
    steps: int = 240
    kill_at: int = 150
    checkpoint_every: int = 60
    cache_batch: int = 256
    epoch_batch: int = 128
    encoder_batches: tuple[int, ...] = (1, 256)
    encoder_iters: dict[int, int] = field(default_factory=lambda: {1: 200, 256: 20})
    bench_batches: str = "1,64"
    bench_iters: int = 30

    @classmethod
    def dry(cls) -> "Sizes":
        return cls(scenes=48, scenes_val=16, scene_px=32, teacher="tiny", student="mobilenetv3_small_100",
                   image_px=32, batch=8, workers=0, steps=8, kill_at=5, checkpoint_every=2, cache_batch=16,
                   epoch_batch=16, encoder_batches=(1, 4), encoder_iters={1: 3, 4: 3}, bench_batches="1",
                   bench_iters=2)


@dataclass
class Context:
    work: Path
    out: Path
    dry: bool
    cuda: bool
    sizes: Sizes
    compile: bool = False
    log: Callable[[str], None] = print

    @property
    def device(self) -> str:
        return "cuda" if self.cuda else "cpu"

    @property
    def scenes(self) -> Path:
        return self.work / "scenes"

    def teacher(self) -> dict[str, Any]:
        if self.sizes.teacher != "tiny":
            return {"model": self.sizes.teacher, "pretrained": None}
        path = self.work / "tiny-clip.json"
        if not path.is_file():
            path.write_text(json.dumps(TINY_TEACHER))
        return {"model": str(path), "pretrained": None}

    def recipe(self, name: str, val: bool = True, **train: Any) -> dict[str, Any]:
        """A recipe dict for this machine: the scenes data, the check's teacher and student."""
        s = self.sizes
        student: dict[str, Any] = {"vision": s.student}
        if self.dry:
            student["image_size"] = s.image_px
        return {"name": name, "seed": 0, "out": str(self.work / "runs" / name), "device": self.device,
                "teacher": self.teacher(), "student": student,
                "data": {"train": str(self.scenes / "train.jsonl"),
                         "val": str(self.scenes / "val.jsonl") if val else None,
                         "batch_size": s.batch, "workers": s.workers},
                "cache": {"dir": str(self.work / "cache")},
                "train": {"epochs": 100, "max_steps": s.steps, "warmup_steps": max(1, s.steps // 10),
                          "log_every": 1, "checkpoint_every": s.checkpoint_every, "tensorboard": False,
                          "amp": True, **train}}

    def write_recipe(self, raw: dict[str, Any]) -> Path:
        import yaml
        path = self.work / "recipes" / f"{raw['name']}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path


def cli(*args: str) -> int:
    """``edgedistill ARGS`` in this process (its output goes to the log)."""
    from edgedistill.cli import main
    return main([str(a) for a in args])


def skipped(message: str, **extra: Any) -> dict[str, Any]:
    return {"status": "skipped", "message": message, **extra}


def failed(message: str, **extra: Any) -> dict[str, Any]:
    return {"status": "failed", "message": message, **extra}


# ------------------------------------------------------------------------------------------------ env
def step_env(ctx: Context) -> dict[str, Any]:
    """The machine, the packages, and whether everything edgedistill imports is there."""
    import importlib
    import importlib.metadata as md

    import torch
    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch_cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "dry_run": ctx.dry}
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    missing = []
    for module in ("edgedistill.cli", "edgedistill.distill.train", "edgedistill.bench.runner", "open_clip", "pydantic",
                   "webdataset", "onnxslim"):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - recorded, the later steps say what they need
            missing.append(f"{module}: {type(e).__name__}: {e}")
    import edgedistill
    info.update(packages=versions, edgedistill=str(Path(edgedistill.__file__).parent))
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16=torch.cuda.is_bf16_supported(), nvidia_smi=_nvidia_smi(),
                    cuda_python=_cuda_python_view())
    if missing:
        return failed("imports failed: " + "; ".join(missing), env=info)
    return {"status": "ok", "message": "CUDA steps skipped: --dry-run" if ctx.dry else f"GPU {info.get('gpu')}",
            "env": info}


def _cuda_python_view() -> Any:
    """The GPU as the torch-free runtime sees it (cuda-python: the TensorRT runner's buffers, the engine sidecar's
    identity), or the one-line reason it does not."""
    from edgedistill.core.errors import UserError
    from edgedistill.runtime.cuda import gpu_properties
    try:
        return gpu_properties(what="the GPU check")
    except UserError as e:
        return str(e)


def _nvidia_smi() -> str | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    fields = "name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    proc = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True,
                          timeout=20)
    return proc.stdout.strip() or proc.stderr.strip()


# ------------------------------------------------------------------------------------------------ tests
def step_gpu_tests(ctx: Context, timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu``; the dry run collects one GPU test file, whose tests skip cleanly without CUDA."""
    import xml.etree.ElementTree as ET

    xml = ctx.work / "gpu_tests.xml"
    targets = ["tests"] if ctx.cuda else ["tests/test_train_gpu.py"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           f"--junitxml={xml}", *targets]
    proc = subprocess.run(cmd, cwd=REPO, timeout=max(5.0, timeout_s - 5), stderr=subprocess.STDOUT)
    if not xml.is_file():
        return failed(f"pytest exited with {proc.returncode} and wrote no report")
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{case.get('classname')}.{case.get('name')}: {(child.get('message') or '').splitlines()[0][:200]}"
           for case in suite.iter("testcase") for child in case if child.tag in ("failure", "error")]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    status = "ok" if proc.returncode == 0 else "failed"
    return {"status": status, "message": f"pytest -m gpu: {counts['passed']} passed, {counts['skipped']} skipped, "
                                         f"{counts['failures'] + counts['errors']} failed", "tests": counts,
            "failing": bad}


# ------------------------------------------------------------------------------------------------ data
def step_data(ctx: Context) -> dict[str, Any]:
    s = ctx.sizes
    t = time.perf_counter()
    rc = cli("data", "scenes", "--out", ctx.scenes, "--n", s.scenes, "--n-val", s.scenes_val, "--n-hard", 1,
             "--n-ood", 1, "--size", s.scene_px, "--workers", min(16, os.cpu_count() or 1))
    if rc != 0:
        return failed(f"edgedistill data scenes exited with {rc}")
    return {"status": "ok", "message": f"{s.scenes} + {s.scenes_val} scenes at {s.scene_px} px",
            "seconds": round(time.perf_counter() - t, 2)}


# ------------------------------------------------------------------------------------------------ resume
def _losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    return {int(r["step"]): float(r["loss"]) for r in lines}


def _weight_diff(a: Path, b: Path) -> float:
    import torch
    wa = torch.load(a / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["model"]
    wb = torch.load(b / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["model"]
    return max((float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].is_floating_point()),
               default=0.0)


def step_distill_resume(ctx: Context, timeout_s: float) -> dict[str, Any]:
    """Distill with AMP, SIGKILL mid-run (EDGEDISTILL_FAULT_KILL_AFTER_STEP), resume, compare with a whole run."""
    import torch

    from edgedistill.distill.train import FAULT_ENV
    s = ctx.sizes
    for name in ("crash", "whole"):
        shutil.rmtree(ctx.work / "runs" / name, ignore_errors=True)
    crash, whole = ctx.write_recipe(ctx.recipe("crash")), ctx.write_recipe(ctx.recipe("whole"))
    timings: dict[str, float] = {}
    t = time.perf_counter()
    killed = subprocess.run([sys.executable, "-m", "edgedistill", "distill", str(crash)], cwd=REPO,
                            env={**os.environ, FAULT_ENV: str(s.kill_at)}, timeout=max(5.0, timeout_s / 2),
                            stderr=subprocess.STDOUT)
    timings["killed_run_s"] = round(time.perf_counter() - t, 2)
    if killed.returncode != -9:
        return failed(f"the run meant to be killed after step {s.kill_at} exited with {killed.returncode}")
    crash_dir, whole_dir = ctx.work / "runs" / "crash", ctx.work / "runs" / "whole"
    resumed_from = int(torch.load(crash_dir / "checkpoints" / "last.pt", weights_only=True,
                                  map_location="cpu")["state"]["step"])
    for key, args in (("resumed_run_s", ("distill", crash, "--resume")), ("whole_run_s", ("distill", whole))):
        t = time.perf_counter()
        rc = cli(*args)
        timings[key] = round(time.perf_counter() - t, 2)
        if rc != 0:
            return failed(f"edgedistill {' '.join(map(str, args))} exited with {rc}", **timings)
    return _compare_runs(whole_dir, crash_dir, resumed_from, timings)


def _compare_runs(whole: Path, resumed: Path, resumed_from: int, timings: dict[str, float]) -> dict[str, Any]:
    a, b = _losses(whole), _losses(resumed)
    steps = sorted(a)
    rows = [{"step": k, "loss_whole": a[k], "loss_killed_and_resumed": b.get(k),
             "rel_diff": abs(b[k] - a[k]) / max(abs(a[k]), 1e-12) if k in b else None} for k in steps]
    diffs = [r["rel_diff"] for r in rows if r["rel_diff"] is not None]
    before = [r["rel_diff"] for r in rows if r["step"] <= resumed_from and r["rel_diff"] is not None]
    after = [r["rel_diff"] for r in rows if r["step"] > resumed_from and r["rel_diff"] is not None]
    weights = _weight_diff(whole, resumed)
    summary = {"steps": len(steps), "resumed_from": resumed_from, "same_steps": sorted(b) == steps,
               "identical_before_kill": all(d == 0 for d in before),
               "max_rel_loss_diff_after_resume": max(after, default=None), "max_abs_weight_diff": weights,
               "exact": bool(diffs) and all(d == 0 for d in diffs) and weights == 0.0, **timings}
    close = summary["same_steps"] and max(diffs, default=float("inf")) <= 1e-2  # fails closed on NaN: nan <= x
    message = (f"resumed from step {resumed_from}: {'bit-exact' if summary['exact'] else 'not bit-exact'}, "
               f"max relative loss difference {max(diffs, default=float('nan')):.2e}, weights {weights:.2e}")
    return {"status": "ok" if close else "failed", "message": message, "resume": summary, "rows": rows}


# ------------------------------------------------------------------------------------------------ cache
def _autocast(kind: str) -> Callable[[], Any]:
    import torch
    if kind == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16
    return lambda: torch.autocast("cuda", dtype=dtype)


def step_cache_build(ctx: Context) -> dict[str, Any]:
    """Teacher feature cache build images/s: the teacher in fp32 vs bf16 autocast (and the library's fp16)."""
    import torch

    from edgedistill.distill.cache import caches_for_recipe, load_split_manifests
    from edgedistill.distill.recipe import validate_recipe
    from edgedistill.distill.teachers import load_teacher
    kinds = ("fp32", "bf16", "fp16") if ctx.cuda else ("fp32",)
    rows: list[dict[str, Any]] = [] if ctx.cuda else [
        {"kind": k, "status": "skipped", "message": "autocast on CUDA only"} for k in ("bf16", "fp16")]
    teacher = None
    for kind in kinds:
        raw = ctx.recipe("cache", val=False)
        raw["data"].update(batch_size=ctx.sizes.cache_batch, workers=max(ctx.sizes.workers, 0))
        raw["cache"]["dir"] = str(ctx.work / f"cache-{kind}")
        shutil.rmtree(raw["cache"]["dir"], ignore_errors=True)
        recipe = validate_recipe(raw)
        manifests = load_split_manifests(recipe)
        teacher = teacher or load_teacher(recipe.teacher, ctx.device)
        if ctx.cuda:
            teacher._autocast = _autocast(kind)  # the cache build's forward pass in this precision
            teacher.embed_images(torch.randn(8, 3, ctx.sizes.image_px, ctx.sizes.image_px))  # kernels warm
            torch.cuda.synchronize()
        t = time.perf_counter()
        result = caches_for_recipe(recipe, teacher, manifests)["train"]
        seconds = time.perf_counter() - t
        n = len(manifests["train"].entries)
        rows.append({"kind": kind, "status": "ok", "images": n, "seconds": round(seconds, 3),
                     "images_per_s": round(n / seconds, 1), "batch": ctx.sizes.cache_batch,
                     "workers": ctx.sizes.workers, "hit": bool(result.hit)})
    done = {r["kind"]: r for r in rows if r["status"] == "ok"}
    ratio = done["bf16"]["images_per_s"] / done["fp32"]["images_per_s"] if "bf16" in done else None
    return {"status": "ok", "message": f"cache build {done['fp32']['images_per_s']} images/s fp32"
            + (f", bf16 {ratio:.2f}x" if ratio else "; bf16/fp16 autocast skipped: no CUDA"),
            "rows": rows, "bf16_speedup": ratio}


# ------------------------------------------------------------------------------------------------ epoch
def step_epoch(ctx: Context) -> dict[str, Any]:
    """One training epoch with cached teacher features vs the teacher online (the cache's speed-up)."""
    from rich.console import Console

    from edgedistill.distill.cache import caches_for_recipe, load_split_manifests
    from edgedistill.distill.recipe import validate_recipe
    from edgedistill.distill.teachers import load_teacher
    from edgedistill.distill.train import build_trainer
    raw = ctx.recipe("epoch", val=False, epochs=1, max_steps=None, checkpoint_every=0, log_every=10)
    raw["data"]["batch_size"] = ctx.sizes.epoch_batch
    recipe = validate_recipe(raw)
    manifests = load_split_manifests(recipe)
    teacher = load_teacher(recipe.teacher, ctx.device)
    cache = caches_for_recipe(recipe, teacher, manifests)["train"].cache
    rows = []
    for mode in ("cached", "online"):
        run = validate_recipe({**raw, "out": str(ctx.work / "runs" / f"epoch-{mode}"),
                               "train": {**raw["train"], "teacher": mode}})
        shutil.rmtree(run.out, ignore_errors=True)
        trainer = build_trainer(run, teacher, manifests, {"train": cache} if mode == "cached" else {},
                                Console(stderr=True))
        trainer.fit()
        st = trainer.state
        rows.append({"mode": mode, "images": st.images, "seconds": round(st.train_seconds, 3),
                     "images_per_s": round(st.images / max(st.train_seconds, 1e-9), 1),
                     "batch": ctx.sizes.epoch_batch, "workers": ctx.sizes.workers, "device": ctx.device})
    speedup = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    return {"status": "ok", "message": f"cached {rows[0]['images_per_s']} vs online {rows[1]['images_per_s']} "
                                       f"images/s ({speedup:.2f}x)", "rows": rows, "cached_speedup": speedup}


# ------------------------------------------------------------------------------------------------ encoders
ENCODER_MODES = ("fp32", "bf16", "bf16+cudagraph", "bf16+compile")  # bf16: autocast, channels_last


def _encoder_models(ctx: Context) -> dict[str, Any]:
    """The teacher's image encoder (open_clip, random weights) and the student's vision tower (timm)."""
    import timm

    from edgedistill.distill.recipe import validate_recipe
    from edgedistill.distill.teachers import load_teacher
    teacher = load_teacher(validate_recipe(ctx.recipe("encoders", val=False)).teacher, ctx.device)
    student = timm.create_model(ctx.sizes.student, pretrained=False, num_classes=teacher.embed_dim)
    return {"student": student.eval().to(ctx.device), "teacher": teacher.model.visual.eval()}


def _prepare(model: Any, x: Any, mode: str) -> Callable[[], Any]:
    """A call running ``model`` on ``x`` in ``mode`` (bf16 modes: autocast and channels_last)."""
    import copy

    import torch
    if mode == "fp32":
        return lambda: model(x)
    m = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)  # noqa: E731
    if mode != "bf16+cudagraph":
        run = torch.compile(m) if mode == "bf16+compile" else m

        def call() -> Any:
            with autocast():
                return run(xc)
        return call
    static = xc.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), autocast():  # warm up off the capture, as CUDA graphs want
        for _ in range(3):
            m(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), autocast():
        m(static)
    return graph.replay


def _time(call: Callable[[], Any], iters: int, cuda: bool) -> float:
    """Mean milliseconds per call over ``iters`` back-to-back calls, after 3 warm-up calls."""
    import torch
    for _ in range(3):
        call()
    if not cuda:
        t = time.perf_counter()
        for _ in range(iters):
            call()
        return (time.perf_counter() - t) * 1000 / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def _mode_skip(ctx: Context, mode: str) -> str | None:
    if mode != "fp32" and not ctx.cuda:
        return "bf16 autocast, CUDA graphs and torch.compile are measured on CUDA only"
    if mode == "bf16+compile" and not ctx.compile:
        return "torch.compile is off (its compile time does not fit the budget); --compile turns it on"
    return None


def step_encoders(ctx: Context) -> dict[str, Any]:
    """Student vs teacher image-encoder throughput in PyTorch at each batch and mode."""
    import torch
    s = ctx.sizes
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for role, model in _encoder_models(ctx).items():
            for batch in s.encoder_batches:
                x = torch.randn(batch, 3, s.image_px, s.image_px, device=ctx.device)
                for mode in ENCODER_MODES:
                    row = {"role": role, "model": s.teacher if role == "teacher" else s.student, "batch": batch,
                           "mode": mode, "device": ctx.device}
                    why = _mode_skip(ctx, mode)
                    if why:
                        rows.append({**row, "status": "skipped", "message": why})
                        continue
                    try:
                        ms = _time(_prepare(model, x, mode), s.encoder_iters[batch], ctx.cuda)
                    except Exception as e:  # noqa: BLE001 - one mode failing must not hide the others
                        rows.append({**row, "status": "failed", "message": f"{type(e).__name__}: {e}"[:300]})
                        continue
                    rows.append({**row, "status": "ok", "ms_per_batch": round(ms, 4),
                                 "images_per_s": round(batch * 1000 / ms, 1)})
    ok = [r for r in rows if r["status"] == "ok"]
    best = {role: max((r["images_per_s"] for r in ok if r["role"] == role and r["batch"] == max(s.encoder_batches)),
                      default=None) for role in ("student", "teacher")}
    ratio = best["student"] / best["teacher"] if best["student"] and best["teacher"] else None
    bad = [r for r in rows if r["status"] == "failed"]
    return {"status": "failed" if bad else "ok", "rows": rows, "student_over_teacher": ratio,
            "message": (f"batch {max(s.encoder_batches)}: student {best['student']} vs teacher {best['teacher']} "
                        f"images/s" + (f" ({ratio:.1f}x)" if ratio else "") + (f"; {len(bad)} mode(s) failed"
                                                                                 if bad else ""))}


# ------------------------------------------------------------------------------------------------ bench
def step_bench(ctx: Context) -> dict[str, Any]:
    """``edgedistill export`` of the distilled student, then ``edgedistill bench --device cuda`` on it."""
    run = ctx.work / "runs" / "whole"
    if not (run / "student").is_dir():
        return failed("needs the distilled student of the distill_resume step, which is missing")
    export, out = ctx.work / "export", ctx.work / "bench"
    for folder in (export, out):
        shutil.rmtree(folder, ignore_errors=True)
    rc = cli("export", run, "--out", export, *(["--fp16"] if ctx.cuda else []))  # fp16 graphs: skipped rows on CUDA
    if rc != 0:
        return failed(f"edgedistill export exited with {rc}")
    device = ctx.device
    rc = cli("bench", export, "--device", device, "--batch", ctx.sizes.bench_batches, "--iters",
             ctx.sizes.bench_iters, "--warmup", 5 if ctx.cuda else 1, "--out", out)
    report_path = out / "bench.json"
    if not report_path.is_file():
        return failed(f"edgedistill bench --device {device} exited with {rc} and wrote no report")
    shutil.copy2(report_path, ctx.out / "bench.json")
    rows = json.loads(report_path.read_text())["rows"]
    timed = sorted({(r["backend"], r["artifact"]) for r in rows if r["status"] == "ok" and r.get("p50_ms")})
    skips = sorted({f"{r['backend']}: {r['reason']}" for r in rows if r["status"] == "skipped"})
    wanted = f"pytorch-{device}"
    ok = rc == 0 and any(b == wanted for b, _ in timed)
    message = (f"bench --device {device}: {len(timed)} artifact/backend pairs timed, {len(skips)} skip reasons"
               + ("" if ctx.cuda else "; bench --device cuda skipped: no CUDA (ran --device cpu)"))
    return {"status": "ok" if ok else "failed", "message": message if ok else f"exit {rc}; {message}",
            "timed": [f"{b} {a}" for b, a in timed], "skipped_reasons": skips,
            "failures": [r["reason"] for r in rows if r["status"] == "failed"]}
