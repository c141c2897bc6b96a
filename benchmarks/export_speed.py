"""ONNX latency on onnxruntime CPU, measured side by side in one run:

* ``--pair teacher``: the student's image encoder (MobileNetV3-Large, 224 px) vs the teacher's image tower
  (open_clip ViT-B-32), both FP32, both exported by edgedistill's own exporter. Issue target: >= 15x.
* ``--pair int8``: a ResNet-18 student's image encoder, FP32 vs the calibrated INT8 QDQ graph
  (``edgedistill.export.precision.quantize_int8`` with onnxruntime's CPU flavour, and the TensorRT flavour with
  symmetric int8 activations for comparison). Issue target: >= 2.5x.

Weights are random (no download; latency does not depend on them); calibration uses generated scene images.
Rounds alternate between the graphs so both see the same machine state; the ratio is of medians.

    python benchmarks/export_speed.py --pair teacher
    python benchmarks/export_speed.py --pair int8 --batch 1
    python benchmarks/export_speed.py --pair int8 --run runs/scenes-resnet18   # + a trained student's accuracy

``--run RUN_DIR`` (a distilled ResNet-18 run) also exports that student with ``edgedistill export --int8`` and
records its val Recall@1 at FP32 and INT8 (from export.json) and both graphs' latency at its own input size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import open_clip
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import cpu_model, report  # noqa: E402
from edgedistill.export.graph import ImageEncoder, export_onnx  # noqa: E402
from edgedistill.runtime.ort import ort_session  # noqa: E402
from edgedistill.export.precision import ORT_CPU_INT8, TENSORRT_INT8, ImageCalibrationReader, quantize_int8  # noqa: E402
from edgedistill.distill.teachers import register_open_clip_config  # noqa: E402


def student(vision: str, size: int = 224) -> torch.nn.Module:
    name = f"bench-{vision}-{size}"
    register_open_clip_config(name, {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": vision, "timm_model_pretrained": False, "timm_pool": "avg",
                       "timm_proj": "", "image_size": size},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 1}})
    return open_clip.create_model(name).eval()


def scene_images(n: int, size: int) -> np.ndarray:
    """Preprocessed (N, 3, size, size) float32 scene images (the demo's data) for calibration and timing."""
    from edgedistill.data.scenes import make_scene, render

    mean = np.array(open_clip.OPENAI_DATASET_MEAN, np.float32)[:, None, None]
    std = np.array(open_clip.OPENAI_DATASET_STD, np.float32)[:, None, None]
    out = [(np.asarray(render(make_scene((7, i)), size), np.float32).transpose(2, 0, 1) / 255 - mean) / std
           for i in range(n)]
    return np.stack(out).astype(np.float32)


def time_side_by_side(paths: dict[str, Path], x: np.ndarray, threads: int, warmup: int, iters: int,
                      rounds: int = 5) -> dict[str, np.ndarray]:
    sessions = {k: ort_session(p, threads) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, {s.get_inputs()[0].name: x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):  # alternate so both graphs see the same machine state
        for k, s in sessions.items():
            name = s.get_inputs()[0].name
            for _ in range(iters // rounds):
                t = time.perf_counter()
                s.run(None, {name: x})
                times[k].append((time.perf_counter() - t) * 1000)
    return {k: np.array(v) for k, v in times.items()}


def trained_run(args: argparse.Namespace, row: dict) -> dict[str, np.ndarray]:
    """Export a distilled run with INT8 (onnxruntime CPU flavour), record val R@1 and time both graphs."""
    from edgedistill.export.exporter import ExportOptions, run_export

    out = Path(tempfile.mkdtemp(prefix="export-speed-"))
    doc = run_export(ExportOptions(run_dir=args.run, format="onnx", int8=True, calib_size=args.calib_size, out=out))
    arts = {a["precision"]: a for a in doc["artifacts"] if a["encoder"] == "image"}
    size = doc["preprocess"]["size"]
    size = size[-1] if isinstance(size, list) else size
    row.update({"trained run": str(args.run), "trained input px": size, "val images": doc["val"]["images"],
                "trained fp32 val i2t_r1": arts["fp32"]["val"]["i2t_r1"],
                "trained int8 val i2t_r1": arts["int8"]["val"]["i2t_r1"],
                "trained fp32 val t2i_r1": arts["fp32"]["val"]["t2i_r1"],
                "trained int8 val t2i_r1": arts["int8"]["val"]["t2i_r1"],
                "trained int8 parity cosine": round(arts["int8"]["parity"]["cosine_mean"], 5)})
    x = np.random.default_rng(0).normal(size=(args.batch, 3, size, size)).astype(np.float32)
    return {f"trained {p}": t for p, t in time_side_by_side(
        {p: out / arts[p]["path"] for p in ("fp32", "int8")}, x, args.threads, args.warmup, args.iters).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", choices=["teacher", "int8"], required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--run", type=Path, default=None, help="a distilled run to export and score (int8 pair)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        x = scene_images(max(args.batch, args.calib_size), 224)
        graphs: dict[str, Path] = {}
        if args.pair == "teacher":
            teacher = open_clip.create_model("ViT-B-32").eval()
            export_onnx(ImageEncoder(teacher), torch.from_numpy(x[:2]), work / "teacher.onnx", "image", "emb")
            export_onnx(ImageEncoder(student("mobilenetv3_large_100")), torch.from_numpy(x[:2]),
                        work / "student.onnx", "image", "emb")
            graphs = {"ViT-B-32 fp32": work / "teacher.onnx", "mobilenetv3_large_100 fp32": work / "student.onnx"}
        else:
            export_onnx(ImageEncoder(student("resnet18")), torch.from_numpy(x[:2]), work / "fp32.onnx", "image",
                        "emb")
            graphs = {"resnet18 fp32": work / "fp32.onnx"}
            for flavour, symmetric in (("cpu", False), ("tensorrt", True)):
                reader = ImageCalibrationReader("image", args.calib_size, lambda i: x[i])
                quantize_int8(work / "fp32.onnx", work / f"int8-{flavour}.onnx", reader, "entropy", work / "cache",
                              "scenes", settings=TENSORRT_INT8 if symmetric else ORT_CPU_INT8)
                graphs[f"resnet18 int8 ({flavour} flavour)"] = work / f"int8-{flavour}.onnx"
        times = time_side_by_side(graphs, x[:args.batch], args.threads, args.warmup, args.iters)
    row_extra: dict = {}
    if args.run is not None:
        times.update(trained_run(args, row_extra))
    names = list(times)
    base = float(np.median(times[names[0]]))
    row = {"date": dt.date.today().isoformat(), "machine": cpu_model(), "threads": args.threads,
           "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "pair": args.pair,
           "batch": args.batch, "warmup": args.warmup, "iters": args.iters}
    for k in names:
        row[f"{k} p50_ms"] = round(float(np.median(times[k])), 2)
        row[f"{k} p90_ms"] = round(float(np.percentile(times[k], 90)), 2)
    for k in names[1:]:
        if not k.startswith("trained"):
            row[f"speed-up {k} vs {names[0]}"] = round(base / float(np.median(times[k])), 2)
    if "trained fp32" in times:
        row["speed-up trained int8 vs fp32"] = round(float(np.median(times["trained fp32"]))
                                                     / float(np.median(times["trained int8"])), 2)
    row.update(row_extra)
    report(row, f"export_speed_{args.pair}", record=not args.no_record)


if __name__ == "__main__":
    main()
