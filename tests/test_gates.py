"""Every gate and threshold fails closed on NaN and inf (a comparison with NaN is False in Python, so a gate
written as ``if value < floor: fail`` lets NaN through). One injected non-finite value per gate; the end-to-end
cases live with their commands: a damaged student and a NaN parity (test_export), a NaN artifact in bench
(test_bench), three non-finite losses in a row (test_train)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import edgedistill.core.gates as gates
from edgedistill.evaluation.split import score
from edgedistill.core.errors import UserError
from edgedistill.export import exporter
from edgedistill.evaluation.metrics import (NonFiniteEmbeddings, agreement, few_shot_accuracy, retention, retrieval_metrics,
                                 zero_shot_accuracy)

BAD = [float("nan"), float("inf"), float("-inf"), None, "0.99"]


@pytest.mark.parametrize("value", BAD)
def test_threshold_helpers_fail_closed(value):
    assert not gates.at_least(value, 0.5) and not gates.at_most(value, 0.5) and not gates.finite(value)
    assert gates.at_least(0.5, 0.5) and gates.at_most(0.5, 0.5) and not gates.at_least(0.4, 0.5)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_the_export_parity_gate_fails_on_non_finite_cosines(precision, value):
    assert exporter.parity_ok({"cosine_mean": 1.0, "cosine_min": 1.0}, precision)
    assert not exporter.parity_ok({"cosine_mean": value, "cosine_min": 1.0}, precision)
    assert not exporter.parity_ok({"cosine_mean": 1.0, "cosine_min": value}, precision)


def test_the_int8_accuracy_warning_flags_a_nan_drop():
    printed = []
    job = SimpleNamespace(torch_val={"i2t_r1": 50.0}, console=SimpleNamespace(print=lambda m, **k: printed.append(m)))
    entries = [{"precision": "int8", "val": {"i2t_r1": float("nan")}}, {"precision": "int8", "val": {"i2t_r1": 49.5}}]
    exporter.ExportJob._flag_int8(job, entries)
    assert len(printed) == 1 and "INT8 loses nan points" in printed[0]


@pytest.mark.parametrize("student, teacher", [(float("nan"), 500.0), (400.0, float("nan")), (400.0, 0.0),
                                              (float("inf"), 500.0), (None, 500.0)])
def test_retention_is_absent_rather_than_a_number_that_passes(student, teacher):
    assert retention({"rsum": student}, {"rsum": teacher}) is None
    assert retention({"rsum": 400.0}, {"rsum": 500.0}) == {"rsum": 0.8}


def test_every_metric_refuses_non_finite_embeddings():
    img, txt, t2i = torch.randn(6, 8), torch.randn(6, 8), torch.arange(6)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    assert retrieval_metrics(img, txt, t2i)["rsum"] >= 0
    bad = img.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(NonFiniteEmbeddings, match="1 of 6 rows"):
        retrieval_metrics(bad, txt, t2i)  # NaN scores would rank first: a broken model at 100% recall
    with pytest.raises(NonFiniteEmbeddings):
        retrieval_metrics(img, txt.masked_fill(txt > 1, float("inf")), t2i)
    with pytest.raises(NonFiniteEmbeddings):
        zero_shot_accuracy(bad, torch.randn(2, 8), labels)
    with pytest.raises(NonFiniteEmbeddings):
        agreement(bad, txt, img, txt, t2i)
    with pytest.raises(NonFiniteEmbeddings):
        few_shot_accuracy(bad, labels, 1)


def test_the_score_of_a_non_finite_artifact_is_an_error_not_a_perfect_score():
    split = SimpleNamespace(captions=["a", "b", "c", "d"], labels=None, text_to_image=np.arange(4),
                            manifest=SimpleNamespace(path="val.jsonl"))
    good = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    assert score(split, good, good)["i2t_r1"] == 100.0
    with pytest.raises(UserError, match="image_int8.onnx: image embeddings hold NaN or inf"):
        score(split, np.full((4, 8), np.nan, np.float32), good, what="image_int8.onnx")
