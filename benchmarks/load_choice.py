"""Does ``edgedistill.load`` pick the right artifact on this CPU? Its choice against every candidate, measured.

    python benchmarks/load_choice.py --export runs/demo/run/export [--rounds 7] [--threads 2]

1. The first load's cost: ``load(export, remeasure=True)`` (every candidate embedded on the probe set and timed),
   then a second load from the cache, both timed.
2. For every image (artifact, backend) that runs here: val image->text R@1 and RSUM on the export's val split
   (against the fp32 text graph's caption embeddings), and the batch-1 / batch-8 p50 latency ratio to the fp32
   graph on onnxruntime CPU, the sides interleaved in ``--rounds`` rounds in one process.
3. Whether load's pick is within 0.5 point of fp32's R@1 and the fastest of those that are.

The result is appended to results/load_choice.csv with the CPU's model and INT8-relevant flags.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import edgedistill  # noqa: E402
from benchmarks.common import report  # noqa: E402
from edgedistill.bench.accuracy import class_prompts, load_bench_val, reference_texts  # noqa: E402
from edgedistill.evaluation.split import score  # noqa: E402
from edgedistill.runtime.backends import candidates  # noqa: E402
from edgedistill.runtime.device import cpu_model, isa_flags  # noqa: E402
from edgedistill.runtime.manifest import read_manifest, verify_artifact  # noqa: E402
from edgedistill.runtime.probe import unit  # noqa: E402
from edgedistill.runtime.tokenizer import load_tokenizer  # noqa: E402

R1_TOLERANCE = 0.5


def p50_ms(runner, staged, seconds: float = 0.25) -> float:
    runner.call(staged)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        runner.to_numpy(runner.call(staged))
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--export", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as bare:  # the export alone, without a bench report: load() measures
        copy = Path(bare) / "export"
        shutil.copytree(args.export, copy)
        # as on a CPU the export did not check: nothing is ruled out beforehand, every candidate is measured
        doc = json.loads((copy / "export.json").read_text())
        for a in doc["artifacts"]:
            a.pop("checked_on", None)
        (copy / "export.json").write_text(json.dumps(doc))
        t0 = time.perf_counter()
        measured = edgedistill.load(copy, device="cpu", threads=args.threads, remeasure=True)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        second = edgedistill.load(copy, device="cpu", threads=args.threads)
        second_s = time.perf_counter() - t0
    first = edgedistill.load(args.export, device="cpu", threads=args.threads)  # as the demo leaves it (bench.json)
    picked = f"{first.info.image['artifact']}@{first.info.image['backend']}"
    picked_measured = f"{measured.info.image['artifact']}@{measured.info.image['backend']}"

    doc = read_manifest(args.export)
    tokenizer = load_tokenizer(args.export / "tokenizer")
    val = load_bench_val(Path(doc["val"]["manifest"]), doc["preprocess"], tokenizer, class_prompts(doc["val"]))
    text_fp32 = next(a for a in doc["artifacts"] if a["name"] == "text_fp32_onnx")
    text_runner = next(c for c in candidates(text_fp32, verify_artifact(args.export, text_fp32), "cpu",
                                             args.threads) if c.backend == "onnxruntime-cpu").make()
    text, class_text = reference_texts(val, lambda t: unit(text_runner.embed(t, 256)))
    runners = {}
    for a in doc["artifacts"]:
        if a["encoder"] != "image" or a["format"] != "onnx":
            continue
        for c in candidates(a, verify_artifact(args.export, a), "cpu", args.threads):
            if c.make is not None:
                runners[f"{a['name']}@{c.backend}"] = c.make()
    acc = {k: score(val.split, unit(r.embed(val.images, 32)), text, class_text, k) for k, r in runners.items()}
    base_key = "image_fp32_onnx@onnxruntime-cpu"
    ratios: dict[str, dict[int, list[float]]] = {k: {1: [], 8: []} for k in runners}
    for _ in range(args.rounds):  # interleaved: every candidate against fp32 in the same round
        for batch in (1, 8):
            x = runners[base_key].stage(val.images[:batch])
            base = p50_ms(runners[base_key], x)
            for k, r in runners.items():
                ratios[k][batch].append(p50_ms(r, r.stage(val.images[:batch])) / base)
    fp32_r1 = acc[base_key]["i2t_r1"]
    eligible = {k for k in runners if acc[k]["i2t_r1"] >= fp32_r1 - R1_TOLERANCE}
    fastest = min(eligible, key=lambda k: np.median(ratios[k][1]))
    stamp = {"date": dt.date.today().isoformat(), "machine": cpu_model(), "flags": " ".join(isa_flags()),
             "cpus": os.cpu_count(), "threads": args.threads, "loadavg_1m": round(os.getloadavg()[0], 2),
             "export": str(args.export), "student": doc.get("vision"), "val_images": len(val.images),
             "first_load_s": round(first_s, 2), "cached_load_s": round(second_s, 2),
             "cached": second.info.chosen_by, "first_load_by": measured.info.chosen_by, "picked": picked, "picked_by": first.info.chosen_by,
             "picked_without_bench": picked_measured, "fastest_within_0.5": fastest,
             "pick_ok": picked == fastest or (picked in eligible and np.median(ratios[picked][1]) <=
                                             1.05 * np.median(ratios[fastest][1]))}
    for k in runners:
        report({**stamp, "candidate": k, "i2t_r1": round(acc[k]["i2t_r1"], 2), "rsum": round(acc[k]["rsum"], 2),
                "r1_minus_fp32": round(acc[k]["i2t_r1"] - fp32_r1, 2),
                "p50_over_fp32_b1": round(float(np.median(ratios[k][1])), 3),
                "p50_over_fp32_b8": round(float(np.median(ratios[k][8])), 3)},
               "load_choice", record=not args.no_record)
    print(json.dumps({"measured": measured.info.measurements, "notes": measured.info.notes}, indent=1))


if __name__ == "__main__":
    main()
