"""benchmarks/gpu/: the dry run of the GPU check end to end on the CPU, its time boxes, and its wheel list."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU = REPO / "benchmarks" / "gpu"
OUTPUT = {"results.json", "check.log", "steps.csv", "resume.csv", "cache_epoch.csv", "encoders.csv", "bench.json"}


def load_check():
    if "gpu_check" not in sys.modules:  # dataclasses look their module up while it is being executed
        spec = importlib.util.spec_from_file_location("gpu_check", GPU / "check.py")
        sys.modules["gpu_check"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(GPU / "check.py"), "--dry-run", "--out", str(out), "--work", str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=480)
    log = (out / "check.log").read_text() if (out / "check.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-3000:]
    # what comes back from the GPU machine: at most 8 plain files, no folders, each well under 16 MiB
    files = list(out.iterdir())
    assert {f.name for f in files} == OUTPUT and all(f.is_file() and f.stat().st_size < 16 << 20 for f in files)
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert list(steps) == [s.name for s in load_check().STEPS] and results["dry_run"] is True
    assert list(steps)[:2] == ["env", "encoders"]  # the encoder figures come back first
    assert {name: r["status"] for name, r in steps.items()} == {name: "ok" for name in steps}, steps
    assert steps["env"]["env"]["cuda_available"] in (True, False) and steps["env"]["env"]["packages"]["torch"]
    assert steps["gpu_tests"]["tests"]["tests"] >= 1  # the GPU tests were collected (and skip without CUDA)
    resume = steps["distill_resume"]["resume"]
    assert resume["resumed_from"] == 4 and resume["steps"] == 8 and resume["same_steps"]
    assert resume["exact"] and resume["identical_before_kill"]  # on the CPU the resume is bit-exact
    cache = {r["kind"]: r for r in steps["cache_build"]["rows"]}
    assert cache["fp32"]["images_per_s"] > 0 and cache["bf16"]["status"] == "skipped"
    assert [r["mode"] for r in steps["epoch"]["rows"]] == ["cached", "online"]
    encoders = steps["encoders"]["rows"]
    assert {(r["role"], r["batch"]) for r in encoders if r["status"] == "ok"} == {
        ("student", 1), ("student", 4), ("teacher", 1), ("teacher", 4)}
    assert all("CUDA only" in r["message"] for r in encoders if r["mode"] != "fp32")
    assert "bench --device cuda skipped: no CUDA" in steps["bench"]["message"]
    assert any(t.startswith("pytorch-cpu ") for t in steps["bench"]["timed"])
    assert json.loads((out / "bench.json").read_text())["device_info"]["device"] == "cpu"
    rows = (out / "resume.csv").read_text().splitlines()
    assert rows[0].startswith("source,step,loss_whole,loss_killed_and_resumed") and len(rows) == 9  # + 8 steps
    assert "===== step bench: ok" in (out / "check.log").read_text()


FAKE_WORKER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    work, steps = sys.argv[1], sys.argv[2].split(",")
    def write(name, doc):
        os.makedirs(os.path.dirname(name), exist_ok=True)
        with open(name + ".tmp", "w") as f:
            json.dump(doc, f)
        os.replace(name + ".tmp", name)
    for step in steps:
        write(os.path.join(work, "progress.json"), {"step": step, "started": time.time()})
        if step == "slow":  # hangs, with a child of its own
            child = subprocess.Popen(["sleep", "60"])
            open(os.path.join(work, "child.pid"), "w").write(str(child.pid))
            time.sleep(60)
        if step == "boom":
            os._exit(3)
        write(os.path.join(work, "results", step + ".json"), {"status": "ok", "message": step})
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in state


def test_the_encoder_step_runs_first_after_env():
    """The encoder throughput is what the GPU time is mostly for: it runs right after env (a minute of machine
    checks), needing no other step, so a later step that hangs or spends the budget cannot cost it."""
    check = load_check()
    names = [s.name for s in check.STEPS]
    assert names[:2] == ["env", "encoders"] and sorted(names) == sorted(set(names))
    by_name = {s.name: s for s in check.STEPS}
    assert by_name["encoders"].needs == () and by_name["env"].box_s <= 60
    # every step's needs come before it
    assert all(names.index(n) < names.index(s.name) for s in check.STEPS for n in s.needs)


def test_a_step_past_its_box_is_killed_with_its_children_and_the_next_steps_run(tmp_path):
    check = load_check()
    said = []

    def spawn(todo):
        return subprocess.Popen([sys.executable, "-c", FAKE_WORKER, str(tmp_path), ",".join(todo)],
                                start_new_session=True)

    boxes = {"a": 30, "slow": 1.0, "boom": 30, "c": 30}
    results = check.orchestrate(["a", "slow", "boom", "c"], boxes, tmp_path, 120, spawn, said.append)
    assert results["a"]["status"] == "ok" and results["c"]["status"] == "ok"
    assert results["slow"]["status"] == "timeout" and "past its time box (1 s)" in results["slow"]["message"]
    assert results["boom"] == {"status": "failed", "message": "the worker died (exit status 3)"}
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child)  # the hung step's own child went with it
    assert any(line.startswith("step slow: killed after") for line in said)


def test_nothing_starts_once_the_budget_is_spent(tmp_path, monkeypatch):
    check = load_check()
    monkeypatch.setattr(check, "MIN_START_S", 1000.0)
    results = check.orchestrate(["a", "b"], {"a": 1, "b": 1}, tmp_path, 10, lambda todo: pytest.fail("spawned"),
                                lambda line: None)
    assert {r["status"] for r in results.values()} == {"skipped"}


def test_the_report_writes_csv_rows_per_step(tmp_path):
    check = load_check()
    results = {"distill_resume": {"status": "ok", "rows": [{"step": 1, "loss_whole": 2.0}]},
               "encoders": {"status": "failed", "message": "x", "rows": [{"role": "student", "ms": 1.5},
                                                                         {"role": "teacher", "extra": 1}]}}
    check.write_report(tmp_path, results, {"dry_run": True})
    assert (tmp_path / "encoders.csv").read_text().splitlines() == ["source,role,ms,extra", "encoders,student,1.5,",
                                                                   "encoders,teacher,,1"]
    assert (tmp_path / "steps.csv").read_text().splitlines()[1:] == ["distill_resume,ok,,", "encoders,failed,,x"]
    assert json.loads((tmp_path / "results.json").read_text())["steps"]["encoders"]["status"] == "failed"


def test_the_wheel_list_pins_one_version_of_each_missing_package():
    lines = [ln.strip() for ln in (GPU / "wheels.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    pins = dict(ln.split("==") for ln in lines)
    assert len(pins) == len(lines) and all(re.fullmatch(r"\d+(\.\d+)+", v) for v in pins.values())
    names = {re.sub(r"[-_.]+", "-", n.lower()) for n in pins}
    # what edgedistill imports and the GPU machine's image lacks, with their own missing dependencies
    assert {"open-clip-torch", "ftfy", "wcwidth", "pydantic", "pydantic-core", "annotated-types",
            "typing-inspection", "typing-extensions", "webdataset", "braceexpand", "onnxslim"} <= names
    assert "/.whl/" in (REPO / ".gitignore").read_text().split()


def test_docs_gpu_names_tests_that_exist():
    """docs/gpu.md says which test proves each fix: every test it names is there."""
    names = set(re.findall(r"`(test_[a-z0-9_]+)`", (REPO / "docs" / "gpu.md").read_text()))
    assert len(names) >= 12
    source = "\n".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    assert not [n for n in names if f"def {n}(" not in source]
