"""`edgedistill embed` at the decode limit: today's decoding (threads, full-size JPEG decode) against
``runtime.decode`` (worker processes, reduced-scale JPEG decode, EXIF orientation), on camera-size and
ImageNet-size photos, with the demo's exported student.

Photos: scikit-image's bundled sample photos (``pip install scikit-image``; benchmark only), cropped at random,
resized to camera sizes (1920x1080, 3264x2448, 4032x3024, a quarter stored sideways with an EXIF rotation) or
ImageNet size (500x375, 375x500), with a full-resolution texture and sensor-like noise laid over them (an upscaled
512 px sample alone is far smoother than a photo), JPEG quality 90. Measured per photo set, interleaved in rounds
so before and after see the same machine state (other work shares the cores):

- decode only: each decoder alone (before: a copy of index.py's thread pool as it was; variants: threads with
  reduced decode, processes with exact decode, one process; after: ``decoded_batches`` defaults);
- inference only: ``Encoder.encode_pixels`` on pixels decoded beforehand;
- end to end: decode -> ``encode_pixels`` loops (before, after), and ``index.build_index`` (after; it also hashes
  every file and writes the index);
- the no-overlap bound ``1 / (1/decode + 1/inference)`` (the two stages share the cores);
- minimum cosine between the embeddings of reduced and exact decode (EXIF on in both), and the sweep of
  ``DRAFT_MARGIN`` that chose it; the start cost of a worker pool by start method.

    python benchmarks/embed_decode.py                      # 240 camera + 400 ImageNet-size photos, 3 rounds
    python benchmarks/embed_decode.py --quick              # 24 + 48 photos, 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import edgedistill.runtime.preprocess as preprocess_module  # noqa: E402
from edgedistill.data.images import open_image, why_unreadable  # noqa: E402
from edgedistill.runtime import decode as decode_module  # noqa: E402
from edgedistill.runtime.decode import decoded_batches  # noqa: E402
from edgedistill.runtime.preprocess import Preprocess  # noqa: E402

MODEL = Path("/tmp/demo1/run/export")
CAMERA = [(1920, 1080), (3264, 2448), (4032, 3024)]
IMAGENET = [(500, 375), (375, 500)]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry")
GREY = ("camera", "coins", "moon", "clock")          # tinted to colour
TEXTURES = ("grass", "gravel", "brick")


# -- photos ------------------------------------------------------------------------------------------------------
def write_photos(folder: Path, n: int, sizes: list[tuple[int, int]], seed: int, sideways: float) -> list[Path]:
    """``n`` JPEGs (quality 90) of the given sizes, each a different random crop of a sample photo."""
    import skimage.data as samples  # deferred: a benchmark-only dependency

    folder.mkdir(parents=True, exist_ok=True)
    paths = sorted(folder.glob("*.jpg"))
    if len(paths) == n:
        return paths
    rng = np.random.default_rng(seed)
    colour = [getattr(samples, name)() for name in PHOTOS]
    grey = [getattr(samples, name)() for name in GREY]
    textures = [getattr(samples, name)().astype(np.int16) for name in TEXTURES]
    tiled: dict[tuple[int, int, int], np.ndarray] = {}  # (texture, w, h) -> its tiled, centred quarter (int16)
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        if rng.random() < 0.7:
            src = colour[int(rng.integers(len(colour)))]
        else:
            g = grey[int(rng.integers(len(grey)))].astype(np.float32)[..., None]
            src = np.clip(g * rng.uniform(0.6, 1.1, size=3), 0, 255).astype(np.uint8)
        t = int(rng.integers(len(textures)))
        if (t, w, h) not in tiled:
            tex = np.tile(textures[t], (h // 512 + 1, w // 512 + 1))[:h, :w]
            tiled[t, w, h] = ((tex - int(tex.mean())) // 4)[..., None]
        pixels = _crop_resize(src, w, h, rng).astype(np.int16) + tiled[t, w, h]
        pixels += rng.integers(-4, 5, size=(h, w, 1), dtype=np.int16)  # sensor-like noise
        out = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        exif = Image.Exif()
        if rng.random() < sideways:
            exif[0x0112] = 6  # a phone's portrait photo, stored sideways
        path = folder / f"{i:04d}.jpg"
        out.save(path, quality=90, exif=exif)
        paths.append(path)
    return paths


def _crop_resize(src: np.ndarray, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    sh, sw = src.shape[:2]
    scale = rng.uniform(0.6, 1.0)
    cw, ch = (sw * scale, sw * scale * h / w) if sw * h / w <= sh else (sh * scale * w / h, sh * scale)
    cw, ch = min(cw, sw), min(ch, sh)
    x0, y0 = rng.uniform(0, sw - cw), rng.uniform(0, sh - ch)
    img = Image.fromarray(src).resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    return np.asarray(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img)


# -- today's decoding (index.py before runtime/decode.py), kept to compare against --------------------------------
def old_decoded_batches(paths: Sequence[Path], preprocess: Preprocess, batch: int, ahead: int = 2,
                        decode: str = "exact", exif: bool = False) -> Iterator[tuple[list[int], np.ndarray, list]]:
    def one(i: int) -> np.ndarray | str:
        try:
            if decode == "exact" and not exif:
                return preprocess.image(open_image(paths[i]))  # as index.py did: edgedistill's reader
            return preprocess.image(paths[i], decode, exif)
        except Exception as e:  # noqa: BLE001
            return why_unreadable(e)

    groups = [list(range(s, min(s + batch, len(paths)))) for s in range(0, len(paths), batch)]
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def produce() -> None:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for group in groups:
                results = list(pool.map(one, group))
                while not stop.is_set():
                    try:
                        ready.put((group, results), timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        ready.put(None)

    threading.Thread(target=produce, name="embed-decode", daemon=True).start()
    try:
        while (item := ready.get()) is not None:
            group, results = item
            good = [(i, r) for i, r in zip(group, results) if not isinstance(r, str)]
            pixels = np.stack([r for _, r in good]) if good else np.zeros((0,), np.float32)
            yield [i for i, _ in good], pixels, [(i, r) for i, r in zip(group, results) if isinstance(r, str)]
    finally:
        stop.set()


# -- measurements -----------------------------------------------------------------------------------------------
Decoder = Callable[[], Iterator[tuple[list[int], np.ndarray, list]]]


def decoders(paths: list[Path], pre: Preprocess, batch: int) -> dict[str, Decoder]:
    return {
        "before: threads, exact": lambda: old_decoded_batches(paths, pre, batch),
        "threads, reduced": lambda: old_decoded_batches(paths, pre, batch, decode="reduced", exif=True),
        "processes, exact": lambda: decoded_batches(paths, pre, batch, decode="exact"),
        "1 process, reduced": lambda: decoded_batches(paths, pre, batch, workers=1),
        "after: processes, reduced": lambda: decoded_batches(paths, pre, batch),
    }


def time_decode(make: Decoder) -> tuple[float, np.ndarray]:
    start, pixels = time.perf_counter(), []
    for _, px, _ in make():
        pixels.append(px)
    return time.perf_counter() - start, np.concatenate(pixels)


def time_inference(enc: Any, pixels: np.ndarray, batch: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        enc.encode_pixels(pixels[i:i + batch], batch)
    return time.perf_counter() - start


def time_end_to_end(make: Decoder, enc: Any, batch: int) -> float:
    start = time.perf_counter()
    for _, px, _ in make():
        enc.encode_pixels(px, batch)
    return time.perf_counter() - start


def time_build_index(folder: Path, enc: Any, batch: int, out: Path) -> float:
    from rich.console import Console

    from edgedistill.runtime.index import build_index
    start = time.perf_counter()
    build_index(folder, enc, out, batch=batch, console=Console(file=open(os.devnull, "w")))
    return time.perf_counter() - start


def cosines(enc: Any, paths: list[Path], pre: Preprocess, batch: int) -> np.ndarray:
    """Per photo: cosine between its embeddings from reduced and from exact decode (EXIF on in both)."""
    def embed(mode: str) -> np.ndarray:
        return np.concatenate([enc.encode_pixels(px, batch) for _, px, _ in
                               decoded_batches(paths, pre, batch, decode=mode, workers=0)])
    return (embed("reduced") * embed("exact")).sum(axis=1)


def margin_sweep(enc: Any, paths: list[Path], pre: Preprocess, batch: int) -> list[dict[str, Any]]:
    """Minimum cosine and one-process decode rate per DRAFT_MARGIN (in this process: workers=0)."""
    rows, kept = [], preprocess_module.DRAFT_MARGIN
    try:
        for margin in (1.0, 1.5, 2.0, 3.0):
            preprocess_module.DRAFT_MARGIN = margin
            start = time.perf_counter()
            list(decoded_batches(paths, pre, batch, workers=0))
            rate = len(paths) / (time.perf_counter() - start)
            cos = cosines(enc, paths, pre, batch)
            rows.append({"margin": margin, "min cosine": round(float(cos.min()), 4),
                         "mean cosine": round(float(cos.mean()), 5), "1-process decode images/s": round(rate, 1)})
    finally:
        preprocess_module.DRAFT_MARGIN = kept
    return rows


def start_costs(pre: Preprocess) -> dict[str, float]:
    """Seconds from creating a 2-worker pool to its first result, by start method (forkserver: the server's own
    start on the first pool, then the later pools)."""
    out = {}
    for method in ("forkserver", "spawn"):
        ctx = decode_module._context() if method == "forkserver" else multiprocessing.get_context(method)
        took = []
        for _ in range(3):
            start = time.perf_counter()
            with ProcessPoolExecutor(2, mp_context=ctx, initializer=decode_module._start_worker,
                                     initargs=(pre, "reduced", True)) as pool:
                list(pool.map(abs, [1, 2]))
                took.append(time.perf_counter() - start)
        out[f"{method} first pool s"], out[f"{method} later pools s"] = round(took[0], 3), round(min(took[1:]), 3)
    return out


def measure(name: str, paths: list[Path], enc: Any, batch: int, rounds: int, work: Path) -> dict[str, Any]:
    pre = enc.preprocess
    n = len(paths)
    makers = decoders(paths, pre, batch)
    _, pixels = time_decode(makers["after: processes, reduced"])  # warm-up: page cache, pools, the runtime
    time_inference(enc, pixels[:batch * 2], batch)
    seconds: dict[str, list[float]] = {}
    for r in range(rounds):
        for label, make in makers.items():
            seconds.setdefault(f"decode {label}", []).append(time_decode(make)[0])
        seconds.setdefault("inference", []).append(time_inference(enc, pixels, batch))
        seconds.setdefault("e2e before", []).append(time_end_to_end(makers["before: threads, exact"], enc, batch))
        seconds.setdefault("e2e after", []).append(time_end_to_end(makers["after: processes, reduced"], enc, batch))
        seconds.setdefault("e2e after build_index", []).append(
            time_build_index(paths[0].parent, enc, batch, work / f"index-{name}-{r}"))
    rate = {k: n / float(np.median(v)) for k, v in seconds.items()}
    row: dict[str, Any] = {"photos": name, "images": n}
    row.update({f"{k} images/s": round(v, 1) for k, v in rate.items()})
    for when, label in (("before", "before: threads, exact"), ("after", "after: processes, reduced")):
        bound = 1 / (1 / rate[f"decode {label}"] + 1 / rate["inference"])
        row[f"no-overlap bound {when} images/s"] = round(bound, 1)
        row[f"e2e {when} / bound"] = round(rate[f"e2e {when}"] / bound, 3)
    row["decode after / before"] = round(rate["decode after: processes, reduced"] / rate["decode before: threads, "
                                                                                           "exact"], 2)
    row["e2e after / before"] = round(rate["e2e after"] / rate["e2e before"], 2)
    cos = cosines(enc, paths, pre, batch)
    row["min cosine reduced vs exact"], row["mean cosine"] = round(float(cos.min()), 4), round(float(cos.mean()), 5)
    return row


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--camera", type=int, default=240, help="camera-size photos")
    ap.add_argument("--imagenet", type=int, default=400, help="ImageNet-size photos")
    ap.add_argument("--model", type=Path, default=MODEL, help="an export folder (default: the demo's)")
    ap.add_argument("--batch", type=int, default=64, help="embed's default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgedistill-embed-decode",
                    help="where the photos are written (kept: a second run reuses them)")
    ap.add_argument("--quick", action="store_true", help="24 + 48 photos, one round: a smoke run")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.camera, args.imagenet, args.rounds = 24, 48, 1
    return args


def main() -> None:
    from benchmarks.common import cpu_model, report  # deferred: it imports torch, which workers must not
    from edgedistill.runtime.loader import load

    args = parse_args()
    sets = {"camera": write_photos(args.work / f"camera-{args.camera}", args.camera, CAMERA, 1, 0.25),
            "imagenet": write_photos(args.work / f"imagenet-{args.imagenet}", args.imagenet, IMAGENET, 2, 0.0)}
    enc = load(args.model, spin=False, batch=args.batch)  # as `edgedistill embed` loads it
    common = {"date": dt.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "machine": cpu_model(), "usable cpus": decode_module.usable_cpus()[0],
              "loadavg_1m_at_start": round(os.getloadavg()[0], 2), "model": str(args.model),
              "artifact": enc.info.image.get("artifact"), "backend": enc.info.image.get("backend"),
              "batch": args.batch, "rounds": args.rounds, **start_costs(enc.preprocess)}
    with tempfile.TemporaryDirectory(prefix="embed-decode-") as tmp:
        for name, paths in sets.items():
            mb = sum(p.stat().st_size for p in paths) / len(paths) / 1e6
            report({**common, **measure(name, paths, enc, args.batch, args.rounds, Path(tmp)),
                    "mean file MB": round(mb, 2)}, "embed_decode", record=not args.no_record)
    for name, paths in sets.items():
        for row in margin_sweep(enc, paths[:120], enc.preprocess, args.batch):
            print(f"margin sweep {name} ({min(120, len(paths))} photos): {row}")


if __name__ == "__main__":
    main()
