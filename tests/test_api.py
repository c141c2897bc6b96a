"""edgedistill.load: any exported form of a student, the fastest backend or the one asked for, images and text in,
normalised embeddings out; the same numbers as the student; and it runs without torch."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import edgedistill
from edgedistill.cli import main
from edgedistill.core.errors import UserError


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


def images(export_dir: Path) -> list[Path]:
    return sorted((export_dir.parent.parent / "data" / "val_images").glob("*.jpg"))


@pytest.mark.slow
def test_the_rule_never_prefers_int8_without_evidence_and_embeds_every_input_kind(export_dir):
    enc = edgedistill.load(export_dir, device="cpu", measure=False)
    assert enc.info.image["artifact"] == "image_fp32_onnx" and enc.info.image["backend"] == "onnxruntime-cpu"
    assert enc.info.text["artifact"] == "text_fp32_onnx" and enc.info.chosen_by == "rule"
    paths = images(export_dir)[:3]
    by_path = enc.encode_image([str(p) for p in paths])
    assert by_path.shape == (3, enc.embed_dim) and by_path.dtype == np.float32
    assert np.allclose(np.linalg.norm(by_path, axis=1), 1, atol=1e-5)
    pil = [Image.open(p) for p in paths]
    arrays = np.stack([np.asarray(im.convert("RGB")) for im in pil])
    assert np.allclose(enc.encode_image(pil), by_path, atol=1e-6)
    assert np.allclose(enc.encode_image(arrays), by_path, atol=1e-6)       # (N, H, W, 3) uint8
    assert np.allclose(enc.encode_image(arrays[0]), by_path[:1], atol=1e-6)  # one (H, W, 3) array
    assert enc.encode_image(str(paths[0])).shape == (1, enc.embed_dim)


@pytest.mark.slow
def test_every_backend_and_precision_agrees_with_the_pytorch_student(export_dir):
    torch_enc = edgedistill.load(export_dir.parent / "student", device="cpu")
    assert torch_enc.info.image["backend"] == "pytorch-cpu"
    paths = [str(p) for p in images(export_dir)]
    reference = torch_enc.encode_image(paths)
    texts = ["red circle left", "a blue square", ""]
    ref_text = torch_enc.encode_text(texts)
    for precision, floor in (("fp32", 0.9999), ("int8", 0.99)):
        enc = edgedistill.load(export_dir, device="cpu", backend="onnxruntime-cpu", precision=precision)
        assert enc.info.image["precision"] == precision and enc.info.chosen_by == "request"
        cos = (enc.encode_image(paths) * reference).sum(axis=1)
        assert cos.min() >= floor, (precision, cos.min())
    fp32 = edgedistill.load(export_dir, device="cpu", precision="fp32")
    assert ((fp32.encode_text(texts) * ref_text).sum(axis=1) > 0.9999).all()
    int8 = edgedistill.load(export_dir, device="cpu", precision="int8")  # the text tower exists in fp32 only
    assert int8.info.text["precision"] == "fp32" and any("no int8 text encoder" in n for n in int8.info.notes)
    assert ((int8.encode_text(texts) * ref_text).sum(axis=1) > 0.9999).all()


def test_zero_shot_gives_probabilities_over_the_labels(export_dir):
    enc = edgedistill.load(export_dir, device="cpu")
    probs = enc.zero_shot([str(p) for p in images(export_dir)[:4]], ["red", "blue", "green"])
    assert probs.shape == (4, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5) and (probs >= 0).all()
    image = enc.encode_image([str(p) for p in images(export_dir)[:4]])
    text = enc.encode_text([f"a photo of a {x}." for x in ("red", "blue", "green")])
    assert (probs.argmax(axis=1) == (image @ text.T).argmax(axis=1)).all()
    with pytest.raises(UserError, match="needs a {label} placeholder"):
        enc.zero_shot([str(images(export_dir)[0])], ["x"], prompt="no placeholder")


@pytest.mark.parametrize("bad, message", [
    (np.zeros((0, 0, 3), np.uint8), "holds no pixels"), (np.zeros((8, 8), np.uint8), "uint8 \\(H, W, 3\\)"),
    (np.random.rand(8, 8, 3), "not float64"), (None, "cannot read an image from a NoneType"),
])
def test_what_is_not_an_image_is_one_user_error(export_dir, bad, message):
    enc = edgedistill.load(export_dir, device="cpu")
    with pytest.raises(UserError, match=message):
        enc.encode_image(bad)


@pytest.mark.parametrize("bad", [None, 5, {"a": 1}])
def test_what_is_not_text_is_one_user_error(export_dir, bad):
    with pytest.raises(UserError, match="texts must be a string or a list of strings"):
        edgedistill.load(export_dir, device="cpu").encode_text(bad)


def test_an_artifact_file_pins_its_tower_and_a_run_folder_opens_its_export(export_dir):
    enc = edgedistill.load(export_dir / "image_fp32.onnx", device="cpu")
    assert enc.info.image["artifact"] == "image_fp32_onnx" and enc.info.text is not None
    assert edgedistill.load(export_dir.parent, device="cpu").info.image["path"].startswith(str(export_dir))


@pytest.mark.slow
def test_what_bench_measured_decides(export_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    assert main(["bench", str(copy), "--batch", "1", "--iters", "3", "--warmup", "1", "--threads", "1"]) == 0
    report = json.loads((copy / "bench" / "bench.json").read_text())
    for r in report["rows"]:  # make fp32 the measured fastest: load must follow the measurement, not the rule
        if r["status"] == "ok" and r["batch"] == 1 and r["p50_ms"]:
            r["p50_ms"] = 0.001 if r["artifact"] == "image_fp32_onnx" else 99.0
    (copy / "bench" / "bench.json").write_text(json.dumps(report))
    enc = edgedistill.load(copy, device="cpu")
    assert enc.info.chosen_by == "bench.json" and enc.info.image["artifact"] == "image_fp32_onnx"
    for r in report["rows"]:  # the fastest row loses a point of R@1 against fp32: not accurate enough to choose
        if r["status"] == "ok" and r["batch"] == 1 and r["artifact"] == "image_int8_onnx":
            r["p50_ms"], r["i2t_r1"] = 0.0001, max(r["i2t_r1"] for r in report["rows"] if r["i2t_r1"]) - 1.0
    (copy / "bench" / "bench.json").write_text(json.dumps(report))
    assert edgedistill.load(copy, device="cpu").info.image["artifact"] == "image_fp32_onnx"
    report["device_info"]["cpu"] = "another processor"  # measured elsewhere: says nothing about this machine
    (copy / "bench" / "bench.json").write_text(json.dumps(report))
    assert edgedistill.load(copy, device="cpu").info.chosen_by.startswith("measured")
    assert edgedistill.load(copy, device="cpu", measure=False).info.chosen_by == "rule"


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "tensorrt"}, "does not run on cpu"),
    ({"backend": "onnxruntime-cuda"}, "does not run on cpu"),
    ({"backend": "nope"}, "unknown backend 'nope'"),
    ({"precision": "int4"}, "unknown precision"),
    ({"device": "tpu"}, "not one of auto, cpu"),
])
def test_a_request_nothing_satisfies_is_one_clear_error(export_dir, kwargs, message):
    with pytest.raises(UserError, match=message):
        edgedistill.load(export_dir, **{"device": "cpu", **kwargs})


def test_bad_paths_and_damaged_artifacts_are_refused(export_dir, tmp_path):
    with pytest.raises(UserError, match="none of: an export folder"):
        edgedistill.load(tmp_path)
    (tmp_path / "lonely.onnx").write_bytes(b"x")
    with pytest.raises(UserError, match="export.json beside it"):
        edgedistill.load(tmp_path / "lonely.onnx")
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    with open(copy / "image_int8.onnx", "ab") as f:
        f.write(b"\0")
    # every artifact load() opens is checked: the damaged one when it is asked for, and every candidate when the
    # choice is measured (a choice read from the cache opens only what it chose)
    with pytest.raises(UserError, match="does not match the sha256"):
        edgedistill.load(copy, device="cpu", precision="int8")
    with pytest.raises(UserError, match="does not match the sha256"):
        edgedistill.load(copy, device="cpu", remeasure=True)


def test_an_image_only_export_has_no_text(export_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    doc = json.loads((copy / "export.json").read_text())
    doc["artifacts"] = [a for a in doc["artifacts"] if a["encoder"] == "image"]
    (copy / "export.json").write_text(json.dumps(doc))
    enc = edgedistill.load(copy, device="cpu")
    assert enc.info.text is None and enc.encode_image(str(images(export_dir)[0])).shape[0] == 1
    with pytest.raises(UserError, match="has no text encoder"):
        enc.encode_text("a dog")


def test_loading_and_embedding_need_no_torch(export_dir):
    script = f"""
import sys
for name in ("torch", "torchvision", "open_clip", "timm"):
    sys.modules[name] = None
import edgedistill
enc = edgedistill.load({str(export_dir)!r}, device="cpu")
img = enc.encode_image({[str(p) for p in images(export_dir)[:2]]!r})
txt = enc.encode_text(["a red circle"])
print(img.shape, txt.shape, enc.info.image["backend"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] in ("openvino-cpu", "onnxruntime-cpu")
    assert "(2, 32)" in proc.stdout and "(1, 32)" in proc.stdout
