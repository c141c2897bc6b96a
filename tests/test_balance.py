"""Loss balancers: totals, adaptation on a tiny real optimisation, exact resume, absent terms, validation."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgedistill.distill.balance import (BALANCERS, Balancer, CoverageBalancer, DSMDBalancer, MagnitudeBalancer,
                                 build_balancer, validate_balancer)

NAMES = ["big", "small"]


@pytest.fixture(autouse=True)
def _one_thread():
    # Hundreds of tiny ops: thread hand-offs cost more than they save, and far more on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

ADAPTIVE = ["magnitude", "coverage", "dsmd", "dwa", "uncertainty", "gradnorm"]


def make(name: str, base: dict[str, float] | None = None, **options: object) -> Balancer:
    return build_balancer(validate_balancer({"name": name, **options}), NAMES, base or {"big": 1.0, "small": 1.0})


class Toy:
    """A shared Linear layer with two heads and two MSE losses; ``scale`` multiplies the first ("big") loss.

    ``realizable``: the first head's target is a linear function of the input, so its loss can fall towards 0
    (the second target is noise, so its loss stalls at a floor).
    """

    def __init__(self, balancer: Balancer, seed: int = 0, scale: float = 1000.0, realizable: bool = False) -> None:
        torch.manual_seed(seed)
        self.shared, self.head_a, self.head_b = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)
        self.x = torch.randn(64, 8)
        self.ya = self.x @ torch.randn(8, 4) * 0.3 if realizable else torch.randn(64, 4)
        self.yb = torch.randn(64, 4)
        self.scale, self.realizable = scale, realizable
        self.model_params = [*self.shared.parameters(), *self.head_a.parameters(), *self.head_b.parameters()]
        params = self.model_params + (list(balancer.parameters()) if balancer.learned else [])
        self.opt = torch.optim.Adam(params, lr=0.01)
        balancer.bind_shared(list(self.shared.parameters()))

    def losses(self) -> dict[str, torch.Tensor]:
        h = self.shared(self.x)
        h = h if self.realizable else torch.tanh(h)
        return {"big": self.scale * F.mse_loss(self.head_a(h), self.ya),
                "small": F.mse_loss(self.head_b(h), self.yb)}

    def step(self, balancer: Balancer, step: int, losses: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
        total, weights = balancer(self.losses() if losses is None else losses, step)
        self.opt.zero_grad()
        total.backward()
        self.opt.step()
        return weights


def run(balancer: Balancer, steps: int, **toy: object) -> list[dict[str, float]]:
    t = Toy(balancer, **toy)
    return [t.step(balancer, s) for s in range(steps)]


def test_registry():
    assert {"static", "magnitude", "coverage", "dsmd", "dwa", "uncertainty", "gradnorm"} <= set(BALANCERS)
    assert BALANCERS["dsmd"] is DSMDBalancer and not issubclass(DSMDBalancer, MagnitudeBalancer)
    assert "official DSMD code" in (DSMDBalancer.__doc__ or "")
    assert [n for n, c in BALANCERS.items() if c.learned] == ["uncertainty"]
    assert [n for n, c in BALANCERS.items() if c.uses_counts] == ["coverage"]
    for cls in BALANCERS.values():  # every option is documented
        for field, info in cls.Options.model_fields.items():
            assert info.description, f"{cls.name}.{field} has no description"


def test_static_total_is_the_hand_sum():
    b = make("static", {"big": 0.5, "small": 2.0})
    a, c = torch.tensor(3.0, requires_grad=True), torch.tensor(7.0, requires_grad=True)
    total, weights = b({"small": c, "big": a}, 0)
    assert total.item() == pytest.approx(0.5 * 3.0 + 2.0 * 7.0)
    assert weights == {"big": 0.5, "small": 2.0}
    total.backward()
    assert a.grad.item() == 0.5 and c.grad.item() == 2.0


def test_static_leaves_a_dominating_term_dominant():
    hist = run(make("static"), 5)
    assert hist[-1] == {"big": 1.0, "small": 1.0}


@pytest.mark.parametrize("name", ["magnitude", "coverage", "dsmd", "uncertainty", "gradnorm"])
def test_weight_moves_away_from_a_dominating_term(name):
    """"big" is 1000x "small"; after a few hundred steps of a real optimisation the big term has lost weight."""
    hist = run(make(name), 300)
    first, last = hist[0], hist[-1]
    assert last["big"] < last["small"] / 3, last
    if name in ("uncertainty", "gradnorm"):  # these start equal and learn their way there
        assert first["big"] == first["small"]
        assert last["big"] < first["big"] and last["small"] > first["small"]
    else:  # magnitude equalises contributions at once: w_i ~ mean(m) / m_i; dsmd: w_i = (k / N) max L / L_i
        assert last["big"] < last["small"] and (last["big"] < 1.0 < last["small"] or name == "dsmd")
        assert last["small"] / last["big"] > 50


def test_magnitude_weights_follow_the_ema():
    b = make("magnitude", momentum=0.5)
    one = lambda v: torch.tensor(float(v))  # noqa: E731
    b({"big": one(100), "small": one(1)}, 0)  # first observation initialises: m = (100, 1)
    _, w = b({"big": one(200), "small": one(1)}, 1)  # m = (150, 1)
    mean = (150 + 1) / 2
    assert w["big"] == pytest.approx(mean / 150) and w["small"] == pytest.approx(mean / 1)


def test_dwa_shifts_weight_to_the_stalling_term():
    """DWA is scale-invariant by construction: it weighs terms by how fast they fall (r_i = avg(p-1)/avg(p-2)),
    not by their size, so a merely large term keeps weight 1. The honest test: "big" dominates by x1000 AND
    falls fast (a realizable target), while "small" stalls at a noise floor; DWA moves weight to "small".
    """
    period = 10
    hist = run(make("dwa", period=period), 300, realizable=True)
    assert all(w == {"big": 1.0, "small": 1.0} for w in hist[:2 * period])  # first two periods: weights 1
    later = hist[2 * period:]
    assert all(w["small"] > w["big"] for w in later)
    assert all(w["big"] + w["small"] == pytest.approx(2.0) for w in later)  # K * softmax: they sum to K


def test_dwa_is_scale_invariant_and_matches_the_formula():
    seq = [(1000 * 0.9 ** s, 1.0 + 0.01 * s) for s in range(6)]
    weights = {}
    for scale in (1.0, 1000.0):
        b = make("dwa", period=2, temperature=2.0)
        for s, (a, c) in enumerate(seq):
            _, weights[scale] = b({"big": torch.tensor(a / 1000 * scale), "small": torch.tensor(c)}, s)
    assert weights[1.0] == pytest.approx(weights[1000.0])
    # step 5 is in period 2: r = avg(period 1) / avg(period 0)
    r = torch.tensor([(seq[2][0] + seq[3][0]) / (seq[0][0] + seq[1][0]),
                      (seq[2][1] + seq[3][1]) / (seq[0][1] + seq[1][1])])
    expected = 2 * torch.softmax(r / 2.0, 0)
    assert [weights[1.0]["big"], weights[1.0]["small"]] == pytest.approx(expected.tolist(), rel=1e-5)


def test_uncertainty_formula_and_gradients():
    b = make("uncertainty", {"big": 2.0, "small": 1.0})
    with torch.no_grad():
        b.log_vars[0].fill_(1.0)
    a, c = torch.tensor(3.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)
    total, w = b({"big": a, "small": c}, 0)
    e = torch.exp(torch.tensor(-1.0)).item()
    assert total.item() == pytest.approx(2.0 * (3.0 * e / 2 + 0.5) + 1.0 * (5.0 / 2 + 0.0))
    assert w["big"] == pytest.approx(2.0 * e / 2) and w["small"] == pytest.approx(0.5)
    total.backward()
    assert a.grad.item() == pytest.approx(w["big"]) and c.grad.item() == pytest.approx(w["small"])
    assert b.log_vars[0].grad is not None  # learned on purpose


def test_gradnorm_needs_bind_shared():
    b = make("gradnorm")
    with pytest.raises(RuntimeError, match="bind_shared"):
        b({"big": torch.tensor(1.0, requires_grad=True), "small": torch.tensor(1.0, requires_grad=True)}, 0)


def test_gradnorm_weights_sum_to_k_and_stay_positive():
    b = make("gradnorm", min_weight=0.01)
    hist = run(b, 100)
    assert all(sum(w.values()) == pytest.approx(2.0, rel=1e-4) for w in hist)
    assert all(min(w.values()) >= 0.01 * 0.99 for w in hist)


@pytest.mark.parametrize("name", ["static", *ADAPTIVE])
def test_weights_are_detached(name):
    """Backward from the total reaches the model, and never the balancer's weights unless learned on purpose;
    d total / d L_i equals the reported weight (so the weights are constants in the graph)."""
    b = make(name, {"big": 1.0, "small": 0.5}, **({"period": 2} if name == "dwa" else {}))
    toy = Toy(b)
    for s in range(7):  # past the warm-up of every balancer
        toy.step(b, s)
    losses = toy.losses()
    for p in [*toy.model_params, *b.parameters()]:
        p.grad = None
    total, weights = b(losses, 7)
    d_total = torch.autograd.grad(total, list(losses.values()), retain_graph=True)
    assert [g.item() for g in d_total] == pytest.approx([weights[n] for n in losses], rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in toy.shared.parameters())
    learned = [p for p in b.parameters() if p.grad is not None]
    assert (len(learned) > 0) == (name == "uncertainty")
    assert all(not buf.requires_grad for buf in b.buffers())


def _roundtrip(b: Balancer, name: str, **options: object) -> Balancer:
    buf = io.BytesIO()
    torch.save(b.state_dict(), buf)  # only tensors: loads with weights_only=True
    buf.seek(0)
    fresh = make(name, **options)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


@pytest.mark.parametrize("name", ["static", *ADAPTIVE])
def test_state_dict_round_trip_resumes_exactly(name):
    options = {"period": 5} if name == "dwa" else {}
    b = make(name, **options)
    toy = Toy(b)
    for s in range(23):  # mid-period for dwa, mid-run for everything
        toy.step(b, s)
    resumed = _roundtrip(b, name, **options)
    resumed.bind_shared(list(toy.shared.parameters()))
    for s in range(23, 23 + (1 if name == "uncertainty" else 12)):
        losses = toy.losses()
        total_r, w_r = resumed(losses, s)
        total, w = b(losses, s)
        assert w_r == w and total_r.item() == total.item()
        toy.opt.zero_grad()
        total.backward()
        toy.opt.step()
    for key, value in b.state_dict().items():
        if name != "uncertainty":
            assert torch.equal(value, resumed.state_dict()[key]), key


@pytest.mark.parametrize("name", ADAPTIVE)
def test_absent_term_leaves_its_state_untouched(name):
    b = make(name, **({"period": 3} if name == "dwa" else {}))
    toy = Toy(b)
    for s in range(10):
        toy.step(b, s)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    for s in range(10, 20):  # "small" skips ten steps, across dwa period boundaries
        w = toy.step(b, s, {"big": toy.losses()["big"]})
        assert set(w) == {"big"}
    small = NAMES.index("small")
    for key, value in b.state_dict().items():
        if value.ndim == 1 and len(value) == len(NAMES):
            assert torch.equal(value[small], before[key][small]), key
        elif key.startswith("log_vars."):
            if key == f"log_vars.{small}":
                assert torch.equal(value, before[key])
    # the term can come back
    _, w = b(toy.losses(), 20)
    assert set(w) == set(NAMES)


def test_unknown_term_and_empty_step():
    b = make("static")
    with pytest.raises(ValueError, match="not built for: other"):
        b({"other": torch.tensor(1.0)}, 0)
    total, w = b({}, 0)
    assert total.item() == 0.0 and w == {}
    with pytest.raises(ValueError, match="not in the run"):
        build_balancer(validate_balancer("static"), NAMES, {"nope": 1.0})


def test_validate_balancer():
    assert validate_balancer("gradnorm").model_dump() == {"name": "gradnorm", "alpha": 1.5, "lr": 0.025,
                                                          "min_weight": 1e-3}
    opts = validate_balancer({"name": "gradnorm", "alpha": 2})
    assert opts.alpha == 2.0  # type: ignore[attr-defined]
    assert validate_balancer(opts.model_dump()) == opts  # the resolved recipe re-reads
    assert validate_balancer("dsmd").model_dump() == {"name": "dsmd", "k": 10.0, "temperature": 1.0, "ratio": "scaled",
                                                      "eps": 1e-8}
    cases = [
        ("gradnrom", r"unknown balancer 'gradnrom'; did you mean 'gradnorm'\? valid: coverage, dsmd, dwa, gradnorm"),
        ({"name": "dwa", "temprature": 1},
         r"unknown option 'temprature' of balancer 'dwa'; did you mean 'temperature'"),
        ({"name": "static", "alpha": 1}, r"unknown option 'alpha' of balancer 'static'; valid: \(none\)"),
        ({"name": "dwa", "period": 0}, r"option 'period' of balancer 'dwa': "),
        ({"alpha": 1}, r"needs a 'name'"),
        (3, r"give a balancer name"),
    ]
    for raw, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            validate_balancer(raw)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- dsmd, the official rule

def one(v: float) -> torch.Tensor:
    return torch.tensor(float(v), dtype=torch.float64)


def dsmd_reference(history: list[dict[str, float]], k: float = 10.0, T: float = 1.0, ratio: str = "scaled",
                   eps: float = 1e-8) -> list[dict[str, float]]:
    """The official code's rule written out in plain Python: weights of each step of ``history``."""
    out, prev_scaled, prev_raw = [], {}, {}
    for t, losses in enumerate(history):
        top = max(losses.values())
        m = {n: top / (v + eps) for n, v in losses.items()}
        scaled = {n: m[n] * v for n, v in losses.items()}
        if t == 0:
            w = {n: 1.0 for n in losses}
        else:
            now, prev = (scaled, prev_scaled) if ratio == "scaled" else (losses, prev_raw)
            r = {n: now[n] / max(prev[n], eps) if n in prev else 1.0 for n in losses}
            z = sum(math.exp(x / T) for x in r.values())
            w = {n: k * math.exp(r[n] / T) / z * m[n] for n in losses}
        prev_scaled.update(scaled)
        prev_raw.update(losses)
        out.append(w)
    return out


def run_dsmd(history: list[dict[str, float]], **options: object) -> list[dict[str, float]]:
    b = make("dsmd", **options)
    return [b({n: one(v) for n, v in losses.items()}, t)[1] for t, losses in enumerate(history)]


HISTORY = [{"big": 800.0, "small": 2.0}, {"big": 600.0, "small": 1.9}, {"big": 300.0, "small": 1.95},
           {"big": 310.0}, {"big": 200.0, "small": 1.5}, {"big": 100.0, "small": 1.4}]


@pytest.mark.parametrize("ratio", ["scaled", "raw"])
def test_dsmd_follows_the_official_rule(ratio):
    got = run_dsmd(HISTORY, ratio=ratio)
    want = dsmd_reference(HISTORY, ratio=ratio)
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and list(g.values()) == pytest.approx(list(w.values()), rel=1e-6)
    assert got[0] == {"big": 1.0, "small": 1.0}  # weights 1 at the first step


def test_dsmd_as_coded_is_magnitude_equalisation_to_the_largest_term():
    """With every term present at consecutive steps, all r_i are equal: w_i = (k / N) max_j L_j / L_i."""
    steps = [{"big": 800.0, "small": 2.0}, {"big": 600.0, "small": 1.9}, {"big": 30.0, "small": 3.0}]
    got = run_dsmd(steps, k=10.0)
    for losses, w in zip(steps[1:], got[1:]):
        top = max(losses.values())
        assert w == pytest.approx({n: 10.0 / 2 * top / v for n, v in losses.items()}, rel=1e-6)
    # the temperature cannot matter: the softmax is uniform
    for a, b in zip(run_dsmd(steps, temperature=0.01)[1:], got[1:]):
        assert a == pytest.approx(b, rel=1e-6)


def test_dsmd_raw_ratio_moves_weight_to_the_term_that_falls_slower():
    """The intended variant: r_i = L_i(t) / L_i(t-1); the term that stalls gets the larger softmax share."""
    steps = [{"big": 100.0, "small": 1.0}, {"big": 50.0, "small": 1.0}]
    w = run_dsmd(steps, ratio="raw")[1]
    share = {n: w[n] / (max(steps[1].values()) / v) for n, v in steps[1].items()}  # k softmax(r)_i
    assert share["small"] > share["big"] and share["small"] + share["big"] == pytest.approx(10.0)


def test_dsmd_zero_previous_value_does_not_divide_by_zero():
    w = run_dsmd([{"big": 1.0, "small": 0.0}, {"big": 1.0, "small": 0.5}], ratio="raw")[1]
    assert all(math.isfinite(x) for x in w.values())


def test_dsmd_non_finite_step_leaves_state_alone():
    b = make("dsmd")
    b({"big": one(4.0), "small": one(2.0)}, 0)
    before = {k: v.clone() for k, v in b.state_dict().items()}
    _, w = b({"big": one(float("nan")), "small": one(2.0)}, 1)
    assert w == {"big": 1.0, "small": 1.0}
    assert all(torch.equal(v, before[k]) for k, v in b.state_dict().items())


# ---------------------------------------------------------------------------- coverage: weight by samples seen

def test_coverage_weighs_terms_by_the_samples_they_saw():
    """A caption term seeing 2 of 64 images gets 2/64 of the weight magnitude equalisation would give it."""
    counts = {"big": 64, "small": 2}
    cov, mag = make("coverage"), make("magnitude")
    for t, (a, c) in enumerate([(100.0, 1.0), (80.0, 1.2), (90.0, 0.8)]):
        losses = {"big": one(a), "small": one(c)}
        _, w_cov = cov(losses, t, counts)
        _, w_mag = mag(losses, t)
        assert w_cov["big"] == pytest.approx(w_mag["big"]) and w_cov["small"] == pytest.approx(w_mag["small"] * 2 / 64)
    # without counts it is the magnitude rule; with equalise off, base weight times coverage
    assert make("coverage")({"big": one(5), "small": one(1)}, 0)[1] == make("magnitude")(
        {"big": one(5), "small": one(1)}, 0)[1]
    plain = build_balancer(validate_balancer({"name": "coverage", "equalise": False}), NAMES,
                           {"big": 2.0, "small": 1.0})
    total, w = plain({"big": one(5), "small": one(1)}, 0, {"big": 64, "small": 16})
    assert w == {"big": 2.0, "small": 0.25} and total.item() == pytest.approx(2.0 * 5 + 0.25 * 1)


def test_coverage_counts_are_checked():
    b = make("coverage")
    with pytest.raises(ValueError, match="no sample count for: small"):
        b({"big": one(1), "small": one(1)}, 0, {"big": 3})
    with pytest.raises(ValueError, match=">= 0"):
        b({"big": one(1), "small": one(1)}, 0, {"big": 3, "small": float("nan")})


def test_coverage_state_resumes_exactly_with_counts():
    b = make("coverage")
    toy = Toy(b)
    counts = lambda s: {"big": 64, "small": 1 + s % 5}  # noqa: E731 - a caption count that moves
    for s in range(9):
        total, _ = b(toy.losses(), s, counts(s))
        toy.opt.zero_grad()
        total.backward()
        toy.opt.step()
    resumed = _roundtrip(b, "coverage")
    for s in range(9, 14):
        losses = toy.losses()
        assert resumed(losses, s, counts(s))[1] == b(losses, s, counts(s))[1]


def test_coverage_weighs_every_row_alike_in_a_recipe_with_a_mostly_uncaptioned_batch():
    """32 images, 2 of them captioned, a student text tower; terms as a recipe resolves them under coverage:
    feature (an image part and a caption part) and clip (the pairs). One student row is 0.3 rad off its teacher,
    an image row or a caption row: both rows must weigh alike in the total, and as much as one clip pair."""
    from edgedistill.distill.losses import Embeddings, LossContext, build_losses
    from edgedistill.distill.recipe import LossConfig

    B, P, D, angle = 32, 2, 8, 0.3
    d = 2 - 2 * math.cos(angle)  # the off row's squared distance
    config = LossConfig.model_validate({"terms": {"feature": {"distance": "mse"}, "clip": {}},
                                        "balancer": {"name": "coverage", "equalise": False}})
    terms = build_losses(config.terms, LossContext(embed_dim=D))

    def one_row_off(kind: str) -> Embeddings:
        t_img = torch.zeros(B, D, dtype=torch.float64)
        t_img[:, 0] = 1.0
        t_txt = torch.zeros(P, D, dtype=torch.float64)
        t_txt[:, 2] = 1.0
        s_img, s_txt = t_img.clone(), t_txt.clone()
        off, axis = (s_img, 0) if kind == "image" else (s_txt, 2)
        off[0, axis], off[0, axis + 1] = math.cos(angle), math.sin(angle)
        return Embeddings(student_image=s_img, teacher_image=t_img, student_text=s_txt, teacher_text=t_txt,
                          pair_image=torch.arange(P), text_is_student=True)

    per_row = {}
    for kind in ("image", "caption"):
        e = one_row_off(kind)
        values = {n: t(e) for n, t in terms.items()}
        counts = {n: t.samples(e) for n, t in terms.items()}  # what the trainer passes
        balancer = build_balancer(config.balancer, list(terms), {})
        _, w = balancer(values, 0, counts)
        per_row[kind] = w["feature"] * values["feature"].item() / d  # the off row's weight in the total
        clip_pair = w["clip"] / P  # clip's value is a mean over its P pairs
    assert per_row["caption"] / per_row["image"] == pytest.approx(1.0, rel=1e-9)  # a mean of parts: B / P = 16
    # the balancer's weights are float32
    assert per_row["image"] == pytest.approx(clip_pair, rel=1e-6) and per_row["image"] == pytest.approx(1 / (B + P))


# --------------------------------------------------------- dsmd's k under AdamW and gradient clipping


def dsmd_adamw_run(k: float, clip: float, steps: int = 40) -> tuple[torch.Tensor, int]:
    """A tiny regression with three terms of very different sizes under dsmd, stepped as the trainer steps: AdamW
    (lr 3e-3, weight decay 0.05) after clipping the gradient norm at ``clip`` (inf: off). Float64, one seed.
    -> (the parameters after ``steps``, the steps whose norm was clipped)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12)).double()
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 12, dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    balancer = build_balancer(validate_balancer({"name": "dsmd", "k": k}), ["a", "b", "c"], {})
    clipped = 0
    for step in range(steps):
        out = model(x)
        losses = {"a": 100 * F.mse_loss(out[:, :4], y[:, :4]), "b": F.mse_loss(out[:, 4:8], y[:, 4:8]),
                  "c": 0.01 * F.mse_loss(out[:, 8:], y[:, 8:])}
        total, _ = balancer(losses, step)
        opt.zero_grad()
        total.backward()
        clipped += float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)) > clip
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), clipped


def test_dsmd_k_changes_nothing_while_the_gradient_clip_binds_at_every_step():
    """k scales every weight after the first step, so the total is k times a k-free sum. Clipped to norm 1, the
    gradient is the same for k = 10 and k = 3 (up to clip_grad_norm's 1e-6 in the divisor), and so is AdamW's
    step: the two runs agree to float tolerance. Without clipping they differ: the first step's weights are the
    base weights, not k times anything, so the scale is not one constant across steps for Adam's moments; and a
    clip that binds on different steps of the two runs changes their directions' mix."""
    p10, clipped10 = dsmd_adamw_run(10.0, clip=1.0)
    p3, clipped3 = dsmd_adamw_run(3.0, clip=1.0)
    assert clipped10 == clipped3 == 40  # the trainer's grad_clip 1.0 binds at every step here
    assert (p10 - p3).abs().max().item() < 1e-7
    free10, clipped_free = dsmd_adamw_run(10.0, clip=math.inf)
    free3, _ = dsmd_adamw_run(3.0, clip=math.inf)
    assert clipped_free == 0 and (free10 - free3).abs().max().item() > 1e-4
    some10, n10 = dsmd_adamw_run(10.0, clip=100.0)  # norms 40-233 with k = 10, 18-70 with k = 3
    some3, n3 = dsmd_adamw_run(3.0, clip=100.0)
    assert n10 > 0 == n3 and (some10 - some3).abs().max().item() > 1e-4
