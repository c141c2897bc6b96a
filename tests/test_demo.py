"""`edgedistill demo --quick` end to end (scenes -> teacher -> distill -> export -> table), and `data scenes`."""

import json
from pathlib import Path

import pytest
import yaml

from edgedistill.cli import main
from edgedistill.demo import MARKER, _prepare_out, compression
from edgedistill.core.errors import UserError

SUMMARY_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEDISTILL_CACHE", str(root / "cache"))
    try:
        code = main(["demo", "--quick", "--out", str(root / "demo")])
    finally:
        mp.undo()
    return code, root / "demo", root / "cache"


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports(quick_demo, capsys):
    code, out, cache = quick_demo
    assert code == 0
    report = json.loads((out / MARKER).read_text())
    assert set(report["stages"]) == {"scenes", "teacher", "distill", "without_teacher", "export", "bench", "search"}
    # loose checks: the teacher learned the scenes (chance is 0.5 % on 200 held-out images) ...
    assert report["teacher"]["held_out"]["i2t_r1"] > 5
    summary = json.loads((out / "summary.json").read_text())  # the distill contract
    assert SUMMARY_KEYS <= set(summary["teacher"]) and SUMMARY_KEYS <= set(summary["student"])
    assert summary["steps"] == 120 and summary["retention"]["rsum"] > 0.1
    # ... and the table has the teacher, the PyTorch student and both ONNX precisions, with latencies
    models = [r["model"] for r in report["rows"]]
    assert models[0].startswith("teacher") and models[1] == "student (PyTorch)"
    assert models[2] == "student without the teacher (PyTorch)"
    # the default recipe on the user's case (300 of 3,000 images captioned) against the same student trained on
    # the 300 pairs alone: both numbers on the report
    v = report["versus_without_teacher"]
    alone = json.loads((out / "without-teacher" / "summary.json").read_text())
    assert v["without_teacher"]["rsum"] == alone["student"]["rsum"] == report["rows"][2]["rsum"]
    assert v["distilled"]["rsum"] == summary["student"]["rsum"] and v["captioned"] == 300
    assert v["rsum_gain"] == pytest.approx(v["distilled"]["rsum"] - v["without_teacher"]["rsum"])
    assert yaml.safe_load((out / "without-teacher" / "recipe.yaml").read_text())["loss"]["terms"].keys() == {"clip"}
    train = yaml.safe_load((out / "recipe.yaml").read_text())["data"]["train"]
    assert sum(bool(json.loads(x)["captions"]) for x in Path(train).read_text().splitlines()) == 300
    assert "What the teacher gave: the distilled student reaches RSUM" in (out / "demo.md").read_text()
    exported = json.loads((out / "export" / "export.json").read_text())
    names = {a["name"] for a in exported["artifacts"]}
    # INT8 is kept only where it holds cosine 0.99 to PyTorch on this CPU (the quick student's may not without
    # VNNI): then it is left out, with the reason in export.json and demo.md, and the demo goes on
    int8_kept = "image_int8_onnx" in names
    assert int8_kept != any(d["name"] == "image_int8_onnx" for d in exported["dropped"])
    assert int8_kept or "Left out of the export: image_int8_onnx" in (out / "demo.md").read_text()
    precisions = [r["precision"] for r in report["rows"][3:]]
    assert precisions == (["fp32", "int8"] if int8_kept else ["fp32"])
    assert all(r["latency_ms"] > 0 for r in report["rows"] if "PyTorch" not in r["model"])
    assert all(r["rsum"] is not None for r in report["rows"])
    assert {"image_fp32_onnx", "text_fp32_onnx"} <= names
    assert "| model |" in (out / "demo.md").read_text()
    # the compression ratios are bench's: sizes of everything a device holds, latency from interleaved rounds
    # (the quick demo's tiny teacher is smaller than its student: the ratios are measured, not asserted above 1)
    bench = json.loads((out / "bench" / "bench.json").read_text())
    c = report["compression"]
    assert c == compression(bench) and c["size_ratio"] > 0 and c["latency_rounds"] == 5
    assert c["latency_ratio_min"] <= c["latency_ratio"] <= c["latency_ratio_max"]
    assert [p["part"] for p in c["student_mb"]["parts"]] == ["image encoder", "text encoder", "tokenizer files"]
    assert c["student_mb"]["total_mb"] > report["rows"][3]["size_mb"]  # more than the image tower alone
    assert set(report["timing_load"]) >= {"load1_before", "load1_after", "cpus", "busy", "warning"}
    md = (out / "demo.md").read_text()
    assert "Compression (fp32 ONNX, teacher vs student)" in md and "interleaved rounds" in md
    # bench's own report sits beside it: every artifact and the timed teacher, at batch 1 and 8
    timed = {(r["artifact"], r["batch"]) for r in bench["rows"] if r["status"] == "ok" and r["p50_ms"]}
    assert {("image_fp32_onnx", 1), ("image_fp32_onnx", 8), ("teacher_image_fp32_onnx", 1)} <= timed
    assert not int8_kept or {("image_int8_onnx", 1), ("image_int8_onnx", 8)} <= timed
    assert (out / "bench" / "pareto.png").is_file() and report["bench"]["plot"].endswith("pareto.png")
    # the search step embedded the held-out scenes with what load() picked and ranked them for each query
    assert report["loaded"]["artifact"] in names and report["loaded"]["chosen_by"]
    assert report["search"] and all(len(q["hits"]) == 5 for q in report["search"])
    assert all(q["hits"][0]["score"] >= q["hits"][-1]["score"] for q in report["search"])
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # data and teacher live in the cache, for the next demo to reuse
    assert list((cache / "teachers").glob("tiny-*/pretrain.json"))
    assert list((cache / "scenes").glob("demo-quick-*/scenes.json"))


def test_the_claim_compares_the_fp32_onnx_pair_on_onnxruntime_only():
    def versus(backend, median):
        return {"student": "image_fp32_onnx", "teacher": "teacher_image_fp32_onnx", "backend": backend, "batch": 1,
                "latency_ratio": {"median": median, "min": median, "max": median, "rounds": 5}}
    bench = {"versus_teacher": [versus("openvino-cpu", 9.0), versus("onnxruntime-cpu", 2.0)]}
    assert compression(bench)["latency_ratio"] == 2.0
    # no footprint, no interleaved pair: no claim, and neither smaller nor faster
    empty = compression({"versus_teacher": [versus("openvino-cpu", 9.0)]})
    assert empty["latency_ratio"] is None and empty["size_ratio"] is None
    assert empty["smaller"] is False and empty["faster"] is False


def test_demo_replaces_only_a_previous_demo(tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a demo run"):
        _prepare_out(other)
    assert (other / "notes.txt").read_text() == "keep me"
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(UserError, match="not a demo"):
        _prepare_out(run)
    previous = tmp_path / "demo"
    previous.mkdir()
    (previous / MARKER).write_text("{}")
    (previous / "recipe.yaml").write_text("name: demo\n")
    _prepare_out(previous)
    assert not previous.exists()


def test_demo_into_a_foreign_folder_exits_2(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 2
    assert "not a demo run" in capsys.readouterr().err


def test_data_scenes_command_writes_and_reuses(tmp_path, capsys):
    out = tmp_path / "scenes"
    args = ["data", "scenes", "--out", str(out), "--n", "30", "--n-val", "10", "--n-hard", "7", "--n-ood", "7"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().err
    lines = (out / "train.jsonl").read_text().splitlines()
    assert len(lines) == 30 and json.loads(lines[0])["captions"]
    assert main(args) == 0
    assert "reused" in capsys.readouterr().err
    assert main([*args[:4], "--n", "31"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and len(err.strip().splitlines()) == 1


def test_the_demo_table_times_onnx_artifacts_on_onnxruntime_whatever_else_bench_ran():
    from edgedistill.demo import _rows

    def row(artifact, backend, p50, fmt="onnx", role="student"):
        return {"artifact": artifact, "backend": backend, "p50_ms": p50, "status": "ok", "batch": 1,
                "encoder": "image", "format": fmt, "role": role, "precision": "int8", "size_mb": 1.0}
    bench = {"rows": [row("image_int8_onnx", "onnxruntime-cpu", 2.0), row("image_int8_onnx", "openvino-cpu", 9.0),
                      row("image_fp32_pytorch", "pytorch-cpu", 5.0, fmt="pytorch")]}
    summary = {"teacher": {}, "student": {}}
    for order in (bench["rows"], bench["rows"][::-1]):
        got = {r["model"]: r["latency_ms"] for r in _rows(summary, {"rows": order})}
        assert got["student ONNX (image_int8_onnx)"] == 2.0 and got["student (PyTorch)"] == 5.0
