"""onnxruntime vs OpenVINO on the CPU: latency of the students' image encoders, idle and under load.

MobileNetV3-Large and ResNet-18 students (224 px, random weights: latency does not depend on them), exported by
edgedistill's own exporter to fp32 and INT8 QDQ (``quantize_int8``, onnxruntime's CPU flavour: uint8
activations, calibrated on generated scene images), run through bench's own runners: ``OrtRunner`` with
onnxruntime's default spinning threads, ``OrtRunner`` with spinning off, ``OpenVinoRunner`` (LATENCY hint, fp32
compute). Each condition (model x precision x batch x load) times the runtimes interleaved in rounds, so they
see the same machine state; the result is ratios of medians, not absolute times. Under load, ``--load N`` busy
processes (``edgedistill.bench.timing.cpu_load``) run beside the timing: the state of an edge box that also runs
its application (docs/design.md#formats-and-backends: onnxruntime was faster idle, OpenVINO under contention).

    python benchmarks/ort_vs_openvino.py                        # everything: 2 models x 2 precisions x 2 batches x 2 loads
    python benchmarks/ort_vs_openvino.py --quick                # the same conditions, few iterations (a smoke run)
    python benchmarks/ort_vs_openvino.py --models resnet18 --batches 1 --loads 0,4 --no-record

One row per condition is appended to ``results/ort_vs_openvino.csv`` with the command, machine, date and the
1-minute load average when the run started (an "idle" row is only as idle as the machine was).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import cpu_model, report  # noqa: E402
from benchmarks.export_speed import scene_images, student  # noqa: E402
from edgedistill.runtime.backends import OpenVinoRunner, OrtRunner, Runner, package_version  # noqa: E402
from edgedistill.bench.timing import cpu_load, time_cpu  # noqa: E402
from edgedistill.export.graph import ImageEncoder, cosine_parity, export_onnx  # noqa: E402
from edgedistill.export.precision import ORT_CPU_INT8, ImageCalibrationReader, quantize_int8  # noqa: E402

SIZE = 224
# name -> runner factory (graph, precision, threads); the first is the baseline of every ratio
RUNTIMES: dict[str, Callable[[Path, str, int], Runner]] = {
    "onnxruntime": lambda path, precision, threads: OrtRunner(path, precision, "onnxruntime-cpu", threads),
    "onnxruntime-nospin": lambda path, precision, threads: OrtRunner(path, precision, "onnxruntime-cpu", threads,
                                                                     spin=False),
    "openvino": lambda path, precision, threads: OpenVinoRunner(path, threads),
}


def export_graphs(vision: str, precisions: list[str], images: np.ndarray, calib: int, work: Path) -> dict[str, Path]:
    """The student's image encoder as edgedistill exports it: fp32, and INT8 QDQ for onnxruntime's CPU kernels."""
    fp32 = work / f"{vision}_fp32.onnx"
    export_onnx(ImageEncoder(student(vision, SIZE)), torch.from_numpy(images[:2]), fp32, "image", "image_embedding")
    graphs = {"fp32": fp32}
    if "int8" in precisions:
        graphs["int8"] = work / f"{vision}_int8.onnx"
        reader = ImageCalibrationReader("image", calib, lambda i: images[i])
        quantize_int8(fp32, graphs["int8"], reader, "entropy", work / "cache", "scenes", settings=ORT_CPU_INT8)
    return {p: graphs[p] for p in precisions}


def interleaved(runners: dict[str, Runner], x: np.ndarray, warmup: int, iters: int,
                rounds: int) -> dict[str, np.ndarray]:
    """Per-call ms of each runner: warm-up each, then ``rounds`` rounds of iters/rounds calls per runner."""
    staged = {k: r.stage(x) for k, r in runners.items()}
    for k, r in runners.items():
        time_cpu(lambda: r.call(staged[k]), warmup, 0)  # noqa: B023 - called right here
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            times[k] += time_cpu(lambda: r.call(staged[k]), 0, max(1, iters // rounds))  # noqa: B023
    return {k: np.asarray(v) for k, v in times.items()}


def condition_row(base: dict[str, Any], times: dict[str, np.ndarray], parity: dict[str, float]) -> dict[str, Any]:
    row = dict(base)
    for k, t in times.items():
        row[f"{k} p50_ms"] = round(float(np.median(t)), 3)
        row[f"{k} p90_ms"] = round(float(np.percentile(t, 90)), 3)
    ref = float(np.median(times["onnxruntime"]))
    for k in list(times)[1:]:  # > 1: faster than onnxruntime with its defaults
        row[f"{k} speed vs onnxruntime"] = round(ref / float(np.median(times[k])), 3)
    # the two runtimes' embeddings of the same graph; INT8 engines round differently, and a randomly initialised
    # MobileNetV3 is fragile under INT8 in both (each at about 0.94 mean cosine to its fp32 graph)
    row["openvino vs onnxruntime cosine mean"] = round(parity["cosine_mean"], 6)
    row["openvino vs onnxruntime cosine min"] = round(parity["cosine_min"], 6)
    return row


def run_model(vision: str, args: argparse.Namespace, common: dict[str, Any], images: np.ndarray,
              work: Path) -> list[dict[str, Any]]:
    rows = []
    for precision, path in export_graphs(vision, args.precisions, images, args.calib_size, work).items():
        runners = {k: make(path, precision, args.threads) for k, make in RUNTIMES.items()}
        check = images[:8]
        parity = cosine_parity(runners["openvino"].embed(check), runners["onnxruntime"].embed(check))
        for batch in args.batches:
            x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))
            for load in args.loads:
                with cpu_load(load):
                    times = interleaved(runners, x, args.warmup, args.iters, args.rounds)
                row = condition_row({**common, "model": vision, "precision": precision, "batch": batch,
                                     "load": load, "warmup": args.warmup, "iters": args.iters,
                                     "rounds": args.rounds}, times, parity)
                report(row, "ort_vs_openvino", record=not args.no_record)
                rows.append(row)
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    ap.add_argument("--models", default="mobilenetv3_large_100,resnet18", type=lambda t: t.split(","))
    ap.add_argument("--precisions", default="fp32,int8", type=lambda t: t.split(","))
    ap.add_argument("--batches", default="1,32", type=ints)
    ap.add_argument("--loads", default=None, type=ints, help="busy background processes per condition "
                                                             "(default: 0 and --threads)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calib-size", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="few iterations and calibration images: a smoke run")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.warmup, args.iters, args.rounds, args.calib_size = 2, 10, 2, 16
    args.loads = args.loads if args.loads is not None else [0, args.threads]
    if set(args.precisions) - {"fp32", "int8"} or min(args.batches) < 1 or min(args.loads) < 0:
        ap.error("--precisions fp32,int8; --batches and --loads: positive numbers (loads may be 0)")
    return args


def main() -> None:
    if importlib.util.find_spec("openvino") is None:
        sys.exit("ort_vs_openvino: OpenVINO is not installed (pip install 'edgedistill[openvino]')")
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)  # the export's own PyTorch work; timing is onnxruntime's and OpenVINO's
    common = {"date": dt.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "machine": cpu_model(), "cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
              "threads": args.threads, "onnxruntime": package_version("onnxruntime"),
              "openvino": package_version("openvino"), "torch": torch.__version__}
    start = time.monotonic()
    images = scene_images(max(args.calib_size, 8), SIZE)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ort-vs-openvino-") as tmp:
        for vision in args.models:
            rows += run_model(vision, args, common, images, Path(tmp))
    print(f"\n{len(rows)} conditions in {time.monotonic() - start:.0f} s")
    print(f"{'model':<24}{'prec':<6}{'batch':>6}{'load':>6}{'openvino':>10}{'ort nospin':>12}   (speed vs onnxruntime)")
    for r in rows:
        print(f"{r['model']:<24}{r['precision']:<6}{r['batch']:>6}{r['load']:>6}"
              f"{r['openvino speed vs onnxruntime']:>10.2f}{r['onnxruntime-nospin speed vs onnxruntime']:>12.2f}")


if __name__ == "__main__":
    main()
