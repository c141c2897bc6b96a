import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from edgedistill.distill.cache import build_or_load, cache_dir
from edgedistill.data.images import open_image
from edgedistill.data.manifest import load_manifest
from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import TeacherConfig
from edgedistill.distill.teachers import Teacher, load_teacher
from tests.conftest import read_only_copy, write_images, write_manifest


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"))


@pytest.fixture
def teacher(tiny_teacher) -> Teacher:
    return load_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1])))


def build(teacher, manifest, root, **kw):
    kw = {"batch_size": 8, "workers": 0, "chunk_size": 16, "console": quiet(), **kw}
    return build_or_load(teacher, manifest, root, **kw)


def test_cache_holds_the_teachers_embeddings(teacher, dataset, tmp_path):
    manifest = load_manifest(dataset["train"])
    result = build(teacher, manifest, tmp_path / "cache")
    c = result.cache
    assert not result.hit and result.forward_batches > 0
    assert c.image_emb.dtype == np.float16 and c.image_emb.shape == (40, 32) and c.image_ok.all()
    images = torch.stack([teacher.preprocess(open_image(e.image)) for e in manifest.entries])
    assert torch.allclose(c.image_features(range(40)), teacher.embed_images(images), atol=2e-3)
    texts = teacher.embed_texts(manifest.all_captions())
    assert c.n_texts == 80 and torch.allclose(c.text_features(range(80)), texts, atol=2e-3)
    assert list(c.caption_rows(3)) == [6, 7]
    meta = json.loads((c.path / "meta.json").read_text())
    assert meta["n_images"] == 40 and meta["teacher"]["weights"].startswith("file:")
    assert not list(c.path.parent.glob("*.partial"))


def test_second_run_computes_nothing(teacher, dataset, tmp_path, monkeypatch):
    manifest = load_manifest(dataset["train"])
    first = build(teacher, manifest, tmp_path / "cache")

    def no_forward(*args, **kwargs):
        raise AssertionError("the teacher ran on a cache hit")

    monkeypatch.setattr(Teacher, "embed_images", no_forward)
    monkeypatch.setattr(Teacher, "embed_texts", no_forward)
    again = build(teacher, load_manifest(dataset["train"]), tmp_path / "cache")
    assert again.hit and again.forward_batches == 0 and again.cache.path == first.cache.path
    assert np.array_equal(again.cache.image_emb, first.cache.image_emb)


def crash_on_batch(monkeypatch, n: int) -> None:
    """Make the teacher's n-th image batch raise KeyboardInterrupt (a crash mid-build)."""
    real = Teacher.embed_images
    calls = {"n": 0}

    def embed(self, images):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(Teacher, "embed_images", embed)


def test_resume_after_a_crash_equals_an_uninterrupted_build(teacher, dataset, tmp_path, monkeypatch):
    manifest = load_manifest(dataset["train"])
    reference = build(teacher, manifest, tmp_path / "reference").cache
    crash_on_batch(monkeypatch, 4)  # batches 1-2 make chunk 1 (16 images); batch 4 is inside chunk 2
    with pytest.raises(KeyboardInterrupt):
        build(teacher, manifest, tmp_path / "cache")
    final = cache_dir(tmp_path / "cache", teacher, manifest)
    assert not final.exists()  # nothing that looks complete
    progress = json.loads((final.with_name(final.name + ".partial") / "progress.json").read_text())
    assert progress["images_done"] == 16

    monkeypatch.undo()
    resumed = build(teacher, manifest, tmp_path / "cache")
    assert not resumed.hit and resumed.forward_batches == 3 + 10  # 24 images left in batches of 8, 80 captions
    for name in ("image_emb", "image_ok", "text_emb", "text_offsets"):
        assert np.array_equal(getattr(resumed.cache, name), getattr(reference, name)), name


def test_a_changed_batch_size_restarts_instead_of_mixing(teacher, dataset, tmp_path, monkeypatch):
    manifest = load_manifest(dataset["train"])
    crash_on_batch(monkeypatch, 3)  # after chunk 1 is saved
    with pytest.raises(KeyboardInterrupt):
        build(teacher, manifest, tmp_path / "cache")
    monkeypatch.undo()
    result = build(teacher, manifest, tmp_path / "cache", batch_size=4)
    assert result.forward_batches == 10 + 20  # all 40 images again (batch 4), then 80 captions


@pytest.mark.parametrize("damage", ["flip_bytes", "delete_meta", "truncate", "empty_array", "bad_meta_json"])
def test_corruption_is_detected_and_rebuilt(teacher, dataset, tmp_path, damage):
    manifest = load_manifest(dataset["train"])
    good = build(teacher, manifest, tmp_path / "cache").cache
    reference = np.array(good.image_emb)
    path = good.path
    del good
    if damage == "flip_bytes":
        data = bytearray((path / "image_emb.npy").read_bytes())
        data[-7] ^= 0xFF
        (path / "image_emb.npy").write_bytes(bytes(data))
    elif damage == "delete_meta":
        (path / "meta.json").unlink()
    elif damage == "truncate":
        (path / "text_emb.npy").write_bytes((path / "text_emb.npy").read_bytes()[:300])
    elif damage == "empty_array":  # a 0-byte file: np.load raises EOFError, which once read as "Aborted."
        (path / "text_emb.npy").write_bytes(b"")
    else:
        (path / "meta.json").write_text("{not json")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        rebuilt = build(teacher, manifest, tmp_path / "cache", console=Console(file=f, width=300))
    assert not rebuilt.hit and "does not match" in log.read_text() and "rebuilding" in log.read_text()
    assert np.array_equal(rebuilt.cache.image_emb, reference)


def test_changed_manifest_gets_its_own_cache(teacher, dataset, tmp_path):
    first = build(teacher, load_manifest(dataset["train"]), tmp_path / "cache").cache
    lines = dataset["train"].read_text().splitlines()
    changed = dataset["train"].with_name("changed.jsonl")
    changed.write_text("\n".join(lines[:-1]) + "\n")
    second = build(teacher, load_manifest(changed), tmp_path / "cache")
    assert not second.hit and second.cache.path != first.path and second.cache.n_images == 39


def test_unreadable_images_are_skipped_and_recorded(teacher, tmp_path):
    images = write_images(tmp_path / "imgs", 40)
    images[5].unlink()
    images[9].write_bytes(b"garbage")
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", images))
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        result = build(teacher, manifest, tmp_path / "cache", console=Console(file=f, width=300))
    c = result.cache
    assert c.image_ok.sum() == 38 and not c.image_ok[5] and not c.image_ok[9]
    assert [b[0] for b in c.bad_images] == [5, 9] and c.bad_images[0][2] == "file not found"
    text = log.read_text()
    assert "skipped image" in text and "img_00005.jpg" in text and "skipped 2 of 40 images (5.0%)" in text
    assert c.n_texts == 80  # captions of unreadable images are still embedded: they are the teacher's text


def test_too_many_unreadable_images_stop_the_build(teacher, tmp_path):
    images = write_images(tmp_path / "imgs", 40)
    for i in (1, 2, 3):
        images[i].unlink()
    manifest = load_manifest(write_manifest(tmp_path / "m.jsonl", images))
    with pytest.raises(UserError, match=r"3 of 40 images could not be read, more than 5%"):
        build(teacher, manifest, tmp_path / "cache")
    assert not cache_dir(tmp_path / "cache", teacher, manifest).exists()
    ok = build(teacher, manifest, tmp_path / "cache", max_bad_fraction=0.1)  # raising the limit resumes
    assert ok.cache.image_ok.sum() == 37


def test_images_without_captions(teacher, tmp_path):
    images = write_images(tmp_path / "imgs", 10)
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"image": str(p), **({"captions": ["x y"]} if i % 3 == 0 else {})}) + "\n"
                            for i, p in enumerate(images)))
    c = build(teacher, load_manifest(path), tmp_path / "cache").cache
    assert c.n_texts == 4 and c.text_offsets.tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert c.image_ok.all()


def test_worker_processes_give_the_same_cache(teacher, dataset, tmp_path):
    manifest = load_manifest(dataset["train"])
    single = build(teacher, manifest, tmp_path / "a").cache
    multi = build(teacher, manifest, tmp_path / "b", workers=2).cache
    assert np.array_equal(single.image_emb, multi.image_emb)


def test_rebuild_flag_recomputes(teacher, dataset, tmp_path):
    manifest = load_manifest(dataset["train"])
    build(teacher, manifest, tmp_path / "cache")
    again = build(teacher, manifest, tmp_path / "cache", rebuild=True)
    assert not again.hit and again.forward_batches > 0


def test_other_preprocessing_is_another_cache(tiny_teacher, dataset, tmp_path):
    hub = tmp_path / "open_clip_config.json"
    hub.write_text(json.dumps({"model_cfg": json.loads(Path(tiny_teacher[0]).read_text()),
                               "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}))
    plain = load_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1])))
    other = load_teacher(TeacherConfig(model=str(hub), pretrained=str(tiny_teacher[1])))
    assert plain.identity["weights"] == other.identity["weights"]
    manifest = load_manifest(dataset["val"])
    assert cache_dir(tmp_path, plain, manifest) != cache_dir(tmp_path, other, manifest)


def test_a_damaged_unfinished_build_starts_over(teacher, dataset, tmp_path, monkeypatch):
    manifest = load_manifest(dataset["train"])
    reference = build(teacher, manifest, tmp_path / "reference").cache
    crash_on_batch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        build(teacher, manifest, tmp_path / "cache")
    monkeypatch.undo()
    final = cache_dir(tmp_path / "cache", teacher, manifest)
    partial_emb = final.with_name(final.name + ".partial") / "image_emb.npy"
    partial_emb.write_bytes(partial_emb.read_bytes()[:500])  # e.g. a disk that filled up
    result = build(teacher, manifest, tmp_path / "cache")
    assert result.forward_batches == 5 + 10  # every image again
    assert np.array_equal(result.cache.image_emb, reference.image_emb)


def test_a_full_disk_is_a_user_error(teacher, dataset, tmp_path, monkeypatch):
    import errno

    import edgedistill.distill.cache as cache_module

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "_reserve_disk", full)
    with pytest.raises(UserError, match=r"train: no space left writing the teacher feature cache .*set cache.dir"):
        build(teacher, load_manifest(dataset["train"]), tmp_path / "cache", what="train")


def test_a_finished_cache_on_read_only_storage_is_read(teacher, dataset, tmp_path):
    manifest = load_manifest(dataset["train"])
    built = build(teacher, manifest, tmp_path / "cache").cache
    reference = np.array(built.image_emb)
    del built
    with read_only_copy(tmp_path / "cache", tmp_path / "ro-cache") as ro:
        result = build(teacher, manifest, ro)
        assert result.hit and result.forward_batches == 0
        assert np.array_equal(np.asarray(result.cache.image_emb), reference)
        other = load_manifest(write_manifest(tmp_path / "other.jsonl", write_images(tmp_path / "o", 3, seed=5)))
        with pytest.raises(UserError, match="is read-only and there is none for this run; set cache.dir"):
            build(teacher, other, ro)
