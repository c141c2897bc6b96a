"""Module selectors: a synthetic non-stationary bandit, posteriors, determinism, exact resume, recipe errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgedistill.core.errors import UserError
from edgedistill.distill.recipe import validate_recipe
from edgedistill.distill.select import SELECTORS, build_selector, validate_selector

ARMS = ["m0", "m1", "m2"]


def bandit(method: str, seed: int, steps: int = 400, switch: int = 300, **options) -> np.ndarray:
    """Arms with Gaussian rewards (std 0.02): means (0.05, 0.02, 0.0) until ``switch``, then (0.0, 0.02, 0.05): the
    best arm switches from 0 to 2. Returns the arm chosen at every pull."""
    sel = build_selector(validate_selector({"method": method, "pull_steps": 1, **options}), ARMS, seed=seed)
    rng = np.random.default_rng(1000 + seed)
    chosen = []
    for t in range(steps):
        arms = sel.active()
        assert len(arms) == 1
        sel.stepped(arms)
        assert sel.pull_done
        means = (0.05, 0.02, 0.0) if t < switch else (0.0, 0.02, 0.05)
        sel.observe(means[arms[0]] + rng.normal(0, 0.02))
        chosen.append(arms[0])
    return np.array(chosen)


@pytest.mark.slow
def test_windowed_sampler_follows_a_switch_that_unlimited_history_misses():
    after = slice(300 + 20, 400)  # 20 pulls to notice the switch
    optima = [np.mean(bandit("optima", s, window=10)[after] == 2) for s in range(5)]
    per_arm = [np.mean(bandit("optima", s, window=10, window_scope="arm")[after] == 2) for s in range(5)]
    thompson = [np.mean(bandit("thompson", s)[after] == 2) for s in range(5)]
    # Before the switch all find the best arm. The window of rounds pays for its forgetting: an arm with no pull in
    # the last 10 rounds is back at its prior N(0, 1), which beats rewards of a few hundredths about half the time,
    # so each other arm is tried again every few rounds (the best arm takes about 0.7 of the pulls, not 0.95).
    for method, opts, share in (("optima", {"window": 10}, 0.6), ("optima", {"window": 10, "window_scope": "arm"}, 0.8),
                                ("thompson", {}, 0.8)):
        assert np.mean([np.mean(bandit(method, s, **opts)[3:300] == 0) for s in range(3)]) > share, (method, opts)
    assert np.mean(optima) > 0.6 and min(optima) > 0.6, optima  # every seed follows the switch
    assert np.mean(per_arm) > 0.75, per_arm
    assert np.mean(thompson) < 0.35, thompson
    assert min(optima) > max(thompson) and min(per_arm) > max(thompson)


def test_every_arm_is_pulled_once_first_in_order():
    for method in ("optima", "thompson", "random"):
        assert list(bandit(method, 0, steps=3)) == [0, 1, 2]


def test_choices_depend_on_the_seed_only_and_resume_exactly():
    a, b = bandit("optima", 3, steps=60), bandit("optima", 3, steps=60)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, bandit("optima", 4, steps=60))
    # Stop after 25 pulls, restore the state into a fresh selector, go on: the same choices as without a stop.
    rewards = np.random.default_rng(0).normal(0, 0.03, size=60)

    def run(stop: int | None) -> list[int]:
        sel = build_selector({"method": "optima", "pull_steps": 2, "window": 4}, ARMS, seed=9)
        out = []
        for t in range(60):
            if t == stop:
                fresh = build_selector({"method": "optima", "pull_steps": 2, "window": 4}, ARMS, seed=9)
                fresh.load_state_dict(sel.state_dict())
                sel = fresh
            arm = sel.active()[0]
            sel.stepped([arm])
            if sel.pull_done:
                sel.observe(rewards[t] + 0.01 * arm)
            out.append(arm)
        return out

    whole = run(None)
    assert run(25) == whole and run(26) == whole  # mid-pull too


def test_pull_length_and_counts():
    sel = build_selector({"method": "random", "pull_steps": 3}, ARMS, seed=0)
    arms = []
    for _ in range(12):
        arm = sel.active()
        sel.stepped(arm)
        arms.append(arm[0])
        if sel.pull_done:
            sel.observe(0.1)
    assert arms[:9] == [0, 0, 0, 1, 1, 1, 2, 2, 2] and len(set(arms[9:])) == 1
    summary = sel.summary()
    assert summary["method"] == "random" and sum(summary["counts"].values()) == 4
    assert sum(summary["steps"].values()) == 12
    assert summary["mean_reward"][ARMS[arms[9]]] == pytest.approx(0.1)


def test_uniform_turns_every_module_on_every_step():
    sel = build_selector({"method": "uniform"}, ARMS)
    for _ in range(5):
        arms = sel.active()
        assert arms == [0, 1, 2]
        sel.stepped(arms)
        assert not sel.pull_done
    assert sel.summary()["counts"] == {"m0": 5, "m1": 5, "m2": 5} and sel.mean_reward() == {}
    assert not sel.needs_reward


def test_posterior_is_the_conjugate_gaussian_one_over_the_window():
    opts = {"prior_mean": 0.1, "prior_var": 0.5, "noise_var": 0.01}
    sel = build_selector({"method": "optima", "pull_steps": 1, "window": 3, **opts}, ARMS)
    unlimited = build_selector({"method": "thompson", "pull_steps": 1, **opts}, ARMS)
    rewards = [0.3, 0.1, 0.2, -0.1, 0.05]
    for s in (sel, unlimited):
        for r in rewards:
            s.current.fill_(1)
            s.observe(r)

    def closed_form(rs: list[float]) -> tuple[float, float]:
        var = 1 / (1 / opts["prior_var"] + len(rs) / opts["noise_var"])
        return var * (opts["prior_mean"] / opts["prior_var"] + sum(rs) / opts["noise_var"]), math.sqrt(var)

    assert sel.posterior()["m1"] == pytest.approx(closed_form(rewards[-3:]))
    assert unlimited.posterior()["m1"] == pytest.approx(closed_form(rewards))
    assert sel.posterior()["m0"] == pytest.approx((0.1, math.sqrt(0.5)))  # no rewards: the prior


def test_option_errors_name_the_key_and_suggest():
    with pytest.raises(ValueError, match="did you mean 'optima'"):
        validate_selector("optma")
    with pytest.raises(ValueError, match="did you mean 'window'"):
        validate_selector({"method": "optima", "windw": 3})
    with pytest.raises(ValueError, match="window"):
        validate_selector({"method": "optima", "window": 0})
    with pytest.raises(ValueError, match="needs a 'name'"):
        validate_selector({"window": 3})
    assert validate_selector({"method": "optima"}) == validate_selector({"name": "optima"})  # the older key
    for name, cls in SELECTORS.items():
        for key, field in cls.Options.model_fields.items():
            assert field.description, f"{name}.{key} has no description"


BASE = {"name": "x", "teacher": {"model": "ViT-B-32"}, "data": {"train": "a.jsonl"}}


def test_recipe_select_section():
    r = validate_recipe({**BASE, "loss": {"layerwise": True}})
    assert r.train.teacher == "online"  # set automatically
    assert r.select.name == "optima" and r.select.window == 10
    r = validate_recipe({**BASE, "loss": {"layerwise": {"grid": 2}}, "select": {"method": "thompson",
                                                                               "pull_steps": 5}})
    assert r.select == validate_selector({"name": "thompson", "pull_steps": 5})
    assert validate_recipe({**BASE, "loss": {"layerwise": False}}).loss.layerwise is None


@pytest.mark.parametrize("raw, words", [
    ({"loss": {"layerwise": True}, "train": {"teacher": "cached"}}, ["train.teacher: online"]),
    ({"select": "optima"}, ["loss.layerwise"]),
    ({"loss": {"layerwise": True}, "select": {"method": "optma"}}, ["'select'", "did you mean 'optima'"]),
    ({"loss": {"layerwise": True}, "select": {"method": "optima", "windw": 3}}, ["did you mean 'window'"]),
    ({"loss": {"layerwise": {"gird": 3}}}, ["did you mean 'loss.layerwise.grid'"]),
])
def test_recipe_errors_are_one_line(raw, words):
    with pytest.raises(UserError) as err:
        validate_recipe({**BASE, **raw})
    msg = str(err.value)
    assert "\n" not in msg and "Recipe(" not in msg
    for w in words:
        assert w in msg


def observe_pulls(sel, pulls: list[tuple[int, float]]) -> None:
    """Feed (arm, reward) rounds to ``sel`` as if each arm had been chosen and pulled in turn."""
    for arm, reward in pulls:
        sel.current.fill_(arm)
        sel.observe(reward)


def test_optima_forgets_a_reward_older_than_w_rounds_for_every_arm():
    """The window is the last W rounds of the whole bandit: m0's reward of round 0 counts while rounds 0-2 are
    the window and is gone after round 3, though m0 was never pulled again; m0 is back at its prior (so it is
    explored again), m1 keeps its three rewards."""
    opts = {"prior_mean": 0.0, "prior_var": 1.0, "noise_var": 0.01}
    sel = build_selector({"method": "optima", "pull_steps": 1, "window": 3, **opts}, ARMS)

    def closed_form(rs: list[float]) -> tuple[float, float]:
        var = 1 / (1 / opts["prior_var"] + len(rs) / opts["noise_var"])
        return var * (opts["prior_mean"] / opts["prior_var"] + sum(rs) / opts["noise_var"]), math.sqrt(var)

    observe_pulls(sel, [(0, 0.5), (1, 0.1), (1, 0.2)])
    assert sel.posterior()["m0"] == pytest.approx(closed_form([0.5]))
    observe_pulls(sel, [(1, 0.3)])
    assert sel.posterior()["m0"] == pytest.approx((0.0, 1.0))  # the prior: nothing of m0 in the last 3 rounds
    assert sel.posterior()["m1"] == pytest.approx(closed_form([0.1, 0.2, 0.3]))
    assert sel.posterior()["m2"] == pytest.approx((0.0, 1.0))
    # the per-arm reading keeps each arm's own last W rewards, however old: m0's stays
    per_arm = build_selector({"method": "optima", "pull_steps": 1, "window": 3, "window_scope": "arm", **opts}, ARMS)
    observe_pulls(per_arm, [(0, 0.5), (1, 0.1), (1, 0.2), (1, 0.3), (1, 0.4)])
    assert per_arm.posterior()["m0"] == pytest.approx(closed_form([0.5]))
    assert per_arm.posterior()["m1"] == pytest.approx(closed_form([0.2, 0.3, 0.4]))


def test_optima_window_of_rounds_resumes_exactly():
    sel = build_selector({"method": "optima", "pull_steps": 1, "window": 4}, ARMS, seed=2)
    observe_pulls(sel, [(0, 0.1), (1, 0.2), (2, 0.05), (1, 0.3), (0, 0.0), (2, 0.4)])
    fresh = build_selector({"method": "optima", "pull_steps": 1, "window": 4}, ARMS, seed=2)
    fresh.load_state_dict(sel.state_dict())
    assert fresh.posterior() == sel.posterior()
    observe_pulls(sel, [(1, 0.25)])
    observe_pulls(fresh, [(1, 0.25)])
    assert fresh.posterior() == sel.posterior()
