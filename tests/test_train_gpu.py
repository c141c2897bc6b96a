"""The trainer on CUDA: mixed precision, and the same output contract. Skipped without an NVIDIA GPU."""

import json

import pytest
import torch

from edgedistill.cli import main
from tests.test_train import SUMMARY_KEYS, recipe_for

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA)")]


@pytest.mark.parametrize("amp", [True, False])
def test_distill_on_cuda(tiny_teacher, dataset, tmp_path, amp):
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name=f"cuda-{amp}", train={"amp": amp})
    assert main(["distill", str(recipe), "device=cuda"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("cuda") and summary["skipped_steps"] == 0
    assert SUMMARY_KEYS <= set(summary["student"])
    assert all(abs(v) < 1e6 for v in summary["student"].values())


def test_resume_on_cuda_matches(tiny_teacher, dataset, tmp_path):
    whole, whole_out = recipe_for(tmp_path, tiny_teacher, dataset, name="gpu-whole", train={"amp": False})
    assert main(["distill", str(whole), "device=cuda"]) == 0
    part, part_out = recipe_for(tmp_path, tiny_teacher, dataset, name="gpu-part", train={"amp": False})
    assert main(["distill", str(part), "device=cuda", "train.max_steps=6"]) == 0
    assert main(["distill", str(part), "device=cuda", "--resume"]) == 0
    a = json.loads((whole_out / "summary.json").read_text())["student"]
    b = json.loads((part_out / "summary.json").read_text())["student"]
    assert b["cosine_to_teacher"] == pytest.approx(a["cosine_to_teacher"], abs=1e-2)
