"""Out-of-distribution distillation: the classification term, class descriptions and their cache, few-shot
classifiers against numpy, the scenes OOD classes, and a run with data.ood_val end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgedistill.cli import main
from edgedistill.core.errors import UserError
from edgedistill.evaluation.split import class_prompt_sets, read_class_descriptions
from edgedistill.distill.losses import LossContext
from edgedistill.evaluation.metrics import few_shot_accuracy, mean_class_top1, prototype_logits, tip_adapter_logits
from tests.conftest import captions_for, write_images
from tests.test_losses import close, make_batch, nunit, term
from tests.test_train import recipe_for

# ------------------------------------------------------------------------------------------ classification


def ref_classification(sv: np.ndarray, texts: np.ndarray, labels: np.ndarray, temperature: float) -> float | None:
    keep = labels >= 0
    if not keep.any():
        return None
    logits = nunit(sv[keep]) @ nunit(texts).T / temperature
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(keep.sum()), labels[keep]].mean())


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_classification_matches_numpy(temperature):
    rng = np.random.default_rng(3)
    texts = rng.normal(size=(5, 8))
    e, b = make_batch(7, 3, seed=4)
    labels = np.array([0, 4, -1, 2, 2, 1, -1])
    e.labels = torch.tensor(labels)
    loss = term("classification", context=LossContext(8, class_text=torch.tensor(texts)), temperature=temperature)
    close(loss(e), ref_classification(b["sv"], texts, labels, temperature))


def test_classification_gradcheck_and_none_cases():
    texts = torch.randn(4, 5, dtype=torch.float64)
    e, _ = make_batch(6, 2, D=5, seed=5)
    e.labels = torch.tensor([0, 1, 2, 3, -1, 1])
    loss = term("classification", D=5, context=LossContext(5, class_text=texts))
    sv = e.student_image.detach().requires_grad_()

    def f(x: torch.Tensor) -> torch.Tensor:
        e.student_image = x
        return loss(e)

    assert torch.autograd.gradcheck(f, (sv,))
    e.labels = torch.full((6,), -1)
    assert loss(e) is None                      # no labelled sample
    e.labels = None
    assert loss(e) is None                      # no labels
    assert term("classification", D=5)(make_batch(6, 2, D=5)[0]) is None  # no class texts


# ------------------------------------------------------------------------------------------- few-shot metrics


def test_prototype_and_tip_adapter_match_numpy():
    rng = np.random.default_rng(0)
    support, queries, classes = rng.normal(size=(6, 4)), rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    s_lab = np.array([0, 0, 1, 1, 2, 2])
    proto = nunit(np.stack([nunit(support)[s_lab == c].sum(0) for c in range(3)]))
    got = prototype_logits(torch.tensor(queries), torch.tensor(support), torch.tensor(s_lab), 3)
    np.testing.assert_allclose(got, nunit(queries) @ proto.T, rtol=1e-10)  # torch in, numpy out
    affinity = np.exp(-5.5 * (1 - nunit(queries) @ nunit(support).T))
    want = 2.0 * affinity @ np.eye(3)[s_lab] + 100 * nunit(queries) @ nunit(classes).T
    got = tip_adapter_logits(torch.tensor(queries), torch.tensor(support), torch.tensor(s_lab), 3,
                             torch.tensor(classes), alpha=2.0, beta=5.5)
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # a class without support scores -inf for the prototype classifier
    assert np.isinf(prototype_logits(queries, support[:4], s_lab[:4], 3)[:, 2]).all()


def test_mean_class_top1_weights_classes_equally():
    labels = torch.tensor([0, 0, 0, 0, 1])
    pred = torch.tensor([0, 0, 0, 0, 0])
    assert mean_class_top1(pred, labels, 2) == pytest.approx(50.0)  # overall accuracy would be 80


def test_few_shot_on_separable_classes_and_support_draws():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 16)) * 5
    labels = np.repeat(np.arange(4), 6)
    emb = torch.tensor(centres[labels] + rng.normal(size=(24, 16)) * 0.1)
    out = few_shot_accuracy(emb, torch.tensor(labels), k=1, repeats=2)
    assert out == {"prototype": 100.0, "tip_adapter": 100.0, "classes": 4.0}
    noise = torch.tensor(rng.normal(size=(24, 16)))
    a = few_shot_accuracy(noise, torch.tensor(labels), k=2, repeats=3, seed=0)
    assert a == few_shot_accuracy(noise, torch.tensor(labels), k=2, repeats=3, seed=0)  # seeded draws
    assert a["prototype"] < 75.0  # random embeddings are not separable
    assert few_shot_accuracy(emb, torch.tensor(labels), k=6) == {}  # no class has more than k images


# ------------------------------------------------------------------------------------ descriptions and cache


def test_class_prompt_sets_and_description_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"red star": ["it has five points", "it is red"], "cat": "a small animal"}))
    d = read_class_descriptions(path)
    assert d == {"red star": ["it has five points", "it is red"], "cat": ["a small animal"]}
    sets = class_prompt_sets(["cat", "dog", "red star"], "a photo of a {label}.", d)
    assert sets == [["a photo of cat . a small animal"], ["a photo of a dog."],
                    ["a photo of red star . it has five points", "a photo of red star . it is red"]]
    for text, words in (("[1, 2]", "JSON object"), ('{"a": []}', "non-empty"), ("{", "not valid JSON")):
        path.write_text(text)
        with pytest.raises(UserError, match=words):
            read_class_descriptions(path)
    with pytest.raises(UserError, match="not found"):
        read_class_descriptions(tmp_path / "missing.json")


def test_class_texts_are_embedded_once_and_cached(tiny_teacher, tmp_path, monkeypatch):
    from edgedistill.distill.cache import class_text_features
    from edgedistill.distill.recipe import TeacherConfig
    from edgedistill.distill.teachers import load_teacher
    teacher = load_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1])), "cpu")
    sets = [["a photo of a red star."], ["a photo of blue . one", "a photo of blue . two"]]
    first = class_text_features(teacher, sets, tmp_path)
    want = torch.nn.functional.normalize(teacher.embed_texts(sets[1]).mean(0), dim=-1)
    torch.testing.assert_close(first[1], want)
    torch.testing.assert_close(first[0], teacher.embed_texts(sets[0])[0])
    calls = []
    monkeypatch.setattr(type(teacher), "embed_texts", lambda self, t: calls.append(t) or torch.zeros(len(t), 32))
    torch.testing.assert_close(class_text_features(teacher, sets, tmp_path), first)
    assert calls == []  # from the cache
    class_text_features(teacher, [["another prompt"]], tmp_path)
    assert calls == [["another prompt"]]  # other prompts: another key


# ------------------------------------------------------------------------------------------------- scenes


def test_scenes_ood_classes_are_disjoint_from_training(tmp_path):
    from edgedistill.data.scenes import HELD_OUT, class_descriptions, write_ood_classes, write_scenes
    write_scenes(tmp_path / "s", 60, n_val=0, n_hard=0, n_ood=0)
    manifest = write_ood_classes(tmp_path / "s", 3)
    train = {json.loads(x)["label"] for x in (tmp_path / "s" / "train.jsonl").read_text().splitlines()}
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    ood = [x["label"] for x in lines]
    assert sorted(set(ood)) == sorted(f"{c} {s}" for c, s in HELD_OUT) and not set(ood) & train
    assert all(ood.count(c) == 3 for c in set(ood))
    assert all((tmp_path / "s" / x["image"]).is_file() and x["captions"] for x in lines)
    for x in lines:  # the labelled object is in the captions
        assert all(x["label"] in c for c in x["captions"])
    d = json.loads((tmp_path / "s" / "class_descriptions.json").read_text())
    assert d == class_descriptions() and len(d) == 64 and set(ood) <= set(d)
    before = manifest.read_text()
    assert write_ood_classes(tmp_path / "s", 3).read_text() == before  # reused, deterministic
    with pytest.raises(UserError, match="other settings"):
        write_ood_classes(tmp_path / "s", 4)


# ---------------------------------------------------------------------------------------------- end to end

OOD_CLASSES = ["circle", "square", "star"]


def write_ood(folder: Path) -> Path:
    images = write_images(folder / "images", 15, seed=7)
    path = folder / "ood.jsonl"
    with open(path, "w") as f:
        for i, img in enumerate(images):
            f.write(json.dumps({"image": str(img), "captions": captions_for(100 + i),
                                "label": OOD_CLASSES[i % 3]}) + "\n")
    return path


@pytest.mark.slow
def test_distill_with_descriptions_and_ood_val(tiny_teacher, dataset, tmp_path, monkeypatch):
    from edgedistill.distill.losses.alignment import ClassificationLoss
    seen = []
    original = ClassificationLoss.forward

    def spy(self, e):
        seen.append((None if e.labels is None else e.labels.clone(), self.class_text.shape))
        return original(self, e)

    monkeypatch.setattr(ClassificationLoss, "forward", spy)
    descriptions = tmp_path / "descriptions.json"
    descriptions.write_text(json.dumps({n: [f"{n} thing", f"very {n}"] for n in ["red", "blue", "green"]
                                        + OOD_CLASSES}))
    ood = write_ood(tmp_path / "ood")
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name="ood", train={"epochs": 1},
                             data={"class_descriptions": str(descriptions), "ood_val": str(ood)},
                             eval={"few_shot": [1, 2], "few_shot_repeats": 2},
                             loss={"terms": {"feature": {}, "vl_align": {"k": 2, "filter_wrong": True},
                                             "classification": {}}, "balancer": "static"})
    assert main(["distill", str(recipe)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    zs = summary["ood_zero_shot"]
    assert zs["classes"] == 3 and zs["images"] == 15 and zs["prompts"] == "descriptions"
    for key in ("student_mean_class", "teacher_mean_class", "student_top1", "teacher_top1"):
        assert 0 <= zs[key] <= 100
    few = summary["ood_few_shot"]
    assert set(few["k"]) == {"1", "2"} and few["repeats"] == 2
    for row in few["k"].values():
        assert row["classes"] == 3 and {"prototype", "tip_adapter", "teacher_prototype"} <= set(row)
    # the training labels and the 3 training classes' texts reached the term (conftest: labels red/blue/green)
    labels, shape = seen[0]
    assert shape == (3, 32) and labels is not None and set(labels.tolist()) <= {0, 1, 2}
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["terms"]["classification"] > 0
    assert any((tmp_path / "cache" / "class_text").iterdir())  # class texts kept next to the feature cache


def test_ood_val_sharing_training_classes_is_refused(tiny_teacher, dataset, tmp_path, capsys):
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name="overlap", train={"epochs": 1},
                             data={"ood_val": str(dataset["val"])})  # same classes as train
    assert main(["distill", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert "disjoint" in err and len(err.splitlines()) == 1


def test_classification_without_labels_is_refused(tiny_teacher, tmp_path, capsys):
    images = write_images(tmp_path / "data" / "images", 16)
    with open(tmp_path / "data" / "train.jsonl", "w") as f:
        for img in images:
            f.write(json.dumps({"image": str(img)}) + "\n")
    recipe, _ = recipe_for(tmp_path, tiny_teacher, {"train": tmp_path / "data" / "train.jsonl", "val": None},
                           name="nolabels", loss={"terms": ["feature", "classification"]})
    assert main(["distill", str(recipe)]) == 2
    assert "needs class labels" in capsys.readouterr().err
