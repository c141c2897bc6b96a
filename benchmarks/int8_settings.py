"""Which INT8 settings hold on this CPU: cosine to the fp32 graph and speed, per quantisation setting.

    python benchmarks/int8_settings.py --export runs/demo/run/export [--images DIR] [--calib 128]

For the export's fp32 image graph, quantise it with each setting below (the same calibration images, entropy
ranges) and measure on held-out images: the cosine of each INT8 embedding to the fp32 graph's (min and mean) and
the batch-1 and batch-8 latency ratio INT8 / fp32 on onnxruntime CPU, the two sides interleaved in one run. The
images come from ``--images`` (a folder), else from the export's val split (export.json ``val.manifest``).
Results are appended to results/int8_settings.csv with the CPU's model and INT8-relevant flags: the answer
depends on them (docs/runtime.md#int8).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import report  # noqa: E402
from edgedistill.data.manifest import load_manifest  # noqa: E402
from edgedistill.export.precision import ImageCalibrationReader, Int8Settings, quantize_int8  # noqa: E402
from edgedistill.runtime.device import cpu_model, isa_flags  # noqa: E402
from edgedistill.runtime.ort import ort_session, run_session  # noqa: E402
from edgedistill.runtime.preprocess import Preprocess  # noqa: E402

SETTINGS = {
    "u8s8 full range (before)": Int8Settings("uint8"),
    "u8s8 reduce_range": Int8Settings("uint8", reduce_range=True),
    "u8u8": Int8Settings("uint8", weights="uint8"),
    "s8s8 symmetric": Int8Settings("int8"),
}


def images_of(export: Path, folder: Path | None) -> list[Path]:
    if folder is not None:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    doc = json.loads((export / "export.json").read_text())
    manifest = load_manifest(Path(doc["val"]["manifest"]))
    return [Path(e.image) for e in manifest.entries]


def p50_ms(session, x: np.ndarray, seconds: float) -> float:
    name = session.get_inputs()[0].name
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        session.run(None, {name: x})
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--images", type=Path)
    ap.add_argument("--calib", type=int, default=128, help="calibration images (the rest are scored)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    doc = json.loads((args.export / "export.json").read_text())
    fp32 = args.export / next(a["path"] for a in doc["artifacts"] if a["name"] == "image_fp32_onnx")
    pre = Preprocess(doc["preprocess"])
    paths = images_of(args.export, args.images)
    calib = np.stack([pre.image(p) for p in paths[:args.calib]])
    held = np.stack([pre.image(p) for p in paths[args.calib:args.calib + 512]])
    ref_session = ort_session(fp32, args.threads)
    ref = run_session(ref_session, held)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    stamp = {"date": dt.date.today().isoformat(), "machine": cpu_model(), "flags": " ".join(isa_flags()),
             "threads": args.threads, "loadavg_1m": round(os.getloadavg()[0], 2), "export": str(args.export),
             "student": doc.get("vision"), "size": doc["preprocess"].get("size"), "calib": len(calib),
             "scored": len(held)}
    with tempfile.TemporaryDirectory() as work:
        sessions = {}
        for name, settings in SETTINGS.items():
            out = Path(work) / f"{len(sessions)}.onnx"
            reader = ImageCalibrationReader("image", len(calib), lambda i: calib[i])
            quantize_int8(fp32, out, reader, "entropy", Path(work) / "cache", "bench", settings=settings)
            sessions[name] = ort_session(out, args.threads)
        ratios: dict[str, dict[int, list[float]]] = {n: {1: [], 8: []} for n in sessions}
        for _ in range(args.rounds):  # interleaved: fp32, then each setting, at each batch, every round
            for batch in (1, 8):
                x = held[:batch]
                base = p50_ms(ref_session, x, 0.3)
                for name, session in sessions.items():
                    ratios[name][batch].append(p50_ms(session, x, 0.3) / base)
        for name, session in sessions.items():
            got = run_session(session, held)
            got /= np.linalg.norm(got, axis=1, keepdims=True)
            cos = (got * ref).sum(axis=1)
            report({**stamp, "setting": name, "cos_min": round(float(cos.min()), 5),
                    "cos_mean": round(float(cos.mean()), 5),
                    "int8_over_fp32_b1": round(float(np.median(ratios[name][1])), 3),
                    "int8_over_fp32_b8": round(float(np.median(ratios[name][8])), 3)},
                   "int8_settings", record=not args.no_record)


if __name__ == "__main__":
    main()
