"""edgedistill.runtime.decode: batches decoded in worker processes, in order, unreadable images reported with
their position, workers gone when the consumer stops early or on Ctrl-C; reduced-scale decode close to exact."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from edgedistill.core.errors import UserError
from edgedistill.runtime.decode import DECODE_MODES, decoded_batches
from edgedistill.runtime.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess
from tests.test_runtime_preprocess import write_image

ROOT = Path(__file__).resolve().parents[1]
DESC = {"size": 64, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
        "resize_mode": "shortest"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """24 JPEGs of 640x480 (every fourth stored sideways with an EXIF rotation) and 4 PNGs."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    jpegs = [write_image(folder / f"{i:02d}.jpg", rng, (640, 480), "exif6.jpg" if i % 4 == 0 else "RGB.jpg")
             for i in range(24)]
    return jpegs + [write_image(folder / f"{i:02d}.png", rng, (320, 240), "RGB.png") for i in range(24, 28)]


def _sources(photos: list[Path], tmp_path: Path) -> tuple[list[Path], dict[int, str]]:
    """The photos with three unreadable files among them -> (sources, {position: start of the reason})."""
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(photos[1].read_bytes()[:400])
    sources = list(photos)
    sources.insert(3, tmp_path / "missing.jpg")
    sources.insert(17, tmp_path / "notes.jpg")
    sources.insert(29, tmp_path / "cut.jpg")
    return sources, {3: "file not found", 17: "not an image file", 29: "unreadable ("}


@pytest.mark.parametrize("workers", [2, 1, 0])
def test_batches_are_in_order_and_unreadable_images_reported(photos, tmp_path, workers):
    sources, unreadable = _sources(photos, tmp_path)
    pre = Preprocess(DESC)
    batches = list(decoded_batches(sources, pre, 8, workers=workers))
    assert [len(p) + len(b) for p, _, b in batches] == [8, 8, 8, 7]  # 31 sources in batches of 8
    positions = [i for p, _, _ in batches for i in p]
    assert positions == [i for i in range(len(sources)) if i not in unreadable]
    bad = [b for _, _, bs in batches for b in bs]
    assert [i for i, _ in bad] == sorted(unreadable) and all(why.startswith(unreadable[i]) for i, why in bad), bad
    pixels = np.concatenate([px for _, px, _ in batches])
    assert pixels.dtype == np.float32 and pixels.shape == (len(positions), 3, 64, 64)
    want = np.stack([pre(sources[i], decode="reduced", exif=True) for i in positions])
    assert np.array_equal(pixels, want)  # the worker's crops, normalised here: the same numbers


def test_decode_and_exif_settings_reach_the_workers(photos):
    pre = Preprocess(DESC)
    got = np.concatenate([px for _, px, _ in decoded_batches(photos, pre, 16, decode="exact", exif=False, workers=2)])
    assert np.array_equal(got, pre(photos))  # exact, no EXIF: open_clip's pixels
    turned = np.concatenate([px for _, px, _ in decoded_batches(photos, pre, 16, workers=2, exif=True)])
    assert not np.allclose(turned[0], got[0], atol=0.1) and np.array_equal(turned[0], pre(photos[0], "reduced", True))


def test_empty_input_and_bad_arguments():
    pre = Preprocess(DESC)
    assert list(decoded_batches([], pre, 8)) == []
    assert DECODE_MODES == ("reduced", "exact")
    for kwargs, message in [({"decode": "fast"}, "decode 'fast'"), ({"workers": -1}, "workers"),
                            ({"batch": 0}, "batch")]:
        with pytest.raises(UserError, match=message):
            list(decoded_batches(["a.jpg"], pre, **{"batch": 8, **kwargs}))


def test_closing_the_generator_early_stops_the_workers(photos):
    gen = decoded_batches(photos * 4, Preprocess(DESC), 4, workers=2)
    first = next(gen)
    assert first[0] == [0, 1, 2, 3]
    workers = multiprocessing.active_children()
    assert len(workers) == 2 and all(p.is_alive() for p in workers)
    gen.close()
    assert multiprocessing.active_children() == [] and not any(p.is_alive() for p in workers)


INTERRUPTED = """
import multiprocessing, sys, time
from edgedistill.runtime.decode import decoded_batches
from edgedistill.runtime.preprocess import Preprocess
if __name__ == "__main__":
    try:
        for k, _ in enumerate(decoded_batches(sys.argv[1:] * 20, Preprocess({"size": 64}), 4, workers=2)):
            if k == 0:
                print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
            time.sleep(0.05)  # a consumer slower than decoding: the workers wait with batches ready
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
"""


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (field 6 of /proc/PID/stat), zombies left out."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads sessions from /proc")
def test_ctrl_c_stops_the_run_and_leaves_no_process(photos, tmp_path):
    """Ctrl-C reaches the whole process group: the workers ignore it, the parent stops them and exits."""
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED)
    run = subprocess.Popen([sys.executable, str(script), *map(str, photos[:8])], stdout=subprocess.PIPE, text=True,
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        workers = [int(p) for p in run.stdout.readline().split()]
        assert len(workers) == 2 and len(_session(run.pid)) >= 3  # the parent, its workers (and forkserver)
        os.killpg(run.pid, signal.SIGINT)
        out, _ = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130 and "interrupted" in out
    deadline = time.monotonic() + 20  # the forkserver exits when it sees its parent gone
    while _session(run.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session(run.pid) == []


def _photo_set(folder: Path) -> list[Path]:
    rng = np.random.default_rng(7)
    sizes = [(4032, 3024), (3000, 2000), (1920, 1080), (1080, 1920), (1000, 750), (500, 375)]
    return [write_image(folder / f"{w}x{h}.jpg", rng, (w, h), "RGB.jpg") for w, h in sizes]


@pytest.mark.slow
def test_reduced_decode_embeds_like_exact(tmp_path):
    """Large JPEGs decoded at 1/2 to 1/8 scale embed like full decodes (timm MobileNetV3-Small, random weights):
    cosine >= 0.99 at 64 and 224 px, while different photos stay far apart (the check can fail)."""
    photos = _photo_set(tmp_path)
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=0).eval()

    def embed(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(x)).numpy()
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    for size in (64, 224):
        pre = Preprocess({**DESC, "size": size})
        exact, reduced = embed(pre(photos)), embed(pre(photos, decode="reduced"))
        cosine = (exact * reduced).sum(axis=1)
        assert cosine.min() >= 0.99, f"{size} px: min cosine {cosine.min():.4f} at {photos[int(cosine.argmin())].name}"
        others = exact @ exact.T - 2 * np.eye(len(photos))
        assert others.max() < cosine.min(), f"{size} px: different photos at cosine {others.max():.4f}"
        pixels = np.abs(pre(photos[:3]) - pre(photos[:3], decode="reduced")).mean()
        assert pixels < 0.05, f"{size} px: mean pixel difference {pixels:.4f} (normalised units)"
