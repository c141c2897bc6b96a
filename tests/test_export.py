"""`edgedistill export` on CPU: ONNX fp32/fp16/INT8 artifacts, parity against PyTorch, export.json, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import open_clip
import pytest
import torch
import yaml

from edgedistill.cli import main
from edgedistill.core.errors import UserError
import edgedistill.runtime.manifest as artifacts
from edgedistill.export.exporter import ExportOptions, make_plan
from edgedistill.core.locations import latest_run
from edgedistill.export.graph import ImageEncoder, cosine_parity, export_onnx
from edgedistill.runtime.ort import ort_session, run_session
from edgedistill.export.precision import TENSORRT_INT8, ImageCalibrationReader, _stride, quantize_int8, to_fp16
from tests.conftest import write_images, write_manifest, write_recipe


@pytest.fixture(scope="module")
def finished_run(tiny_teacher, tmp_path_factory):
    """A distilled tiny student (mobilenetv3_small at 32 px, the teacher's text tower) and its data."""
    root = tmp_path_factory.mktemp("export")
    train = write_manifest(root / "data" / "train.jsonl", write_images(root / "data" / "images", 40))
    val = write_manifest(root / "data" / "val.jsonl", write_images(root / "data" / "val_images", 12, seed=1))
    recipe = write_recipe(root / "tiny.yaml", tiny_teacher, train, val, cache_dir=root / "cache",
                          student={"image_size": 32},
                          train={"epochs": 1, "warmup_steps": 1, "tensorboard": False, "log_every": 1})
    raw = yaml.safe_load(recipe.read_text())
    raw["out"] = str(root / "runs" / "tiny")
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["distill", str(recipe)]) == 0
    return root / "runs" / "tiny"


@pytest.fixture(scope="module")
def exported(finished_run):
    """One export with every ONNX precision (shared by the checks below: exporting is the slow part)."""
    out = finished_run.parent / "export-all"
    prompts = finished_run.parent / "prompts.txt"
    prompts.write_text("a red circle\n\na blue star\n")
    assert main(["export", str(finished_run), "--fp16", "--int8", "--calib-size", "24", "--out", str(out),
                 "--text-embeddings", str(prompts)]) == 0
    return out


@pytest.mark.slow
def test_export_writes_every_onnx_artifact_with_parity_and_hashes(exported):
    doc = json.loads((exported / "export.json").read_text())
    by_name = {a["name"]: a for a in doc["artifacts"]}
    assert set(by_name) == {"image_fp32_onnx", "image_fp16_onnx", "image_int8_onnx", "text_fp32_onnx",
                            "text_fp16_onnx", "text_embeddings"}
    for a in doc["artifacts"]:
        path = exported / a["path"]
        assert artifacts.verify_artifact(exported, a) == path
        assert a["size_mb"] == pytest.approx(path.stat().st_size / 2**20, abs=1e-3)
    for name in ("image_fp32_onnx", "text_fp32_onnx"):
        assert by_name[name]["parity"]["cosine_mean"] >= 0.9999
    for name in ("image_fp16_onnx", "text_fp16_onnx"):
        assert by_name[name]["parity"]["cosine_mean"] >= 0.999
    assert 0 < by_name["image_int8_onnx"]["parity"]["cosine_mean"] <= 1
    assert by_name["image_int8_onnx"]["calibration"]["images"] == 24
    for name in ("image_fp32_onnx", "image_int8_onnx"):  # val Recall@1 recorded next to FP32 PyTorch
        assert {"i2t_r1", "t2i_r1", "rsum"} <= set(by_name[name]["val"])
        assert "i2t_r1" in by_name[name]["val_pytorch_fp32"]
    assert doc["val"]["images"] == 12 and doc["preprocess"]["size"]
    assert {"torch", "onnx", "onnxruntime"} <= set(doc["tools"])
    assert not list(exported.glob(".*"))  # no staging files left behind


def test_onnx_graphs_are_valid_dynamic_and_typed(exported):
    for name in ("image_fp32", "image_fp16", "image_int8", "text_fp32"):
        model = onnx.load(str(exported / f"{name}.onnx"))
        onnx.checker.check_model(model)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        inp = model.graph.input[0].type.tensor_type
        assert inp.shape.dim[0].dim_value == 0  # symbolic batch axis
        elem = onnx.TensorProto.INT64 if name.startswith("text") else onnx.TensorProto.FLOAT
        assert inp.elem_type == elem
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    fp16 = onnx.load(str(exported / "image_fp16.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in fp16.graph.initializer)
    int8 = onnx.load(str(exported / "image_int8.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # --format onnx targets onnxruntime on CPU: int8 weights with zero point 0, uint8 activations
    zero_points = [onnx.numpy_helper.to_array(i) for i in int8.graph.initializer if "zero_point" in i.name]
    assert {np.dtype(np.int8), np.dtype(np.uint8)} <= {z.dtype for z in zero_points}  # (+ int32 for biases)
    assert all(int(np.abs(z).max()) == 0 for z in zero_points if z.dtype != np.uint8)


def test_onnx_matches_the_saved_student_loaded_by_open_clip(exported, finished_run):
    """The graph a device runs gives the embeddings a user of the open_clip student gets (batch 5 and 1)."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{finished_run / 'student'}")
    model.eval()
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = model.encode_image(images, normalize=True).numpy()
    session = ort_session(exported / "image_fp32.onnx")
    assert cosine_parity(run_session(session, images.numpy()), ref)["cosine_min"] > 0.9999
    assert cosine_parity(run_session(session, images.numpy()[:1]), ref[:1])["cosine_min"] > 0.9999
    tokenizer = open_clip.get_tokenizer(f"local-dir:{finished_run / 'student'}")
    tokens = tokenizer(["a red circle", "two blue stars on the left"])
    with torch.no_grad():
        ref_text = model.encode_text(tokens, normalize=True).numpy()
    got = run_session(ort_session(exported / "text_fp32.onnx"), tokens.numpy().astype(np.int64))
    assert cosine_parity(got, ref_text)["cosine_min"] > 0.9999


def test_text_embeddings_file_holds_the_prompts(exported, finished_run):
    emb = np.load(exported / "text_embeddings.npy")
    assert emb.shape[0] == 2 and (exported / "text_prompts.txt").read_text().split("\n")[:2] == \
        ["a red circle", "a blue star"]
    model = open_clip.create_model(f"local-dir:{finished_run / 'student'}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{finished_run / 'student'}")
    with torch.no_grad():
        ref = model.encode_text(tokenizer(["a red circle", "a blue star"]), normalize=True).numpy()
    assert cosine_parity(emb, ref)["cosine_min"] > 0.9999


@pytest.mark.slow
def test_failed_parity_leaves_no_artifact_and_exits_2(finished_run, monkeypatch, capsys):
    import edgedistill.export.exporter as exporter

    monkeypatch.setitem(exporter.MIN_PARITY, "fp32", 1.5)  # unreachable: the check must fail
    out = finished_run.parent / "export-bad"
    assert main(["export", str(finished_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disagrees with PyTorch" in err and "Traceback" not in err
    assert not list(out.glob("*.onnx")) and not list(out.glob(".*")) and not (out / "export.json").exists()


@pytest.mark.slow
def test_an_int8_graph_that_does_not_hold_on_this_cpu_fails_the_export_or_is_left_out(finished_run, monkeypatch,
                                                                                      capsys):
    import edgedistill.export.exporter as exporter
    from edgedistill.export.exporter import ExportOptions, run_export

    monkeypatch.setattr(exporter, "INT8_MIN_COSINE", 1.01)  # unreachable: the onnxruntime-CPU INT8 gate must fail
    out = finished_run.parent / "export-int8-gate"
    assert main(["export", str(finished_run), "--int8", "--calib-size", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "does not hold cosine 1.01 to PyTorch on this CPU" in err and "Traceback" not in err
    assert not (out / "export.json").exists() and not list(out.glob("*int8*"))
    doc = run_export(ExportOptions(run_dir=finished_run, int8=True, calib_size=8, out=out, int8_required=False))
    assert [d["name"] for d in doc["dropped"]] == ["image_int8_onnx"]
    assert "does not hold cosine 1.01" in doc["dropped"][0]["reason"]
    assert {a["name"] for a in doc["artifacts"]} == {"image_fp32_onnx", "text_fp32_onnx"}
    assert not (out / "image_int8.onnx").exists()


def test_the_cpu_int8_graph_records_its_flavour_settings_and_the_cpu_it_was_checked_on(exported):
    doc = json.loads((exported / "export.json").read_text())
    int8 = next(a for a in doc["artifacts"] if a["name"] == "image_int8_onnx")
    assert int8["flavour"] == "onnxruntime-cpu" and int8["calibration"]["reduce_range"] is True
    assert int8["checked_on"]["cpu"] and isinstance(int8["checked_on"]["flags"], list)
    assert int8["parity"]["cosine_min"] >= 0.99  # it passed the gate on this CPU, VNNI or not
    assert doc["probe"]["images"] >= 8 and set(doc["probe"]["files"]) == {"pixels", "image_ref", "tokens",
                                                                            "text_ref"}


def test_default_run_dir_is_the_latest_run(finished_run, tmp_path):
    assert latest_run(finished_run.parent) == finished_run
    with pytest.raises(UserError, match="no finished run"):
        latest_run(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--format", "engine"], "unknown --format"),
    (["--int8", "--calib-method", "kl"], "unknown --calib-method"),
    (["--int8", "--calib-size", "0"], "--calib-size must be at least 1"),
    (["--format", "torchtrt", "--int8"], "INT8 use --format trt"),
    (["--target", "jetson-orin-nanoo"], "jetson-orin-nano"),
])
def test_bad_flags_exit_2_with_one_line(finished_run, args, message, capsys):
    assert main(["export", str(finished_run), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_paths_exit_2(finished_run, tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["export", str(finished_run), "--text-embeddings", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n\n")
    assert main(["export", str(finished_run), "--text-embeddings", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompts" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.parametrize("fmt", ["trt", "torchtrt"])
def test_gpu_formats_without_a_gpu_exit_2_saying_what_is_missing(finished_run, fmt, capsys):
    out = finished_run.parent / f"export-{fmt}"
    assert main(["export", str(finished_run), "--format", fmt, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gpu" in err.lower()
    assert not out.exists()  # refused before any work


def test_target_sets_precision_profile_and_calibration():
    plan = make_plan(ExportOptions(format="trt", target="jetson-orin-nano"))
    assert plan.precisions == ["int8"] and plan.profile[0] == 1 and plan.calib_method in ("entropy", "minmax",
                                                                                           "percentile")
    flags = make_plan(ExportOptions(format="trt", fp16=True, calib_method="minmax", target="jetson-orin-nano"))
    assert flags.precisions == ["fp16"] and flags.calib_method == "minmax"  # flags win over the preset
    assert make_plan(ExportOptions(format="onnx")).precisions == []
    assert make_plan(ExportOptions(format="trt")).precisions == ["fp16"]
    assert make_plan(ExportOptions(format="trt")).for_tensorrt
    assert not make_plan(ExportOptions(format="onnx", target="cpu")).for_tensorrt
    assert make_plan(ExportOptions(format="onnx", target="jetson-orin-nano")).for_tensorrt


# -- the graph and precision building blocks on a small real model -----------------------------------------

@pytest.fixture(scope="module")
def small_graph(tmp_path_factory):
    torch.manual_seed(0)
    cfg = {"embed_dim": 16, "vision_cfg": {"timm_model_name": "resnet18", "timm_model_pretrained": False,
                                           "timm_pool": "avg", "timm_proj": "", "image_size": 32},
           "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    from edgedistill.distill.teachers import register_open_clip_config
    register_open_clip_config("export-test-resnet", cfg)
    model = open_clip.create_model("export-test-resnet").eval()
    folder = tmp_path_factory.mktemp("graph")
    path = folder / "image.onnx"
    info = export_onnx(ImageEncoder(model), torch.randn(2, 3, 32, 32), path, "image", "image_embedding")
    return model, path, info


@pytest.mark.slow
def test_export_onnx_reports_its_exporter_and_is_atomic(small_graph, tmp_path, monkeypatch):
    model, path, info = small_graph
    assert info["exporter"] in ("dynamo", "torchscript") and info["opset"] >= 17
    import edgedistill.export.graph as graph

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")
    monkeypatch.setattr(graph, "_export", broken)
    with pytest.raises(UserError, match="exporter exploded"):
        export_onnx(ImageEncoder(model), torch.randn(2, 3, 32, 32), tmp_path / "x.onnx", "image", "e")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_fp16_and_int8_run_on_cpu_and_calibration_is_cached(small_graph, tmp_path):
    model, path, _ = small_graph
    rng = np.random.default_rng(0)
    images = rng.normal(size=(20, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = ImageEncoder(model)(torch.from_numpy(images)).numpy()
    to_fp16(path, tmp_path / "half.onnx")
    half = run_session(ort_session(tmp_path / "half.onnx"), images)
    assert cosine_parity(half, ref)["cosine_mean"] > 0.999
    seen = []
    info = quantize_int8(path, tmp_path / "int8.onnx", ImageCalibrationReader("image", 20, lambda i: images[i],
                                                                              progress=seen.append),
                         "minmax", tmp_path / "cache", "data-v1")
    assert not info["cache_hit"] and sum(seen) == 20 and Path(info["cache"]).is_file()
    q = run_session(ort_session(tmp_path / "int8.onnx"), images)
    assert cosine_parity(q, ref)["cosine_mean"] > 0.9
    calls = []
    again = quantize_int8(path, tmp_path / "int8b.onnx",
                          ImageCalibrationReader("image", 20, lambda i: calls.append(i) or images[i]),
                          "minmax", tmp_path / "cache", "data-v1")
    assert again["cache_hit"] and calls == []  # ranges from the cache: no calibration inference
    assert np.allclose(run_session(ort_session(tmp_path / "int8b.onnx"), images), q, atol=1e-6)
    other = quantize_int8(path, tmp_path / "int8c.onnx", ImageCalibrationReader("image", 20, lambda i: images[i]),
                          "minmax", tmp_path / "cache", "data-v2")
    assert not other["cache_hit"]  # other images, other ranges
    trt = quantize_int8(path, tmp_path / "int8-trt.onnx", ImageCalibrationReader("image", 20, lambda i: images[i]),
                        "minmax", tmp_path / "cache", "data-v1", settings=TENSORRT_INT8)
    assert not trt["cache_hit"] and trt["activations"] == "int8 symmetric"
    zero_points = [onnx.numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "int8-trt.onnx")).graph.initializer
                   if "zero_point" in i.name]
    assert zero_points and all(z.dtype != np.uint8 and int(np.abs(z).max()) == 0 for z in zero_points)


def _float_inputs(model: onnx.ModelProto) -> dict[str, list[int]]:
    """op type -> element types of the float inputs of every node but Cast (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    out: dict[str, list[int]] = {}
    for node in inferred.graph.node:
        if node.op_type != "Cast":
            out.setdefault(node.op_type, []).extend(types[x] for x in node.input if types.get(x) in floats)
    return out


@pytest.mark.slow
def test_tensorrt_int8_graph_has_float_biases_and_fp16_outside_the_qdq_pairs(small_graph, tmp_path):
    model, path, _ = small_graph
    images = np.random.default_rng(0).normal(size=(16, 3, 32, 32)).astype(np.float32)
    info = quantize_int8(path, tmp_path / "trt.onnx", ImageCalibrationReader("image", 16, lambda i: images[i]),
                         "minmax", tmp_path / "cache", "data", settings=TENSORRT_INT8)
    graph = onnx.load(str(tmp_path / "trt.onnx"))
    initializers = {i.name: i for i in graph.graph.initializer}
    dequantized = [initializers[n.input[0]] for n in graph.graph.node
                   if n.op_type == "DequantizeLinear" and n.input[0] in initializers]
    # (1) TensorRT rejects DequantizeLinear of an int32 bias: biases stay float
    assert dequantized and all(t.data_type == onnx.TensorProto.INT8 for t in dequantized)
    # (2) a strongly typed engine runs each layer in its graph type: nothing but the edge casts is fp32
    inputs = _float_inputs(graph)
    assert {"Conv", "QuantizeLinear", "DequantizeLinear"} <= set(inputs)
    assert all(t == onnx.TensorProto.FLOAT16 for types in inputs.values() for t in types), inputs
    assert [i.type.tensor_type.elem_type for i in graph.graph.input] == [onnx.TensorProto.FLOAT]
    assert info["high_precision"] == "fp16" and info["activations"] == "int8 symmetric"
    with torch.no_grad():
        ref = ImageEncoder(model)(torch.from_numpy(images)).numpy()
    got = run_session(ort_session(tmp_path / "trt.onnx"), images)
    assert cosine_parity(got, ref)["cosine_mean"] > 0.9  # still runs on onnxruntime's CPU provider
    # the onnxruntime-CPU flavour is unchanged: fp32 around the Q/DQ pairs, uint8 activations
    quantize_int8(path, tmp_path / "cpu.onnx", ImageCalibrationReader("image", 16, lambda i: images[i]),
                  "minmax", tmp_path / "cache", "data")
    assert onnx.TensorProto.FLOAT in _float_inputs(onnx.load(str(tmp_path / "cpu.onnx")))["Conv"]


def test_calibration_reader_strides_cover_every_image_once():
    reader = ImageCalibrationReader("x", 21, lambda i: np.full((1,), i, np.float32), batch_size=4)
    assert len(reader) == 6 and 6 % _stride(6) == 0
    seen = []
    for start in range(0, len(reader), _stride(len(reader))):
        reader.set_range(start, start + _stride(len(reader)))
        while (batch := reader.get_next()) is not None:
            seen += batch["x"][:, 0].astype(int).tolist()
    assert seen == list(range(21))
    assert _stride(7) == 7 and _stride(13) == 1 and _stride(64) == 8


def test_read_manifest_and_verify_reject_bad_exports(exported, tmp_path):
    with pytest.raises(UserError, match="no export.json"):
        artifacts.read_manifest(tmp_path)
    (tmp_path / "export.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        artifacts.read_manifest(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    doc = artifacts.read_manifest(copy)
    entry = next(a for a in doc["artifacts"] if a["name"] == "image_fp32_onnx")
    with open(copy / entry["path"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="does not match the sha256"):
        artifacts.verify_artifact(copy, entry)
    (copy / entry["path"]).unlink()
    with pytest.raises(UserError, match="is missing"):
        artifacts.verify_artifact(copy, entry)


# ---------------------------------------------------------------------------------------------- bad input (issue 18)
def _damaged_copy(finished_run: Path, dest: Path, keep_sha: bool = True) -> Path:
    """A copy of the run whose student weights have about 40 bytes flipped near the end (NaN-prone floats)."""
    shutil.copytree(finished_run, dest)
    weights = dest / "student" / "open_clip_model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) - 200, len(data) - 160):
        data[i] = 0xFF
    weights.write_bytes(bytes(data))
    if not keep_sha:  # a student saved before weights got a sha256: the NaN check must still refuse it
        cfg = dest / "student" / "open_clip_config.json"
        doc = json.loads(cfg.read_text())
        doc["edgedistill"].pop("weights_sha256")
        cfg.write_text(json.dumps(doc))
    return dest


def test_a_damaged_student_is_refused_before_export(finished_run, tmp_path, capsys):
    run = _damaged_copy(finished_run, tmp_path / "run")
    assert main(["export", str(run), "--out", str(tmp_path / "e1")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not match the sha256 recorded" in err
    run2 = _damaged_copy(finished_run, tmp_path / "run2", keep_sha=False)
    assert main(["export", str(run2), "--out", str(tmp_path / "e2")]) == 2
    assert "hold NaN or inf" in capsys.readouterr().err
    assert not list((tmp_path / "e2").glob("*.onnx")) and not (tmp_path / "e2" / "export.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("cosine", [float("nan"), float("inf")])
def test_a_non_finite_parity_fails_the_gate(finished_run, tmp_path, monkeypatch, capsys, cosine):
    import edgedistill.export.exporter as exporter

    monkeypatch.setattr(exporter, "cosine_parity", lambda a, b: {"cosine_mean": cosine, "cosine_min": cosine})
    assert main(["export", str(finished_run), "--out", str(tmp_path / "e")]) == 2
    assert "disagrees with PyTorch" in capsys.readouterr().err
    assert not (tmp_path / "e" / "export.json").exists()


def test_export_out_that_cannot_be_a_folder_exits_2(finished_run, tmp_path, unwritable_dir, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out, message in ((a_file, "is a file, not a folder"), (a_file / "sub", "a part of that path is a file"),
                         (unwritable_dir / "export", "cannot be written")):
        assert main(["export", str(finished_run), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_fp16_graphs_run_in_a_default_onnxruntime_session(exported):
    """A user's plain ``InferenceSession(path)`` (ORT_ENABLE_ALL) once crashed on the fp16 text graph."""
    import subprocess
    import sys

    for name, x in (("text_fp16.onnx", "np.zeros((2, 16), np.int64)"), ("image_fp16.onnx", None)):
        x = x or "np.zeros((2, 3, 32, 32), np.float32)"
        script = (f"import numpy as np, onnxruntime as ort; s = ort.InferenceSession({str(exported / name)!r}); "
                  f"print(s.run(None, {{s.get_inputs()[0].name: {x}}})[0].shape)")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-500:]
        assert proc.stdout.strip() == "(2, 32)"


@pytest.mark.slow
def test_an_artifact_that_crashes_a_default_session_is_a_failed_gate(finished_run, tmp_path, monkeypatch, capsys):
    import edgedistill.export.graph as graph

    crash = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(graph, "_DEFAULT_SESSION_PROBE", crash)
    out = tmp_path / "e"
    assert main(["export", str(finished_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "crashed onnxruntime (SIGSEGV)" in errors[0] and "Traceback" not in err
    assert not list(out.glob("*.onnx")) and not list(out.glob(".*"))


def _sqrt_graph(path: Path) -> Path:
    """(batch, 4) -> sqrt: NaN for negative inputs, a real graph that runs and gives non-finite output."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Sqrt", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_the_openvino_gate_runs_the_graph_with_openvinos_defaults(small_graph, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    import edgedistill.export.graph as graph

    _, path, _ = small_graph
    graph.check_default_openvino(path, np.zeros((2, 3, 32, 32), np.float32))  # a good graph passes
    sqrt = _sqrt_graph(tmp_path / "sqrt.onnx")
    graph.check_default_openvino(sqrt, np.ones((2, 4), np.float32))
    with pytest.raises(UserError, match=r"^sqrt\.onnx does not run under OpenVINO's default CPU settings \(its "
                                        r"output holds NaN or inf\); nothing was kept"):
        graph.check_default_openvino(sqrt, -np.ones((2, 4), np.float32))
    with pytest.raises(UserError) as e:  # a batch the graph cannot take: OpenVINO's own line, not its stack
        graph.check_default_openvino(path, np.zeros((2, 3, 40, 32), np.float32))
    msg = str(e.value)
    assert "(OpenVINO failed: " in msg and "incompatible" in msg and "Exception from" not in msg and "\n" not in msg
    monkeypatch.setattr(graph, "_DEFAULT_OPENVINO_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(UserError, match=r"it crashed OpenVINO \(SIGSEGV\)"):
        graph.check_default_openvino(path, np.zeros((2, 3, 32, 32), np.float32))


def test_an_artifact_that_crashes_openvino_is_a_failed_gate_where_openvino_is_installed(finished_run, tmp_path,
                                                                                         monkeypatch, capsys):
    pytest.importorskip("openvino")
    import importlib.util

    import edgedistill.export.graph as graph

    monkeypatch.setattr(graph, "_DEFAULT_OPENVINO_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    out = tmp_path / "e"
    assert main(["export", str(finished_run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "crashed OpenVINO (SIGSEGV)" in errors[0] and "Traceback" not in err
    assert not list(out.glob("*.onnx")) and not list(out.glob(".*"))
    real = importlib.util.find_spec  # without openvino there is no OpenVINO gate: the same export succeeds
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert main(["export", str(finished_run), "--out", str(tmp_path / "f")]) == 0


@pytest.mark.slow
def test_a_killed_exports_temporaries_are_removed_by_the_next(finished_run, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    stale = [out / ".image_fp32.onnx.k3j2.tmp", out / ".image_fp32.unverified.onnx"]
    for p in stale:
        p.write_bytes(b"half")
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(finished_run), "--out", str(out)]) == 0
    assert not any(p.exists() for p in stale) and (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob(".*"))


def test_export_json_is_checked_field_by_field(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    doc = json.loads((copy / "export.json").read_text())
    for artifacts_value, field in (([1, "x"], "artifacts.0"), ("none", "artifacts"),
                                   ([{**doc["artifacts"][0], "path": "../../etc/passwd"}], "artifacts.0.path"),
                                   ([{**doc["artifacts"][0], "sha256": "abc"}], "artifacts.0.sha256"),
                                   ([{**doc["artifacts"][0], "format": "npy", "precision": "int8"}],
                                    "artifacts.0")):
        (copy / "export.json").write_text(json.dumps({**doc, "artifacts": artifacts_value}))
        with pytest.raises(UserError, match=f"field '{field}'"):
            artifacts.read_manifest(copy)


@pytest.mark.slow
def test_export_restores_torchs_thread_count(finished_run, tmp_path):
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    assert main(["export", str(finished_run), "--out", str(tmp_path / "e"), "--threads", str(other)]) == 0
    assert torch.get_num_threads() == before


def test_a_graph_with_a_fixed_batch_axis_is_refused(small_graph, tmp_path, monkeypatch):
    """The dynamo exporter can specialise the batch axis on a batch-1 example (open_clip's ViT-B-32 image tower
    came out as [1, 3, 224, 224]): such a graph fails at any other batch size and must never be named."""
    import edgedistill.export.graph as graph

    model, _, _ = small_graph

    def fixed(module, example, path, input_name, output_name, dynamo):
        torch.onnx.export(module, (example,), str(path), dynamo=False, input_names=[input_name],
                          output_names=[output_name], opset_version=17)  # no dynamic axes: batch fixed at 1

    monkeypatch.setattr(graph, "_export", fixed)
    with pytest.raises(UserError, match=r"batch axis of image\[2, 3, 32, 32\].* came out fixed"):
        export_onnx(ImageEncoder(model), torch.randn(1, 3, 32, 32), tmp_path / "x.onnx", "image", "e")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_batch_1_example_still_gives_a_symbolic_batch_axis(tiny_teacher, tmp_path):
    teacher = open_clip.create_model("tiny-clip")
    info = export_onnx(ImageEncoder(teacher), torch.randn(1, 3, 32, 32), tmp_path / "t.onnx", "image", "e")
    graph = onnx.load(str(tmp_path / "t.onnx"))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param, info
    out = run_session(ort_session(tmp_path / "t.onnx"), np.random.default_rng(0).standard_normal(
        (5, 3, 32, 32)).astype(np.float32), batch_size=5)
    assert out.shape == (5, 32)
