"""`edgedistill embed` throughput: decode-only, inference-only and end-to-end images/s, per backend and precision.

500 JPEGs of 500x375 (photo stand-ins: gradient, shapes, sensor-like noise; quality 90) are embedded by a
MobileNetV3-Large student at 224 px (random weights: speed does not depend on them), exported by edgedistill's own
exporter to fp32 and INT8 QDQ, on each CPU backend (onnxruntime, OpenVINO when installed). Three measurements per
backend x precision, interleaved in rounds so they see the same machine state:

- decode: ``runtime.decode.decoded_batches`` alone (JPEG decode + the model's transform, in the worker processes
  embed uses);
- inference: ``Encoder.encode_pixels`` on pixels decoded beforehand;
- end-to-end: ``index.build_index`` into a fresh folder, what ``edgedistill embed`` runs (decode overlapped with
  inference, chunks written, index assembled).

The goal (docs/runtime.md#embed) is end-to-end at >= 80% of the slower of decode and inference. On a machine with
few cores the two stages share them, so the bound that is reachable is ``1 / (1/decode + 1/inference)`` (no
overlap possible) and the ratio to it is printed too.

Decoding uses embed's defaults (reduced-scale JPEG decode, EXIF on); at 500x375 for a 224 px model the draft cannot
shrink anything (375 / 2 < 2 x 224). ``benchmarks/embed_decode.py`` measures camera-size photos and a 64 px student.

    python benchmarks/embed_speed.py              # 500 images, fp32 + int8, every installed CPU backend, 3 rounds
    python benchmarks/embed_speed.py --quick      # 64 images, 1 round: a smoke run
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
from typing import Any

import numpy as np
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import cpu_model, report, write_dataset  # noqa: E402
from benchmarks.export_speed import scene_images  # noqa: E402
from benchmarks.ort_vs_openvino import export_graphs  # noqa: E402
from edgedistill.runtime.encoder import Encoder, EncoderInfo  # noqa: E402
from edgedistill.runtime.backends import OpenVinoRunner, OrtRunner, Runner, package_version  # noqa: E402
from edgedistill.data.manifest import load_manifest  # noqa: E402
from edgedistill.runtime.decode import decoded_batches  # noqa: E402
from edgedistill.runtime.index import build_index  # noqa: E402
from edgedistill.runtime.preprocess import Preprocess  # noqa: E402

SIZE = 224
PHOTO = (500, 375)
VISION = "mobilenetv3_large_100"
BACKENDS = ("onnxruntime-cpu", "onnxruntime-cpu-nospin", "openvino-cpu")


def runner(backend: str, path: Path, precision: str, threads: int) -> Runner:
    if backend == "openvino-cpu":
        return OpenVinoRunner(path, threads)
    # onnxruntime as edgedistill.load opens it (its default spinning threads), and with spinning off: its idle
    # threads spin on the cores the decoding threads need
    return OrtRunner(path, precision, "onnxruntime-cpu", threads, spin=False if backend.endswith("nospin") else None)


def encoder(image: Runner, backend: str, precision: str) -> Encoder:
    info = EncoderInfo(source="benchmark", device="cpu", image={"backend": backend, "precision": precision},
                       text=None, chosen_by="request", model=f"{VISION}-{precision}")
    return Encoder(image, None, Preprocess({"size": SIZE}), None, 512, info)


def decode_only(manifest: Any, enc: Encoder, batch: int) -> tuple[float, np.ndarray]:
    start, pixels = time.perf_counter(), []
    for _, px, _ in decoded_batches([e.image for e in manifest.entries], enc.preprocess, batch):
        pixels.append(px)
    return time.perf_counter() - start, np.concatenate(pixels)


def inference_only(enc: Encoder, pixels: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        enc.encode_pixels(pixels[i:i + batch], batch)
    return time.perf_counter() - start


def end_to_end(manifest_path: Path, enc: Encoder, batch: int, out: Path) -> float:
    start = time.perf_counter()
    build_index(manifest_path, enc, out, batch=batch, console=Console(file=open(os.devnull, "w")))
    return time.perf_counter() - start


def measure(backend: str, precision: str, graph: Path, manifest_path: Path, args: argparse.Namespace,
            work: Path) -> dict[str, Any]:
    enc = encoder(runner(backend, graph, precision, args.threads), backend, precision)
    manifest = load_manifest(manifest_path)
    n = len(manifest)
    _, pixels = decode_only(manifest, enc, args.batch)  # warm-up of both stages
    inference_only(enc, pixels[:args.batch * 2], args.batch)
    seconds: dict[str, list[float]] = {"decode": [], "inference": [], "e2e": []}
    for r in range(args.rounds):
        seconds["decode"].append(decode_only(manifest, enc, args.batch)[0])
        seconds["inference"].append(inference_only(enc, pixels, args.batch))
        seconds["e2e"].append(end_to_end(manifest_path, enc, args.batch, work / f"index-{backend}-{precision}-{r}"))
    rate = {k: n / float(np.median(v)) for k, v in seconds.items()}
    slower = min(rate["decode"], rate["inference"])
    serial = 1 / (1 / rate["decode"] + 1 / rate["inference"])
    return {"backend": backend, "precision": precision, "images": n,
            "decode images/s": round(rate["decode"], 1), "inference images/s": round(rate["inference"], 1),
            "e2e images/s": round(rate["e2e"], 1), "e2e / slower stage": round(rate["e2e"] / slower, 3),
            "e2e / no-overlap bound": round(rate["e2e"] / serial, 3)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--precisions", default="fp32,int8", type=lambda t: t.split(","))
    ap.add_argument("--backends", default=None, type=lambda t: t.split(","),
                    help=f"some of {','.join(BACKENDS)} (default: those installed)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="64 images, one round: a smoke run")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = 64, 1
    if args.backends is None:
        args.backends = [b for b in BACKENDS if b != "openvino-cpu" or importlib.util.find_spec("openvino")]
    if set(args.precisions) - {"fp32", "int8"} or set(args.backends) - set(BACKENDS):
        ap.error(f"--precisions fp32,int8; --backends {','.join(BACKENDS)}")
    if min(args.images, args.batch, args.threads, args.rounds) < 1:
        ap.error("--images, --batch, --threads, --rounds: 1 or more")
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    common = {"date": dt.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "machine": cpu_model(), "cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
              "threads": args.threads, "batch": args.batch, "rounds": args.rounds, "photo": "x".join(map(str, PHOTO)),
              "model": VISION, "onnxruntime": package_version("onnxruntime"), "openvino": package_version("openvino")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="embed-speed-") as tmp:
        work = Path(tmp)
        (work / "photos").mkdir()
        manifest = write_dataset(work / "photos", args.images, PHOTO)
        graphs = export_graphs(VISION, args.precisions, scene_images(32, SIZE), 32, work)
        for precision, graph in graphs.items():
            for backend in args.backends:
                row = {**common, **measure(backend, precision, graph, manifest, args, work)}
                report(row, "embed_speed", record=not args.no_record)
                rows.append(row)
    print(f"\n{'backend':<24}{'prec':<6}{'decode':>9}{'infer':>9}{'e2e':>9}{'e2e/slower':>12}{'e2e/bound':>11}")
    for r in rows:
        print(f"{r['backend']:<24}{r['precision']:<6}{r['decode images/s']:>9}{r['inference images/s']:>9}"
              f"{r['e2e images/s']:>9}{r['e2e / slower stage']:>12}{r['e2e / no-overlap bound']:>11}")


if __name__ == "__main__":
    main()
