"""benchmarks/quality.py's plan: equal budgets and looks, the runs of each cell, saved runs and convergence."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks import quality as q


def paths(tmp_path: Path) -> dict[str, Path]:
    return {"teacher_json": tmp_path / "t.json", "teacher_pt": tmp_path / "t.pt", "selection": tmp_path / "sel.jsonl",
            "pairs_only": tmp_path / "pairs.jsonl", "transfer": tmp_path / "transfer"}


# The full plan on every training image: these tests' manifests are names, not files to take every 5th line of.
ALL_IMAGES = replace(q.PLANS["full"], subset=1)


def value(overrides: list[str], key: str) -> str:
    return next(o.split("=", 1)[1] for o in overrides if o.startswith(key + "="))


def test_every_method_sees_the_same_images_and_looks_at_selection_as_often(tmp_path):
    plan = ALL_IMAGES
    runs = [q.Run("transfer", m, 0, plan.budget["transfer"]) for m in (*q.DECIDING, *q.SIDE)]
    seen = set()
    for run in runs:
        _, ov = q.overrides_for(run, paths(tmp_path), plan, tmp_path / "out", tmp_path / "cache")
        steps, every = int(value(ov, "train.max_steps")), int(value(ov, "train.eval_every"))
        seen.add((steps * int(value(ov, "data.batch_size")), steps // every))
        assert value(ov, "data.val") == str(tmp_path / "sel.jsonl")  # checkpoints on the selection split
        assert int(value(ov, "train.epochs")) * 31 > steps  # supervised's 2,000 pairs cannot end the run early
    assert seen == {(plan.budget["transfer"] * q.BATCH, plan.looks)}
    _, ov = q.overrides_for(q.Run("transfer", f"{q.DEFAULT_METHOD}:consistent", 0, 2400), paths(tmp_path), plan,
                            tmp_path, tmp_path)
    assert "train.teacher_view=consistent" in ov and "loss.balancer=coverage" in ov
    with pytest.raises(ValueError, match="equal looks"):
        q.overrides_for(q.Run("transfer", "feature", 0, 2401), paths(tmp_path), plan, tmp_path, tmp_path)


def test_runs_of_the_plan():
    plan = q.Plan(budget={"transfer": 120, "compression": 240}, seeds=(0, 1, 2, 3, 4), side_seeds=(0, 1, 2),
                  half_seeds=(0, 1), looks=6, selector_budget=0.25, pull_steps=10, subset=1)
    runs = q.runs_of(["transfer", "compression"], ["supervised", q.DEFAULT_METHOD, q.SIDE[0], "clipkd", "optima"],
                     ["compression"], plan)
    def count(**kw):
        return sum(all(getattr(r, k) == v for k, v in kw.items()) for r in runs)
    assert count(track="transfer", method="supervised", steps=120) == 5  # deciding: 5 seeds
    assert count(track="transfer", method=q.SIDE[0]) == 3                # side: 3 seeds
    assert count(track="transfer", method="clipkd") == 3                 # a challenger: 3 seeds, no B/2 run
    assert q.DECIDING == ("supervised", "feature", q.DEFAULT_METHOD)      # the deciding cells of the plan
    assert count(track="transfer", method="supervised", steps=60) == 2   # B/2 runs of the convergence check
    assert count(track="transfer", method="optima") == 0 and count(track="compression", method="optima") == 3
    assert {r.steps for r in runs if r.method == "optima"} == {60}       # a quarter of 240, in whole looks
    assert len({r.name for r in runs}) == len(runs)


def test_a_saved_run_is_reused_only_with_the_same_overrides(tmp_path):
    run = q.Run("transfer", "feature", 3, 60)
    hits = {"scoring": {"i2t": np.ones((5, 3), bool), "t2i": np.zeros((15, 3), bool), "teacher_rsum": 512.5,
                        "ks": (1, 5, 10)}}
    q.save_run(tmp_path, run, ["a=1"], {"seed": 3, "selection_share": 0.9}, hits)
    row, back = q.load_run(tmp_path, run, ["a=1"])
    assert row == {"seed": 3, "selection_share": 0.9}
    assert back["scoring"]["teacher_rsum"] == 512.5 and back["scoring"]["ks"] == (1, 5, 10)
    assert np.array_equal(back["scoring"]["i2t"], hits["scoring"]["i2t"]) and back["scoring"]["i2t"].dtype == bool
    assert q.load_run(tmp_path, run, ["a=2"]) is None  # other settings: run again
    (tmp_path / f"{run.name}.npz").write_bytes(b"not a zip")
    assert q.load_run(tmp_path, run, ["a=1"]) is None  # damaged: run again
    assert json.loads((tmp_path / f"{run.name}.json").read_text())["overrides"] == ["a=1"]


def test_convergence_pairs_the_budgets_by_seed():
    plan = q.Plan(budget={"transfer": 100}, seeds=(0, 1, 2), side_seeds=(0,), half_seeds=(0, 1, 2), looks=5,
                  selector_budget=0.5, pull_steps=10, subset=1, converge=("feature", "supervised"))
    rows = [{"track": "transfer", "method": "feature", "seed": s, "steps": 100, "selection_share": v}
            for s, v in enumerate((0.90, 0.92, 0.94))]
    rows += [{"track": "transfer", "method": "feature", "seed": s, "steps": 50, "selection_share": v}
             for s, v in enumerate((0.895, 0.925, 0.93))]
    rows += [{"track": "transfer", "method": "supervised", "seed": s, "steps": b, "selection_share": v}
             for s in range(3) for b, v in ((100, 0.8 + s / 1000), (50, 0.7))]
    checks = {c["method"]: c for c in q.convergence(rows, plan)}
    assert checks["feature"]["converged"] and checks["feature"]["difference"] == pytest.approx(0.01 / 3)
    assert not checks["supervised"]["converged"] and "seed spread" in checks["supervised"]["reason"]
    assert "| transfer | feature | 100 (6,400) | 3 |" in q.convergence_markdown(list(checks.values()))


def test_every_benchmark_recipe_decodes_the_scenes_once(tmp_path):
    """The scenes recipes keep the decoded images in memory (the same training, tested in test_in_memory.py)."""
    from edgedistill.distill.recipe import load_recipe
    plan = ALL_IMAGES
    for method in (*q.DECIDING, *q.SIDE, *q.SELECTORS):
        recipe_path, ov = q.overrides_for(q.Run("compression", method, 0, plan.budget["compression"]),
                                          paths(tmp_path), plan, tmp_path / "out", tmp_path)
        assert load_recipe(recipe_path, ov).data.in_memory, method


def test_held_out_splits_are_disjoint_cuts_of_val(tmp_path):
    lines = [json.dumps({"image": f"images/val/{i:05d}.jpg", "captions": [f"c{i}"]}) for i in range(11000)]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    held = q.held_out_splits(tmp_path / "val.jsonl")
    parts = {k: v.read_text().splitlines() for k, v in held.items()}
    assert [len(parts[k]) for k in ("teacher_val", "selection", "scoring")] == [1000, 5000, 5000]
    assert not set(parts["scoring"]) & (set(parts["selection"]) | set(parts["teacher_val"]))
    # new scenes in val.jsonl: the splits follow them (a split kept from other scenes would score the wrong ones)
    (tmp_path / "val.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    assert q.held_out_splits(tmp_path / "val.jsonl")["scoring"].read_text().splitlines() == lines[::-1][6000:]
    (tmp_path / "val.jsonl").write_text("\n".join(lines[:10999]) + "\n")
    with pytest.raises(SystemExit, match="held-out splits need 11000"):
        q.held_out_splits(tmp_path / "val.jsonl")


def test_caption_rank_temperature_runs(tmp_path):
    run = q.Run("transfer", "caption_rank@0.1", 1, 60)
    assert run.base == "caption_rank" and run.temperature == 0.1 and run.name == "transfer-caption_rank-t0.1-B60-s1"
    _, ov = q.overrides_for(run, paths(tmp_path), ALL_IMAGES, tmp_path, tmp_path)
    assert "loss.terms.caption_rank.temperature=0.1" in ov
    with pytest.raises(ValueError, match="caption_rank's"):
        q.overrides_for(q.Run("transfer", "feature@0.1", 1, 60), paths(tmp_path), ALL_IMAGES, tmp_path,
                        tmp_path)
    from edgedistill.distill.recipe import load_recipe
    recipe_path, ov = q.overrides_for(run, paths(tmp_path), ALL_IMAGES, tmp_path / "out", tmp_path)
    assert load_recipe(recipe_path, ov).loss.terms["caption_rank"].temperature == 0.1


def test_record_judges_the_full_budget_runs_and_prints_convergence(monkeypatch, capsys):
    """record(): the full-budget runs make the table (each method against the default, paired by seed), the
    budget-B/2 runs only the convergence lines; nothing is written with record_it False."""
    plan = q.Plan(budget={"compression": 120}, seeds=(0, 1), side_seeds=(0, 1), half_seeds=(0, 1), looks=6,
                  selector_budget=0.5, pull_steps=10, subset=1, converge=("supervised", q.DEFAULT_METHOD))
    rng = np.random.default_rng(0)
    rows, hits = [], {}
    for method, p in (("supervised", 0.5), (q.DEFAULT_METHOD, 0.8)):
        for seed in (0, 1):
            for steps in (120, 60):
                rows.append({"track": "compression", "method": method, "seed": seed, "steps": steps,
                             "selection_share": p + seed / 100 + (steps == 60) / 1000,
                             "scoring_rsum_share": p, "run_s": 1.0})
                hits[("compression", method, seed, "full" if steps == 120 else "half")] = {
                    "scoring": {"i2t": rng.random((300, 3)) < p, "t2i": rng.random((900, 3)) < p,
                                "teacher_rsum": 500.0, "ks": (1, 5, 10)}}
    monkeypatch.setattr(q, "report", lambda *a, **k: None)
    text = q.record({"date": "x"}, rows, hits, plan, record_it=False)
    table = [line for line in text.splitlines() if line.startswith("| compression |")]
    assert len(table) == 6  # 2 table lines (full budget) + 2 of the B/2 runs + 2 convergence lines
    assert "below the default" in table[0] and "| default |" in table[1]
    # the B/2 runs are cells of their own, judged against the default at B
    assert "| supervised (pairs only), B/2 | 2 |" in table[2] and "below the default" in table[2]
    assert f"| {q.LABELS[q.DEFAULT_METHOD]}, B/2 | 2 |" in table[3]
    assert "| 120 (7,680) | 2 |" in text and "yes" in text.split("Convergence")[1]


def test_record_under_another_name_leaves_the_default_record_alone(monkeypatch, tmp_path):
    """--record NAME: the rows, the table and the hits go to NAME's files, so a run of one track does not
    overwrite the table another run recorded."""
    plan = q.Plan(budget={"transfer": 60}, seeds=(0, 1), side_seeds=(0, 1), half_seeds=(), looks=6,
                  selector_budget=0.5, pull_steps=10, subset=1, converge=())
    rng = np.random.default_rng(1)
    rows, hits, reported = [], {}, []
    for method, p in (("supervised", 0.5), (q.DEFAULT_METHOD, 0.8)):
        for seed in (0, 1):
            rows.append({"track": "transfer", "method": method, "seed": seed, "steps": 60,
                         "selection_share": p, "scoring_rsum_share": p, "run_s": 1.0})
            hits[("transfer", method, seed, "full")] = {
                "scoring": {"i2t": rng.random((300, 3)) < p, "t2i": rng.random((900, 3)) < p,
                            "teacher_rsum": 500.0, "ks": (1, 5, 10)}}
    monkeypatch.setattr(q, "report", lambda row, name, record: reported.append((name, record)))
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    text = q.record({"date": "x"}, rows, hits, plan, record_it=True, name="quality_runs_transfer")
    assert "from the best, on the transfer track (cells past convergence only): dsmd+coverage" in text
    assert {name for name, _ in reported} == {"quality_runs_transfer"} and len(reported) == 4
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["quality_runs_transfer_last.json", "quality_runs_transfer_last.md",
                       "quality_runs_transfer_last_hits"]
    assert json.loads((tmp_path / "quality_runs_transfer_last.json").read_text())["cells"]


def test_record_compares_the_selectors_among_themselves(monkeypatch, tmp_path):
    """The selector cells (a fraction of the budget, so not the track's B) are in the table against the default
    and, pair by pair, against each other: printed and recorded in the results file."""
    plan = q.Plan(budget={"compression": 120}, seeds=(0, 1), side_seeds=(0, 1, 2), half_seeds=(), looks=6,
                  selector_budget=0.5, pull_steps=10, subset=1, converge=())
    rng = np.random.default_rng(2)
    rows, hits = [], {}
    for method, p, steps in (("optima", 0.8, 60), ("uniform", 0.8, 60), ("random", 0.4, 60)):
        for seed in (0, 1, 2):
            rows.append({"track": "compression", "method": method, "seed": seed, "steps": steps,
                         "selection_share": p, "scoring_rsum_share": p, "run_s": 1.0})
            hits[("compression", method, seed, "full")] = {
                "scoring": {"i2t": rng.random((300, 3)) < p, "t2i": rng.random((900, 3)) < p,
                            "teacher_rsum": 500.0, "ks": (1, 5, 10)}}
    monkeypatch.setattr(q, "report", lambda *a, **k: None)
    monkeypatch.setattr(q, "RESULTS", tmp_path)
    text = q.record({"date": "x"}, rows, hits, plan, record_it=True, name="sel")
    part = text.split("Selectors among themselves")[1]
    assert "Convergence" not in text  # no B/2 runs: no empty convergence table
    assert "0.5 of the track's budget" in part and part.count("| compression |") == 3
    assert "layerwise + OPTIMA beats layerwise + random" in part
    assert "layerwise + uniform beats layerwise + random" in part
    recorded = json.loads((tmp_path / "sel_last.json").read_text())["selectors"]
    assert [(r["a"], r["b"]) for r in recorded] == [("optima", "uniform"), ("optima", "random"), ("uniform", "random")]
    assert recorded[0]["verdict"] == "no difference shown" and recorded[1]["ci95"][0] > 0 and recorded[1]["seeds"] == 3


def test_plan_overrides_from_the_command_line():
    import argparse
    args = argparse.Namespace(quick=False, budget="compression=900", seeds="0,1", side_seeds=None, half_seeds="",
                              subset=5, converge="supervised")
    plan = q.plan_of(args)
    assert plan.budget == {"transfer": 3000, "compression": 900} and plan.seeds == (0, 1)
    assert plan.side_seeds == q.PLANS["full"].side_seeds and plan.half_seeds == () and plan.subset == 5
    assert plan.converge == ("supervised",)
    assert q.plan_of(argparse.Namespace(**{**vars(args), "budget": "600", "converge": None})).budget == \
        {"transfer": 600, "compression": 600}


def test_a_jobs_child_runs_the_parents_plan_without_jobs():
    cmd = q.child_command(["--work", "w", "--jobs", "2", "--seeds", "0,1", "--jobs=3"], "compression-feature-B6-s0")
    assert cmd[1].endswith("quality.py")
    assert cmd[2:] == ["--work", "w", "--seeds", "0,1", "--only", "compression-feature-B6-s0", "--no-record"]


def test_run_parallel_shares_the_cores_and_reports_failed_runs(tmp_path, monkeypatch):
    runs = [q.Run("compression", m, s, 6) for m in ("feature", "supervised") for s in (0, 1)]
    script = ("import os, sys; open(sys.argv[1], 'w').write(os.environ['OMP_NUM_THREADS']); "
              "sys.exit(3 if 'supervised-B6-s1' in sys.argv[1] else 0)")
    monkeypatch.setattr(q, "child_command", lambda argv, name: [q.sys.executable, "-c", script,
                                                                str(tmp_path / f"{name}.threads")])
    monkeypatch.setattr(q.os, "cpu_count", lambda: 4)
    printed = []
    console = type("C", (), {"print": lambda self, text, **kw: printed.append(text)})()
    failed = q.run_parallel(runs, 2, [], tmp_path / "logs", console)
    assert failed == ["compression-supervised-B6-s1"]
    assert {p.read_text() for p in tmp_path.glob("*.threads")} == {"2"} and len(list(tmp_path.glob("*.threads"))) == 4
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == sorted(f"{r.name}.log" for r in runs)
    assert len(printed) == 4 and any("failed (exit 3" in line for line in printed)


@pytest.mark.parametrize("bad", ["../x", "a/b", "", "runs.csv"])
def test_a_record_name_that_is_not_a_file_stem_is_refused(monkeypatch, capsys, bad):
    monkeypatch.setattr(sys, "argv", ["quality.py", "--record", bad])
    with pytest.raises(SystemExit) as e:
        q.parse()
    assert e.value.code == 2 and "--record is a file name stem" in capsys.readouterr().err


def test_the_quick_plan_scores_on_every_fifth_held_out_scene_and_the_full_plan_on_all(tmp_path):
    lines = [json.dumps({"image": f"images/val/{i:05d}.jpg", "captions": [f"c{i}"]}) for i in range(11000)]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    held = q.held_out_splits(tmp_path / "val.jsonl")
    assert q.held_out_of(q.PLANS["full"], held) == held
    quick = q.held_out_of(q.PLANS["quick"], held)
    assert quick["teacher_val"] == held["teacher_val"]
    for split in ("selection", "scoring"):
        assert quick[split].read_text().splitlines() == held[split].read_text().splitlines()[::5]
    (tmp_path / "transfer").mkdir()
    (tmp_path / "transfer" / "train.jsonl").write_text("\n".join(lines[:50]) + "\n")
    _, ov = q.overrides_for(q.Run("transfer", "feature", 0, 160), {**paths(tmp_path), **quick}, q.PLANS["quick"],
                            tmp_path, tmp_path)
    assert value(ov, "data.val") == str(quick["selection"])
    assert len(Path(value(ov, "data.train")).read_text().splitlines()) == 10  # every fifth training scene too


def test_the_full_plan_is_the_protocol_of_the_recorded_tables():
    """`quality.py --work data` without overrides runs what the tables of record ran on each track: its budget,
    training subset and looks (so their runs restore into it)."""
    full = q.PLANS["full"]
    for track in ("transfer", "compression"):
        stamp = json.loads((q.RESULTS / f"quality_runs_{track}_last.json").read_text())["stamp"]
        plan = json.loads(stamp["plan"])
        assert plan["budget"][track] == full.budget[track], track
        assert (plan["subset"], plan["looks"], plan["seeds"]) == (full.subset, full.looks, list(full.seeds)), track


def test_the_closing_line_names_the_tracks_it_judged():
    assert "on every track (cells past convergence only): none" in q.winners_line([], ["transfer", "compression"])
    assert "on the compression track (cells past convergence only): feature" in \
        q.winners_line(["feature"], ["compression"])
