"""Layerwise distillation: module discovery, teacher hooks against a manual forward, the trainer with module
selection end to end, exact resume after SIGKILL, and refused recipes."""

from __future__ import annotations

import json

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

from edgedistill.cli import main
from edgedistill.distill.layerwise import Layerwise, default_module_names, uniform_layer_map
from edgedistill.distill.recipe import LayerwiseConfig, StudentConfig, TeacherConfig
from edgedistill.distill.students import build_student
from edgedistill.distill.teachers import load_teacher
from edgedistill.distill.train import FAULT_ENV
from tests.test_train import recipe_for, run_subprocess


def layerwise_recipe(tmp_path, tiny_teacher, dataset, name="lw", method="optima", **extra):
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name=name,
                             loss={"terms": ["feature", "similarity"], "balancer": "dsmd",
                                   "layerwise": {"grid": 2, **extra.pop("layerwise", {})}}, **extra)
    raw = yaml.safe_load(recipe.read_text())
    raw["select"] = {"method": method, "pull_steps": 2, "held_batch": 8}
    recipe.write_text(yaml.safe_dump(raw))
    return recipe, out


def test_default_modules_are_stages_or_runs_of_blocks():
    cnn = timm.create_model("mobilenetv3_small_100", num_classes=0)
    assert default_module_names(cnn, 4) == ["blocks.0", "blocks.1", "blocks.3", "blocks.5"]  # stem left out
    assert default_module_names(timm.create_model("resnet18", num_classes=0), 4) == \
        ["layer1", "layer2", "layer3", "layer4"]
    assert default_module_names(cnn, 2) == ["blocks.1", "blocks.5"]
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    assert default_module_names(vit, 4) == ["blocks.2", "blocks.5", "blocks.8", "blocks.11"]  # runs of 3 blocks


def test_uniform_layer_map_ends_at_the_last_block():
    assert uniform_layer_map(4, 12) == [2, 5, 8, 11]
    assert uniform_layer_map(4, 2) == [0, 0, 1, 1]
    assert uniform_layer_map(2, 5) == [1, 4]
    assert uniform_layer_map(1, 3) == [2]


@pytest.fixture
def tiny_pair(tiny_teacher):
    teacher = load_teacher(TeacherConfig(model=str(tiny_teacher[0]), pretrained=str(tiny_teacher[1])), "cpu")
    student = build_student(StudentConfig(vision="mobilenetv3_small_100", image_size=32), teacher, "lwtest")
    return teacher, student


def test_teacher_targets_match_a_manual_forward(tiny_pair):
    teacher, student = tiny_pair
    lw = Layerwise(LayerwiseConfig(grid=4, teacher_layers=[0, 0, -1, 1]), student.model, teacher.model, 32)
    assert [s.teacher_layer for s in lw.specs] == [0, 0, 1, 1]
    assert [s.grid for s in lw.specs] == [4, 4, 2, 1]  # student maps 8, 4, 2, 1 px; teacher grid 4
    images = torch.randn(3, 3, 32, 32)
    emb, targets = lw.teacher_targets(teacher, images)
    torch.testing.assert_close(emb, teacher.embed_images(images))
    visual = teacher.model.visual
    with torch.no_grad():
        x = visual._embeds(images)
        states = []
        for block in visual.transformer.resblocks:
            x = block(x)
            states.append(x)
    for spec, target in zip(lw.specs, targets):
        tokens = states[spec.teacher_layer][:, 1:]  # class token dropped
        grid = tokens.reshape(3, 4, 4, -1).permute(0, 3, 1, 2)
        want = F.adaptive_avg_pool2d(grid, spec.grid).flatten(2).transpose(1, 2)
        want = F.layer_norm(want, (want.shape[-1],))
        assert target.shape == (3, spec.grid ** 2, 64) and not target.is_inference()
        torch.testing.assert_close(target, want, atol=1e-5, rtol=1e-5)


def test_student_tokens_are_projected_and_carry_gradient(tiny_pair):
    teacher, student = tiny_pair
    lw = Layerwise(LayerwiseConfig(grid=2), student.model, teacher.model, 32)
    assert [p.weight.shape for p in lw.projections] == [(64, s.channels) for s in lw.specs]
    lw.capturing = True
    student.model.encode_image(torch.randn(2, 3, 32, 32))
    lw.capturing = False
    loss = sum(lw.mse(lw.student_tokens(i), torch.zeros(2, s.grid ** 2, 64)) for i, s in enumerate(lw.specs))
    loss.backward()
    assert all(p.weight.grad.abs().sum() > 0 for p in lw.projections)
    assert next(student.model.visual.parameters()).grad is not None
    student.model.encode_image(torch.randn(2, 3, 32, 32))  # not capturing: nothing kept
    lw.student_outputs.clear()
    student.model.encode_image(torch.randn(2, 3, 32, 32))
    assert lw.student_outputs == {}
    assert not any(k.startswith("projections") for k in student.model.state_dict())


@pytest.mark.slow
def test_layerwise_optima_run_end_to_end(tiny_teacher, dataset, tmp_path):
    recipe, out = layerwise_recipe(tmp_path, tiny_teacher, dataset)
    assert main(["distill", str(recipe)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sel = summary["selection"]
    modules = ["blocks.0", "blocks.1", "blocks.3", "blocks.5"]
    assert sel["method"] == "optima" and list(sel["counts"]) == modules
    assert sum(sel["counts"].values()) == 5 and all(c >= 1 for c in sel["counts"].values())  # 10 steps / K=2
    assert set(sel["mean_reward"]) == set(modules)
    assert summary["layerwise_modules"]["blocks.5"]["teacher_layer"] == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    pulls = [x["selection"] for x in lines if "selection" in x]
    assert [p["module"] for p in pulls[:4]] == modules  # every arm once first
    for a, b in zip(pulls, pulls[1:]):
        assert b["loss_before"] == a["loss_after"]  # one held batch, measured once per pull
        assert b["reward"] == pytest.approx((b["loss_before"] - b["loss_after"]) / b["loss_before"])
    assert set(pulls[-1]["posterior_mean"]) == set(modules)
    steps = [x for x in lines if "loss" in x]
    for x in steps:  # the output-level terms every step, exactly one module's hidden-state term
        hidden = [k for k in x["terms"] if k.startswith("layerwise:")]
        assert {"feature", "similarity"} <= set(x["terms"]) and len(hidden) == 1
    assert [k for x in steps[:2] for k in x["terms"] if k.startswith("layerwise:")] == ["layerwise:blocks.0"] * 2
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["selector"]["pull_index"] == 5 and "projections.0.weight" in ckpt["layerwise"]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["train"]["teacher"] == "online"
    model = open_clip.create_model(f"local-dir:{out / 'student'}").eval()  # projections: not in the student
    assert model.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 32)


@pytest.mark.slow
def test_uniform_turns_every_module_on(tiny_teacher, dataset, tmp_path):
    recipe, out = layerwise_recipe(tmp_path, tiny_teacher, dataset, name="uni", method="uniform",
                                   train={"max_steps": 3, "epochs": 1})
    assert main(["distill", str(recipe)]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(len([k for k in x["terms"] if k.startswith("layerwise:")]) == 4 for x in lines if "loss" in x)
    assert not any("selection" in x for x in lines)
    summary = json.loads((out / "summary.json").read_text())["selection"]
    assert summary["counts"] == {m: 3 for m in ("blocks.0", "blocks.1", "blocks.3", "blocks.5")}


@pytest.mark.slow
def test_sigkill_then_resume_continues_the_selection_exactly(tiny_teacher, dataset, tmp_path):
    whole, whole_out = layerwise_recipe(tmp_path, tiny_teacher, dataset, name="lwwhole")
    assert main(["distill", str(whole)]) == 0
    crash, crash_out = layerwise_recipe(tmp_path, tiny_teacher, dataset, name="lwcrash")
    killed = run_subprocess("distill", str(crash), env={FAULT_ENV: "8"})  # mid-pull; last checkpoint at step 6
    assert killed.returncode == -9, killed.stderr
    assert torch.load(crash_out / "checkpoints" / "last.pt", weights_only=True)["state"]["step"] == 6
    resumed = run_subprocess("distill", str(crash), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    def records(out):
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [x["loss"] for x in lines if "loss" in x], [x["selection"] for x in lines if "selection" in x]

    (loss_a, sel_a), (loss_b, sel_b) = records(whole_out), records(crash_out)
    assert loss_b == pytest.approx(loss_a, rel=1e-4)
    assert [s["module"] for s in sel_b] == [s["module"] for s in sel_a]
    assert [s["reward"] for s in sel_b] == pytest.approx([s["reward"] for s in sel_a], rel=1e-3, abs=1e-6)
    a = json.loads((whole_out / "summary.json").read_text())["selection"]
    b = json.loads((crash_out / "summary.json").read_text())["selection"]
    assert a["counts"] == b["counts"]


def test_contradictory_and_bad_layerwise_recipes_exit_2(tiny_teacher, dataset, tmp_path, capsys):
    recipe, out = layerwise_recipe(tmp_path, tiny_teacher, dataset, name="bad")
    assert main(["distill", str(recipe), "train.teacher=cached"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.teacher: online" in err
    assert main(["distill", str(recipe), "loss.layerwise.teacher_layers=[0,1]"]) == 2
    assert "one per module" in capsys.readouterr().err
    assert main(["distill", str(recipe), "loss.layerwise.student_modules=[blocks.9]"]) == 2
    assert "no module 'blocks.9'" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
