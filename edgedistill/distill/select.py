"""Module selection for layerwise distillation, registered by name (docs/methods.md#module-selection).

The student is split into modules (``edgedistill.distill.layerwise``); distilling a module is pulling a bandit arm for
``pull_steps`` (K) training steps. A selector says which modules' hidden-state terms are on at each step and
learns from the reward of each pull: the decrease of the distillation loss on one held batch, measured before
and after the K steps. A recipe names it::

    select:
      name: optima          # optima | thompson | random | uniform ('method' is accepted too)
      window: 10            # optima: only the rewards of the last W rounds (pulls of any arm) count
      pull_steps: 20

Methods:

- ``optima``: Gaussian Thompson sampling on the rewards of the last ``window`` rounds (a reconstruction of the
  OPTIMA sampler, docs/methods.md#optima): rewards drift as the student learns, so old ones are forgotten, for every
  arm; an arm with no reward left in the window is back at its prior and gets explored again.
- ``thompson``: the same sampler with unlimited history (W = infinity), the baseline.
- ``random``: a uniformly random arm per pull.
- ``uniform``: every module on at every step (no pulls, no rewards).

Every arm is pulled once first (in module order). A selector's randomness is a function of (run seed, pull
index), never of a global random state, and all of its state lives in buffers, so ``state_dict()`` /
``load_state_dict()`` round-trip it and ``--resume`` continues with the same choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from edgedistill.core.hashing import seed_of
from edgedistill.core.registry import ComponentOptions, Registry


class SelectorOptions(ComponentOptions):
    """Options every selector has; a selector's own options subclass this."""
    name: str = Field(description="the selector's registered name")
    pull_steps: int = Field(20, ge=1, description="K: training steps per pull (one arm distilled for K steps), "
                                                  "and the steps between two reward measurements")
    held_batch: int = Field(64, ge=2, description="images of the held batch the reward is measured on (a fixed, "
                                                  "seeded sample of the training images, clean views)")
    reward: Literal["relative", "absolute"] = Field(
        "relative", description="relative: (before - after) / before; absolute: before - after, where before "
                            "and after are the held batch's distillation loss around a pull")


@dataclass
class SelectContext:
    """What the run gives a selector: the modules (arms), in order, and the run's seed."""
    names: list[str]
    seed: int = 0


class Selector(nn.Module):
    """Base class: which of ``names`` (the modules, in order) are on, pull by pull.

    Protocol of the trainer: ``active()`` before each step (the arms on this step); ``observe(reward)`` after the
    ``pull_steps``-th step of a pull (a selector with ``needs_reward = False`` is never asked to measure).
    """
    name: ClassVar[str] = ""
    Options: ClassVar[type[SelectorOptions]] = SelectorOptions
    needs_reward: ClassVar[bool] = True

    def __init__(self, options: SelectorOptions, context: SelectContext) -> None:
        super().__init__()
        if not context.names:
            raise ValueError("a selector needs at least one module")
        self.names = list(context.names)
        self.options = options
        self.seed = int(context.seed)
        m = len(self.names)
        self.register_buffer("pulls", torch.zeros(m, dtype=torch.long))          # completed pulls per arm
        self.register_buffer("steps", torch.zeros(m, dtype=torch.long))          # training steps each arm was on
        self.register_buffer("reward_sum", torch.zeros(m, dtype=torch.float64))  # over all pulls (for the summary)
        self.register_buffer("pull_index", torch.zeros((), dtype=torch.long))    # pulls started
        self.register_buffer("current", torch.full((), -1, dtype=torch.long))    # arm of the pull in progress
        self.register_buffer("in_pull", torch.zeros((), dtype=torch.long))       # steps done in that pull
        self.register_buffer("loss_before", torch.full((), math.nan, dtype=torch.float64))

    # ----------------------------------------------------------------------------------------- protocol

    @property
    def pull_done(self) -> bool:
        """True right after the K-th step of a pull (the trainer then measures and calls ``observe``)."""
        return int(self.current) >= 0 and int(self.in_pull) >= self.options.pull_steps

    def active(self) -> list[int]:
        """The arms on for the next step (starting a pull when none is in progress)."""
        if int(self.current) < 0:
            k = int(self.pull_index)
            arm = k if k < len(self.names) else self._choose(np.random.default_rng(seed_of(self.seed, 104729, k)))
            self.current.fill_(arm)
            self.in_pull.zero_()
        return [int(self.current)]

    def stepped(self, arms: list[int]) -> None:
        """Count one training step with ``arms`` on."""
        for a in arms:
            self.steps[a] += 1
        if int(self.current) >= 0:
            self.in_pull += 1

    def observe(self, reward: float) -> None:
        """The reward of the pull that just ended; the next ``active()`` starts a new pull."""
        arm = int(self.current)
        self.pulls[arm] += 1
        self.reward_sum[arm] += float(reward)
        self._record(arm, float(reward))
        self.pull_index += 1
        self.current.fill_(-1)
        self.in_pull.zero_()

    # --------------------------------------------------------------------------------------- for subclasses

    def _choose(self, rng: np.random.Generator) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def _record(self, arm: int, reward: float) -> None:
        """Keep what the sampler needs of a reward (default: nothing beyond the counts)."""

    def posterior(self) -> dict[str, tuple[float, float]] | None:
        """Per arm (posterior mean, posterior std) of its expected reward, for logging; None if not Bayesian."""
        return None

    # ------------------------------------------------------------------------------------------- summary

    def counts(self) -> dict[str, int]:
        """Pulls per module (steps per module for ``uniform``)."""
        return {n: int(c) for n, c in zip(self.names, self.pulls)}

    def mean_reward(self) -> dict[str, float]:
        return {n: float(s) / int(c) for n, s, c in zip(self.names, self.reward_sum, self.pulls) if int(c) > 0}

    def summary(self) -> dict[str, Any]:
        return {"method": self.name, "counts": self.counts(), "mean_reward": self.mean_reward(),
                "steps": {n: int(s) for n, s in zip(self.names, self.steps)}}


SELECTORS = Registry("module selector", aliases=("method",))
register_selector = SELECTORS.register


@register_selector("uniform")
class UniformSelector(Selector):
    """Every module's hidden-state term on at every step (the OPTIMA paper's 'all modules' baseline)."""
    needs_reward = False

    def active(self) -> list[int]:
        return list(range(len(self.names)))

    def stepped(self, arms: list[int]) -> None:
        for a in arms:
            self.steps[a] += 1
            self.pulls[a] += 1  # a "pull" of uniform is one step of every module

    @property
    def pull_done(self) -> bool:
        return False

    def mean_reward(self) -> dict[str, float]:
        return {}  # nothing is measured


@register_selector("random")
class RandomSelector(Selector):
    """A uniformly random arm per pull (after each arm once)."""

    def _choose(self, rng: np.random.Generator) -> int:
        return int(rng.integers(len(self.names)))


class ThompsonOptions(SelectorOptions):
    prior_mean: float = Field(0.0, description="mean of the Gaussian prior on an arm's expected reward")
    prior_var: float = Field(1.0, gt=0.0, description="variance of that prior")
    noise_var: float = Field(1e-3, gt=0.0, description="variance of one reward around the arm's expected reward")


@register_selector("thompson")
class ThompsonSelector(Selector):
    """Gaussian Thompson sampling with unlimited history (the OPTIMA paper's W = infinity baseline).

    Arm a with n rewards r_1..r_n: posterior variance ``v = 1 / (1 / prior_var + n / noise_var)``, mean
    ``v * (prior_mean / prior_var + sum(r) / noise_var)``; each pull samples every arm's posterior and takes
    the argmax (ties: the lowest index).
    """
    Options = ThompsonOptions

    def __init__(self, options: SelectorOptions, context: SelectContext) -> None:
        super().__init__(options, context)
        m = len(self.names)
        self.register_buffer("hist_sum", torch.zeros(m, dtype=torch.float64))
        self.register_buffer("hist_n", torch.zeros(m, dtype=torch.float64))

    def _record(self, arm: int, reward: float) -> None:
        self.hist_sum[arm] += reward
        self.hist_n[arm] += 1

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        return self.hist_sum.numpy().copy(), self.hist_n.numpy().copy()

    def _posterior_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        o: ThompsonOptions = self.options  # type: ignore[assignment]
        s, n = self._stats()
        var = 1.0 / (1.0 / o.prior_var + n / o.noise_var)
        mean = var * (o.prior_mean / o.prior_var + s / o.noise_var)
        return mean, var

    def _choose(self, rng: np.random.Generator) -> int:
        mean, var = self._posterior_arrays()
        return int(np.argmax(rng.normal(mean, np.sqrt(var))))

    def posterior(self) -> dict[str, tuple[float, float]]:
        mean, var = self._posterior_arrays()
        return {n: (float(m), float(math.sqrt(v))) for n, m, v in zip(self.names, mean, var)}


class OptimaOptions(ThompsonOptions):
    window: int = Field(10, ge=1, description="W: only the rewards of the last W rounds (pulls of any arm) enter "
                                              "the posteriors; an arm with none of them is back at its prior")
    window_scope: Literal["rounds", "arm"] = Field(
        "rounds", description="rounds: the window is the last W rounds of the whole bandit, so every arm forgets "
                              "old rewards (sliding-window Thompson sampling, the paper's); arm: each arm keeps "
                              "its own last W rewards however old (edgedistill's earlier reading)")


@register_selector("optima")
class OptimaSelector(ThompsonSelector):
    """OPTIMA-style Thompson sampling that trusts recent history only.

    ``window_scope: rounds``: the (arm, reward) of the last ``window`` rounds, a ring buffer over all pulls; an
    arm's posterior is built from its rewards among them, so a reward older than W rounds is forgotten whether or
    not its arm was pulled since, and an arm with none left is back at its prior (and gets explored again).
    ``arm``: a ring buffer of the last ``window`` rewards per arm, which an arm no longer pulled keeps for good.
    """
    Options = OptimaOptions

    def __init__(self, options: SelectorOptions, context: SelectContext) -> None:
        super().__init__(options, context)
        o: OptimaOptions = options  # type: ignore[assignment]
        w, m = o.window, len(self.names)
        if o.window_scope == "rounds":
            self.register_buffer("round_arm", torch.full((w,), -1, dtype=torch.long))  # arm of each kept round
            self.register_buffer("round_reward", torch.zeros(w, dtype=torch.float64))
            self.register_buffer("round_ptr", torch.zeros((), dtype=torch.long))  # slot of the next round
        else:
            self.register_buffer("ring", torch.zeros(m, w, dtype=torch.float64))
            self.register_buffer("ring_fill", torch.zeros(m, dtype=torch.long))
            self.register_buffer("ring_ptr", torch.zeros(m, dtype=torch.long))

    def _record(self, arm: int, reward: float) -> None:
        super()._record(arm, reward)
        if self.options.window_scope == "rounds":  # type: ignore[attr-defined]
            slot = int(self.round_ptr)
            self.round_arm[slot], self.round_reward[slot] = arm, reward  # overwrites the round W rounds ago
            self.round_ptr.fill_((slot + 1) % self.round_arm.shape[0])
            return
        w = self.ring.shape[1]
        self.ring[arm, int(self.ring_ptr[arm])] = reward
        self.ring_ptr[arm] = (self.ring_ptr[arm] + 1) % w
        self.ring_fill[arm] = min(int(self.ring_fill[arm]) + 1, w)

    def _stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(sum, count) of each arm's rewards inside the window, (M,) each."""
        m = len(self.names)
        if self.options.window_scope == "rounds":  # type: ignore[attr-defined]
            arms, rewards = self.round_arm.numpy(), self.round_reward.numpy()
            kept = arms >= 0  # slots not yet filled hold -1
            sums = np.bincount(arms[kept], weights=rewards[kept], minlength=m).astype(np.float64)
            return sums, np.bincount(arms[kept], minlength=m).astype(np.float64)
        fill = self.ring_fill.numpy()
        w = self.ring.shape[1]
        mask = np.arange(w)[None, :] < fill[:, None]
        return (self.ring.numpy() * mask).sum(axis=1), fill.astype(np.float64)


class SelectionControl:
    """Drives a selector through training: which modules are on for a step, and, at the end of each pull, the
    reward measured with ``held_loss`` (the distillation loss on the held batch, before and after the pull).

    One measurement per pull boundary: the loss after one pull is the loss before the next.
    """

    def __init__(self, selector: Selector, held_loss: Callable[[], float]) -> None:
        self.selector, self.held_loss = selector, held_loss

    def arms(self) -> list[int]:
        """The modules on for the next step (the first pull's "before" is measured here)."""
        sel = self.selector
        if sel.needs_reward and bool(torch.isnan(sel.loss_before)):
            sel.loss_before.fill_(self.held_loss())
        return sel.active()

    def after_step(self, arms: list[int]) -> dict[str, Any] | None:
        """Count a step taken with ``arms``; at the end of a pull measure its reward -> the record to log."""
        sel = self.selector
        if not arms:
            return None
        sel.stepped(arms)
        if not sel.pull_done:
            return None
        before, after = float(sel.loss_before), self.held_loss()
        reward = (before - after) / max(abs(before), 1e-12) if sel.options.reward == "relative" else before - after
        arm = int(sel.current)
        sel.observe(reward)
        sel.loss_before.fill_(after)
        record: dict[str, Any] = {"module": sel.names[arm], "reward": reward, "loss_before": before,
                                  "loss_after": after, "counts": sel.counts()}
        posterior = sel.posterior()
        if posterior is not None:
            record["posterior_mean"] = {k: v[0] for k, v in posterior.items()}
            record["posterior_std"] = {k: v[1] for k, v in posterior.items()}
        return record


def validate_selector(raw: str | dict[str, Any] | SelectorOptions) -> SelectorOptions:
    """Options from the recipe: a name or a mapping with 'name' ('method' accepted; see Registry.validate_named)."""
    return SELECTORS.validate_named(raw)  # type: ignore[return-value]


def build_selector(options: SelectorOptions | dict[str, Any], names: list[str], seed: int = 0) -> Selector:
    """The selector named by ``options`` over the modules ``names`` (in order), deterministic given ``seed``."""
    options = validate_selector(options)
    return SELECTORS.build(options.name, options, SelectContext(names, seed))


__all__ = ["OptimaSelector", "RandomSelector", "SELECTORS", "SelectContext", "SelectionControl", "Selector",
           "SelectorOptions",
           "ThompsonSelector",
           "UniformSelector", "build_selector", "register_selector", "validate_selector"]
