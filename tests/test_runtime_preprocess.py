"""edgedistill.runtime.preprocess: open_clip's eval transform in PIL + numpy, the same pixels without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import timm
import torch
from PIL import Image, ImageDraw, ImageOps

from edgedistill.data.images import open_image
from edgedistill.core.errors import UserError
from edgedistill.runtime.preprocess import OPENAI_MEAN, OPENAI_STD, Preprocess, PreprocessConfig, read_image

ROOT = Path(__file__).resolve().parents[1]
# what export.json's "preprocess" holds for a CLIP-like student (edgedistill.export.exporter._preprocess_desc)
DESC = {"size": 224, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
        "resize_mode": "shortest"}
SIZES = [(640, 480), (480, 640), (500, 375), (375, 500), (1024, 200), (200, 1024), (31, 47), (47, 31), (224, 224),
         (225, 223), (299, 300), (800, 600), (1280, 720), (64, 64), (16, 9), (333, 777), (448, 336), (257, 256)]
KINDS = ["RGB.jpg", "L.jpg", "CMYK.jpg", "RGB.png", "RGBA.png", "LA.png", "P-transparent.png", "L.png",
         "I;16.png", "1.png", "exif6.jpg", "P.gif"]
BIG = [((3000, 2000), "RGB.jpg"), ((2000, 3000), "CMYK.jpg"), ((3000, 2000), "RGBA.png")]


def _content(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Random RGB content with structure: smooth blobs, a gradient, shapes and lines, fine noise."""
    grid = rng.integers(0, 256, size=(max(2, h // 24), max(2, w // 24), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    ramp = (np.linspace(-40, 40, w)[:, None] * rng.uniform(-1, 1, size=3)).astype(np.int16)[None]
    noise = rng.integers(-12, 13, size=(h, w, 1), dtype=np.int16)
    img = Image.fromarray(np.clip(base + ramp + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, w, 2).tolist())
        y0, y1 = sorted(rng.integers(0, h, 2).tolist())
        color = tuple(rng.integers(0, 256, 3).tolist())
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.line((x0, y0, x1, y1), fill=color, width=int(rng.integers(1, 6)))
    return img


def _alpha(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """An alpha channel with fully transparent, opaque and soft regions (premultiplication shows)."""
    grid = rng.integers(0, 256, size=(max(2, h // 40), max(2, w // 40)), dtype=np.uint8)
    a = np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)
    return Image.fromarray(np.clip((a - 96) * 2.5, 0, 255).astype(np.uint8))


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int], kind: str) -> Path:
    w, h = size
    img = _content(rng, w, h)
    mode = kind.split(".")[0]
    if mode in ("RGBA", "LA"):
        img = img.convert(mode[:-1])
        img.putalpha(_alpha(rng, w, h))
    elif mode.startswith("P"):
        img = img.quantize(colors=int(rng.integers(16, 200)), method=Image.Quantize.FASTOCTREE)
        if mode == "P-transparent":
            img.info["transparency"] = int(rng.integers(0, 16))
    elif mode == "I;16":  # 16-bit grey with values above 255 (PIL's RGB conversion clips them)
        img = Image.fromarray((np.asarray(img.convert("L"), dtype=np.float32) * rng.uniform(1, 1.6)).astype(np.uint16))
    elif mode == "exif6":  # a camera's "rotate 90" tag; the pixels are stored unrotated
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(path, quality=88, exif=exif)
        return path
    elif mode != "RGB":
        img = img.convert(mode)
    save = {"quality": int(rng.integers(70, 96))} if path.suffix == ".jpg" else {"compress_level": 1}
    if mode == "P-transparent":
        save["transparency"] = img.info["transparency"]
    img.save(path, **save)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """219 image files: 18 sizes x 12 kinds (modes, formats, an EXIF rotation) and 3 of about 3000 x 2000."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(len(SIZES) * len(KINDS)):
        size, kind = SIZES[i % len(SIZES)], KINDS[(i + i // len(SIZES)) % len(KINDS)]
        paths.append(write_image(folder / f"{i:03d}_{kind.replace(';', '')}", rng, size, kind))
    for i, (size, kind) in enumerate(BIG):
        paths.append(write_image(folder / f"big{i}_{kind}", rng, size, kind))
    return paths


def reference(desc: dict, img: Image.Image) -> np.ndarray:
    """open_clip's own eval transform (torchvision) on ``img``: (3, H, W)."""
    transform = open_clip.image_transform(desc["size"], is_train=False, mean=desc.get("mean"), std=desc.get("std"),
                                          resize_mode=desc.get("resize_mode"),
                                          interpolation=desc.get("interpolation"),
                                          fill_color=desc.get("fill_color", 0))
    return transform(img).numpy()


def native(path: Path) -> Image.Image:
    """The image as PIL decodes it, in its own mode (what open_clip's transform gets from Image.open)."""
    with Image.open(path) as im:
        im.load()
        return im.copy()


@pytest.fixture(scope="module")
def pixels(images: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(open_clip's pixels, ours) for every image with the default CLIP description: two (N, 3, 224, 224)."""
    want = np.stack([reference(DESC, open_image(p)) for p in images])  # edgedistill's reader, open_clip's transform
    return want, Preprocess(DESC)(images)


@pytest.mark.slow
def test_the_images_are_what_the_test_claims(images):
    decoded = {p.name: native(p) for p in images}
    assert len(images) >= 200 and {"RGB", "L", "RGBA", "LA", "CMYK", "P", "I;16", "1"} <= {
        im.mode for im in decoded.values()}
    assert {(640, 480), (500, 375), (1024, 200), (31, 47), (3000, 2000)} <= {im.size for im in decoded.values()}
    assert all("transparency" in im.info for name, im in decoded.items() if name.endswith("P-transparent.png"))
    assert all(im.getexif().get(0x0112) == 6 for name, im in decoded.items() if "exif6" in name)
    assert all(np.asarray(im.convert("L"), dtype=np.float32).std() > 10 for im in decoded.values())  # not flat


@pytest.mark.slow
def test_pixels_equal_open_clip(pixels):
    want, got = pixels
    assert got.dtype == np.float32 and got.shape == want.shape == (len(want), 3, 224, 224)
    max_diff = float(np.abs(want - got).max())
    assert max_diff == 0.0, f"max absolute pixel difference {max_diff}"  # the same PIL calls: bit for bit


def _embed(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = torch.cat([model(torch.from_numpy(x[i:i + 64])) for i in range(0, len(x), 64)]).numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.mark.slow
def test_embeddings_equal_open_clip(pixels, images):
    """A real image tower (timm MobileNetV3-Small, random weights) embeds our pixels as it embeds open_clip's."""
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=0).eval()
    want, got = pixels
    cosine = (_embed(model, want) * _embed(model, got)).sum(axis=1)
    assert cosine.min() >= 0.9999, f"min cosine {cosine.min():.6f} at {images[int(cosine.argmin())].name}"
    # the check can fail: bilinear instead of bicubic (a plausible slip) moves embeddings past the bound
    slip = Preprocess({**DESC, "interpolation": "bilinear"})(images[:16])
    assert (_embed(model, want[:16]) * _embed(model, slip)).sum(axis=1).min() < 0.9999


CONFIGS = [
    {**DESC, "interpolation": "bilinear"},
    {**DESC, "interpolation": "random"},
    {**DESC, "size": 64, "resize_mode": "longest", "fill_color": 0},
    {**DESC, "size": [96, 64], "resize_mode": "longest", "fill_color": 128, "interpolation": "bilinear"},
    {**DESC, "size": [64, 96]},  # non-square 'shortest': open_clip resizes bicubic whatever it is told
    {**DESC, "size": [80, 48], "interpolation": "bilinear"},
    {**DESC, "size": 50, "resize_mode": "squash", "interpolation": "bilinear"},
    {**DESC, "size": [40, 70], "resize_mode": "squash", "mean": 0.5, "std": [0.2, 0.3, 0.4]},
    {"size": 256},  # mean, std, interpolation and mode left to open_clip's defaults
]


@pytest.mark.slow
@pytest.mark.parametrize("convert_first", [True, False])
def test_every_resize_mode_and_interpolation(images, convert_first):
    """Pixel-exact against open_clip for each resize mode, interpolation, non-square size and padding, with the
    RGB conversion where edgedistill's reader does it (first) and where open_clip's transform does it (last)."""
    subset = images[::7]  # 7 is prime to the 18 sizes and 12 kinds: every size and every kind comes up
    assert {native(p).size for p in subset} >= set(SIZES)
    decoded = [open_image(p) if convert_first else native(p) for p in subset]
    for desc in CONFIGS:
        ours = Preprocess(desc, convert_first=convert_first)
        for path, img in zip(subset, decoded):
            want, got = reference(desc, img), ours(img)  # reading files is covered above; decode once
            assert np.array_equal(want, got), f"{desc} {path.name}: max diff {np.abs(want - got).max()}"


def test_conversion_order_matters_only_for_images_that_are_not_rgb(images):
    first, last = Preprocess({**DESC, "size": 64}), Preprocess({**DESC, "size": 64}, convert_first=False)
    same = {mode: [] for mode in ("RGB", "L", "P", "RGBA", "CMYK")}
    for path in images[:100]:
        mode = native(path).mode
        if mode in same:
            same[mode].append(np.array_equal(first(path), last(path)))
    assert all(same["RGB"]) and all(same["L"])  # channel-wise resampling commutes with grey -> RGB
    assert not any(same["P"]) and not any(same["RGBA"])  # nearest vs bicubic; premultiplied alpha


def test_inputs_paths_pil_arrays_and_batches(images):
    pre = Preprocess(DESC)
    path = images[0]
    one = pre(path)
    rgb = open_image(path)
    assert one.shape == (3, 224, 224) and pre.input_size == (3, 224, 224)
    assert np.array_equal(pre(str(path)), one) and np.array_equal(pre(rgb), one)
    assert np.array_equal(pre(np.asarray(rgb)), one)
    assert np.array_equal(pre(native(path).convert("RGBA")), pre(native(path).convert("RGBA").convert("RGB")))
    batch = pre([path, rgb, np.asarray(rgb)])
    assert batch.shape == (3, 3, 224, 224) and all(np.array_equal(b, one) for b in batch)
    stacked = np.stack([np.asarray(open_image(p).resize((50, 40))) for p in images[:4]])  # (N, H, W, 3) uint8
    assert pre(stacked).shape == (4, 3, 224, 224)
    assert pre([]).shape == (0, 3, 224, 224)


def test_exif_orientation_is_not_applied_as_in_open_clip(images):
    """open_clip and edgedistill's reader ignore the EXIF rotation tag, so the runtime does too."""
    path = next(p for p in images if "exif6" in p.name and native(p).size[0] != native(p).size[1])
    ours = Preprocess({**DESC, "resize_mode": "squash", "size": [30, 60]})(path)
    assert np.array_equal(ours, reference({**DESC, "resize_mode": "squash", "size": [30, 60]}, open_image(path)))
    rotated = reference({**DESC, "resize_mode": "squash", "size": [30, 60]},
                        ImageOps.exif_transpose(native(path)).convert("RGB"))
    assert not np.allclose(ours, rotated, atol=0.1)


def test_config_from_export_json_and_open_clip_defaults():
    config = PreprocessConfig.from_dict(json.loads(json.dumps(DESC)))
    assert config == PreprocessConfig(size=(224, 224))
    assert PreprocessConfig.from_dict({"size": [192, 256], "mean": 0.5, "std": None}).mean == (0.5, 0.5, 0.5)
    from dataclasses import asdict

    from open_clip.transform import PreprocessCfg
    assert PreprocessConfig.from_dict(asdict(PreprocessCfg())) == PreprocessConfig(size=(224, 224))


@pytest.mark.parametrize("desc, message", [
    ({**DESC, "interpolation": "nearest"}, "preprocess.interpolation"),
    ({**DESC, "resize_mode": "crop"}, "preprocess.resize_mode"),
    ({**DESC, "size": 0}, "preprocess.size"),
    ({**DESC, "size": [224, 224, 3]}, "preprocess.size"),
    ({**DESC, "size": None}, "preprocess.size"),
    ({**DESC, "std": [0.2, 0, 0.2]}, "preprocess.std has a zero"),
    ({**DESC, "mean": [0.5, 0.5]}, "preprocess.mean"),
    ({**DESC, "mean": [0.5, float("nan"), 0.5]}, "preprocess.mean"),
    ({**DESC, "fill_color": "black"}, "preprocess.fill_color"),
])
def test_bad_descriptions_are_user_errors(desc, message):
    with pytest.raises(UserError, match=message) as info:
        Preprocess(desc)
    assert "\n" not in str(info.value)


def test_bad_images_are_user_errors(tmp_path, images):
    pre = Preprocess(DESC)
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "cut.jpg").write_bytes(images[0].read_bytes()[:300])
    cases = [(tmp_path / "missing.jpg", "not found"), (tmp_path / "notes.jpg", "not an image file"),
             (tmp_path / "cut.jpg", "unreadable image"), (tmp_path, "is a directory"),
             (np.zeros((8, 8, 3), dtype=np.float32), "uint8"), (np.zeros((8, 8), dtype=np.uint8), r"\(H, W, 3\)"),
             (np.zeros((8, 8, 4), dtype=np.uint8), "uint8"), (42, "cannot read an image from a int")]
    for source, message in cases:
        with pytest.raises(UserError, match=message) as info:
            pre(source)
        assert "\n" not in str(info.value)


BLOCKED = """
import sys
for name in ("torch", "torchvision", "open_clip", "timm"):
    sys.modules[name] = None  # any import of these now raises ImportError
import numpy as np
from edgedistill.runtime.preprocess import Preprocess
desc = {"size": 224, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic", "resize_mode": "shortest"}
np.save(sys.argv[1], Preprocess(desc)(sys.argv[2:]))
"""


def test_preprocess_runs_with_torch_blocked(tmp_path, images, pixels):
    out = tmp_path / "pixels.npy"
    run = subprocess.run([sys.executable, "-c", BLOCKED, str(out), *map(str, images[:3])], capture_output=True,
                         text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.array_equal(np.load(out), pixels[0][:3])


# -- reduced-scale JPEG decode and EXIF orientation (docs/runtime.md#decoding-photos) ------------------------------
def test_exif_orientation_is_applied_when_asked(images):
    """exif=True turns a photo stored sideways (Orientation 6) upright before the geometry; off by default."""
    path = next(p for p in images if "exif6" in p.name and native(p).size[0] != native(p).size[1])
    desc = {**DESC, "resize_mode": "squash", "size": [30, 60]}
    pre = Preprocess(desc)
    upright = reference(desc, ImageOps.exif_transpose(native(path)).convert("RGB"))
    assert np.array_equal(pre(path, exif=True), upright)
    assert np.array_equal(pre(native(path), exif=True), upright)  # a PIL image carries its EXIF too
    assert np.array_equal(pre(path, exif=False), pre(path)) and not np.allclose(pre(path), upright, atol=0.1)
    plain = next(p for p in images if p.name.endswith("_RGB.jpg"))  # no tag: nothing to turn
    assert np.array_equal(pre(plain, exif=True), pre(plain))


@pytest.mark.slow
def test_reduced_decode_changes_only_large_jpegs(images):
    """decode='reduced' drafts JPEGs only: PNG, GIF, PIL images and arrays give the exact pixels."""
    pre = Preprocess({**DESC, "size": 64})
    others = [p for p in images if not p.name.endswith(".jpg")][:40] + [images[-1]]  # incl. a 3000x2000 PNG
    assert any(native(p).size == (3000, 2000) for p in others)
    for source in others + [open_image(images[-3]), np.asarray(open_image(images[-3]))]:
        assert np.array_equal(pre(source, decode="reduced"), pre(source)), getattr(source, "name", type(source))
    small = next(p for p in images if p.name.endswith("_RGB.jpg") and max(native(p).size) <= 64)
    assert np.array_equal(pre(small, decode="reduced"), pre(small))  # no room for a reduction
    with pytest.raises(UserError, match="decode 'draft' is not one of"):
        pre(images[0], decode="draft")


def test_reduced_decode_of_large_jpegs_is_close_to_exact(images):
    """The two 3000x2000 JPEGs (RGB, CMYK) at 64 px: drafted to 1/8 scale, pixels within a few levels."""
    pre = Preprocess({**DESC, "size": 64})
    for path in [p for p in images if p.name.startswith("big") and p.suffix == ".jpg"]:
        drafted, full = read_image(path, draft=pre.config)
        assert full == native(path).size and drafted.size == tuple(-(-s // 8) for s in full), drafted.size
        exact, reduced = pre.crop(path), pre.crop(path, decode="reduced")
        assert exact.shape == reduced.shape == (64, 64, 3)
        diff = np.abs(exact.astype(np.int16) - reduced.astype(np.int16))
        assert diff.mean() < 3 and np.percentile(diff, 99) < 16, (path.name, diff.mean(), diff.max())


def test_files_as_bytes_file_objects_and_shard_members(images, tmp_path):
    from edgedistill.data.shards import ShardMember

    pre = Preprocess({**DESC, "size": 64})
    path = images[0]
    blob = path.read_bytes()
    shard = tmp_path / "shard.tar"
    shard.write_bytes(b"x" * 512 + blob)
    member = ShardMember(str(shard), path.name, 512, len(blob))
    with open(path, "rb") as f:
        sources = [blob, f, member]
        assert all(np.array_equal(pre(s), pre(path)) for s in sources)
    with pytest.raises(UserError, match="image bytes is not an image file"):
        pre(b"not an image")
