"""Loss balancers, registered by name (docs/methods.md#balancers).

A balancer turns the loss terms active at one step into the total that is back-propagated, and reports the
effective weight of every term for logging::

    balancer = build_balancer(validate_balancer("gradnorm"), names=["feature", "clip"],
                              base_weights={"feature": 1.0, "clip": 0.5})   # = GradNormBalancer(options, context)
    balancer.bind_shared(list(student.last_shared_layer.parameters()))   # only gradnorm uses it
    total, weights = balancer({"feature": l_feat, "clip": l_clip}, step)
    total, weights = balancer(losses, step, counts={"feature": 64, "clip": 3})  # samples each term saw

Rules every balancer keeps:

- ``losses`` holds the terms active this step, a subset of ``names``; a term that is absent leaves its state
  untouched (a term may skip steps, e.g. a module-wise term that is off).
- The weights never receive gradient from the total, except the ones learned on purpose through the trainer's
  optimizer (``learned = True``: uncertainty's ``s_i``). gradnorm learns its weights with its own optimizer.
- The recipe's base weight of a term multiplies whatever the balancer computes.
- ``counts`` (optional) gives the number of samples each active term's value averages over this step (the trainer
  passes them when ``uses_counts`` is set: ``coverage`` weighs terms by them); the others ignore them.
- All state needed for an exact resume (EMAs, period sums, counters, first losses, gradnorm's weights and its
  Adam moments) lives in buffers or parameters, so ``state_dict()`` / ``load_state_dict()`` round-trip it and a
  checkpoint holds only tensors.

Adding a balancer is one decorated class with an ``Options`` model; the option descriptions are the user docs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

import edgedistill.distill.distributed as distributed
from edgedistill.core.registry import ComponentOptions, Registry


class BalancerOptions(ComponentOptions):
    """Options every balancer has; a balancer's own options subclass this."""
    name: str = Field(description="the balancer's registered name")


@dataclass
class BalanceContext:
    """What the run gives a balancer: every term it may produce (in a fixed order) and the recipe's base weights."""
    names: list[str]
    base_weights: dict[str, float] = field(default_factory=dict)


class Balancer(nn.Module):
    """Base class: maps the active loss terms of a step to (total, effective weights).

    ``names``: every term the run may produce, in a fixed order (the order of the state tensors).
    ``base_weights``: the recipe's weight per term; a name missing from it gets 1.0.
    """
    name: ClassVar[str] = ""
    Options: ClassVar[type[BalancerOptions]] = BalancerOptions
    learned: ClassVar[bool] = False  # True: parameters() must join the trainer's optimizer
    uses_counts: ClassVar[bool] = False  # True: the trainer passes each term's sample count to forward

    def __init__(self, options: BalancerOptions, context: BalanceContext) -> None:
        super().__init__()
        names, base_weights = list(context.names), context.base_weights
        if not names:
            raise ValueError("a balancer needs at least one loss term")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate loss term names: {names}")
        unknown = sorted(set(base_weights) - set(names))
        if unknown:
            raise ValueError(f"base weights given for terms that are not in the run: {', '.join(unknown)}")
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.options = options
        # A buffer, so it follows .to(device); not persistent: it comes from the recipe, not from the run.
        self.register_buffer("base", torch.tensor([float(base_weights.get(n, 1.0)) for n in names]),
                             persistent=False)

    def bind_shared(self, params: list[nn.Parameter]) -> None:
        """Give the parameters of the last shared layer (gradnorm measures gradient norms there); others ignore."""

    def forward(self, losses: dict[str, Tensor], step: int,
                counts: dict[str, float] | None = None) -> tuple[Tensor, dict[str, float]]:
        """Total (scalar, with gradient through the losses) and each active term's effective weight.

        ``counts``: samples each active term's value averages over this step (all of them, or None).
        """
        active = self._active(losses)
        if not active:
            # Nothing to weigh: a zero without gradient; the trainer should skip the backward pass.
            return torch.zeros((), device=self.base.device), {}
        values = torch.stack([losses[n].reshape(()) for n in active])  # (A,) with gradient
        idx = torch.tensor([self.index[n] for n in active], device=self.base.device)
        return self._combine(active, idx, values, step, self._counts(active, counts))

    def _counts(self, active: list[str], counts: dict[str, float] | None) -> Tensor | None:
        """(A,) float sample counts of the active terms, or None when none were given."""
        if counts is None:
            return None
        missing = [n for n in active if n not in counts]
        if missing:
            raise ValueError(f"balancer got no sample count for: {', '.join(missing)}")
        if any(not counts[n] >= 0 for n in active):  # NaN fails this too
            raise ValueError(f"sample counts must be >= 0: { {n: counts[n] for n in active} }")
        return torch.tensor([float(counts[n]) for n in active], device=self.base.device)

    def _combine(self, active: list[str], idx: Tensor, values: Tensor, step: int,
                 counts: Tensor | None) -> tuple[Tensor, dict[str, float]]:  # pragma: no cover - abstract
        """active: names (A), idx: (A,) long indices into the state, values: (A,) losses with gradient,
        counts: (A,) samples per term or None."""
        raise NotImplementedError

    def _active(self, losses: dict[str, Tensor]) -> list[str]:
        unknown = [n for n in losses if n not in self.index]
        if unknown:
            raise ValueError(f"balancer got loss terms it was not built for: {', '.join(unknown)}; "
                             f"known: {', '.join(self.names)}")
        return [n for n in self.names if n in losses]  # fixed order, whatever the dict order

    def _weighted(self, active: list[str], values: Tensor, weights: Tensor) -> tuple[Tensor, dict[str, float]]:
        """total = sum_i weights_i * L_i with weights (A,) detached; weights as floats for logging."""
        weights = weights.detach().to(device=values.device, dtype=values.dtype)
        total = (weights * values).sum()
        return total, dict(zip(active, weights.tolist()))


BALANCERS = Registry("balancer")
register_balancer = BALANCERS.register


def _detached(values: Tensor) -> Tensor:
    """(A,) loss values without gradient, float32, for state updates."""
    return values.detach().float()


# ----------------------------------------------------------------------------------------------------------------
# static


@register_balancer("static")
class StaticBalancer(Balancer):
    """Fixed weights: total = sum_i base_i * L_i."""

    def _combine(self, active: list[str], idx: Tensor, values: Tensor, step: int,
                 counts: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        return self._weighted(active, values, self.base[idx])


# ----------------------------------------------------------------------------------------------------------------
# magnitude / coverage


class MagnitudeOptions(BalancerOptions):
    momentum: float = Field(0.9, ge=0.0, lt=1.0,
                            description="EMA momentum of each term's loss value (0 = use this step's value only)")
    eps: float = Field(1e-8, gt=0.0, description="added to each term's EMA before dividing")


@register_balancer("magnitude")
class MagnitudeBalancer(Balancer):
    """Magnitude equalisation with smoothing, edgedistill's own rule (docs/methods.md#magnitude).

    Each term keeps an EMA ``m_i`` of its detached loss (the first observation initialises it); the weight is
    ``w_i = base_i * mean_j(m_j) / (m_i + eps)`` over the active terms, so every active term contributes about
    ``base_i * mean_j(m_j)`` to the total, whatever its scale. Weights are detached.
    """
    Options = MagnitudeOptions

    def __init__(self, options: BalancerOptions, context: BalanceContext) -> None:
        super().__init__(options, context)
        k = len(self.names)
        self.register_buffer("ema", torch.zeros(k))
        self.register_buffer("seen", torch.zeros(k, dtype=torch.bool))

    def _equalise(self, idx: Tensor, values: Tensor) -> Tensor:
        """Update the EMAs with this step's values; (A,) factors ``mean_j(m_j) / (m_i + eps)``."""
        opts: MagnitudeOptions = self.options  # type: ignore[assignment]
        v = _detached(values).to(self.ema.device)
        # A non-finite value would poison the EMA for good; leave the state as it was and let the trainer decide.
        ok = torch.isfinite(v)
        with torch.no_grad():
            old, seen = self.ema[idx], self.seen[idx]
            new = torch.where(seen, opts.momentum * old + (1.0 - opts.momentum) * v, v)
            self.ema[idx] = torch.where(ok, new, old)
            self.seen[idx] = seen | ok
        m, seen = self.ema[idx], self.seen[idx]
        # A term with no finite observation yet has no EMA: factor 1, and it is left out of the mean.
        mean = (m * seen).sum() / seen.sum().clamp_min(1)
        return torch.where(seen, mean / (m + opts.eps), torch.ones_like(m))

    def _combine(self, active: list[str], idx: Tensor, values: Tensor, step: int,
                 counts: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        return self._weighted(active, values, self.base[idx] * self._equalise(idx, values))


class CoverageOptions(MagnitudeOptions):
    equalise: bool = Field(True, description="also equalise the terms' smoothed magnitudes (as magnitude "
                                             "does); false: base weight times coverage only")


@register_balancer("coverage")
class CoverageBalancer(MagnitudeBalancer):
    """Weights each term by the share of the batch it saw (edgedistill's rule, docs/methods.md#coverage).

    ``c_i = n_i / max_j n_j`` over the active terms, ``n_i`` = the samples term i's value averages over this
    step (the trainer's counts); ``w_i = base_i * c_i * mean_j(m_j) / (m_i + eps)`` with ``magnitude``'s EMAs
    (``equalise``), else ``w_i = base_i * c_i``. A term on the few captioned pairs of a mostly uncaptioned batch
    keeps a weight in proportion to its pairs, however its magnitude compares. Without counts every ``c_i`` is 1.

    ``w_i / n_i`` is then alike for every term, so every row weighs alike (times each term's magnitude factor)
    provided a term of parts is the mean over all its rows and counts them all: a recipe sets ``combine: rows`` on
    such terms under this balancer. A mean of parts (``combine: parts``) would weigh one of P caption rows B / P
    times one of B image rows, which no single weight per term can undo.
    """
    Options = CoverageOptions
    uses_counts = True

    def _combine(self, active: list[str], idx: Tensor, values: Tensor, step: int,
                 counts: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        opts: CoverageOptions = self.options  # type: ignore[assignment]
        w = self.base[idx].clone()
        if counts is not None:
            w = w * counts.to(w) / counts.max().clamp_min(1.0)
        if opts.equalise:
            w = w * self._equalise(idx, values)
        return self._weighted(active, values, w)


# ----------------------------------------------------------------------------------------------------------------
# dsmd


class DSMDOptions(BalancerOptions):
    k: float = Field(10.0, gt=0.0, description="overall scale k of the weights (10 in the official code)")
    temperature: float = Field(1.0, gt=0.0, description="softmax temperature T of the ratios (1 in the official "
                                                        "code)")
    ratio: Literal["scaled", "raw"] = Field(
        "scaled", description="r_i from the magnitude-scaled losses, as coded ('scaled': all r_i equal, the "
                              "softmax is uniform), or from the raw losses, as the paper intends ('raw')")
    eps: float = Field(1e-8, gt=0.0, description="added to a loss before dividing by it (1e-8 in the code)")


@register_balancer("dsmd")
class DSMDBalancer(Balancer):
    """The rule in the official DSMD code (its ``AdaptiveLossWeighting``; docs/methods.md#dsmd).

    For the active terms' detached losses ``L_i`` at step t: ``m_i = max_j L_j / (L_i + eps)``,
    ``L~_i = m_i L_i``, ``r_i = L~_i(t) / L~_i(t-1)`` (``ratio: raw``: ``L_i(t) / L_i(t-1)``),
    ``w_i = base_i * k * softmax(r / T)_i * m_i``; every weight is ``base_i`` at the first step. A term's
    previous value is its own last one; a term without one has ``r_i = 1``. As coded ``L~_i = max_j L_j`` for
    every term, so the rule is ``w_i = (k / N) max_j L_j / L_i``: magnitude equalisation to the largest term.
    """
    Options = DSMDOptions

    def __init__(self, options: BalancerOptions, context: BalanceContext) -> None:
        super().__init__(options, context)
        k = len(self.names)
        self.register_buffer("prev_scaled", torch.zeros(k, dtype=torch.float64))  # L~_i of the term's last step
        self.register_buffer("prev_raw", torch.zeros(k, dtype=torch.float64))  # L_i of the term's last step
        self.register_buffer("seen", torch.zeros(k, dtype=torch.bool))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))  # a first step has been taken

    def _combine(self, active: list[str], idx: Tensor, values: Tensor, step: int,
                 counts: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        opts: DSMDOptions = self.options  # type: ignore[assignment]
        v = _detached(values).to(device=self.prev_raw.device, dtype=torch.float64)
        if not bool(torch.isfinite(v).all()):
            return self._weighted(active, values, self.base[idx])  # no statistics from a non-finite step
        m = v.max() / (v + opts.eps)
        scaled = m * v
        with torch.no_grad():
            if bool(self.started):
                seen = self.seen[idx]
                now, prev = (scaled, self.prev_scaled[idx]) if opts.ratio == "scaled" else (v, self.prev_raw[idx])
                # A zero previous value would divide by zero: it counts as eps.
                r = torch.where(seen, now / prev.clamp_min(opts.eps), torch.ones_like(now))
                w = opts.k * torch.softmax(r / opts.temperature, dim=0) * m
            else:
                w = torch.ones_like(v)
            self.prev_scaled[idx], self.prev_raw[idx] = scaled, v
            self.seen[idx] = True
            self.started.fill_(True)
        return self._weighted(active, values, self.base[idx] * w.float())


# ----------------------------------------------------------------------------------------------------------------
# dwa


class DWAOptions(BalancerOptions):
    temperature: float = Field(2.0, gt=0.0, description="softmax temperature T of the loss-rate ratios")
    period: int = Field(100, ge=1, description="steps per averaging period (the paper uses epochs)")


@register_balancer("dwa")
class DWABalancer(Balancer):
    """Dynamic Weight Average (Liu et al. 2019), with periods of ``period`` steps in place of epochs.

    Each term's loss is averaged over a period; ``r_i = avg_i(p-1) / avg_i(p-2)`` and
    ``w = K * softmax(r / T)`` over the active terms (K = their number), times base_i. A term has weight 1
    (times base) until it has two completed periods. DWA reacts to how fast a term falls, not to its scale: a
    term that stalls gains weight, a term that falls fast loses it.

    The period of step ``s`` is ``s // period``. A term's period is closed the first time it is seen in a later
    period, so steps without the term leave its state alone; a period in which the term never appeared is skipped.
    """
    Options = DWAOptions

    def __init__(self, options: BalancerOptions, context: BalanceContext) -> None:
        super().__init__(options, context)
        k = len(self.names)
        self.register_buffer("period_index", torch.full((k,), -1, dtype=torch.long))  # period being summed
        self.register_buffer("period_sum", torch.zeros(k, dtype=torch.float64))  # float64: long periods
        self.register_buffer("period_count", torch.zeros(k, dtype=torch.long))
        self.register_buffer("avg_prev1", torch.zeros(k, dtype=torch.float64))  # average of the last closed period
        self.register_buffer("avg_prev2", torch.zeros(k, dtype=torch.float64))  # ... and of the one before
        self.register_buffer("closed", torch.zeros(k, dtype=torch.long))  # closed periods per term

    def _combine(self, active: list[str], idx: Tensor, values: Tensor, step: int,
                 counts: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        opts: DWAOptions = self.options  # type: ignore[assignment]
        p = step // opts.period
        v = _detached(values).to(device=self.period_sum.device, dtype=torch.float64)
        with torch.no_grad():  # vectorised over the active terms: no host syncs on a GPU
            count, total = self.period_count[idx], self.period_sum[idx]
            new_period = self.period_index[idx] != p
            close = new_period & (count > 0)  # the term's last period is complete: shift the averages
            self.avg_prev2[idx] = torch.where(close, self.avg_prev1[idx], self.avg_prev2[idx])
            self.avg_prev1[idx] = torch.where(close, total / count.clamp_min(1), self.avg_prev1[idx])
            self.closed[idx] += close.long()
            self.period_index[idx] = p
            ok = torch.isfinite(v)  # a non-finite value is not averaged in
            self.period_sum[idx] = torch.where(new_period, 0.0, total) + torch.where(ok, v, 0.0)
            self.period_count[idx] = torch.where(new_period, 0, count) + ok.long()
        ready = self.closed[idx] >= 2
        r = self.avg_prev1[idx] / self.avg_prev2[idx].clamp_min(1e-12)
        # Terms with history share K' * softmax over themselves (K' = their number); the others keep 1.
        logits = torch.where(ready, r / opts.temperature, float("-inf"))
        share = ready.sum() * torch.softmax(logits, dim=0)
        w = torch.where(ready, share, 1.0)  # (softmax of all -inf is nan, but then every term takes the 1)
        return self._weighted(active, values, self.base[idx] * w.float())


# ----------------------------------------------------------------------------------------------------------------
# uncertainty


@register_balancer("uncertainty")
class UncertaintyBalancer(Balancer):
    """Homoscedastic uncertainty weighting (Kendall et al. 2018).

    A learned ``s_i = log sigma_i^2`` per term (init 0); total = ``sum_i base_i * (L_i * exp(-s_i) / 2 + s_i / 2)``;
    reported weight ``base_i * exp(-s_i) / 2``. The ``s_i`` are trained by the trainer's optimizer (``learned``),
    so they should go in a parameter group without weight decay. Each ``s_i`` is its own parameter, so a term that
    is absent from a step leaves its ``s_i`` with no gradient (None), and torch's optimizers skip it entirely.
    """
    learned = True

    def __init__(self, options: BalancerOptions, context: BalanceContext) -> None:
        super().__init__(options, context)
        self.log_vars = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in self.names])

    def _combine(self, active: list[str], idx: Tensor, values: Tensor, step: int,
                 counts: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        s = torch.stack([self.log_vars[i] for i in idx.tolist()]).to(values.device)  # (A,) with gradient
        base = self.base[idx].to(device=values.device, dtype=values.dtype)
        total = (base * (values * torch.exp(-s) / 2 + s / 2)).sum()
        weights = (base * torch.exp(-s.detach()) / 2).tolist()
        return total, dict(zip(active, weights))


# ----------------------------------------------------------------------------------------------------------------
# gradnorm


class GradNormOptions(BalancerOptions):
    alpha: float = Field(1.5, ge=0.0, description="strength of the pull towards equal relative training rates")
    lr: float = Field(0.025, gt=0.0, description="Adam learning rate of the balancer's own weights")
    min_weight: float = Field(1e-3, gt=0.0, description="no weight goes below this (they are renormalised above it)")


@register_balancer("gradnorm")
class GradNormBalancer(Balancer):
    """GradNorm (Chen et al. 2018): weights learned so each term's gradient norm on the last shared layer tracks
    its relative training rate.

    ``G_i = w_i * ||grad_W L_i||`` on the shared parameters W (``bind_shared``); ``r_i = (L_i / L_i(0)) /
    mean_j(L_j / L_j(0))``; target ``mean(G) * r_i^alpha`` (a constant); ``L_grad = sum_i |G_i - target_i|``.
    The weights ``w_i`` (init 1) take one step of the balancer's own Adam on ``L_grad`` per call, then are clamped
    to ``min_weight`` and rescaled above it so the active weights keep their sum (the sum over all terms stays K).
    total = ``sum_i base_i * w_i * L_i`` with this step's weights (before the update) detached.

    ``L_i(0)`` is a term's first loss. Each call costs one extra backward from every active term down to W
    (``retain_graph=True``), so W should be the last shared layer. The weights are a buffer, not a parameter,
    so the trainer's optimizer never sees them; the Adam moments are per term, so an absent term is untouched.
    """
    Options = GradNormOptions
    betas: ClassVar[tuple[float, float]] = (0.9, 0.999)  # torch.optim.Adam's defaults
    adam_eps: ClassVar[float] = 1e-8

    def __init__(self, options: BalancerOptions, context: BalanceContext) -> None:
        super().__init__(options, context)
        k = len(self.names)
        self.register_buffer("weights", torch.ones(k))
        self.register_buffer("initial_loss", torch.zeros(k))  # L_i(0)
        self.register_buffer("seen", torch.zeros(k, dtype=torch.bool))
        # Adam (torch.optim.Adam's update, per element) kept in buffers: exact resume, and moves with .to().
        self.register_buffer("adam_m", torch.zeros(k))
        self.register_buffer("adam_v", torch.zeros(k))
        self.register_buffer("adam_step", torch.zeros(k, dtype=torch.long))
        self._shared: tuple[nn.Parameter, ...] = ()  # a tuple, so the network's parameters are not registered here

    def bind_shared(self, params: list[nn.Parameter]) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("gradnorm needs the trainable parameters of the last shared layer; none were given")
        self._shared = tuple(params)

    def _grad_norm(self, loss: Tensor) -> Tensor:
        """||grad_W loss|| over all shared parameters (0 when the loss does not reach them)."""
        if not loss.requires_grad:
            return torch.zeros((), device=loss.device)
        grads = torch.autograd.grad(loss, self._shared, retain_graph=True, allow_unused=True)
        if distributed.current().enabled:
            # Each rank holds its share of the gradient (DDP has not averaged it: this is not .backward()); the
            # mean over ranks is the whole batch's gradient, so every rank updates the same weights.
            grads = tuple(distributed.all_reduce_mean(
                [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self._shared)]))
        sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=loss.device)

    def _combine(self, active: list[str], idx: Tensor, values: Tensor, step: int,
                 counts: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        if not self._shared:
            raise RuntimeError("the gradnorm balancer needs the last shared layer: call "
                               "balancer.bind_shared(list(layer.parameters())) before the first step")
        opts: GradNormOptions = self.options  # type: ignore[assignment]
        dev = self.weights.device
        w_now = self.weights[idx].clone()  # the weights this step's total uses
        total, reported = self._weighted(active, values, self.base[idx] * w_now)

        v = _detached(values).to(dev)
        finite = torch.isfinite(v)
        if not bool(finite.all()):
            return total, reported  # no statistics from a non-finite step
        with torch.no_grad():
            first = ~self.seen[idx]
            self.initial_loss[idx] = torch.where(first, v, self.initial_loss[idx])
            self.seen[idx] = True
        norms = torch.stack([self._grad_norm(values[j]) for j in range(len(active))]).to(dev)  # (A,)

        # G_i = w_i * n_i; the target is a constant, so dL_grad/dw_i = n_i * sign(G_i - target_i).
        w = w_now.clone().requires_grad_(True)
        g = w * norms
        rate = v / self.initial_loss[idx].clamp_min(1e-12)
        rel = rate / rate.mean()
        target = (g.mean() * rel.pow(opts.alpha)).detach()
        l_grad = (g - target).abs().sum()
        (grad,) = torch.autograd.grad(l_grad, w)

        with torch.no_grad():
            b1, b2 = self.betas
            t = self.adam_step[idx] + 1
            m = b1 * self.adam_m[idx] + (1 - b1) * grad
            s = b2 * self.adam_v[idx] + (1 - b2) * grad * grad
            m_hat = m / (1 - b1 ** t.double()).float()
            s_hat = s / (1 - b2 ** t.double()).float()
            new = w_now - opts.lr * m_hat / (s_hat.sqrt() + self.adam_eps)
            # Renormalise so the active weights keep their sum (all terms: K), none below min_weight: clamp,
            # then rescale only the part above the minimum.
            floor = opts.min_weight
            excess = new.clamp_min(floor) - floor
            room = (w_now.sum() - floor * len(active)).clamp_min(0.0)
            if float(excess.sum()) > 0:
                new = floor + excess * (room / excess.sum())
            else:
                new = w_now
            self.adam_m[idx], self.adam_v[idx], self.adam_step[idx] = m, s, t
            self.weights[idx] = new
        return total, reported


# ----------------------------------------------------------------------------------------------------------------
# validation and construction


def validate_balancer(raw: str | dict[str, Any] | BalancerOptions) -> BalancerOptions:
    """Options from the recipe: a name or a mapping with 'name' (see Registry.validate_named)."""
    return BALANCERS.validate_named(raw)  # type: ignore[return-value]


def build_balancer(options: BalancerOptions, names: list[str], base_weights: dict[str, float]) -> Balancer:
    """The balancer named by ``options`` for the terms ``names`` (fixed order) with the recipe's base weights."""
    return BALANCERS.build(options.name, options, BalanceContext(names, base_weights))


__all__ = [
    "BALANCERS", "BalanceContext", "Balancer", "BalancerOptions", "CoverageBalancer", "CoverageOptions",
    "DSMDBalancer", "DSMDOptions", "DWABalancer", "DWAOptions", "GradNormBalancer", "GradNormOptions",
    "MagnitudeBalancer", "MagnitudeOptions", "StaticBalancer", "UncertaintyBalancer", "build_balancer",
    "register_balancer", "validate_balancer",
]
