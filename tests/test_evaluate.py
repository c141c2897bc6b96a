"""One evaluation path: one trained student scored by distill, eval, export and bench gives the same numbers
(identical on the PyTorch path, within 0.1 point for the fp32 ONNX graph), class descriptions included."""

import json

import numpy as np
import pytest
import yaml

from edgedistill.cli import main
from edgedistill.evaluation.split import ClassPrompts, ValSplit, class_embeddings, score
from edgedistill.data.manifest import load_manifest
from tests.conftest import WORDS, write_recipe

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "zs_top1", "zs_mean_class")


@pytest.fixture(scope="module")
def scored(tiny_teacher, tmp_path_factory):
    from tests.conftest import write_images, write_manifest

    root = tmp_path_factory.mktemp("eval-path")
    train = write_manifest(root / "data" / "train.jsonl", write_images(root / "data" / "images", 40))
    val = write_manifest(root / "data" / "val.jsonl", write_images(root / "data" / "val_images", 16, seed=3))
    descriptions = root / "descriptions.json"
    descriptions.write_text(json.dumps({WORDS[0]: ["it is bright", "it stands out"], WORDS[1]: "it is calm"}))
    recipe = write_recipe(root / "r.yaml", tiny_teacher, train, val, cache_dir=root / "cache",
                          student={"image_size": 32}, data={"class_descriptions": str(descriptions)},
                          train={"epochs": 1, "warmup_steps": 1, "tensorboard": False})
    raw = yaml.safe_load(recipe.read_text())
    raw["out"] = str(root / "run")
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(recipe)]) == 0
    assert main(["eval", str(root / "run"), "--device", "cpu"]) == 0
    assert main(["export", str(root / "run"), "--out", str(root / "export")]) == 0
    assert main(["bench", str(root / "export"), "--batch", "1", "--iters", "2", "--warmup", "0", "--threads", "1",
                 "--out", str(root / "bench")]) == 0
    return root


def _pick(metrics):
    return {k: metrics[k] for k in KEYS if k in metrics}


@pytest.mark.slow
def test_distill_eval_export_and_bench_agree(scored):
    summary = json.loads((scored / "run" / "summary.json").read_text())["student"]
    evaluated = json.loads((scored / "run" / "eval.json").read_text())["student"]
    export = json.loads((scored / "export" / "export.json").read_text())
    image_onnx = next(a for a in export["artifacts"] if a["name"] == "image_fp32_onnx")
    rows = {r["artifact"]: r for r in json.loads((scored / "bench" / "bench.json").read_text())["rows"]
            if r["status"] == "ok"}
    pytorch = _pick(summary)
    assert set(pytorch) == set(KEYS)  # retrieval and zero-shot both measured
    assert _pick(evaluated) == pytorch
    assert _pick(image_onnx["val_pytorch_fp32"]) == pytorch
    assert _pick(rows["image_fp32_pytorch"]) == pytorch
    for onnx in (_pick(image_onnx["val"]), _pick(rows["image_fp32_onnx"])):
        assert set(onnx) == set(KEYS)
        assert all(abs(onnx[k] - pytorch[k]) <= 0.1 for k in KEYS), (onnx, pytorch)
    # the zero-shot prompts came from the class descriptions everywhere: export recorded them for bench
    assert export["val"]["prompts"]["descriptions"][WORDS[1]] == ["it is calm"]
    assert "a photo of red . it is bright" in [p for group in export["val"]["class_prompts"] for p in group]


def test_score_uses_every_prompt_of_a_class(tmp_path):
    from tests.conftest import write_images, write_manifest

    manifest = load_manifest(write_manifest(tmp_path / "v.jsonl", write_images(tmp_path / "i", 6)))
    prompts = ClassPrompts("a {label}", {WORDS[0]: ["x", "y"]}, "{label}: {description}")
    split = ValSplit.from_manifest(manifest, np.ones(6, bool), prompts)
    red, blue = split.class_names.index(WORDS[0]), split.class_names.index(WORDS[1])
    assert split.class_prompts[red] == [f"{WORDS[0]}: x", f"{WORDS[0]}: y"]
    assert split.class_prompts[blue] == [f"a {WORDS[1]}"]
    rng = np.random.default_rng(0)
    image = rng.standard_normal((6, 8)).astype(np.float32)
    prompt_emb = rng.standard_normal((len(split.prompt_texts), 8)).astype(np.float32)
    class_text = class_embeddings(prompt_emb, split.class_prompts)
    # the described class's text is the normalised mean of its two prompts, not its first prompt alone
    first = sum(len(g) for g in split.class_prompts[:red])
    unit = prompt_emb / np.linalg.norm(prompt_emb, axis=1, keepdims=True)
    mean = unit[first:first + 2].mean(0)
    assert np.allclose(class_text[red], mean / np.linalg.norm(mean), atol=1e-6)
    out = score(split, image, image[split.text_to_image], class_text)
    assert out["i2t_r1"] == 100.0 and out["t2i_r1"] == 100.0 and 0 <= out["zs_top1"] <= 100
