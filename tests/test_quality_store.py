"""benchmarks/quality_store.py: restoring a recorded benchmark's runs into an empty store, only under the same
conditions, and only while the run trained again as the check gives its recorded results."""

import json
import sys

import numpy as np
import pytest

from benchmarks import quality as q
from benchmarks import quality_store as qs

PLAN = q.Plan(budget={"transfer": 60}, seeds=(0, 1), side_seeds=(0, 1), half_seeds=(0, 1), looks=6,
              selector_budget=0.5, pull_steps=10, subset=5, converge=("supervised", q.DEFAULT_METHOD))
IDENTITY = {"machine": "CPU X", "torch": "2.9", "n": 100, "captioned": 10, "teacher_held_out": '{"rsum": 500.0}',
            "plan": PLAN.__dict__}


def overrides(run):
    return [f"seed={run.seed}", f"steps={run.steps}"]


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """A benchmark recorded by quality.record (2 methods x 2 seeds x B and B/2) in tmp_path/results."""
    rng = np.random.default_rng(0)
    rows, hits = [], {}
    for method, p in (("supervised", 0.5), (q.DEFAULT_METHOD, 0.8)):
        for seed in (0, 1):
            for steps in (60, 30):
                rows.append({"track": "transfer", "method": method, "seed": seed, "steps": steps,
                             "selection_share": p + seed / 100, "scoring_rsum_share": p, "run_s": 1.0,
                             "train_s": 0.5, "threads": 1})
                hits[("transfer", method, seed, "full" if steps == 60 else "half")] = {
                    "scoring": {"i2t": rng.random((40, 3)) < p, "t2i": rng.random((120, 3)) < p,
                                "teacher_rsum": 500.0, "ks": (1, 5, 10)}}
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(q, "report", lambda *a, **k: None)
    monkeypatch.setattr(q, "RESULTS", results)
    stamp = {**IDENTITY, "plan": json.dumps(PLAN.__dict__)}
    q.record(stamp, rows, hits, PLAN, record_it=True, name="rec")
    return results / "rec_last.json", rows, hits


def runs():
    return q.runs_of(["transfer"], ["supervised", q.DEFAULT_METHOD], [], PLAN)


def test_restore_puts_every_recorded_run_back_but_the_check(recorded, tmp_path):
    results_json, rows, hits = recorded
    store = tmp_path / "store"
    restored = qs.restore(store, results_json, runs(), overrides, IDENTITY)
    assert len(restored.runs) == 7 and restored.check == q.Run("transfer", "supervised", 0, 30).name
    for run in runs():
        saved = qs.load_run(store, run, overrides(run))
        if run.name == restored.check:
            assert saved is None  # trained again
            continue
        row, back = saved
        i = next(k for k, r in enumerate(rows) if (r["method"], r["seed"], r["steps"]) ==
                 (run.method, run.seed, run.steps))
        assert row == rows[i]
        budget = "full" if run.steps == 60 else "half"
        original = hits[("transfer", run.method, run.seed, budget)]["scoring"]
        assert np.array_equal(back["scoring"]["i2t"], original["i2t"])
        assert np.array_equal(back["scoring"]["t2i"], original["t2i"])
        assert back["scoring"]["teacher_rsum"] == 500.0 and back["scoring"]["ks"] == (1, 5, 10)
    expected_row, _ = restored.expected
    assert (expected_row["method"], expected_row["seed"], expected_row["steps"]) == ("supervised", 0, 30)


def test_runs_already_in_the_store_are_left_alone(recorded, tmp_path):
    results_json, _, _ = recorded
    store = tmp_path / "store"
    mine = q.Run("transfer", q.DEFAULT_METHOD, 1, 60)
    qs.save_run(store, mine, overrides(mine), {"mine": True}, {})
    restored = qs.restore(store, results_json, runs(), overrides, IDENTITY)
    assert mine.name not in restored.runs and len(restored.runs) == 6
    assert qs.load_run(store, mine, overrides(mine))[0] == {"mine": True}


@pytest.mark.parametrize("field, other", [("machine", "CPU Y"), ("torch", "2.8"), ("n", 200),
                                          ("teacher_held_out", '{"rsum": 499.9}'), ("plan", {**PLAN.__dict__,
                                                                                           "looks": 5})])
def test_a_record_made_under_other_conditions_is_not_restored(recorded, tmp_path, field, other):
    results_json, _, _ = recorded
    with pytest.raises(ValueError, match="cannot be restored here: its (plan's )?" + ("looks" if field == "plan"
                                                                                      else field)):
        qs.restore(tmp_path / "store", results_json, runs(), overrides, {**IDENTITY, field: other})
    assert not (tmp_path / "store").exists()


def test_a_record_from_before_held_out_every_was_a_plan_field_had_it_at_1(recorded, tmp_path):
    results_json, _, _ = recorded
    data = json.loads(results_json.read_text())
    plan = json.loads(data["stamp"]["plan"])
    del plan["held_out_every"]
    data["stamp"]["plan"] = json.dumps(plan)
    results_json.write_text(json.dumps(data))
    assert len(qs.restore(tmp_path / "store", results_json, runs(), overrides, IDENTITY).runs) == 7
    quick = {**IDENTITY, "plan": {**PLAN.__dict__, "held_out_every": 5}}
    with pytest.raises(ValueError, match="held_out_every is 1, here 5"):
        qs.restore(tmp_path / "store2", results_json, runs(), overrides, quick)


def test_the_check_keeps_or_removes_the_restored_runs(recorded, tmp_path):
    results_json, _, _ = recorded
    store = tmp_path / "store"
    restored = qs.restore(store, results_json, runs(), overrides, IDENTITY)
    row, hits = restored.expected
    qs.check_restored(store, restored, ({**row, "run_s": 99.0, "train_s": 98.0}, hits))  # timings may differ
    assert len(list(store.glob("*.json"))) == 7
    flipped = {s: {**h, "i2t": ~h["i2t"]} for s, h in hits.items()}
    for fresh in (({**row, "scoring_rsum_share": 0.51}, hits), (row, flipped)):
        with pytest.raises(ValueError, match="differs from its record"):
            qs.check_restored(store, restored, fresh)
        assert list(store.iterdir()) == []  # every restored run removed
        restored = qs.restore(store, results_json, runs(), overrides, IDENTITY)


def test_restored_rows_are_not_appended_to_the_csv_again(monkeypatch):
    reported = []
    monkeypatch.setattr(q, "report", lambda row, name, record: reported.append((row["method"], row["seed"])))
    rows = [{"track": "transfer", "method": m, "seed": s, "steps": 60, "selection_share": 0.5,
             "scoring_rsum_share": 0.5, "run_s": 1.0} for m in ("supervised", q.DEFAULT_METHOD) for s in (0, 1)]
    q.record({}, rows, {}, PLAN, record_it=False, skip_csv=[q.Run("transfer", "supervised", 1, 60).name])
    assert sorted(reported) == sorted([("supervised", 0), (q.DEFAULT_METHOD, 0), (q.DEFAULT_METHOD, 1)])


@pytest.mark.parametrize("bad", ["no_such_record", "../quality_runs", ""])
def test_restore_names_a_recorded_benchmark(monkeypatch, capsys, bad):
    monkeypatch.setattr(sys, "argv", ["quality.py", "--restore", bad])
    with pytest.raises(SystemExit) as e:
        q.parse()
    assert e.value.code == 2 and "--restore names a recorded benchmark" in capsys.readouterr().err


class CountingTeacher:
    """A stand-in teacher: deterministic embeddings from the pixels and the caption text, calls counted."""

    def __init__(self):
        self.image_calls = 0

    @staticmethod
    def preprocess(image):
        import torch
        return torch.tensor(np.asarray(image.resize((8, 8)), dtype=np.float32)).flatten() / 255

    def embed_images(self, x):
        import torch
        self.image_calls += 1
        return torch.nn.functional.normalize(x[:, :16], dim=-1)

    def embed_texts(self, texts):
        import torch
        rows = [np.random.default_rng(sum(map(ord, t.split(" number ")[1][:-3]))).random(16) for t in texts]
        return torch.nn.functional.normalize(torch.tensor(np.stack(rows), dtype=torch.float32), dim=-1)


def test_the_teachers_scores_are_computed_once_and_read_by_every_process(tmp_path, monkeypatch):
    """--jobs children read the teacher's scores of a split from disk instead of embedding it again; a split
    whose content changed (same file name) is scored again."""
    from tests.conftest import write_images, write_manifest

    manifest = write_manifest(tmp_path / "split" / "scoring.jsonl", write_images(tmp_path / "split" / "img", 12))
    store = tmp_path / "teacher-scores"
    teacher = CountingTeacher()
    first = q.teacher_scores(teacher, manifest, None, store)
    assert teacher.image_calls == 1 and "hits" not in first and first["rsum"] > 0
    monkeypatch.setattr(q, "_TEACHER_SCORES", {})  # another process
    again = q.teacher_scores(teacher, manifest, None, store)
    assert teacher.image_calls == 1 and again == first
    write_manifest(manifest, write_images(tmp_path / "split" / "img2", 12, seed=5))  # other scenes, same name
    monkeypatch.setattr(q, "_TEACHER_SCORES", {})
    q.teacher_scores(teacher, manifest, None, store)
    assert teacher.image_calls == 2 and len(list(store.glob("scoring-*.json"))) == 2
