"""Pretraining a small open_clip CLIP from scratch: learning, open_clip-format output, caching, bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
from PIL import Image, ImageDraw

import edgedistill.distill.pretrain as pretrain
from edgedistill.data.images import open_image
from edgedistill.data.manifest import load_manifest
from edgedistill.core.errors import UserError
from edgedistill.distill.pretrain import PRESETS, PretrainConfig, pretrain_config, pretrain_teacher, preset_name
from edgedistill.distill.recipe import TeacherConfig
from edgedistill.distill.teachers import load_teacher

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (230, 220, 30),
           "purple": (140, 40, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "cyan": (30, 210, 220)}
SHAPES = ("circle", "square")
COMBOS = [(c, s) for c in COLOURS for s in SHAPES]  # 16: every val caption names exactly one val image

# Small enough to train in seconds; captions decide images, so held-out retrieval must beat chance (1/16).
CFG = PretrainConfig(vision_width=64, vision_layers=2, vision_heads=2, text_width=64, text_layers=1, text_heads=2,
                     embed_dim=64, steps=40, batch_size=64, lr=2e-3, warmup_steps=5)


def draw_shape(path: Path, colour: str, shape: str, rng: random.Random, size: tuple[int, int] = (64, 64)) -> None:
    img = Image.new("RGB", size, (rng.randint(0, 50),) * 3)
    m = min(size)
    r = rng.randint(max(2, m // 6), max(2, m // 4))  # 10..16 pixels at 64x64
    x, y = rng.randint(r, size[0] - r), rng.randint(r, size[1] - r)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)([x - r, y - r, x + r, y + r], fill=COLOURS[colour])
    img.save(path, quality=90)


def write_dataset(folder: Path, combos: list[tuple[str, str]], seed: int, name: str,
                  uncaptioned: int = 0) -> Path:
    """A manifest of shape images; each caption names its image's colour and shape."""
    rng = random.Random(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (colour, shape) in enumerate(combos):
        rel = f"{name}/{i:04d}.jpg"
        draw_shape(folder / rel, colour, shape, rng)
        lines.append({"image": rel, "captions": [f"a {colour} {shape}", f"a photo of a {shape} that is {colour}"]})
    for i in range(uncaptioned):  # no captions: must be skipped, not trained on
        rel = f"{name}/bare_{i:04d}.jpg"
        draw_shape(folder / rel, "red", "circle", rng)
        lines.append({"image": rel, "captions": []})
    manifest = folder / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return manifest


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    train = write_dataset(folder, [rng.choice(COMBOS) for _ in range(200)], seed=1, name="train", uncaptioned=5)
    val = write_dataset(folder, COMBOS, seed=2, name="val")
    return {"train": train, "val": val, "folder": folder}


@pytest.fixture(scope="module")
def trained(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One training run shared by the tests; also keeps the in-memory model's val embeddings."""
    root = tmp_path_factory.mktemp("teachers")
    seen: dict[str, Any] = {}
    original = pretrain.embed_pairs

    def spy(model, pairs, normalize, device):
        seen["images"], seen["texts"] = original(model, pairs, normalize, device)
        seen["pairs"], seen["normalize"] = pairs, normalize
        return seen["images"], seen["texts"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain, "embed_pairs", spy)
        result = pretrain_teacher(data["train"], data["val"], CFG, root=root)
    return {"result": result, "root": root, **seen}


@pytest.mark.slow
def test_loss_goes_down_and_retrieval_beats_chance(trained):
    result = trained["result"]
    assert not result.reused and result.seconds > 0
    losses = result.info["losses"]
    assert len(losses) == CFG.steps
    m = result.metrics
    assert m["train_loss_end"] < 0.8 * m["train_loss_start"], m
    # Chance is 1/16 = 6.25% both ways; a model that learnt colour alone gets about 50%.
    assert m["i2t_r1"] >= 25.0 and m["t2i_r1"] >= 25.0, m
    assert set(m) >= {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
    # Uncaptioned images are not trained on; the counts are recorded.
    assert result.info["train"]["images"] == 200 and result.info["train"]["captions"] == 400
    assert result.info["val"]["images"] == 16


def test_saved_in_open_clip_format_and_loads_as_teacher(trained, data):
    result = trained["result"]
    folder = result.folder
    assert folder.parent == trained["root"] and folder.name.startswith("custom-")
    assert sorted(p.name for p in folder.iterdir()) == sorted([result.config_json.name, result.checkpoint.name,
                                                               "pretrain.json"])
    assert not [p for p in trained["root"].iterdir() if p.name.startswith(".")]  # no temporary leftovers
    cfg = json.loads(result.config_json.read_text())
    assert cfg == CFG.open_clip_config()
    assert cfg["vision_cfg"]["head_width"] == 32 and cfg["text_cfg"]["context_length"] == 32
    state = torch.load(result.checkpoint, weights_only=True)
    assert "logit_scale" in state and state["token_embedding.weight"].shape == (49408, 64)
    info = json.loads((folder / "pretrain.json").read_text())
    assert info["config"] == CFG.model_dump(mode="json") and info["steps"] == 40 and info["train_seconds"] > 0
    assert info["train"]["manifest_sha256"] == load_manifest(data["train"]).content_hash()

    teacher = load_teacher(TeacherConfig(**result.teacher_config()), "cpu")
    val = load_manifest(data["val"])
    images = torch.stack([teacher.preprocess(open_image(e.image)) for e in val.entries])
    # The training-time normalisation of the decoded uint8 images is what the teacher's preprocess gives.
    assert torch.equal(trained["normalize"](trained["pairs"].images), images)
    got_images = teacher.embed_images(images)
    got_texts = teacher.embed_texts(val.all_captions())
    assert torch.nn.functional.cosine_similarity(got_images, trained["images"]).min() > 0.999
    assert torch.nn.functional.cosine_similarity(got_texts, trained["texts"]).min() > 0.999


def test_preprocessing_matches_open_clip_for_other_sizes(tmp_path):
    """Non-square, larger and smaller images: resize-shortest + centre crop exactly as open_clip's eval transform."""
    cfg = pretrain_config("tiny", image_size=32, patch_size=8)
    model_cfg = cfg.open_clip_config()
    model, preprocess, tokenizer = pretrain.build_model("edgeclip-test-pre", model_cfg)
    rng = random.Random(0)
    lines = []
    for i, size in enumerate([(32, 32), (64, 64), (80, 50), (20, 45)]):
        draw_shape(tmp_path / f"{i}.jpg", "blue", "circle", rng, size=size)
        lines.append({"image": f"{i}.jpg", "captions": [f"a blue circle {i}"]})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    manifest = load_manifest(tmp_path / "m.jsonl")
    geometry, normalize = pretrain.split_preprocess(preprocess)
    pairs = pretrain.load_pairs(manifest, geometry, 32, tokenizer, "train")
    assert pairs.images.dtype == torch.uint8 and pairs.images.shape == (4, 3, 32, 32)
    _, _, reference = open_clip.create_model_and_transforms("edgeclip-test-pre")
    expected = torch.stack([reference(Image.open(e.image)) for e in manifest.entries])
    assert torch.allclose(normalize(pairs.images), expected, atol=1e-6)
    # The tokenizer honours the config's context length.
    assert pairs.tokens.shape[1] == cfg.context_length


def test_second_call_reuses_without_training(trained, data, monkeypatch):
    first = trained["result"]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of reusing")

    monkeypatch.setattr(pretrain, "train_clip", no_training)
    again = pretrain_teacher(data["train"], data["val"], CFG, root=trained["root"])
    assert again.reused and again.folder == first.folder and again.checkpoint == first.checkpoint
    assert again.metrics == first.metrics
    # Without val data, the stored metrics; with another val set, the saved model is evaluated on it.
    assert pretrain_teacher(data["train"], None, CFG, root=trained["root"]).metrics == first.metrics
    other = pretrain_teacher(data["train"], data["train"], CFG, root=trained["root"])
    assert other.reused and other.metrics["i2t_r1"] != first.metrics["i2t_r1"]
    assert json.loads((first.folder / "pretrain.json").read_text())["metrics"] == first.metrics


def test_other_settings_get_another_folder_and_broken_folders_are_retrained(trained, data):
    quick = CFG.model_copy(update={"steps": 2, "seed": 1})
    result = pretrain_teacher(data["train"], None, quick, root=trained["root"])
    assert not result.reused and result.folder != trained["result"].folder
    assert set(result.metrics) == {"train_loss_start", "train_loss_end"}
    # A damaged checkpoint is not trusted: the folder is trained again.
    result.checkpoint.write_bytes(b"damaged")
    again = pretrain_teacher(data["train"], None, quick, root=trained["root"])
    assert not again.reused and again.folder == result.folder
    assert torch.load(again.checkpoint, weights_only=True)["logit_scale"].numel() == 1
    assert not [p for p in trained["root"].iterdir() if p.name.startswith(".")]


def test_presets_name_their_folder_and_match_the_feasibility_sizes():
    assert preset_name(pretrain_config("tiny")) == "tiny" and preset_name(CFG) == "custom"
    assert preset_name(pretrain_config("small", steps=10)) == "custom"
    small, base = PRESETS["small"].open_clip_config(), PRESETS["base"].open_clip_config()
    assert (small["vision_cfg"]["width"], small["vision_cfg"]["layers"], small["text_cfg"]["layers"]) == (128, 3, 2)
    assert (base["vision_cfg"]["width"], base["vision_cfg"]["layers"], base["text_cfg"]["layers"]) == (192, 4, 3)
    assert PRESETS["base"].steps == 1260
    model, _, _ = pretrain.build_model("edgeclip-test-small", small)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 7.4) < 0.1  # the feasibility run's 7.4M


def test_an_interrupted_run_leaves_no_folder(data, tmp_path, monkeypatch):
    class Interrupted(pretrain.ClipLoss):
        calls = 0

        def forward(self, *args, **kwargs):
            Interrupted.calls += 1
            if Interrupted.calls == 3:
                raise KeyboardInterrupt
            return super().forward(*args, **kwargs)

    monkeypatch.setattr(pretrain, "ClipLoss", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain_teacher(data["train"], data["val"], CFG.model_copy(update={"steps": 5}), root=tmp_path)
    assert Interrupted.calls == 3
    assert list(tmp_path.iterdir()) == []


def test_bad_input_is_a_one_line_user_error(data, tmp_path):
    with pytest.raises(UserError, match="not found"):
        pretrain_teacher(tmp_path / "missing.jsonl", None, CFG, root=tmp_path)
    with pytest.raises(UserError, match="val manifest .* not found"):
        pretrain_teacher(data["train"], tmp_path / "missing.jsonl", CFG, root=tmp_path)
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"image": "x.jpg", "captions": []}) + "\n")
    with pytest.raises(UserError, match="no captioned images"):
        pretrain_teacher(bare, None, CFG, root=tmp_path)
    with pytest.raises(UserError, match="steps"):
        pretrain_config("tiny", steps=0)
    with pytest.raises(UserError, match="steps"):
        pretrain_teacher(data["train"], None, CFG.model_copy(update={"steps": 0}), root=tmp_path)
    with pytest.raises(UserError, match="vision_heads"):
        pretrain_config("tiny", vision_heads=3)
    with pytest.raises(UserError, match="unknown pretrain preset 'huge'"):
        pretrain_config("huge")
    with pytest.raises(UserError) as e:
        pretrain_config("tiny", colour="red")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == [bare]
