"""Procedural scenes: determinism, captions that determine the scene, evaluation splits, the dataset writer."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import PIL
import pytest
from PIL import Image, features
from rich.console import Console

from edgedistill.data import scenes as S
from edgedistill.data.manifest import load_manifest
from edgedistill.data.scenes import drawing, writer
from edgedistill.core.errors import UserError

# --------------------------------------------------------------------------------------------- caption parser
# Written independently of the module's phrasing code: every object phrase is "<a|two|three> <size> <colour>
# <shape(s)>" followed by exactly that many "the <position>" before the next object phrase.

_PLURAL = {s + ("es" if s.endswith("ss") else "s"): s for s in S.SHAPES}
_OBJ = re.compile(r"\b(a|two|three) (small|large) (" + "|".join(S.COLOURS) + r") ("
                  + "|".join(sorted([*S.SHAPES, *_PLURAL], key=len, reverse=True)) + r")\b")
_POS = re.compile(r"\bthe (top left|top right|bottom left|bottom right|center)\b")
_COUNT = {"a": 1, "two": 2, "three": 3}


def parse(caption: str) -> tuple:
    """The scene key a caption describes."""
    matches = list(_OBJ.finditer(caption))
    assert matches, caption
    assert not _POS.search(caption[:matches[0].start()]), caption
    objects = []
    for m, nxt in zip(matches, [*matches[1:], None]):
        count, size, colour, shape = _COUNT[m.group(1)], m.group(2), m.group(3), m.group(4)
        assert (shape in _PLURAL) == (count > 1), caption
        positions = _POS.findall(caption[m.end():nxt.start() if nxt else len(caption)])
        assert len(positions) == count, caption
        objects += [(size, colour, _PLURAL.get(shape, shape), p) for p in positions]
    return tuple(sorted(objects))


def edits_between(ka: tuple, kb: tuple) -> set[str]:
    """Every edit type (S.EDITS) that turns key ``ka`` into key ``kb`` in one step."""
    A = {p: (s, c, h) for s, c, h, p in ka}
    B = {p: (s, c, h) for s, c, h, p in kb}
    found = set()
    if len(A) != len(B):
        small, big = sorted((set(ka), set(kb)), key=len)
        if small < big and len(big - small) == 1:
            found.add("count")
    elif set(A) == set(B):
        diff = [p for p in A if A[p] != B[p]]
        if len(diff) == 1:
            changed = [name for name, x, y in zip(("size", "colour", "shape"), A[diff[0]], B[diff[0]]) if x != y]
            if len(changed) == 1:
                found.add(changed[0])
        if len(diff) == 2:
            p, q = diff
            if B[p] == A[q] and B[q] == A[p]:
                found.add("swap-position")
            if B[p] == (A[p][0], A[q][1], A[p][2]) and B[q] == (A[q][0], A[p][1], A[q][2]):
                found.add("bind")
    else:
        gone, new = set(A) - set(B), set(B) - set(A)
        if len(gone) == len(new) == 1 and A[gone.pop()] == B[new.pop()] \
                and all(A[p] == B[p] for p in set(A) & set(B)):
            found.add("position")
    return found


def held_out_in(key: tuple) -> set[tuple[str, str]]:
    return {(c, h) for _, c, h, _ in key} & set(S.HELD_OUT)


def expected_label(key: tuple) -> str:
    """Main object: the large one, ties to the first in POSITIONS order."""
    size, colour, shape, _ = min(key, key=lambda o: (o[0] != "large", S.POSITIONS.index(o[3])))
    return f"{colour} {shape}"


# --------------------------------------------------------------------------------------------- scenes and render


def test_same_seed_same_scene_pixels_and_captions():
    for i in range(20):
        a, b = S.make_scene((3, 0, i)), S.make_scene((3, 0, i))
        assert a == b
        assert np.array_equal(np.asarray(S.render(a, 64)), np.asarray(S.render(b, 64)))
        assert S.captions(a, np.random.default_rng([i])) == S.captions(b, np.random.default_rng([i]))
    assert S.make_scene((3, 0, 0)) != S.make_scene((3, 0, 1)) != S.make_scene((4, 0, 1))


def test_scene_invariants_and_variety():
    scenes = [S.make_scene((0, 0, i)) for i in range(2000)]
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 500
    for s in scenes:
        positions = [o.position for o in s.objects]
        assert len(set(positions)) == len(positions)
        for o in s.objects:
            assert o.size in S.SIZES and o.colour in S.COLOURS and o.shape in S.SHAPES
            assert (o.colour, o.shape) not in S.HELD_OUT  # the training distribution
            assert abs(o.scale - 1) <= 0.15 and max(abs(t) for t in o.tint) <= 8
    seen = Counter((o.colour, o.shape) for s in scenes for o in s.objects)
    assert len(seen) == 64 - len(S.HELD_OUT)
    assert {s.background.kind for s in scenes} == set(S.BACKGROUNDS)
    assert {o.position for s in scenes for o in s.objects} == set(S.POSITIONS)


def test_render_draws_each_object_where_its_key_says():
    for i in range(150):
        scene = S.make_scene((1, 0, i))
        for size in (64, 100):
            img = np.asarray(S.render(scene, size)).astype(int)
            assert img.shape == (size, size, 3)
            for o in scene.objects:
                x, y = drawing._POS_XY[o.position]
                px = img[int((y + o.dy) * size), int((x + o.dx) * size)]
                dist = np.abs(px - np.array(o.rgb)).max()
                if o.shape == "ring":
                    assert dist > 40, (i, o)  # the hole shows the background
                else:
                    assert dist <= 12, (i, o, px)


def test_colours_stand_out_from_every_background():
    tones = {t for i in range(3000) for t in (S.make_scene((2, 0, i)).background.tone,
                                                 S.make_scene((2, 0, i)).background.tone2)}
    tones_arr = np.array(sorted(tones), dtype=float)
    for colour, rgb in S.COLOURS.items():
        distance = np.sqrt(((tones_arr - np.array(rgb)) ** 2).sum(1)).min()
        assert distance > 60, colour


def test_render_sizes():
    scene = S.make_scene((0, 0, 0))
    for size in (32, 64, 224, 512):
        assert S.render(scene, size).size == (size, size)
    assert S.render(scene, 64, supersample=1).size == (64, 64)


# --------------------------------------------------------------------------------------------- captions


def test_captions_name_every_object_and_use_several_phrasings():
    for i in range(600):
        scene = S.make_scene((0, 0, i))
        caps = S.captions(scene, np.random.default_rng([0, i]))
        assert len(set(caps)) >= 2
        for c in caps:
            assert parse(c) == S.scene_key(scene), c


def test_alike_objects_may_share_a_plural_phrase():
    square = S.SceneObject("small", "red", "square", "top left")
    scene = S.Scene(objects=(square, S.SceneObject("large", "blue", "star", "bottom right"),
                             S.SceneObject("small", "red", "square", "center")),
                    background=S.make_scene((0, 0, 0)).background)
    caps = [c for i in range(30) for c in S.captions(scene, np.random.default_rng(i))]
    assert any(re.search(r"two small red squares in the (top left|center) and the (top left|center)", c)
               for c in caps)
    assert all(parse(c) == S.scene_key(scene) for c in caps)
    cross = (S.SceneObject("large", "black", "cross", p) for p in ("top left", "top right", "center"))
    triple = S.Scene(objects=tuple(cross), background=scene.background)
    caps = [c for i in range(30) for c in S.captions(triple, np.random.default_rng(i))]
    assert any("three large black crosses in the" in c for c in caps)
    assert all(parse(c) == S.scene_key(triple) for c in caps)


# --------------------------------------------------------------------------------------------- evaluation splits


def test_iid_keys_are_unique_and_in_distribution():
    val = S.iid_scenes(0, 700)  # more than the ~580 one-object keys: collisions must be redrawn
    keys = [S.scene_key(s) for s, _ in val]
    assert len(set(keys)) == len(keys)
    assert not any(held_out_in(k) for k in keys)
    assert [s for s, _ in val] == [s for s, _ in S.iid_scenes(0, 700)]
    assert all(seed[:2] == (0, S.SPLITS["val"]) for _, seed in val)  # other seeds than train's (0, 0, i)
    assert sum(seed[3] > 0 for _, seed in val) > 0  # some draws collided and were redrawn


def test_hard_twins_differ_by_exactly_the_named_edit():
    pairs = S.twin_scenes(0, 140)
    keys = [S.scene_key(s) for base, twin, _, _ in pairs for s in (base, twin)]
    assert len(set(keys)) == len(keys)
    counts = Counter(edit for _, _, edit, _ in pairs)
    assert set(counts) == set(S.EDITS) and max(counts.values()) - min(counts.values()) <= 1
    for base, twin, edit, _ in pairs:
        assert edit in edits_between(S.scene_key(base), S.scene_key(twin)), (edit, base, twin)
        assert base.background == twin.background  # nothing else changes
        assert 1 <= len(twin.objects) <= 3
        assert not held_out_in(S.scene_key(base)) and not held_out_in(S.scene_key(twin))
        if edit == "bind":  # a colour swap between objects that differ otherwise, not a disguised position swap
            assert "swap-position" not in edits_between(S.scene_key(base), S.scene_key(twin))


def test_ood_bases_all_hold_a_held_out_combination():
    pairs = S.twin_scenes(0, 84, ood=True)
    keys = [S.scene_key(s) for base, twin, _, _ in pairs for s in (base, twin)]
    assert len(set(keys)) == len(keys)
    combos = Counter()
    for base, twin, edit, _ in pairs:
        held = held_out_in(S.scene_key(base))
        assert len(held) == 1
        combos.update(held)
        assert edit in edits_between(S.scene_key(base), S.scene_key(twin))
    assert set(combos) == set(S.HELD_OUT)
    assert {edit for _, _, edit, _ in pairs} == set(S.EDITS)


# --------------------------------------------------------------------------------------------- the writer

SMALL = dict(n=80, seed=7, size=64, n_val=60, n_hard=35, n_ood=18)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scenes") / "data"
    return out, S.write_scenes(out, **SMALL)


def test_manifests_load_and_captions_match_images(written):
    out, info = written
    assert not info["reused"] and info["counts"] == {"train": 80, "val": 60, "hard": 70, "ood": 36,
                                                     "train_captioned": 80}
    assert json.loads((out / "scenes.json").read_text())["held_out"] == [f"{c} {h}" for c, h in S.HELD_OUT]
    for split, n in (("train", 80), ("val", 60), ("hard", 70), ("ood", 36)):
        manifest = load_manifest(out / f"{split}.jsonl")
        assert len(manifest) == n
        keys = []
        for i, entry in enumerate(manifest.entries):
            assert entry.image == out / "images" / split / f"{i:05d}.jpg"
            with Image.open(entry.image) as img:
                assert img.format == "JPEG" and img.size == (64, 64) and img.mode == "RGB"
            assert len(set(entry.captions)) >= 2
            key = {parse(c) for c in entry.captions}
            assert len(key) == 1
            keys.append(key.pop())
            assert entry.label == expected_label(keys[-1])
        if split != "train":
            assert len(set(keys)) == len(keys), split
        if split in ("train", "val", "hard"):
            assert not any(held_out_in(k) for k in keys), split
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert set(train[0]) == {"image", "captions", "label"}


def test_twin_files_name_consecutive_lines_and_their_edit(written):
    out, _ = written
    for split, n_pairs in (("hard", 35), ("ood", 18)):
        twins = json.loads((out / f"{split}_twins.json").read_text())
        manifest = load_manifest(out / f"{split}.jsonl")
        assert [(t["a"], t["b"]) for t in twins] == [(2 * k, 2 * k + 1) for k in range(n_pairs)]
        for t in twins:
            ka, kb = (parse(manifest.entries[t[x]].captions[0]) for x in ("a", "b"))
            assert t["edit"] in edits_between(ka, kb)
            if split == "ood":
                assert held_out_in(ka)
        assert {t["edit"] for t in twins} == set(S.EDITS)


def test_train_and_image_bytes_follow_the_seed(written):
    out, _ = written
    for i in (0, 41, 79):
        scene = S.make_scene((SMALL["seed"], S.SPLITS["train"], i))
        entry = load_manifest(out / "train.jsonl").entries[i]
        assert parse(entry.captions[0]) == S.scene_key(scene)
        with Image.open(entry.image) as img:  # JPEG q95 without chroma subsampling stays close to the render
            pixels = np.asarray(img).astype(int)
        own = np.abs(pixels - np.asarray(S.render(scene, 64)).astype(int)).mean()
        other = np.abs(pixels - np.asarray(S.render(S.make_scene((SMALL["seed"], 0, i + 1)), 64))).mean()
        assert own < 5 and other > 3 * own  # (noisy backgrounds lose most to JPEG)


def test_workers_give_the_same_bytes(tmp_path):
    settings = dict(n=150, seed=3, size=48, n_val=20, n_hard=10, n_ood=7)
    S.write_scenes(tmp_path / "serial", **settings, workers=0)
    S.write_scenes(tmp_path / "pool", **settings, workers=2)
    files = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*") if p.is_file())
    assert len(files) == 150 + 20 + 20 + 14 + 7  # images, 4 manifests, 2 twin files, scenes.json
    assert files == sorted(p.relative_to(tmp_path / "pool") for p in (tmp_path / "pool").rglob("*") if p.is_file())
    for f in files:
        assert (tmp_path / "serial" / f).read_bytes() == (tmp_path / "pool" / f).read_bytes(), f


def test_captioned_keeps_captions_on_the_first_images_only(tmp_path):
    console = Console(file=io.StringIO(), width=100)
    info = S.write_scenes(tmp_path / "d", n=30, size=40, n_val=5, n_hard=0, n_ood=0, captioned=10,
                          progress=console)
    assert info["counts"]["train_captioned"] == 10 and "hard" not in info["manifests"]
    assert not (tmp_path / "d" / "hard.jsonl").exists()
    entries = load_manifest(tmp_path / "d" / "train.jsonl").entries
    assert all(len(e.captions) >= 2 for e in entries[:10]) and all(e.captions == () for e in entries[10:])
    assert all(e.label for e in entries)
    with Image.open(entries[29].image) as img:
        assert img.size == (40, 40)
    assert "35/35" in console.file.getvalue()  # 30 train + 5 val images


def test_reuse_when_settings_match_and_error_when_they_differ(written):
    out, first = written
    stamp = {p: p.stat().st_mtime_ns for p in (out / "train.jsonl", out / "images" / "val" / "00003.jpg")}
    again = S.write_scenes(out, **SMALL)
    assert again["reused"] and {k: v for k, v in again.items() if k != "reused"} == \
        {k: v for k, v in first.items() if k != "reused"}
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    for change in (dict(n=81), dict(seed=8), dict(size=96), dict(n_hard=3), dict(captioned=5)):
        with pytest.raises(UserError, match="choose another --out or delete it") as e:
            S.write_scenes(out, **{**SMALL, **change})
        assert "\n" not in str(e.value)
    (out.parent / "stranger").mkdir()
    with pytest.raises(UserError, match="not a scenes dataset"):
        S.write_scenes(out.parent / "stranger", **SMALL)


def test_a_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    real, calls = S.render, []

    def flaky(scene: S.Scene, size: int = 64, supersample: int = 2) -> Image.Image:
        calls.append(1)
        if len(calls) == 50:
            raise RuntimeError("disk on fire")
        return real(scene, size, supersample)

    monkeypatch.setattr(writer, "render", flaky)  # where the writer looks it up
    with pytest.raises(RuntimeError, match="disk on fire"):
        S.write_scenes(tmp_path / "out", n=100, n_val=10, n_hard=5, n_ood=5)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(writer, "render", real)
    assert S.write_scenes(tmp_path / "out", n=100, n_val=10, n_hard=5, n_ood=5)["reused"] is False


@pytest.mark.parametrize("theirs", [dict(), dict(seed=1)])
def test_a_dataset_another_process_publishes_first_is_reused_or_refused(tmp_path, monkeypatch, theirs):
    ours = dict(n=20, size=32, n_val=4, n_hard=2, n_ood=0)
    out, real = tmp_path / "out", writer._generate

    def racing(*args: object) -> dict[str, int]:
        counts = real(*args)
        monkeypatch.setattr(writer, "_generate", real)
        S.write_scenes(out, **{**ours, **theirs})  # the other process, finishing while ours still generates
        return counts

    monkeypatch.setattr(writer, "_generate", racing)
    if theirs:
        with pytest.raises(UserError, match="other settings"):
            S.write_scenes(out, **ours)
    else:
        assert S.write_scenes(out, **ours)["reused"] is True
    assert list(tmp_path.iterdir()) == [out]  # our staging folder is gone either way
    assert json.loads((out / "scenes.json").read_text())["seed"] == theirs.get("seed", 0)

def test_ood_classes_replace_the_images_an_interrupted_run_left(tmp_path):
    root = tmp_path / "s"
    S.write_scenes(root, n=10, size=32, n_val=0, n_hard=0, n_ood=0)
    stale = root / "images" / "ood_classes"
    stale.mkdir()
    (stale / "99999.jpg").write_bytes(b"half a jpeg")  # images written, manifest not: the run stopped there
    S.write_ood_classes(root, 2)
    names = sorted(p.name for p in stale.iterdir())
    assert names == [f"{i:05d}.jpg" for i in range(2 * len(S.HELD_OUT))]
    assert sorted(p.name for p in (root / "images").iterdir()) == ["ood_classes", "train"]  # no staging left

@pytest.mark.parametrize("bad", [dict(n=0), dict(n=-3), dict(n=2.5), dict(size=31), dict(size=513),
                                 dict(size=64.0), dict(seed=-1), dict(n_val=-1), dict(captioned=11), dict(workers=-1)])
def test_bad_settings_are_one_line_user_errors(tmp_path, bad):
    with pytest.raises(UserError) as e:
        S.write_scenes(tmp_path / "out", **{"n": 10, **bad})
    assert "\n" not in str(e.value) and str(e.value).startswith("scenes: ")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- recorded bytes
# Every file of one small dataset (2 workers, captioned, every split, OOD classes), as the code wrote it when these
# digests were recorded: a change of any byte of any file fails. JPEG bytes and the random streams depend on
# Pillow, its libjpeg and numpy, so the record holds only for the versions it was made with; elsewhere the test
# skips and test_workers_give_the_same_bytes still checks determinism. Re-record with _dataset_digests().

_RECORDED_WITH = {"numpy": "2.4.6", "pillow": "13.0.0", "libjpeg_turbo": "3.2.0"}
_RECORDED = {
    "class_descriptions.json": "ca520fcbf56fd3fba96cee860d46f181238904cbb55b92073b6757a46efa0323",
    "hard.jsonl": "48c733018b5f40ce0326eb4743a4e538c3d0458ac4fb5226cf3239dd8ef1b09e",
    "hard_twins.json": "36ccdf6edf0dc2592b5a74d1a3ee4b917d353c70c4d9fa4259a23ccd014cfad9",
    "ood.jsonl": "64064f291f8f2f9f7e6a39d0f3cd15358280d9b65fea1b2d231153daba7c2b02",
    "ood_classes.json": "8ac043361b4bed7699610626aa8b69e69ec04f5e522e9c85d5cb0686f67b51e5",
    "ood_classes.jsonl": "700858227d8b6837caf5e6065e8f98255de4e5f5604e60582df421a9b9e91926",
    "ood_twins.json": "d7442be7c9de62ff1311a36eec6e3387813b8548e6bc305cb90156f4916683ce",
    "scenes.json": "72a39677a2814dc4d653ed609b83179f2d6f4ae3c404cb4e4af45cf6dce116f7",
    "train.jsonl": "9e7af4be15fbc0e2ed4420e737c628cf4bf39f4eda505e2d8a1f8997db46aa34",
    "val.jsonl": "c0ac39eddc6b969373ddd34238f8fd31727c1ea3aa68b40ad97b7d465607e556",
    "images/hard/": "29704967a497bf529ead693db42364737fce36d2b74123f89d6fe94bccd879de",
    "images/ood/": "708fcfb240d6cd2294ebf88c62c90712d73ca593c0d3669442b51bb1ed51f582",
    "images/ood_classes/": "1e7e81c1a14416b7a5b3a527973fbe6cf35f894a153d788e4293d8cd8930f9c1",
    "images/train/": "597478140d6105ea193104df43bd379744d938a0520b1f9eeacb5f807706adc3",
    "images/val/": "f4eeb595982e9b9dd413f1eb7c60360b96bf4f8717cecc49501c4592ce4da48d",
}


def _versions() -> dict[str, str | None]:
    return {"numpy": np.__version__, "pillow": PIL.__version__, "libjpeg_turbo": features.version("libjpeg_turbo")}


def _dataset_digests(root: Path) -> dict[str, str]:
    """sha256 of each manifest and JSON file; of each image folder, sha256 over its files' "name sha256" lines."""
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file()}
    out = {name: digest for name, digest in files.items() if not name.startswith("images/")}
    for folder in sorted({name.rsplit("/", 1)[0] for name in files if name.startswith("images/")}):
        lines = "".join(f"{n} {d}\n" for n, d in files.items() if n.rsplit("/", 1)[0] == folder)
        out[folder + "/"] = hashlib.sha256(lines.encode()).hexdigest()
    return out


def _write_recorded_dataset(out: Path) -> None:
    S.write_scenes(out, n=64, seed=5, size=64, n_val=16, n_hard=14, n_ood=12, captioned=40, workers=2)
    S.write_ood_classes(out, 2)


def test_dataset_bytes_are_the_recorded_ones(tmp_path):
    if _versions() != _RECORDED_WITH:
        pytest.skip(f"digests recorded with {_RECORDED_WITH}, running {_versions()}")
    _write_recorded_dataset(tmp_path / "d")
    digests = _dataset_digests(tmp_path / "d")
    assert sorted(digests) == sorted(_RECORDED)
    assert [name for name in _RECORDED if digests[name] != _RECORDED[name]] == []

