"""The run directory: resume checks against the saved recipe, checkpoints, the log truncated on resume."""

import json

import pytest
import torch
import yaml

from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import save_recipe, validate_recipe
from edgedistill.distill.train.rundir import RunDir, recipe_differences

RAW = {"name": "x", "teacher": {"model": "ViT-B-32"}, "data": {"train": "a.jsonl"},
       "loss": {"layerwise": True}, "select": {"name": "optima", "window": 4}}


def test_a_run_saved_with_the_older_select_key_resumes(tmp_path):
    run = RunDir(tmp_path)
    recipe = validate_recipe({**RAW, "out": str(tmp_path)})
    save_recipe(recipe, run.recipe)
    saved = yaml.safe_load(run.recipe.read_text())
    saved["select"]["method"] = saved["select"].pop("name")  # how the run directory looked before 'name'
    run.recipe.write_text(yaml.safe_dump(saved))
    run.save_checkpoint(run.last, {"state": {}})
    assert run.will_resume(recipe, resume=True)
    changed = validate_recipe({**RAW, "out": str(tmp_path), "select": {"name": "optima", "window": 5}})
    with pytest.raises(UserError, match=r"the recipe changed since the run started \(select.window\)"):
        run.will_resume(changed, resume=True)
    assert not run.will_resume(recipe, resume=False)


def test_only_what_does_not_change_the_result_may_change_on_resume():
    old = {"train": {"epochs": 3, "lr": 0.1}, "device": "cpu", "loss": {"terms": {"feature": {"weight": 1}}}}
    new = {"train": {"epochs": 9, "lr": 0.2}, "device": "cuda", "loss": {"terms": {"feature": {"weight": 2}}}}
    assert recipe_differences(old, new) == ["loss.terms", "train.lr"]


def test_checkpoints_are_complete_or_refused(tmp_path):
    run = RunDir(tmp_path)
    run.save_checkpoint(run.last, {"state": {"step": 3}, "model": {"w": torch.ones(2)}})
    ckpt = run.load_checkpoint(run.last)
    assert ckpt["format"] == 1 and ckpt["state"]["step"] == 3 and torch.equal(ckpt["model"]["w"], torch.ones(2))
    run.last.write_bytes(run.last.read_bytes()[:50])
    with pytest.raises(UserError, match="cannot read .*last.pt.*delete it to restart"):
        run.load_checkpoint(run.last)
    run.refuse_existing(resume=True)
    with pytest.raises(UserError, match="already holds a run"):
        run.refuse_existing(resume=False)


def test_resume_drops_log_lines_after_the_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    run.truncate_log(5)
    assert [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]
