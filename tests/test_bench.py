"""`edgedistill bench` on CPU: rows per artifact x backend x batch, accuracy, report files, bad input."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgedistill.bench import report as rep
from edgedistill.runtime.backends import candidates
from edgedistill.bench.runner import BenchOptions, parse_batches, remote_args, run_bench
from edgedistill.bench.timing import ROUNDS, summarize, time_cpu
from edgedistill.cli import main
from edgedistill.core.errors import UserError
import edgedistill.runtime.manifest as artifacts

FAST = ["--iters", "3", "--warmup", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def export_dir(tiny_export):
    """The session's tiny student (labelled val data, so zero-shot is scored too), exported to ONNX fp32 + INT8."""
    return tiny_export


@pytest.fixture(scope="module")
def cpu_report(export_dir):
    out = export_dir.parent / "bench-cpu"
    assert main(["bench", str(export_dir), "--batch", "1,3", "--teacher", "--out", str(out), *FAST]) == 0
    return out


def _rows(out: Path) -> list[dict]:
    return json.loads((out / rep.REPORT_JSON).read_text())["rows"]


@pytest.mark.slow
def test_every_artifact_runs_on_every_cpu_backend_at_every_batch(cpu_report, export_dir):
    rows = _rows(cpu_report)
    manifest = artifacts.read_manifest(export_dir)
    timed = {(r["artifact"], r["backend"], r["batch"]) for r in rows if r["status"] == "ok" and r["p50_ms"]}
    for entry in manifest["artifacts"]:
        for batch in (1, 3):
            assert (entry["name"], "onnxruntime-cpu", batch) in timed
    for name in ("image_fp32_pytorch", "text_fp32_pytorch", "teacher_image_pytorch"):
        assert {(name, "pytorch-cpu", 1), (name, "pytorch-cpu", 3)} <= timed
    assert ("teacher_image_fp32_onnx", "onnxruntime-cpu", 1) in timed
    for r in rows:
        assert set(r) == set(rep.ROW_FIELDS)
        if r["status"] != "ok" or r["p50_ms"] is None:
            continue
        # every number names its conditions
        assert r["device"] == "cpu" and r["threads"] == 1 and r["warmup"] == 1 and r["iters"] == 3
        assert r["backend_version"] and r["precision"] in ("fp32", "int8") and r["mode"] == "inference"
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput_ips"] == pytest.approx(r["batch"] * 1000 / r["mean_ms"], rel=1e-3)
        assert r["peak_mem_mb"] > 0


def test_accuracy_matches_the_export_and_the_teacher_is_scored(cpu_report, export_dir):
    rows = _rows(cpu_report)
    manifest = artifacts.read_manifest(export_dir)
    # the export measured its ONNX graphs on onnxruntime (OpenVINO's INT8 kernels round differently)
    by_name = {r["artifact"]: r for r in rows if r["status"] == "ok" and r["backend"] != "openvino-cpu"}
    for entry in manifest["artifacts"]:
        if entry["encoder"] != "image":
            continue
        got = by_name[entry["name"]]
        for key in ("i2t_r1", "t2i_r1", "rsum", "zs_mean_class"):
            # export scored with the PyTorch text tower, bench with the fp32 text graph: same numbers
            assert got[key] == pytest.approx(entry["val"][key], abs=1e-3), (entry["name"], key)
    assert by_name["image_fp32_pytorch"]["rsum"] == pytest.approx(by_name["image_fp32_onnx"]["rsum"], abs=1e-3)
    teacher = next(r for r in rows if r["artifact"] == "teacher")
    assert teacher["role"] == "teacher" and teacher["rsum"] is not None and teacher["zs_top1"] is not None
    timed_teacher = next(r for r in rows if r["artifact"] == "teacher_image_pytorch")
    assert timed_teacher["rsum"] == teacher["rsum"]


def test_report_files_markdown_and_plot(cpu_report):
    md = (cpu_report / rep.REPORT_MD).read_text()
    assert "| image_int8_onnx | onnxruntime-cpu" in md and "warm-up 1, 3 timed iterations" in md
    assert (cpu_report / rep.PARETO_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((cpu_report / rep.REPORT_JSON).read_text())
    assert doc["device_info"]["device"] == "cpu" and doc["conditions"]["batches"] == [1, 3]
    assert doc["pareto_batch"] == 1 and doc["failures"] == []
    assert not list(cpu_report.glob(".*"))  # nothing half-written left behind


def test_the_teacher_is_timed_in_turns_with_each_student_and_sizes_count_the_whole_device(cpu_report, export_dir):
    doc = json.loads((cpu_report / rep.REPORT_JSON).read_text())
    versus = {(v["student"], v["backend"]): v for v in doc["versus_teacher"]}
    assert {("image_fp32_onnx", "onnxruntime-cpu"), ("image_int8_onnx", "onnxruntime-cpu"),
            ("image_fp32_pytorch", "pytorch-cpu")} <= set(versus)
    assert versus[("image_fp32_pytorch", "pytorch-cpu")]["teacher"] == "teacher_image_pytorch"
    v = versus[("image_fp32_onnx", "onnxruntime-cpu")]
    lat = v["latency_ratio"]
    assert v["teacher"] == "teacher_image_fp32_onnx" and v["batch"] == 1 and v["iters_per_round"] == 3
    assert lat["rounds"] == ROUNDS == len(v["teacher_p50_ms"]) == len(v["student_p50_ms"])
    assert lat["per_round"] == pytest.approx([t / s for t, s in zip(v["teacher_p50_ms"], v["student_p50_ms"])],
                                             rel=1e-2)
    assert lat["min"] <= lat["median"] <= lat["max"]
    # the device holds the image encoder, the text encoder and the tokenizer files: all of them are counted
    manifest = artifacts.read_manifest(export_dir)
    sizes = {a["name"]: a["size_mb"] for a in manifest["artifacts"]}
    tokenizer = export_dir / manifest["tokenizer"]["folder"]
    tokenizer_mb = sum(f.stat().st_size for f in tokenizer.iterdir()) / 2**20
    student = doc["footprint"]["students"]["image_fp32_onnx"]
    assert [p["mb"] for p in student["parts"]] == pytest.approx([sizes["image_fp32_onnx"], sizes["text_fp32_onnx"],
                                                                 tokenizer_mb], abs=1e-3)
    assert student["total_mb"] == pytest.approx(sum(p["mb"] for p in student["parts"]), abs=1e-3)
    teacher = doc["footprint"]["teacher"]
    if manifest.get("text_is_teacher"):  # the student kept the teacher's text tower: it counts on both sides
        assert teacher["parts"][1]["mb"] == sizes["text_fp32_onnx"] and v["size"]["total_ratio"] == pytest.approx(
            teacher["total_mb"] / student["total_mb"], rel=1e-2)
    else:
        assert teacher is None and v["size"]["total_ratio"] is None
    load = doc["timing_load"]
    assert load["cpus"] >= 1 and isinstance(load["busy"], bool) and (load["warning"] is None) != load["busy"]
    md = (cpu_report / rep.REPORT_MD).read_text()
    assert "## Student vs teacher" in md and "## Size on the device (MB)" in md and "Load while timing" in md


@pytest.mark.slow
def test_json_prints_the_report_alone_on_stdout_and_csv_the_rows(export_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["bench", str(export_dir), "--batch", "1", "--out", str(out), "--json", *FAST]) == 0
    captured = capsys.readouterr()
    assert captured.out.isascii() and "edgedistill bench" in captured.err  # the table went to stderr
    doc = json.loads(captured.out)  # one document, nothing else
    assert doc["rows"] == _rows(out) and {"versus_teacher", "footprint", "timing_load"} <= set(doc)
    assert main(["bench", str(export_dir), "--batch", "1", "--out", str(out), "--csv", *FAST]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split(",") == list(rep.ROW_FIELDS) and len(lines) == 1 + len(_rows(out))


def _copy_export(export_dir: Path, dest: Path) -> Path:
    shutil.copytree(export_dir, dest)
    return dest


def test_a_corrupt_artifact_fails_alone_and_exits_2(export_dir, tmp_path, capsys):
    exp = _copy_export(export_dir, tmp_path / "export")
    (exp / "image_int8.onnx").write_bytes(b"not the exported graph")
    (exp / "text_fp32.onnx").unlink()
    out = tmp_path / "report"
    assert main(["bench", str(exp), "--batch", "1", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "error: image_int8_onnx:" in err and "sha256" in err
    assert "error: text_fp32_onnx:" in err and "missing" in err
    assert "Traceback" not in err
    rows = _rows(out)
    status = {(r["artifact"], r["status"]) for r in rows}
    assert ("image_int8_onnx", "failed") in status and ("text_fp32_onnx", "failed") in status
    assert ("image_fp32_onnx", "ok") in status  # the others are still measured
    ok = next(r for r in rows if r["artifact"] == "image_fp32_onnx" and r["status"] == "ok")
    assert ok["rsum"] is not None  # the text side falls back to the PyTorch student


def test_a_provider_failure_is_that_artifacts_failed_row(export_dir, tmp_path, monkeypatch):
    """onnxruntime raising from inside a run (a TensorRT EP that cannot build its engine, say) fails that
    artifact alone: the others are measured and the report is written."""
    import edgedistill.runtime.backends as backends

    real = backends.ort_session

    class Failing:
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, *args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 11 : EP_FAIL : could not build engine for fused node")

    def session(path, *args, **kwargs):
        made = real(path, *args, **kwargs)
        return Failing(made) if Path(path).name == "image_int8.onnx" else made

    monkeypatch.setattr(backends, "ort_session", session)
    out = tmp_path / "r"
    with pytest.raises(UserError, match="1 artifact"):
        run_bench(BenchOptions(export_dir=export_dir, batches=[1], iters=2, warmup=0, threads=1, out=out))
    rows = _rows(out)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [r["artifact"] for r in failed] == ["image_int8_onnx"]
    assert "onnxruntime's CPUExecutionProvider failed to run image_int8.onnx" in failed[0]["reason"]
    assert {r["artifact"] for r in rows if r["status"] == "ok"} >= {"image_fp32_onnx", "text_fp32_onnx"}


def test_every_onnx_graph_also_runs_on_openvino_and_its_failure_is_that_row_alone(export_dir, tmp_path,
                                                                                   monkeypatch):
    pytest.importorskip("openvino")
    import edgedistill.runtime.backends as backends

    real_open = backends.OpenVinoRunner.open

    class Broken:
        def infer(self, *args, **kwargs):
            raise RuntimeError("Exception from src/plugins/intel_cpu/src/graph.cpp:1:\nUnsupported node type: X\n")

    def open_(cls, backend, path, artifact, options):
        runner = real_open.__func__(cls, backend, path, artifact, options)
        if Path(path).name == "image_int8.onnx":
            runner.request = Broken()
        return runner

    monkeypatch.setattr(backends.OpenVinoRunner, "open", classmethod(open_))
    out = tmp_path / "r"
    with pytest.raises(UserError, match="1 artifact"):
        run_bench(BenchOptions(export_dir=export_dir, batches=[1, 3], iters=2, warmup=0, threads=1, out=out))
    rows = _rows(out)
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["artifact"], r["backend"]) for r in failed] == [("image_int8_onnx", "openvino-cpu")]
    assert failed[0]["reason"] == "OpenVINO failed to run image_int8.onnx on the CPU: Unsupported node type: X"
    ok = {(r["artifact"], r["backend"], r["batch"]) for r in rows if r["status"] == "ok" and r["p50_ms"]}
    for entry in artifacts.read_manifest(export_dir)["artifacts"]:
        for batch in (1, 3):
            assert (entry["name"], "onnxruntime-cpu", batch) in ok
            if entry["name"] != "image_int8_onnx":
                assert (entry["name"], "openvino-cpu", batch) in ok
    ov = [r for r in rows if r["backend"] == "openvino-cpu" and r["status"] == "ok"]
    assert all(r["backend_version"] and r["rsum"] is not None and r["peak_mem_mb"] for r in ov)


def test_what_cannot_run_is_listed_with_the_reason(export_dir, tmp_path):
    exp = _copy_export(export_dir, tmp_path / "export")
    engine = exp / "image_fp16.engine"
    engine.write_bytes(b"engine bytes")
    doc = json.loads((exp / "export.json").read_text())
    doc["artifacts"].append(artifacts.artifact_entry(exp, engine, name="image_fp16_trt", encoder="image",
                                                     fmt="trt", precision="fp16"))
    (exp / "export.json").write_text(json.dumps(doc))
    report = run_bench(BenchOptions(export_dir=exp, batches=[1], iters=2, warmup=0, threads=1,
                                    out=tmp_path / "r"))
    row = next(r for r in report["rows"] if r["artifact"] == "image_fp16_trt")
    assert row["status"] == "skipped" and "GPU" in row["reason"] and row["backend"] == "tensorrt"


def test_e2e_times_decoding_too(export_dir, tmp_path):
    report = run_bench(BenchOptions(export_dir=export_dir, batches=[2], iters=2, warmup=0, threads=1, e2e=True,
                                    out=tmp_path / "r"))
    timed = [r for r in report["rows"] if r["p50_ms"] is not None]
    assert timed and all(r["mode"] == "e2e" for r in timed)
    assert {r["encoder"] for r in timed} == {"image", "text"}


def test_latency_under_load_is_recorded_with_its_conditions(export_dir, tmp_path):
    report = run_bench(BenchOptions(export_dir=export_dir, batches=[1], iters=2, warmup=0, threads=1, load=1,
                                    spin=False, openvino_hint="throughput", out=tmp_path / "r"))
    assert report["conditions"]["load"] == 1
    assert report["conditions"]["onnxruntime_spinning"] is False
    assert report["conditions"]["openvino_hint"] == "throughput"
    timed = [r for r in report["rows"] if r["p50_ms"] is not None]
    assert timed and all(r["load"] == 1 for r in timed)
    assert remote_args(BenchOptions(export_dir=export_dir, load=2, spin=False, openvino_hint="latency"))[-5:] == \
        ["--load", "2", "--no-spin", "--openvino-hint", "latency"]


def test_missing_export_json_and_bad_flags_exit_2_with_one_line(tmp_path, export_dir, capsys):
    cases = [([str(tmp_path)], "no export.json"),
             ([str(export_dir), "--batch", "0,x"], "--batch"),
             ([str(export_dir), "--iters", "1"], "--iters"),
             ([str(export_dir), "--device", "tpu"], "--device"),
             ([str(export_dir), "--val", str(tmp_path / "nope.jsonl")], "--val"),
             ([str(export_dir), "--load", "-1"], "--load"),
             ([str(export_dir), "--openvino-hint", "fastest"], "--openvino-hint")]
    for args, needle in cases:
        assert main(["bench", *args, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], (args, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_exits_2(export_dir, tmp_path, capsys):
    assert main(["bench", str(export_dir), "--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_jetson_on_a_machine_that_is_not_one_exits_2(export_dir, tmp_path, capsys):
    if Path("/etc/nv_tegra_release").exists():
        pytest.skip("this machine is a Jetson")
    assert main(["bench", str(export_dir), "--device", "jetson", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "not a Jetson" in err and "--host" in err and "Traceback" not in err


def test_gpu_backends_are_listed_for_gpu_devices(export_dir):
    entry = artifacts.read_manifest(export_dir)["artifacts"][0]
    names = [c.backend for c in candidates(entry, export_dir / entry["path"], "cuda", 1)]
    assert names == ["onnxruntime-tensorrt", "onnxruntime-cuda"]  # the table's order: fastest first
    assert [c.backend for c in candidates(entry, export_dir / entry["path"], "cpu", 1)] == ["onnxruntime-cpu",
                                                                                    "openvino-cpu"]
    npy = {"name": "text_embeddings", "format": "npy"}
    assert candidates(npy, export_dir, "cpu", 1)[0].reason.startswith("precomputed")


def test_latency_statistics():
    times = [5.0, 1.0, 2.0, 3.0, 4.0]
    lat = summarize(times, batch=4, warmup=2)
    assert lat.p50_ms == 3.0 and lat.mean_ms == 3.0 and lat.iters == 5 and lat.min_ms == 1.0
    assert lat.p90_ms == pytest.approx(np.percentile(times, 90)) and lat.p99_ms <= 5.0
    assert lat.throughput_ips == pytest.approx(4 * 1000 / 3.0, rel=1e-3)
    calls = []
    assert len(time_cpu(lambda: calls.append(1), warmup=3, iters=7)) == 7 and len(calls) == 10
    assert parse_batches("32, 1,8,8") == [1, 8, 32]
    with pytest.raises(UserError):
        parse_batches("-1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_bench_times_pytorch_with_cuda_events(export_dir, tmp_path):
    report = run_bench(BenchOptions(export_dir=export_dir, device="cuda", batches=[1, 4], iters=5, warmup=2,
                                    out=tmp_path / "r"))
    rows = [r for r in report["rows"] if r["backend"] == "pytorch-cuda" and r["status"] == "ok"]
    assert {r["batch"] for r in rows} == {1, 4} and all(r["peak_mem_kind"].startswith("cuda") for r in rows)
    assert report["device_info"]["gpu"]


@pytest.mark.slow
def test_a_bundle_for_a_remote_target_benches_on_its_own(export_dir, tmp_path):
    """What --host ships: artifacts, student, val split (images copied), teacher scores and graph."""
    from edgedistill.bench.runner import make_bundle, resolve_sources, teacher_side
    from rich.console import Console

    doc = artifacts.read_manifest(export_dir)
    src = resolve_sources(export_dir, doc, None)
    teacher = teacher_side(src, src.val, True, Console(stderr=True))
    bundle = make_bundle(export_dir, doc, src, teacher, tmp_path / "bundle")
    assert (bundle / "val" / "val.jsonl").is_file() and len(list((bundle / "val" / "images").iterdir())) == 10
    assert (bundle / "teacher" / "image_fp32.onnx").is_file() and (bundle / "student").is_dir()
    bundled = resolve_sources(bundle, artifacts.read_manifest(bundle), None)
    assert bundled.run_dir is None and bundled.val == bundle / "val" / "val.jsonl"
    report = run_bench(BenchOptions(export_dir=bundle, batches=[1], iters=2, warmup=0, threads=1, teacher=True,
                                    out=tmp_path / "r"))
    local = run_bench(BenchOptions(export_dir=export_dir, batches=[1], iters=2, warmup=0, threads=1,
                                   out=tmp_path / "l"))
    remote_rows = {(r["artifact"], r["backend"]): r for r in report["rows"] if r["status"] == "ok"}
    for r in local["rows"]:  # the same artifact on the same backend (two int8 engines may rank differently)
        if r["status"] == "ok" and r["rsum"] is not None:
            key = (r["artifact"], r["backend"])
            assert remote_rows[key]["rsum"] == pytest.approx(r["rsum"], abs=1e-3), key
    names = {artifact for artifact, _ in remote_rows}
    assert "teacher_image_fp32_onnx" in names and "teacher_image_pytorch" not in names


@pytest.mark.slow
def test_remote_bench_over_a_real_sshd_brings_the_report_back(export_dir, sshd, tmp_path):
    """--host end to end: bundle -> ssh -> `edgedistill bench` on the 'target' -> report back, teacher included."""
    import sys

    remote_cmd = Path(sys.executable).parent / "edgedistill"
    if not remote_cmd.is_file():
        pytest.skip("no edgedistill console script beside this python (install with pip install -e .)")
    out = tmp_path / "report"
    report = run_bench(BenchOptions(export_dir=export_dir, batches=[1, 2], iters=2, warmup=0, threads=1,
                                    teacher=True, out=out, host=sshd.host, port=sshd.port,
                                    ssh_options=sshd.options, remote_cmd=str(remote_cmd), timeout_s=600))
    assert report["remote"]["host"] == sshd.host
    rows = _rows(out)
    timed = {(r["artifact"], r["batch"]) for r in rows if r["status"] == "ok" and r["p50_ms"]}
    assert {("image_int8_onnx", 1), ("image_int8_onnx", 2), ("teacher_image_fp32_onnx", 1)} <= timed
    assert all(r["rsum"] is not None for r in rows if r["status"] == "ok")
    assert (out / rep.REPORT_MD).is_file() and (out / rep.PARETO_PNG).is_file()


def test_jetson_power_is_sampled_around_the_timed_calls(tmp_path, monkeypatch):
    """On a Jetson, tegrastats runs while a batch size is timed: average board power and mJ per item."""
    import time as _time

    import edgedistill.runtime.jetson as jetson
    from edgedistill.runtime.backends import Runner
    from edgedistill.bench.runner import time_job
    from tests.test_jetson import _fake_tegrastats, device_lines

    line = device_lines("tegrastats_orin_nano_jp6.txt")[0]          # VDD_IN 4556 mW
    exe = _fake_tegrastats(tmp_path, [line])

    class Quick(Runner):  # each call far shorter than tegrastats' interval
        def call(self, staged):
            _time.sleep(0.001)

    opts = BenchOptions(export_dir=tmp_path, iters=2, warmup=1)
    sampler = lambda: jetson.TegrastatsSampler(interval_ms=50, command=(str(exe),))  # noqa: E731
    lat = time_job(None, Quick(), opts, batch=4, source=np.zeros((4, 3), np.float32), e2e_call=None,
                   power=sampler)
    # two timed calls hold no sample: power has a window of its own, long enough for several
    assert lat["power"]["board_rail"] == "VDD_IN" and lat["power"]["sample_count"] >= jetson.POWER_MIN_SAMPLES
    assert lat["avg_power_w"] == pytest.approx(4.556)
    # energy per item = power x window / items, and each call takes at least its 1 ms sleep
    assert lat["energy_mj_per_item"] >= 4556 * 0.001 / 4 * 0.99


def test_bench_leaves_torch_threads_as_it_found_them(export_dir, tmp_path):
    before = torch.get_num_threads()
    run_bench(BenchOptions(export_dir=export_dir, batches=[1], iters=2, warmup=0, threads=1, out=tmp_path / "r"))
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------------------- bad input (issue 18)
def test_an_unwritable_out_is_refused_before_anything_is_measured(export_dir, tmp_path, unwritable_dir, monkeypatch,
                                                                  capsys):
    import edgedistill.bench.runner as runner

    def never(*a, **k):
        raise AssertionError("timed before the output folder was checked")

    monkeypatch.setattr(runner, "time_job", never)
    for out, message in ((unwritable_dir / "b", "cannot be written"), (export_dir / "export.json", "is a file")):
        assert main(["bench", str(export_dir), "--out", str(out), *FAST]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err


def test_a_report_that_cannot_be_written_after_timing_is_kept_elsewhere(export_dir, tmp_path, monkeypatch, capsys):
    import edgedistill.bench.report as report_module

    real = report_module.write_report
    calls = []

    def fails_once(out, report):
        calls.append(out)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(out, report)

    monkeypatch.setattr(report_module, "write_report", fails_once)
    assert main(["bench", str(export_dir), "--batch", "1", "--out", str(tmp_path / "b"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could not write the bench report" in err and "the measurements are saved in" in err
    rescue = Path(err.rsplit("saved in ", 1)[1])
    rows = json.loads((rescue / rep.REPORT_JSON).read_text())["rows"]
    assert any(r["status"] == "ok" and r["p50_ms"] for r in rows)
    shutil.rmtree(rescue)


def test_a_non_finite_artifact_is_a_failed_row_not_a_perfect_score(export_dir, monkeypatch, tmp_path, capsys):
    import edgedistill.runtime.backends as backends

    real_embed = backends.Runner.embed

    def nan_for_int8(self, x, batch=32):
        out = real_embed(self, x, batch)
        if "int8" in str(getattr(self, "name", "")):  # the graph's file name, on onnxruntime and OpenVINO
            out[:] = np.nan
        return out

    monkeypatch.setattr(backends.Runner, "embed", nan_for_int8)
    assert main(["bench", str(export_dir), "--batch", "1", "--out", str(tmp_path / "b"), *FAST]) == 2
    rows = _rows(tmp_path / "b")
    int8 = [r for r in rows if r["artifact"] == "image_int8_onnx" and r["status"] != "skipped"]  # OpenVINO: optional
    assert int8 and all(r["status"] == "failed" and "NaN or inf" in r["reason"] for r in int8)
    assert all(r["i2t_r1"] is None for r in int8)
    assert any(r["artifact"] == "image_fp32_onnx" and r["status"] == "ok" for r in rows)
