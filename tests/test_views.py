"""The reinforced cache (distill/views.py): K stored views per image with the teacher's embedding of each."""

import json

import numpy as np
import pytest
import torch
from rich.console import Console

from edgedistill.core.hashing import seed_of
from edgedistill.data.images import open_image
from edgedistill.data.manifest import load_manifest
from edgedistill.data.transforms import render_view, seeded_view
from edgedistill.distill.cache import build_or_load
from edgedistill.distill.recipe import TeacherConfig
from edgedistill.distill.teachers import Teacher, load_teacher
from edgedistill.distill.views import ViewSettings, build_or_load_views, open_views, render_of


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"))


@pytest.fixture
def teacher(tiny_teacher) -> Teacher:
    return load_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1])))


SETTINGS = ViewSettings(count=3, scale=(0.3, 0.9), hflip=True, seed=5)


def build(teacher, manifest, root, settings=SETTINGS):
    clean = build_or_load(teacher, manifest, root, batch_size=8, workers=0, chunk_size=16, console=quiet()).cache
    return clean, build_or_load_views(teacher, manifest, clean, settings, batch_size=8, workers=0, chunk_size=16,
                                      console=quiet())


@pytest.mark.slow
def test_store_holds_the_teachers_embedding_of_each_stored_view(teacher, dataset, tmp_path):
    manifest = load_manifest(dataset["train"])
    clean, views = build(teacher, manifest, tmp_path / "cache")
    assert views.view_emb.shape == (40, 3, 32) and views.view_params.shape == (40, 3, 5) and views.count == 3
    render = render_of(teacher.preprocess_cfg)
    for i, k in ((0, 0), (17, 2), (39, 1)):
        image = open_image(manifest.entries[i].image)
        view = seeded_view(image, seed_of(5, i, k), SETTINGS.scale, SETTINGS.hflip)
        assert np.array_equal(views.view_params[i, k], view.as_row())  # the view replays from its seed
        expected = teacher.embed_images(render_view(image, view, render)[None])
        assert torch.allclose(views.features([i], [k]), expected, atol=2e-3)
    # the views differ from each other and from the clean crop
    assert not np.allclose(views.view_emb[:, 0], views.view_emb[:, 1], atol=1e-2)
    assert not np.allclose(views.view_emb[:, 0], clean.image_emb, atol=1e-2)
    assert not list(views.path.parent.glob("*.partial"))


@pytest.mark.slow
def test_store_is_reused_and_rebuilt_when_it_does_not_match(teacher, dataset, tmp_path, monkeypatch):
    manifest = load_manifest(dataset["train"])
    _, first = build(teacher, manifest, tmp_path / "cache")
    monkeypatch.setattr(Teacher, "embed_images", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    _, again = build(teacher, manifest, tmp_path / "cache")
    assert again.path == first.path
    monkeypatch.undo()
    other = ViewSettings(count=2, scale=(0.3, 0.9), hflip=True, seed=5)
    _, two = build(teacher, manifest, tmp_path / "cache", other)  # other settings: another store
    assert two.path != first.path and two.count == 2
    with open(first.path / "view_emb.npy", "r+b") as f:  # corrupt a byte of the data
        f.seek(-3, 2)
        f.write(b"\x07\x07\x07")
    _, rebuilt = build(teacher, manifest, tmp_path / "cache")
    assert np.array_equal(np.asarray(rebuilt.view_params), np.asarray(first.view_params))
    meta = json.loads((rebuilt.path / "meta.json").read_text())
    assert meta["count"] == 3 and meta["views_seed"] == 5


@pytest.mark.slow
def test_a_killed_build_resumes_with_the_same_numbers(teacher, dataset, tmp_path, monkeypatch):
    manifest = load_manifest(dataset["train"])
    _, whole = build(teacher, manifest, tmp_path / "a")
    calls = {"n": 0}
    real = Teacher.embed_images

    def dies_in_the_second_chunk(self, images):  # 2 images a batch (8 // 3): 8 batches a chunk
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real(self, images)

    clean = build_or_load(teacher, manifest, tmp_path / "b", batch_size=8, workers=0, chunk_size=16,
                          console=quiet()).cache
    monkeypatch.setattr(Teacher, "embed_images", dies_in_the_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        build_or_load_views(teacher, manifest, clean, SETTINGS, batch_size=8, workers=0, chunk_size=16,
                            console=quiet())
    partial = next((tmp_path / "b").glob("*.partial"))
    assert json.loads((partial / "progress.json").read_text())["images_done"] == 16  # one chunk of 16 done
    monkeypatch.setattr(Teacher, "embed_images", real)
    resumed = build_or_load_views(teacher, manifest, clean, SETTINGS, batch_size=8, workers=0, chunk_size=16,
                                  console=quiet())
    assert np.allclose(np.asarray(resumed.view_emb, np.float32), np.asarray(whole.view_emb, np.float32), atol=2e-3)
    assert open_views(resumed.path, resumed.meta["key"], 40).count == 3
