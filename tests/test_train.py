"""The trainer end to end on a tiny teacher: output contract, exact resume after SIGKILL, bad input, NaN steps."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import yaml

from edgedistill.cli import main
from edgedistill.distill.train import FAULT_ENV, EpochBatches, TrainImages, cosine_schedule
from tests.conftest import write_recipe

SUMMARY_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}
FAST = {"epochs": 2, "log_every": 1, "checkpoint_every": 3, "warmup_steps": 2, "tensorboard": False}


def recipe_for(tmp_path, tiny_teacher, dataset, name="tiny", **sections):
    sections.setdefault("train", {})
    sections["train"] = {**FAST, **sections["train"]}
    sections.setdefault("student", {}).setdefault("image_size", 32)
    path = write_recipe(tmp_path / f"{name}.yaml", tiny_teacher, dataset["train"], dataset["val"],
                        cache_dir=tmp_path / "cache", **sections)
    raw = yaml.safe_load(path.read_text())
    raw["name"], raw["out"] = name, str(tmp_path / "runs" / name)
    path.write_text(yaml.safe_dump(raw))
    return path, Path(raw["out"])


def run_subprocess(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgedistill", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_distill_writes_the_output_contract(tiny_teacher, dataset, tmp_path):
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, train={"tensorboard": True})
    assert main(["distill", str(recipe)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary["teacher"])
    assert SUMMARY_KEYS | {"agreement_top1", "cosine_to_teacher"} <= set(summary["student"])
    assert summary["retention"]["rsum"] == pytest.approx(summary["student"]["rsum"] / summary["teacher"]["rsum"])
    assert summary["steps"] == 10 and summary["wall_s"] > 0 and summary["train_images_per_s"] > 0
    for r in (summary["teacher"], summary["student"]):
        assert r["rsum"] == pytest.approx(sum(r[k] for k in SUMMARY_KEYS - {"rsum"}))
        assert 0 <= r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] <= 100
    assert "zs_mean_class" in summary["student"]  # the val manifest has labels
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["train"]["epochs"] == 2 and "contrastive" in resolved["loss"]["terms"]
    assert resolved["loss"]["terms"]["contrastive"]["queue_size"] == 4096  # defaults written out
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "checkpoints" / "best.pt").is_file()
    assert any((out / "tensorboard").iterdir())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train_lines] == list(range(1, 11))
    assert set(train_lines[0]["weights"]) == set(resolved["loss"]["terms"])  # weights logged at every log step
    assert [x["step"] for x in lines if "eval" in x] == [5, 10]  # after each epoch
    # The saved student is the best checkpoint's model, and it loads as a plain open_clip model.
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert best["step"] == summary["best_step"]
    model = open_clip.create_model(f"local-dir:{out / 'student'}")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, best["model"][key])


@pytest.mark.slow
def test_eval_command_reevaluates_the_saved_student(tiny_teacher, dataset, tmp_path):
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, train={"epochs": 1})
    assert main(["distill", str(recipe)]) == 0
    assert main(["eval", str(out), "--device", "cpu"]) == 0
    result = json.loads((out / "eval.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert result["teacher"] == summary["teacher"]
    # The student's own (frozen teacher) text tower vs the cached float16 teacher text: the same up to rounding.
    assert result["student"]["cosine_to_teacher"] == pytest.approx(summary["student"]["cosine_to_teacher"],
                                                                   abs=1e-3)
    assert result["student"]["zs_mean_class"] == pytest.approx(summary["student"]["zs_mean_class"], abs=10)
    assert main(["eval", str(tmp_path)]) == 2


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny_teacher, dataset, tmp_path):
    whole, whole_out = recipe_for(tmp_path, tiny_teacher, dataset, name="whole")
    assert main(["distill", str(whole)]) == 0
    crash, crash_out = recipe_for(tmp_path, tiny_teacher, dataset, name="crash")
    # Killed after step 7 of 10 (epoch 2, batch 2); the last checkpoint is from step 6.
    killed = run_subprocess("distill", str(crash), env={FAULT_ENV: "7"})
    assert killed.returncode == -9, killed.stderr
    ckpt = torch.load(crash_out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["state"]["step"] == 6 and ckpt["state"]["batch"] == 1
    assert not (crash_out / "summary.json").exists()
    again = run_subprocess("distill", str(crash))  # without --resume: refused, nothing touched
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = run_subprocess("distill", str(crash), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "at step 6" in resumed.stderr
    a = json.loads((whole_out / "summary.json").read_text())
    b = json.loads((crash_out / "summary.json").read_text())
    assert b["steps"] == a["steps"] == 10
    for part in ("teacher", "student"):
        for key, value in a[part].items():
            assert b[part][key] == pytest.approx(value, abs=1e-3), (part, key)
    loss_a = [json.loads(x)["loss"] for x in (whole_out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    loss_b = [json.loads(x)["loss"] for x in (crash_out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert loss_b == pytest.approx(loss_a, rel=1e-4)  # one line per step, the re-run steps not duplicated
    wa = torch.load(whole_out / "checkpoints" / "last.pt", weights_only=True)["model"]
    wb = torch.load(crash_out / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_resume_with_a_changed_recipe_is_refused(tiny_teacher, dataset, tmp_path):
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, train={"epochs": 1})
    assert main(["distill", str(recipe)]) == 0
    assert main(["distill", str(recipe), "train.lr=0.5", "--resume"]) == 2
    # Changing only how long to train is allowed: the run continues to the new end.
    assert main(["distill", str(recipe), "train.epochs=2", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 10


@pytest.mark.slow
def test_three_non_finite_steps_stop_the_run_and_keep_the_last_good_checkpoint(tiny_teacher, dataset, tmp_path,
                                                                               monkeypatch, capsys):
    from edgedistill.distill.losses.output import FeatureLoss
    calls = {"n": 0}
    original = FeatureLoss.forward

    def flaky(self, e):
        calls["n"] += 1
        value = original(self, e)
        return value * float("nan") if calls["n"] > 4 else value

    monkeypatch.setattr(FeatureLoss, "forward", flaky)
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, train={"checkpoint_every": 2})
    assert main(["distill", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "not finite for 3 steps in a row" in err and "last.pt" in err
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["state"]["step"] == 4 and ckpt["state"]["skipped"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("override, names", [
    ("loss.terms=[feature,similarty]", ["unknown loss term 'similarty'", "did you mean 'similarity'", "vl_align"]),
    ("loss.balancer=gradnrom", ["gradnrom", "gradnorm", "uncertainty"]),
    ("loss.terms={contrastive: {queue: 5}}", ["queue_size"]),
])
def test_unknown_loss_and_balancer_names_list_the_valid_ones(tiny_teacher, dataset, tmp_path, capsys,
                                                              override, names):
    recipe, _ = recipe_for(tmp_path, tiny_teacher, dataset)
    assert main(["distill", str(recipe), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for name in names:
        assert name in err


def test_unknown_student_tower_exit_2(tiny_teacher, dataset, tmp_path, capsys):
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset)
    assert main(["check", str(recipe), "student.vision=mobilenet_v9"]) == 2  # caught before any work
    assert "unknown timm model 'mobilenet_v9'" in capsys.readouterr().err
    assert main(["distill", str(recipe), "student.vision=mobilenet_v9"]) == 2
    assert "unknown timm model 'mobilenet_v9'" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()


@pytest.mark.slow
def test_student_text_tower_and_online_teacher(tiny_teacher, dataset, tmp_path):
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name="textonline",
                             student={"text": {"width": 32, "layers": 1, "heads": 2}, "embed_dim": 16},
                             train={"teacher": "online", "max_steps": 3, "epochs": 1})
    assert main(["distill", str(recipe)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and SUMMARY_KEYS <= set(summary["student"])
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["projection"]["weight"].shape == (32, 16)  # student width 16 -> teacher width 32
    model = open_clip.create_model(f"local-dir:{out / 'student'}")
    assert model.encode_text(open_clip.get_tokenizer(f"local-dir:{out / 'student'}")(["a"])).shape == (1, 16)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["terms"]["feature"] > 0 and not (tmp_path / "cache").exists()  # online: no cache built


def test_epoch_batches_are_a_function_of_seed_and_epoch():
    import numpy as np
    sampler = EpochBatches(np.arange(10), 3, seed=5)
    assert sampler.per_epoch == 3
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.set_epoch(1, start=2)
    assert list(sampler) == full[2:]
    sampler.set_epoch(2)
    assert list(sampler) != full
    assert sorted(i for b in full for i in b) == sorted(set(i for b in full for i in b))


def test_augmentation_depends_on_epoch_and_index_only(dataset):
    from edgedistill.data.manifest import load_manifest
    from edgedistill.data.transforms import Render, student_train_transform
    paths = [e.image for e in load_manifest(dataset["train"]).entries]
    ds = TrainImages(paths, Render(32, (0.5,) * 3, (0.5,) * 3), seed=0)
    a = ds[3][1]
    torch.rand(5)  # global RNG use in between changes nothing
    assert torch.equal(ds[3][1], a)
    ds.epoch = 1
    assert not torch.equal(ds[3][1], a)
    # the view is the one torchvision's transforms give under torch.manual_seed(seed_of(seed, epoch, index)):
    # seeding the CPU generator alone draws the same augmentation
    from edgedistill.data.images import open_image
    from edgedistill.core.hashing import seed_of
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed_of(0, 1, 3))
        reference = student_train_transform(32, [0.5] * 3, [0.5] * 3)
        assert torch.equal(reference(open_image(paths[3])), ds[3][1])


def test_consistent_teacher_sees_the_students_view(dataset):
    """An online consistent teacher gets the same crop as the student, at its own size and normalisation; the
    clean teacher gets its centre crop whatever the view."""
    from edgedistill.data.manifest import load_manifest
    from edgedistill.data.transforms import Render
    paths = [e.image for e in load_manifest(dataset["train"]).entries]
    student, teacher = Render(32, (0.5,) * 3, (0.5,) * 3), Render(48, (0.0,) * 3, (1.0,) * 3)
    ds = TrainImages(paths, student, seed=0, scale=(0.2, 0.4), hflip=True, teacher=teacher)
    _, s_view, t_view, k, why = ds[2]
    assert why is None and k == -1 and t_view.shape == (3, 48, 48)
    # the teacher's input, brought to the student's size and normalisation, is the student's view
    back = torch.nn.functional.interpolate(t_view[None], size=32, mode="bicubic", antialias=True)[0]
    assert torch.allclose((back - 0.5) / 0.5, s_view, atol=0.25)
    assert float(((back - 0.5) / 0.5 - s_view).abs().mean()) < 0.05
    clean = TrainImages(paths, student, seed=0, scale=(0.2, 0.4), teacher=lambda im: torch.ones(1))
    assert torch.equal(clean[2][2], torch.ones(1))
    ds.epoch = 1  # another epoch: another view for both
    assert not torch.equal(ds[2][2], t_view)


def test_stored_views_are_replayed(dataset):
    """With stored views, image i's epoch view is one of its stored boxes, k drawn from (seed, epoch, index)."""
    import numpy as np
    from edgedistill.data.images import open_image
    from edgedistill.data.manifest import load_manifest
    from edgedistill.data.transforms import Render, View, render_view
    paths = [e.image for e in load_manifest(dataset["train"]).entries]
    student = Render(32, (0.5,) * 3, (0.5,) * 3)
    stored = np.zeros((len(paths), 3, 5), dtype=np.float32)
    for k, box in enumerate(([0, 0, 32, 32, 0], [10, 5, 40, 50, 1], [20, 20, 44, 44, 0])):
        stored[:, k] = box
    ds = TrainImages(paths, student, seed=3, stored=stored)
    seen = set()
    for epoch in range(40):
        ds.epoch = epoch
        index, view, _, k, _ = ds[4]
        assert 0 <= k < 3
        seen.add(k)
        assert torch.equal(view, render_view(open_image(paths[4]), View.from_row(stored[4, k]), student))
        assert ds[4][3] == k  # the same draw again
    assert seen == {0, 1, 2}
    stored[5, 1] = np.nan
    with pytest.raises(ValueError):
        View.from_row(stored[5, 1])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    f = cosine_schedule(100, 10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5, abs=0.02) and f(100) == pytest.approx(0.0)


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_resumes(tiny_teacher, dataset, tmp_path):
    import signal
    import time
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name="ctrlc",
                             train={"epochs": 40, "checkpoint_every": 1000}, data={"workers": 1})
    proc = subprocess.Popen([sys.executable, "-m", "edgedistill", "distill", str(recipe)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group, workers too
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "add --resume" in err and "Traceback" not in err
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert 3 <= ckpt["state"]["step"] < 200  # saved at the step it stopped, not at a checkpoint interval
    resumed = run_subprocess("distill", str(recipe), "--resume", "train.epochs=" + str(ckpt["state"]["epoch"] + 1))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 5 * (ckpt["state"]["epoch"] + 1)


@pytest.mark.slow
def test_the_student_moves_towards_the_teacher(tiny_teacher, dataset, tmp_path):
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name="learns",
                             train={"epochs": 6, "lr": 0.003, "warmup_steps": 0},
                             loss={"terms": ["feature", "similarity", "contrastive"], "balancer": "static"})
    assert main(["distill", str(recipe)]) == 0
    evals = [json.loads(x)["eval"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 6
    # Held-out images: the student's distance to the teacher (1 - cosine) shrinks as training goes on.
    first, last = 1 - evals[0]["cosine_to_teacher"], 1 - evals[-1]["cosine_to_teacher"]
    assert last < 0.5 * first, (first, last)
    losses = [json.loads(x)["terms"]["feature"] for x in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_images_without_captions_train_on_image_terms_only(tiny_teacher, tmp_path):
    from tests.conftest import write_images
    images = write_images(tmp_path / "data" / "images", 24)
    val_images = write_images(tmp_path / "data" / "val", 8, seed=3)
    for name, files in (("train", images), ("val", val_images)):
        with open(tmp_path / "data" / f"{name}.jsonl", "w") as f:
            for img in files:
                f.write(json.dumps({"image": str(img)}) + "\n")
    data = {"train": tmp_path / "data" / "train.jsonl", "val": tmp_path / "data" / "val.jsonl"}
    recipe, out = recipe_for(tmp_path, tiny_teacher, data, name="nocaptions", train={"epochs": 1})
    assert main(["distill", str(recipe)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher"] == {} and summary["retention"] is None
    assert 0 < summary["student"]["cosine_to_teacher"] <= 1 and "rsum" not in summary["student"]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(first["terms"]) == {"feature", "similarity", "relation", "contrastive", "hard_negative"}  # no clip


@pytest.mark.slow
def test_vl_align_ranks_against_a_bank_of_training_captions(tiny_teacher, dataset, tmp_path, monkeypatch):
    from edgedistill.distill.losses.alignment import VLAlignLoss
    banks = []
    original = VLAlignLoss.__init__

    def spy(self, options, context):
        banks.append(context.text_bank)
        original(self, options, context)

    monkeypatch.setattr(VLAlignLoss, "__init__", spy)
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name="vlalign", train={"epochs": 1},
                             loss={"terms": {"vl_align": {"k": 8, "bank_size": 50}, "image_contrastive": {}}})
    assert main(["distill", str(recipe)]) == 0
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(first["terms"]) == {"vl_align", "image_contrastive"} and first["terms"]["vl_align"] > 0
    assert banks[0].shape == (50, 32)  # 50 of the 80 training captions, at the teacher's width


def test_an_out_that_cannot_be_the_run_directory_fails_before_any_work(tiny_teacher, dataset, tmp_path,
                                                                      unwritable_dir, capsys):
    recipe, _ = recipe_for(tmp_path, tiny_teacher, dataset)
    for out, message in ((dataset["train"], "is a file, not a folder"),
                         (dataset["train"] / "run", "a part of that path is a file"),
                         (unwritable_dir / "run", "cannot be written")):
        assert main(["distill", str(recipe), f"out={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # refused before the teacher cache was built


@pytest.mark.slow
def test_eval_of_a_student_with_non_finite_weights_exits_2(tiny_teacher, dataset, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, train={"epochs": 1})
    assert main(["distill", str(recipe)]) == 0
    weights = out / "student" / "open_clip_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k, v in state.items() if k.startswith("visual.") and v.is_floating_point())
    state[key][...] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    assert main(["eval", str(out)]) == 2
    assert "does not match the sha256 recorded" in capsys.readouterr().err
    cfg = out / "student" / "open_clip_config.json"
    doc = json.loads(cfg.read_text())
    del doc["edgedistill"]["weights_sha256"]
    cfg.write_text(json.dumps(doc))
    assert main(["eval", str(out)]) == 2
    assert f"{key}); the training diverged or the file is damaged" in capsys.readouterr().err


@pytest.mark.slow
def test_clipkd_terms_train_with_the_teachers_scale_and_a_learned_icl_scale(tiny_teacher, dataset, tmp_path,
                                                                           monkeypatch):
    from edgedistill.distill.losses.clipkd import LogitKLLoss
    scales = []
    original = LogitKLLoss.__init__

    def spy(self, options, context):
        original(self, options, context)
        scales.append(self.teacher_scale)

    monkeypatch.setattr(LogitKLLoss, "__init__", spy)
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, name="clipkd", train={"epochs": 1},
                             loss={"terms": {"clip": {}, "logit_kl": {}, "icl": {},
                                             "feature": {"distance": "mse", "reduction": "mean", "weight": 2000}},
                                   "balancer": "coverage"})
    assert main(["distill", str(recipe)]) == 0
    teacher = torch.load(tiny_teacher[1], weights_only=True)
    assert scales == [pytest.approx(teacher["logit_scale"].exp().item())]  # the teacher's own logit scale
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(first["terms"]) == {"clip", "logit_kl", "icl", "feature"}
    # icl's scale joined the optimizer: it moved from log(1 / 0.07) and is saved with the run
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["losses"]
    assert state["icl.log_scale"].item() != pytest.approx(math.log(1 / 0.07), abs=1e-6)


@pytest.mark.slow
def test_caption_rank_trains_on_a_bank_of_training_captions_with_mostly_uncaptioned_images(tiny_teacher, tmp_path,
                                                                                            monkeypatch):
    from tests.conftest import captions_for, write_images, write_manifest
    from edgedistill.distill.losses.ranking import CaptionRankLoss
    images = write_images(tmp_path / "data" / "images", 32)
    with open(tmp_path / "data" / "train.jsonl", "w") as f:  # 4 of 32 images captioned (2 captions each)
        for i, img in enumerate(images):
            f.write(json.dumps({"image": str(img), **({"captions": captions_for(i)} if i % 8 == 0 else {})}) + "\n")
    val = write_manifest(tmp_path / "data" / "val.jsonl", write_images(tmp_path / "data" / "val_images", 12, seed=1))
    banks, seen = [], []
    original_init, original_forward = CaptionRankLoss.__init__, CaptionRankLoss.forward

    def spy_init(self, options, context):
        banks.append(context.text_bank)
        original_init(self, options, context)

    def spy_forward(self, e):
        out = original_forward(self, e)
        seen.append((0 if e.teacher_text is None else e.teacher_text.shape[0], e.student_image.shape[0], out))
        return out

    monkeypatch.setattr(CaptionRankLoss, "__init__", spy_init)
    monkeypatch.setattr(CaptionRankLoss, "forward", spy_forward)
    recipe, out = recipe_for(tmp_path, tiny_teacher, {"train": tmp_path / "data" / "train.jsonl", "val": val},
                             name="captionrank", train={"epochs": 4, "lr": 0.003, "warmup_steps": 0},
                             loss={"terms": {"caption_rank": {"temperature": 0.05}}, "balancer": "static"})
    assert main(["distill", str(recipe)]) == 0
    assert banks[0].shape == (8, 32) and torch.isfinite(banks[0]).all()  # all 8 training captions, teacher width
    # every step ran on every image, batches without any caption included (the term needs no pairs)
    assert len(seen) == 16 and all(value is not None and b == 8 for _, b, value in seen)
    assert any(p == 0 for p, _, _ in seen)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [x["terms"]["caption_rank"] for x in lines if "loss" in x]
    assert set(next(x for x in lines if "loss" in x)["terms"]) == {"caption_rank"} and losses[0] > 0
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4]), losses  # the student learns the teacher's caption ranking


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["cached", "online"])
def test_consistent_teacher_trains_on_the_view_the_student_sees(tiny_teacher, dataset, tmp_path, monkeypatch,
                                                                 teacher):
    """train.teacher_view consistent: cached reads the stored views' embeddings (the clean ones are never
    looked up), online embeds the student's own view; both train."""
    from edgedistill.distill.cache import FeatureCache
    from edgedistill.distill.views import ReinforcedViews
    looked_up = {"clean": 0, "views": 0}
    clean_lookup, view_lookup = FeatureCache.image_features, ReinforcedViews.features
    monkeypatch.setattr(FeatureCache, "image_features",
                        lambda self, i: looked_up.__setitem__("clean", looked_up["clean"] + (self.n_images == 40))
                        or clean_lookup(self, i))  # the training images' (40) clean embeddings; val's are 12
    monkeypatch.setattr(ReinforcedViews, "features",
                        lambda self, i, k: looked_up.__setitem__("views", looked_up["views"] + 1)
                        or view_lookup(self, i, k))
    recipe, out = recipe_for(tmp_path, tiny_teacher, dataset, train={"teacher": teacher, "teacher_view": "consistent",
                                                                     "epochs": 1},
                             cache={"views": 2}, loss={"terms": ["feature", "clip"]})
    assert main(["distill", str(recipe)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 5 and math.isfinite(summary["student"]["rsum"])
    stores = [p for p in (tmp_path / "cache").glob("*__views2-*") if p.is_dir()]
    if teacher == "cached":
        assert looked_up == {"clean": 0, "views": 5} and len(stores) == 1
    else:
        assert looked_up["views"] == 0 and not stores
