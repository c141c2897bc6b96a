"""What a device is handed can be damaged or hostile: every document and file load() reads from an export (or a
student folder) is checked, and each bad one is one UserError line naming the file (docs/runtime.md#what-load-trusts).

One real tiny export per session (conftest's tiny_export) is copied per case into tmp_path and mutated; a table of
(file, mutation, expected message fragment) drives the checks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgedistill
from edgedistill.cli import main
from edgedistill.core.errors import UserError
from edgedistill.core.hashing import sha256_file
from edgedistill.runtime import limits
from edgedistill.runtime.device import cpu_model, isa_flags

EMBED_DIM = 32   # conftest's TINY_CONFIG
SIZE = 32        # the tiny student's image size


@pytest.fixture(scope="module")
def export_dir(tiny_export: Path) -> Path:
    return tiny_export


# ---------------------------------------------------------------------------------------------- mutation helpers
def edit(doc_path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(doc_path.read_text())
    change(doc)
    doc_path.write_text(json.dumps(doc))


def rehash(export: Path, relative: str) -> None:
    """Record the file's new sha256 wherever export.json lists it (a hostile bundle comes with matching hashes)."""
    digest = sha256_file(export / relative)

    def change(doc: dict[str, Any]) -> None:
        for a in doc["artifacts"]:
            if a["path"] == relative:
                a["sha256"] = digest
            if a.get("prompts") == relative:
                a["prompts_sha256"] = digest
        for spec in (doc.get("probe") or {}).get("files", {}).values():
            if spec["path"] == relative:
                spec["sha256"] = digest
        tok = doc.get("tokenizer") or {}
        if relative.startswith("tokenizer/") and relative.split("/", 1)[1] in tok.get("files", {}):
            tok["files"][relative.split("/", 1)[1]] = digest
    edit(export / "export.json", change)


def put_array(export: Path, relative: str, array: np.ndarray, pickle: bool = False) -> None:
    with open(export / relative, "wb") as f:
        np.save(f, array, allow_pickle=pickle)
    rehash(export, relative)


def field(*keys: Any, value: Any = None, delete: bool = False) -> Callable[[Path], None]:
    """A mutation of export.json: set (or delete) doc[k1][k2]..."""
    def mutate(export: Path) -> None:
        def change(doc: dict[str, Any]) -> None:
            node = doc
            for k in keys[:-1]:
                node = node[k]
            if delete:
                del node[keys[-1]]
            else:
                node[keys[-1]] = value
        edit(export / "export.json", change)
    return mutate


def symlink_outside(relative: str) -> Callable[[Path], None]:
    """Replace a bundle file or folder by a symbolic link to an identical copy outside the export (same sha256)."""
    def mutate(export: Path) -> None:
        target, outside = export / relative, export.parent / ("outside_" + relative.replace("/", "_"))
        if target.is_dir():
            shutil.copytree(target, outside)
            shutil.rmtree(target)
        else:
            shutil.copy2(target, outside)
            target.unlink()
        os.symlink(outside, target)
    return mutate


def graph(inputs: list[Any], outputs: list[Any], nodes: list[Any]) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "hostile", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def image_in(shape: tuple[Any, ...] = ("N", 3, SIZE, SIZE)) -> Any:
    return helper.make_tensor_value_info("image", TensorProto.FLOAT, list(shape))


def put_graph(relative: str, model: onnx.ModelProto) -> Callable[[Path], None]:
    def mutate(export: Path) -> None:
        onnx.save(model, str(export / relative))
        rehash(export, relative)
    return mutate


def axes(*values: int) -> Any:
    return helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64,
                                                                             [len(values)], list(values)))


NO_INPUTS = graph([], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, EMBED_DIM])],
                  [helper.make_node("Constant", [], ["y"], value=helper.make_tensor(
                      "c", TensorProto.FLOAT, [1, EMBED_DIM], [0.1] * EMBED_DIM))])
ONE_D_OUTPUT = graph([image_in()], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])],
                     [axes(1, 2, 3), helper.make_node("ReduceMean", ["image", "axes"], ["y"], keepdims=0)])
WRONG_SIZE = graph([image_in(("N", 3, 64, 64))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                   [axes(2, 3), helper.make_node("ReduceMean", ["image", "axes"], ["y"], keepdims=0)])
TEXT_FLOAT_INPUT = graph([helper.make_tensor_value_info("text", TensorProto.FLOAT, ["N", 16])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
                         [helper.make_node("Identity", ["text"], ["y"])])


def add_text_table(export: Path) -> None:
    """An export's fixed-vocabulary text table, as ``export --text-embeddings`` writes it (text encoder removed)."""
    prompts = ["a photo of a red.", "a photo of a blue."]
    (export / "text_prompts.txt").write_text("\n".join(prompts) + "\n")
    emb = np.random.default_rng(0).normal(size=(2, EMBED_DIM)).astype(np.float32)
    with open(export / "text_embeddings.npy", "wb") as f:
        np.save(f, emb, allow_pickle=False)

    def change(doc: dict[str, Any]) -> None:
        doc["artifacts"] = [a for a in doc["artifacts"] if a["encoder"] != "text"] + [{
            "name": "text_embeddings", "encoder": "text", "format": "npy", "precision": "fp32",
            "path": "text_embeddings.npy", "sha256": sha256_file(export / "text_embeddings.npy"),
            "prompts": "text_prompts.txt", "prompts_sha256": sha256_file(export / "text_prompts.txt"), "count": 2}]
    edit(export / "export.json", change)


def with_table(mutate: Callable[[Path], None]) -> Callable[[Path], None]:
    def both(export: Path) -> None:
        add_text_table(export)
        mutate(export)
    return both


def write_outside(export: Path, name: str, text: str) -> str:
    (export.parent / name).write_text(text)
    return str(export.parent / name)


def prompts_abs(export: Path) -> None:
    path = write_outside(export, "stolen.txt", "a photo of a red.\na photo of a blue.\n")
    field("artifacts", -1, "prompts", value=path)(export)


def prompts_edited(export: Path) -> None:
    (export / "text_prompts.txt").write_text("something else\na photo of a blue.\n")


def table_object_array(export: Path) -> None:
    put_array(export, "text_embeddings.npy", np.array([{"x": 1}, None], dtype=object), pickle=True)


def table_wrong_width(export: Path) -> None:
    put_array(export, "text_embeddings.npy", np.zeros((2, 7), np.float32))


def tokenizer_gone(export: Path) -> None:
    shutil.rmtree(export / "tokenizer")


def tokenizer_edited(export: Path) -> None:
    with open(export / "tokenizer" / "tokenizer_edgedistill.json", "a") as f:
        f.write(" ")


def tokenizer_folder_outside(export: Path) -> None:
    shutil.copytree(export / "tokenizer", export.parent / "tok")
    field("tokenizer", "folder", value="../tok")(export)


def tokenizer_folder_absolute(export: Path) -> None:
    shutil.copytree(export / "tokenizer", export.parent / "tok")
    field("tokenizer", "folder", value=str(export.parent / "tok"))(export)


# (file named in the message, mutation, expected fragment)
EXPORT_CASES = [
    ("export.json", field("embed_dim", delete=True), "embed_dim"),
    ("export.json", field("embed_dim", value=0), "embed_dim"),
    ("export.json", field("embed_dim", value="32"), "embed_dim"),
    ("export.json", field("embed_dim", value=1e400), "embed_dim"),
    ("export.json", field("artifacts", 0, "size_mb", value=-1), "size_mb"),
    ("export.json", field("artifacts", 0, "size_mb", value=float("nan")), "size_mb"),
    ("export.json", field("artifacts", 0, "size_mb", value="6 MB"), "size_mb"),
    ("export.json", field("artifacts", 0, "path", value="/etc/passwd"), "artifacts.0.path"),
    ("export.json", field("artifacts", 0, "path", value="../run/export/image_fp32.onnx"), "artifacts.0.path"),
    ("export.json", field("artifacts", 0, "sha256", value=12), "artifacts.0.sha256"),
    ("export.json", field("batch_profile", value=[0, 8]), "batch_profile"),
    ("export.json", field("preprocess", "interpolation", value="magic"), "interpolation"),
    ("export.json", field("preprocess", "size", value=-3), "size"),
    ("export.json", field("tokenizer", "folder", value="../../etc"), "tokenizer.folder"),
    ("export.json", field("tokenizer", "files", value={"../../x": "0" * 64}), "tokenizer.files"),
    ("export.json", field("probe", "files", "pixels", "path", value="/tmp/x.npy"), "probe.files.pixels.path"),
    ("export.json", field("probe", "images", value=-1), "probe.images"),
    ("export.json", lambda e: (e / "export.json").write_text("{not json"), "not valid JSON"),
    ("export.json", lambda e: (e / "export.json").write_bytes(b"\xff\xfe{}"), "UTF-8"),
    ("export.json", tokenizer_folder_outside, "tokenizer.folder"),
    ("export.json", tokenizer_folder_absolute, "tokenizer.folder"),
    ("image_fp32.onnx", symlink_outside("image_fp32.onnx"), "leads outside"),
    ("tokenizer", symlink_outside("tokenizer"), "leads outside"),
    ("tokenizer", tokenizer_gone, "re-export"),
    ("tokenizer_edgedistill.json", tokenizer_edited, "does not match the sha256"),
    ("export.json", field("tokenizer", "files", "tokenizer.json", delete=True), "tokenizer.json"),
    ("images_uint8.npy", symlink_outside("probe/images_uint8.npy"), "leads outside"),
    ("images_uint8.npy", lambda e: put_array(e, "probe/images_uint8.npy",
                                              np.array([object()] * 3, dtype=object), pickle=True),
     "not a plain numpy array"),
    ("probe", lambda e: put_array(e, "probe/images_uint8.npy", np.zeros((10, 8, 8, 3), np.uint8)), "pixels"),
    ("image_fp32.npy", lambda e: put_array(e, "probe/image_fp32.npy",
                                            np.full((10, EMBED_DIM), np.nan, np.float32)), "NaN"),
    ("tokens.npy", lambda e: put_array(e, "probe/tokens.npy", np.zeros((16, 16), np.float32)), "kind"),
    ("image_fp32.onnx", put_graph("image_fp32.onnx", NO_INPUTS), "inputs"),
    ("image_fp32.onnx", put_graph("image_fp32.onnx", ONE_D_OUTPUT), "output"),
    ("image_fp32.onnx", put_graph("image_fp32.onnx", WRONG_SIZE), "H, W = 32, 32"),
    ("text_fp32.onnx", put_graph("text_fp32.onnx", TEXT_FLOAT_INPUT), "integer input"),
    ("export.json", with_table(field("artifacts", -1, "prompts", value="../prompts.txt")), "artifacts.2.prompts"),
    ("export.json", with_table(prompts_abs), "prompts"),
    ("text_prompts.txt", with_table(field("artifacts", -1, "prompts_sha256", delete=True)), "no sha256"),
    ("text_prompts.txt", with_table(prompts_edited), "does not match the sha256"),
    ("text_prompts.txt", with_table(symlink_outside("text_prompts.txt")), "leads outside"),
    ("text_embeddings.npy", with_table(table_object_array), "not a plain numpy array"),
    ("text_embeddings.npy", with_table(table_wrong_width), "embed_dim is 32"),
    ("export.json", field("artifacts", 0, "val", "i2t_r1", value=150.0), "artifacts.0.val.i2t_r1"),
    ("export.json", field("artifacts", 1, "val_r1_drop", value="0.0"), "artifacts.1.val_r1_drop"),
]


PROBE_FILES = ("probe", "images_uint8.npy", "image_fp32.npy", "tokens.npy")


def one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and text.strip() == text
    return text


def damaged(export_dir: Path, tmp_path: Path, mutate: Callable[[Path], None]) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    mutate(copy)
    return copy


@pytest.mark.parametrize("file, mutate, fragment", EXPORT_CASES,
                         ids=[f"{i}-{c[0]}-{c[2]}" for i, c in enumerate(EXPORT_CASES)])
def test_a_damaged_or_hostile_export_is_one_line_naming_the_file(export_dir, tmp_path, file, mutate, fragment):
    copy = damaged(export_dir, tmp_path, mutate)
    # pinned to fp32: both fp32 graphs are opened, by the rule (measure=False) and after measuring on the probe;
    # the probe set is read only to measure
    ways = [{"remeasure": True}] + ([] if file in PROBE_FILES else [{"measure": False}])
    for kwargs in ways:
        with pytest.raises(UserError) as caught:
            edgedistill.load(copy, device="cpu", precision="fp32", **kwargs)
        message = one_line(caught.value)
        assert file in message and fragment in message, message


def test_the_untouched_copy_loads_and_its_text_table_works(export_dir, tmp_path):
    """The mutations above break a bundle that loads: the same copy, untouched, embeds (the control)."""
    copy = damaged(export_dir, tmp_path, add_text_table)
    enc = edgedistill.load(copy, device="cpu", measure=False)
    assert enc.encode_text(["a photo of a blue."]).shape == (1, EMBED_DIM)
    assert enc.encode_image(np.zeros((SIZE, SIZE, 3), np.uint8)).shape == (1, EMBED_DIM)


# ---------------------------------------------------------------------------------------------- a student folder
def student_config(change: Callable[[dict[str, Any]], None] | str) -> Callable[[Path], None]:
    def mutate(student: Path) -> None:
        path = student / "open_clip_config.json"
        if isinstance(change, str):
            path.write_text(change)
        else:
            edit(path, change)
    return mutate


STUDENT_CASES = [
    (student_config("{ damaged"), "not valid JSON"),
    (student_config("[1, 2]"), "the document"),
    (student_config(lambda d: d.pop("model_cfg")), "model_cfg"),
    (student_config(lambda d: d["model_cfg"].update(embed_dim="32")), "model_cfg.embed_dim"),
    (student_config(lambda d: d["model_cfg"].update(embed_dim=-1)), "model_cfg.embed_dim"),
    (student_config(lambda d: d.update(preprocess_cfg=[224])), "preprocess_cfg"),
    (student_config(lambda d: d["preprocess_cfg"].update(interpolation="magic")), "interpolation"),
    (student_config(lambda d: d.update(edgedistill="x")), "edgedistill"),
    (student_config(lambda d: d["edgedistill"].update(weights_sha256=5)), "weights_sha256"),
]


@pytest.mark.parametrize("mutate, fragment", STUDENT_CASES, ids=[c[1] for c in STUDENT_CASES])
def test_a_damaged_student_config_is_one_line_naming_it(export_dir, tmp_path, mutate, fragment):
    student = tmp_path / "student"
    shutil.copytree(export_dir.parent / "student", student)
    mutate(student)
    with pytest.raises(UserError) as caught:
        edgedistill.load(student, device="cpu")
    message = one_line(caught.value)
    assert "open_clip_config.json" in message and fragment in message, message


# ---------------------------------------------------------------------------------------------- bench reports
def bench_report(rows: list[Any], device_info: Any = None) -> dict[str, Any]:
    info = {"device": "cpu", "cpu": cpu_model(), "cpu_flags": list(isa_flags())} if device_info is None \
        else device_info
    return {"device_line": "cpu", "conditions": {}, "device_info": info, "rows": rows}


GOOD_ROW = {"artifact": "image_fp32_onnx", "backend": "onnxruntime-cpu", "precision": "fp32", "batch": 1,
            "status": "ok", "role": "student", "p50_ms": 1.5, "i2t_r1": 10.0}
BENCH_CASES = [
    ({k: v for k, v in GOOD_ROW.items() if k != "batch"}, "batch"),
    ({k: v for k, v in GOOD_ROW.items() if k != "artifact"}, "artifact"),
    ({**GOOD_ROW, "p50_ms": "1.5"}, "p50_ms"),
    ({**GOOD_ROW, "p50_ms": -2.0}, "p50_ms"),
    ({**GOOD_ROW, "p50_ms": float("inf")}, "p50_ms"),
    ({**GOOD_ROW, "i2t_r1": 150.0}, "i2t_r1"),
    ({**GOOD_ROW, "batch": "1"}, "batch"),
    ("not a row", "(the row)"),
]


@pytest.mark.parametrize("row, fragment", BENCH_CASES, ids=[c[1] for c in BENCH_CASES])
def test_a_bad_bench_row_is_skipped_with_a_warning_naming_it(export_dir, tmp_path, row, fragment):
    """A bench report is only evidence for the choice: a bad row is skipped with one warning line, the good rows
    still decide."""
    copy = damaged(export_dir, tmp_path, lambda e: None)
    (copy / "bench").mkdir()
    (copy / "bench" / "bench.json").write_text(json.dumps(bench_report([row, GOOD_ROW])))
    with pytest.warns(UserWarning) as caught:
        enc = edgedistill.load(copy, device="cpu", measure=False)
    messages = [str(w.message) for w in caught if "bench.json" in str(w.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and "row 0" in messages[0] and fragment in messages[0]
    assert enc.info.chosen_by == "bench.json" and enc.info.image["artifact"] == "image_fp32_onnx"


@pytest.mark.parametrize("text", ["{broken", json.dumps(bench_report([GOOD_ROW], device_info="cpu")),
                                  json.dumps({"rows": "none"})])
def test_a_damaged_bench_report_is_skipped_with_a_warning(export_dir, tmp_path, text):
    copy = damaged(export_dir, tmp_path, lambda e: None)
    (copy / "bench.json").write_text(text)
    with pytest.warns(UserWarning, match="bench.json") as caught:
        enc = edgedistill.load(copy, device="cpu", measure=False)
    assert enc.info.chosen_by == "rule" and all("\n" not in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------- limits
@pytest.mark.parametrize("kwargs, fragment", [
    ({"threads": 2000}, "CPUs this process may use"),
    ({"threads": 0}, "at least 1"),
    ({"threads": "2"}, "whole number"),
    ({"batch": 10**9}, "MemAvailable"),
])
def test_threads_and_batch_beyond_the_machine_are_refused(export_dir, kwargs, fragment):
    with pytest.raises(UserError) as caught:
        edgedistill.load(export_dir, device="cpu", **kwargs)
    assert fragment in one_line(caught.value)


def test_the_cgroup_quota_and_meminfo_are_read(tmp_path, monkeypatch):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert limits.cgroup_cpus(tmp_path / "cpu.max") == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert limits.cgroup_cpus(tmp_path / "cpu.max") is None
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:    2048 kB\n")
    assert limits.available_memory(tmp_path / "meminfo") == 2048 * 1024
    monkeypatch.setattr(limits, "available_memory", lambda: 1000 * 3 * 4 * 4 * 4)
    assert limits.check_batch(100, (3, 4, 4)) == 100
    with pytest.raises(UserError, match=r"batch 1000 needs .* give 500 or fewer"):
        limits.check_batch(1000, (3, 4, 4))
    monkeypatch.setattr(limits, "cgroup_cpus", lambda: 1)
    with pytest.raises(UserError, match="cgroup quota"):
        limits.check_threads(len(os.sched_getaffinity(0)) + 1)


@pytest.mark.parametrize("flags, fragment", [
    (["--threads", "2000"], "--threads 2000 is more than"),
    (["--batch", "1,1000000000"], "--batch 1000000000 needs"),
])
def test_bench_refuses_threads_and_batches_beyond_the_machine(export_dir, tmp_path, capsys, flags, fragment):
    capsys.readouterr()
    assert main(["bench", str(export_dir), "--out", str(tmp_path / "b"), *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "bench.json").exists()


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def good_index(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index the undamaged export made (search --model then loads the damaged one)."""
    index = tmp_path_factory.mktemp("index") / "good.index"
    images = export_dir.parent.parent / "data" / "val_images"
    assert main(["embed", str(images), "--model", str(export_dir), "--out", str(index), "--batch", "4"]) == 0
    return index


def first_case(file: str, fragment: str) -> tuple[str, Callable[[Path], None], str]:
    return next(c for c in EXPORT_CASES if c[0] == file and c[2] == fragment)


CLI_SAMPLE = [first_case("export.json", "embed_dim"), first_case("export.json", "artifacts.0.path"),
              first_case("export.json", "tokenizer.folder"), first_case("tokenizer", "re-export"),
              first_case("images_uint8.npy", "not a plain numpy array"), first_case("image_fp32.onnx", "output")]


@pytest.mark.parametrize("file, mutate, fragment", CLI_SAMPLE, ids=[f"{c[0]}-{c[2]}" for c in CLI_SAMPLE])
def test_the_commands_exit_2_with_one_line(export_dir, good_index, tmp_path, capsys, file, mutate, fragment):
    images, index = export_dir.parent.parent / "data" / "val_images", good_index
    copy = damaged(export_dir, tmp_path, mutate)
    capsys.readouterr()
    commands = [["embed", str(images), "--model", str(copy), "--out", str(tmp_path / "x.index")],
                ["search", str(index), "a red square", "--model", str(copy)],
                ["classify", str(next(images.glob("*.jpg"))), "--labels", "red,blue", "--model", str(copy)]]
    if file == "export.json":  # bench reads export.json through the same schema
        commands.append(["bench", str(copy), "--batch", "1", "--iters", "2", "--warmup", "0"])
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("error: ") and file in err and fragment in err, (argv, err)


# ---------------------------------------------------------------------------------------------- the export side
@pytest.mark.slow
def test_the_exporter_records_the_prompts_file_relative_with_its_sha256(export_dir, tmp_path):
    prompts = tmp_path / "vocab.txt"
    prompts.write_text("a photo of a red.\na photo of a blue.\n")
    out = tmp_path / "export"
    assert main(["export", str(export_dir.parent), "--out", str(out), "--text-embeddings", str(prompts)]) == 0
    doc = json.loads((out / "export.json").read_text())
    table = next(a for a in doc["artifacts"] if a["format"] == "npy")
    assert table["prompts"] == "text_prompts.txt" and table["prompts_sha256"] == sha256_file(out / "text_prompts.txt")
    assert all(not Path(a["path"]).is_absolute() for a in doc["artifacts"])
    assert doc["tokenizer"]["folder"] == "tokenizer" and set(doc["tokenizer"]["files"]) == {
        "tokenizer.json", "tokenizer_edgedistill.json"}
    enc = edgedistill.load(out, device="cpu", measure=False)
    assert enc.encode_text(["a photo of a blue."]).shape == (1, EMBED_DIM)
