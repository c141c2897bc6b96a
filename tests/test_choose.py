"""runtime.choose and load()'s measuring: accuracy on the probe first, then speed; cached per device."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import edgedistill
import edgedistill.runtime.choose as choose
from edgedistill.core.errors import UserError
from edgedistill.runtime.backends import Runner
from edgedistill.runtime.choose import Choice, Measured


class FixedRunner(Runner):
    """Embeds by a fixed function; ``delay`` busy-waits to make it slower."""

    def __init__(self, fn, delay_s: float = 0.0) -> None:
        self.fn, self.delay_s = fn, delay_s

    def call(self, staged):
        import time

        end = time.perf_counter() + self.delay_s
        while time.perf_counter() < end:
            pass
        return self.fn(staged)


def choices(*names: str) -> list[Choice]:
    return [Choice({"name": n, "precision": n.split("_")[1]}, Path("."), "onnxruntime-cpu") for n in names]


def test_measure_keeps_the_accurate_and_the_fastest_wins():
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    ref = x / np.linalg.norm(x, axis=1, keepdims=True)
    runners = {"image_fp32_onnx@onnxruntime-cpu": FixedRunner(lambda a: a, 0.002),
               "image_int8_onnx@onnxruntime-cpu": FixedRunner(lambda a: a + 0.001),          # accurate and fast
               "image_fp16_onnx@onnxruntime-cpu": FixedRunner(lambda a: -a)}                # fast, wrong
    opts = choices("image_fp32_onnx", "image_int8_onnx", "image_fp16_onnx")
    measured = choose.measure(opts, x, ref, {1, 4}, lambda c: runners[c.key])
    by = {m.key: m for m in measured}
    assert by["image_fp32_onnx@onnxruntime-cpu"].ok and by["image_int8_onnx@onnxruntime-cpu"].ok
    assert not by["image_fp16_onnx@onnxruntime-cpu"].ok and "cosine" in by["image_fp16_onnx@onnxruntime-cpu"].reason
    assert set(by["image_fp32_onnx@onnxruntime-cpu"].p50_ms) == {"1", "4"}
    assert by["image_fp16_onnx@onnxruntime-cpu"].p50_ms == {}  # inaccurate ones are not timed
    assert choose.fastest(opts, measured, 4).key == "image_int8_onnx@onnxruntime-cpu"


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_non_finite_embedding_fails_the_check_closed(bad):
    x = np.ones((3, 4), np.float32)
    ref = x / 2
    measured = choose.measure(choices("image_int8_onnx"), x, ref, {1}, lambda c: FixedRunner(lambda a: a * bad))
    assert not measured[0].ok and choose.fastest(choices("image_int8_onnx"), measured, 1) is None


def test_a_runner_that_fails_to_open_is_a_failed_candidate_not_an_error():
    def refuse(c):
        raise UserError("onnxruntime could not load it")
    measured = choose.measure(choices("image_fp32_onnx"), np.ones((2, 3), np.float32), np.ones((2, 3)) / 3**0.5,
                              {1}, refuse)
    assert not measured[0].ok and measured[0].reason == "onnxruntime could not load it"


def test_the_cache_is_read_back_only_for_the_same_key_and_survives_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path))
    key = choose.device_key("cpu", 2, 8, {"export": "abc"})
    assert key["cpu"] and "flags" in key and key["batch"] == 8
    rows = {"image": [Measured("a@b", "int8", 0.995, {"1": 0.5}, True)]}
    path = choose.write_cached(key, rows)
    assert choose.read_cached(key) == rows
    assert choose.read_cached({**key, "threads": 1}) is None
    doc = json.loads(path.read_text())
    assert doc["loadavg_1m"] is not None and doc["measured_at"]
    path.write_text("{not json")
    assert choose.read_cached(key) is None


def test_the_rule_never_puts_int8_first():
    opts = choices("image_int8_onnx", "image_fp16_onnx", "image_fp32_onnx")
    assert choose.rule_rank(opts, "cpu")[0].artifact["precision"] == "fp32"
    assert choose.rule_rank(opts, "cuda")[0].artifact["precision"] == "fp16"


# ------------------------------------------------------------------------------------------------ load()
@pytest.fixture(scope="module")
def export_dir(tiny_export):
    return tiny_export


def test_load_measures_once_then_reads_the_cache(export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path))
    first = edgedistill.load(export_dir, device="cpu")
    assert first.info.chosen_by == "measured"
    rows = {m["key"]: m for m in first.info.measurements["image"]}
    assert set(rows) == {"image_fp32_onnx@onnxruntime-cpu", "image_int8_onnx@onnxruntime-cpu"} | \
        ({"image_fp32_onnx@openvino-cpu", "image_int8_onnx@openvino-cpu"} if "openvino-cpu@" in str(rows) else set())
    chosen = rows[f"{first.info.image['artifact']}@{first.info.image['backend']}"]
    assert chosen["ok"] and chosen["cosine_min"] >= choose.TOLERANCE
    assert chosen["p50_ms"]["1"] == min(r["p50_ms"]["1"] for r in rows.values() if r["ok"])
    monkeypatch.setattr(choose, "measure", lambda *a, **k: pytest.fail("measured again"))
    second = edgedistill.load(export_dir, device="cpu")
    assert second.info.chosen_by == "measured (cached)" and second.info.image == first.info.image


@pytest.mark.slow
def test_remeasure_and_another_batch_measure_again(export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path))
    edgedistill.load(export_dir, device="cpu")
    assert edgedistill.load(export_dir, device="cpu", remeasure=True).info.chosen_by == "measured"
    at8 = edgedistill.load(export_dir, device="cpu", batch=8)
    assert at8.info.chosen_by == "measured"
    assert all(set(m["p50_ms"]) == {"1", "8"} for m in at8.info.measurements["image"] if m["ok"])


def test_a_pinned_precision_that_fails_here_loads_with_a_warning_naming_the_cosine(export_dir, tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match=r"image_int8_onnx@onnxruntime-cpu minimum cosine to fp32 0\.\d+"):
        enc = edgedistill.load(export_dir, device="cpu", backend="onnxruntime-cpu", precision="int8",
                               tolerance=0.999999)
    assert enc.info.image["precision"] == "int8" and enc.info.chosen_by == "request"
    assert any("nothing passed the accuracy check" in n for n in enc.info.notes)


def test_your_own_images_can_be_the_probe(export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path))
    photos = sorted((export_dir.parent.parent / "data" / "images").glob("*.jpg"))[:6]
    enc = edgedistill.load(export_dir, device="cpu", probe=[str(p) for p in photos])
    assert enc.info.chosen_by == "measured"
    fp32 = next(m for m in enc.info.measurements["image"] if m["key"] == "image_fp32_onnx@onnxruntime-cpu")
    assert fp32["cosine_min"] == pytest.approx(1.0, abs=1e-5)  # the reference is the fp32 graph itself
    with pytest.raises(UserError, match="probe= holds no images"):
        edgedistill.load(export_dir, device="cpu", probe=[])


@pytest.mark.parametrize("kwargs, message", [
    ({"batch": 0}, "batch must be a whole number"), ({"batch": 2.5}, "batch must be a whole number"),
    ({"tolerance": float("nan")}, "tolerance is a minimum cosine"), ({"tolerance": 1.5}, "tolerance is a minimum"),
])
def test_bad_measuring_requests_are_one_clear_error(export_dir, kwargs, message):
    with pytest.raises(UserError, match=message):
        edgedistill.load(export_dir, device="cpu", **kwargs)


def test_a_damaged_or_missing_probe(export_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    with open(copy / "probe" / "images_uint8.npy", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="probe file is missing or does not match the sha256"):
        edgedistill.load(copy, device="cpu")
    doc = json.loads((copy / "export.json").read_text())
    doc.pop("probe")
    (copy / "export.json").write_text(json.dumps(doc))
    enc = edgedistill.load(copy, device="cpu")  # an export made before probes: the rule, and a note saying so
    assert enc.info.chosen_by == "rule" and enc.info.image["precision"] == "fp32"
    assert any("no probe set" in n for n in enc.info.notes)


@pytest.mark.parametrize("drop, cpu, left_out", [(2.0, "here", True), (0.3, "here", False),
                                                 (2.0, "another CPU", False)])
def test_the_exports_own_check_on_this_cpu_rules_out_an_r1_loss(export_dir, tmp_path, monkeypatch, drop, cpu,
                                                                 left_out):
    from edgedistill.runtime.device import cpu_model, isa_flags

    monkeypatch.setenv("EDGEDISTILL_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    doc = json.loads((copy / "export.json").read_text())
    int8 = next(a for a in doc["artifacts"] if a["name"] == "image_int8_onnx")
    int8["val_r1_drop"] = drop
    int8["checked_on"] = {"cpu": cpu_model() if cpu == "here" else cpu, "flags": list(isa_flags())}
    (copy / "export.json").write_text(json.dumps(doc))
    enc = edgedistill.load(copy, device="cpu")
    measured = {m["key"] for m in enc.info.measurements.get("image", [])}
    assert ("image_int8_onnx@onnxruntime-cpu" not in measured) == left_out
    assert any("image_int8_onnx@onnxruntime-cpu left out" in n for n in enc.info.notes) == left_out
    if left_out:
        assert enc.info.image["artifact"] == "image_fp32_onnx"
