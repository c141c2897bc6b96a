"""data.in_memory (data/images.py DecodedImages): training images decoded once, the same pixels, the same training,
bad images kept as bad, and a memory limit that fails closed before the machine swaps."""

import json

import numpy as np
import pytest
import torch

import edgedistill.data.images as images
from edgedistill.cli import main
from edgedistill.core.errors import UserError
from edgedistill.data.images import DecodedImages, UnreadableImage, open_image, why_unreadable
from edgedistill.data.manifest import load_manifest
from edgedistill.data.transforms import Render
from edgedistill.distill.train import TrainImages
from tests.test_train import recipe_for


def paths_of(dataset):
    return [e.image for e in load_manifest(dataset["train"]).entries]


def test_decoded_images_are_the_files_pixels_and_bad_files_keep_their_reason(dataset, tmp_path):
    paths = paths_of(dataset)[:6]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    paths += [tmp_path / "broken.jpg", tmp_path / "missing.jpg"]
    decoded = DecodedImages(paths)
    assert len(decoded) == 8 and decoded.nbytes == sum(np.asarray(open_image(p)).nbytes for p in paths[:6])
    for i in range(6):
        assert np.array_equal(np.asarray(decoded[i]), np.asarray(open_image(paths[i])))
        assert decoded[i].mode == "RGB"
    for i, expected in ((6, "not an image file"), (7, "file not found")):
        with pytest.raises(UnreadableImage) as e:
            decoded[i]
        assert why_unreadable(e.value) == expected


def test_training_items_are_the_same_from_memory_and_from_files(dataset, tmp_path):
    paths = paths_of(dataset)[:10] + [tmp_path / "missing.jpg"]
    student, teacher = Render(32, (0.5,) * 3, (0.25,) * 3), Render(48, (0.4,) * 3, (0.3,) * 3)
    files = TrainImages(paths, student, seed=2, scale=(0.3, 1.0), hflip=True, teacher=teacher)
    memory = TrainImages(paths, student, seed=2, scale=(0.3, 1.0), hflip=True, teacher=teacher,
                         decoded=DecodedImages(paths))
    for epoch in (0, 3):
        files.epoch = memory.epoch = epoch
        for i in range(10):
            a, b = files[i], memory[i]
            assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) and a[3:] == b[3:]
    assert files[10][1] is None and memory[10][1:] == files[10][1:] == (None, None, -1, "file not found")


def test_the_memory_limit_fails_closed_early(dataset, monkeypatch):
    paths = paths_of(dataset) * 5  # 200 images
    one = np.asarray(open_image(paths[0])).nbytes
    reads = []
    real = images.open_image
    monkeypatch.setattr(images, "open_image", lambda p: reads.append(p) or real(p))
    with pytest.raises(UserError, match="data.in_memory: the 200 decoded training images need about .* set "
                                        "data.in_memory: false"):
        DecodedImages(paths, limit=100 * one)  # half of what they need: refused at the first extrapolation
    assert len(reads) == DecodedImages.PROBE
    reads.clear()
    assert len(DecodedImages(paths, limit=300 * one)) == 200 and len(reads) == 200
    with pytest.raises(UserError, match="data.in_memory"):
        DecodedImages(paths[:10], limit=one // 2)  # too few images to extrapolate: the running total decides


def test_the_limit_defaults_to_half_the_available_memory(dataset, monkeypatch):
    paths = paths_of(dataset)[:4]
    monkeypatch.setattr(images, "available_memory", lambda: 2 * np.asarray(open_image(paths[0])).nbytes)
    with pytest.raises(UserError, match="half the available memory"):
        DecodedImages(paths)
    monkeypatch.setattr(images, "available_memory", lambda: 10 * np.asarray(open_image(paths[0])).nbytes)
    assert len(DecodedImages(paths)) == 4  # half of 10 images' worth holds 4
    with pytest.raises(UserError, match="shared by 2 processes"):
        DecodedImages(paths, processes=2)  # each of 2 ranks gets a quarter: 2.5 images' worth
    monkeypatch.setattr(images, "available_memory", lambda: None)  # unknown (not Linux): no limit
    assert len(DecodedImages(paths)) == 4


def test_available_memory_reads_meminfo():
    available = images.available_memory()
    assert available is None or available > 0


@pytest.mark.slow
def test_a_run_from_memory_trains_exactly_as_a_run_from_files(tiny_teacher, dataset, tmp_path):
    runs = {}
    for name, in_memory in (("files", False), ("memory", True)):
        recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name=name,
                                 data={"workers": 0, "in_memory": in_memory}, train={"epochs": 1})
        assert main(["distill", str(recipe)]) == 0
        runs[name] = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]
        losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        runs[name + "_loss"] = losses
    assert runs["files_loss"] == runs["memory_loss"] and len(runs["files_loss"]) > 1
    for key, value in runs["files"].items():
        assert torch.equal(runs["memory"][key], value), key


def test_the_loader_benchmark_times_three_loaders_of_the_same_items(dataset):
    from benchmarks.train_images import CLIP_MEAN, CLIP_STD, TorchvisionImages, loader_seconds
    paths = paths_of(dataset)[:8]
    student = Render(32, CLIP_MEAN, CLIP_STD)
    kinds = {"torchvision": TorchvisionImages(paths, student, 0, (0.5, 1.0), True),
             "files": TrainImages(paths, student, 0, (0.5, 1.0), True),
             "memory": TrainImages(paths, student, 0, (0.5, 1.0), True, decoded=DecodedImages(paths))}
    seconds = loader_seconds(kinds, repeats=2)
    assert set(seconds) == set(kinds) and all(v > 0 for v in seconds.values())
    kinds["files"] = TrainImages(paths, student, 1, (0.5, 1.0), True)  # another seed: other views
    with pytest.raises(AssertionError, match="disagree"):
        loader_seconds(kinds, repeats=1)
