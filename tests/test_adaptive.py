"""Adaptive estimation (nemo_paced.rollout.adaptive): the posterior of w(p), the fitted prior, the
sequential rule, re-checks of confident extremes, and the service running adaptive jobs on a seeded
toy engine whose pass rates are known."""

import hashlib

import numpy as np
import pytest

from nemo_paced.passrates import Outcome, PassRateTable
from nemo_paced.problems import Problem
from nemo_paced.rollout.adaptive import (AdaptiveConfig, estimate, fit_prior, posterior_weight, select,
                                         table_prior)
from nemo_paced.rollout.engines.base import Generation, Sample


def test_posterior_weight_matches_numerical_integration():
    grid = np.linspace(0, 1, 200001)[1:-1]
    for (s, n, a, b, alpha, beta) in [(0, 4, 1, 1, 1, 1), (3, 8, 0.4, 0.7, 1, 1), (5, 5, 2, 1.5, 2, 1)]:
        density = grid ** (a + s - 1) * (1 - grid) ** (b + n - s - 1)
        density /= density.sum()
        w = grid**alpha * (1 - grid) ** beta
        mean, sd = posterior_weight([s], [n], (a, b), alpha, beta)
        assert mean[0] == pytest.approx((w * density).sum(), rel=1e-3)
        assert sd[0] == pytest.approx(np.sqrt((w**2 * density).sum() - (w * density).sum() ** 2), rel=1e-3)


def test_fit_prior_recovers_the_pools_beta_from_noisy_counts():
    rng = np.random.default_rng(0)
    p = rng.beta(0.6, 0.9, 20000)
    a, b = fit_prior(rng.binomial(8, p), np.full(p.shape, 8))
    assert a == pytest.approx(0.6, rel=0.1) and b == pytest.approx(0.9, rel=0.1)
    assert fit_prior([1, 2], [4, 4]) == (1.0, 1.0)  # too few problems: flat
    assert fit_prior(np.zeros(50), np.full(50, 4)) == (1.0, 1.0)  # no spread to fit


class Coins:
    """draw(ids, n): n seeded Bernoulli(p[id]) rollouts per id; remembers every call."""

    def __init__(self, p: dict, seed: int = 0) -> None:
        self.p, self.rng, self.calls = p, np.random.default_rng(seed), []

    def __call__(self, ids, n):
        self.calls.append((list(ids), n))
        return [(int(self.rng.binomial(n, self.p[i])), n) for i in ids]


def test_sequential_rule_adds_rollouts_only_while_the_weight_is_uncertain():
    config = AdaptiveConfig(first=4, step=4, max_k=16, tolerance=0.03)
    p = {f"q{i}": v for i, v in enumerate(np.linspace(0, 1, 41))}
    prior = (0.5, 0.5)
    draw = Coins(p)
    outcomes = estimate(list(p), draw, config, prior)
    assert [o.problem_id for o in outcomes] == list(p)
    assert draw.calls[0] == (list(p), 4)  # everyone gets `first`
    assert all(n == 4 for _, n in draw.calls[1:]) and len(draw.calls) <= 4
    for earlier, later in zip(draw.calls, draw.calls[1:]):
        assert set(later[0]) <= set(earlier[0])  # a problem that stopped never comes back
    # replay the counts round by round: a problem continues exactly while sd > tolerance and trials < max_k
    counts = {i: [0, 0] for i in p}
    replay = Coins(p)
    for call, (ids, n) in enumerate(draw.calls):
        for i, (s, t) in zip(ids, replay(ids, n)):
            counts[i][0] += s
            counts[i][1] += t
        _, sd = posterior_weight([counts[i][0] for i in ids], [counts[i][1] for i in ids], prior)
        expected_next = [i for i, d in zip(ids, sd) if d > config.tolerance and counts[i][1] < config.max_k]
        assert expected_next == (draw.calls[call + 1][0] if call + 1 < len(draw.calls) else [])
    assert [(o.successes, o.trials) for o in outcomes] == [tuple(counts[i]) for i in p]
    spent = sum(o.trials for o in outcomes)
    assert 4 * len(p) < spent < 16 * len(p)
    # deterministic: the same seed gives the same outcomes
    assert estimate(list(p), Coins(p), config, prior) == outcomes


def test_extremes_stop_early_under_a_u_shaped_prior_but_not_under_a_flat_one():
    config = AdaptiveConfig(first=4, step=4, max_k=16, tolerance=0.05)
    p = {"solved": 1.0, "hopeless": 0.0}
    u_shaped = estimate(list(p), Coins(p), config, prior=(0.1, 0.1))
    assert [o.trials for o in u_shaped] == [4, 4]
    flat = estimate(list(p), Coins(p), config, prior=(1.0, 1.0))
    assert [o.trials for o in flat] == [16, 16]


def test_confident_extremes_are_rechecked_with_the_set_probability_and_never_starved():
    table = PassRateTable()
    ids = [f"q{i}" for i in range(300)]
    # 100 all-fail and 100 all-pass at 8 trials, 100 in the middle; and one 1/1 (too little evidence)
    table.update([Outcome(i, 0 if n < 100 else 8 if n < 200 else 3, 8) for n, i in enumerate(ids)])
    table.update([Outcome("thin", 1, 1)])
    config = AdaptiveConfig(recheck=0.25, confident=0.25, min_fit=32)
    rng = np.random.default_rng(0)
    last_checked = {i: 0 for i in ids[:200]}
    share = []
    for refresh in range(1, 41):
        chosen, left_out = select(ids + ["thin"], table, config, rng)
        assert set(left_out) <= set(ids[:200])  # only confident extremes are ever left out
        assert set(ids[200:]) | {"thin"} <= set(chosen)
        share.append(1 - len(left_out) / 200)
        for i in set(ids[:200]) & set(chosen):
            last_checked[i] = refresh
    assert np.mean(share) == pytest.approx(0.25, abs=0.03)
    assert min(last_checked.values()) > 0  # every one re-estimated within 40 refreshes


class ToyEngine:
    """Problem prompts are "p=0.30": each sample passes with that probability, seeded by
    (params.seed, prompt), so a run is reproducible and rounds with new seeds draw new samples."""

    name = "toy"
    checkpoint = "toy-weights"

    @staticmethod
    def tokenizer(prompts):
        return {"input_ids": [[2] * len(p) for p in prompts]}

    def generate(self, prompts, params):
        out = []
        for prompt in prompts:
            key = int(hashlib.sha256(f"{params.seed}:{prompt}".encode()).hexdigest()[:8], 16)
            passed = np.random.default_rng(key).random(params.n) < float(prompt[2:])
            out.append(Generation([], [Sample("1" if x else "0", [1], [0.0], "stop") for x in passed]))
        return out

    def load_weights(self, path):
        self.checkpoint = path

    def close(self):
        pass


def test_service_runs_adaptive_jobs_and_reports_rollouts_spent_and_saved(tmp_path):
    from nemo_paced.rollout.service import RolloutService, ServiceConfig
    from nemo_paced.rollout.verifiers import resolve

    rates = [0.0] * 40 + [1.0] * 40 + list(np.linspace(0.1, 0.9, 40))
    problems = [Problem(f"q{i}", f"p={r:.2f}", "1") for i, r in enumerate(rates)]
    config = ServiceConfig(k=8, max_tokens=4, template="raw", batch_problems=16, seed=5,
                           adaptive=AdaptiveConfig(first=4, step=4, max_k=16, tolerance=0.03, recheck=0.25))

    def run_job(service):
        job = service.submit()
        service._run(job)  # the worker's own call, synchronously
        assert job.status == "done"
        return job

    service = RolloutService(ToyEngine(), problems, resolve("exact"), tmp_path / "state", config)
    first = run_job(service)  # empty table: flat prior, nobody left out
    trials = {r.problem_id: r.trials for r in service.table.records()}
    assert first.left_out == 0 and first.total == 120
    assert first.rollouts == sum(trials.values()) == service.rollouts
    assert first.saved == 120 * 8 - first.rollouts
    assert set(trials.values()) <= {4, 8, 12, 16}
    assert first.view()["saved"] == first.saved and first.view()["rollouts"] == first.rollouts

    before = {r.problem_id: r for r in service.table.records()}
    second = run_job(service)  # fitted U-shaped prior: extremes stop at 4, most are left out
    assert 40 < second.left_out < 80
    left = [i for i, r in before.items() if service.table[i].version == r.version]
    assert len(left) == second.left_out and all(before[i].successes in (0, before[i].trials) for i in left)
    assert second.rollouts == sum(service.table[i].trials for i in before if i not in left)
    assert second.saved == 120 * 8 - second.rollouts > first.saved  # leaving problems out saves more
    assert table_prior(service.table, config.adaptive)()[0] < 1  # the pool is U-shaped

    again = RolloutService(ToyEngine(), problems, resolve("exact"), tmp_path / "again", config)
    run_job(again)
    assert [(r.successes, r.trials) for r in again.table.records()] == \
        [(before[r.problem_id].successes, before[r.problem_id].trials) for r in again.table.records()]


def test_job_prior_moves_from_the_last_refresh_to_this_jobs_first_rounds():
    """Between refreshes the pool polarises: once min_fit problems had their first round, the prior
    is fitted to those counts, and only the first round of each problem is observed."""
    from nemo_paced.rollout.adaptive import JobPrior

    rng = np.random.default_rng(1)
    p = {f"q{i}": v for i, v in enumerate(rng.beta(4, 0.3, 400))}  # mostly mastered now
    prior = JobPrior(fallback=(2.0, 2.0), min_fit=64)
    config = AdaptiveConfig(first=4, step=4, max_k=16, tolerance=0.05)
    ids = list(p)
    estimate(ids[:32], Coins(p), config, prior)
    assert prior() == (2.0, 2.0) and len(prior.trials) == 32 and set(prior.trials) == {4}
    estimate(ids[32:], Coins(p, seed=1), config, prior)
    a, b = prior()
    assert len(prior.trials) == 400 and a / (a + b) > 0.85  # the job's own pool, not the fallback


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="first"):
        AdaptiveConfig(first=0)
    with pytest.raises(ValueError, match="first"):
        AdaptiveConfig(first=8, max_k=4)
    with pytest.raises(ValueError, match="recheck"):
        AdaptiveConfig(recheck=1.5)
