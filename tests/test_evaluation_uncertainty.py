"""Intervals, llama.cpp's statistic set and the three-way verdict (evaluation/uncertainty.py, record.judge)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llm_workbook.evaluation import uncertainty as U
from llm_workbook.evaluation.metrics import token_comparison, token_kl_divergence
from llm_workbook.evaluation.record import Thresholds, judge


def _series(n=4096, shift=0.13, seed=0):
    rng = np.random.default_rng(seed)
    nll_o = rng.gamma(2.0, 1.2, n)
    return {"nll_original": nll_o, "nll_candidate": nll_o + rng.normal(shift, 0.3, n),
            "kld": np.abs(rng.normal(0.1, 0.05, n)), "top1": (rng.random(n) < 0.8).astype(float), "cosine": rng.random(n)}


def test_block_sums_keep_totals_and_count_tokens():
    series = _series(1000)
    blocks = U.block_sums(series, block=128)
    assert len(blocks["count"]) == 8 and blocks["count"][-1] == 1000 - 7 * 128
    for k, v in series.items():
        assert blocks[k].sum() == pytest.approx(v.sum())
    with pytest.raises(ValueError, match="differ in length"):
        U.block_sums({"a": np.ones(3), "b": np.ones(4)})


def test_interval_is_seeded_contains_the_estimate_and_narrows_with_more_tokens():
    small = U.intervals(U.block_sums(_series(2048)))
    again = U.intervals(U.block_sums(_series(2048)))
    assert small == again  # the same figure gets the same interval on every run
    large = U.intervals(U.block_sums(_series(32768)))
    for name, iv in small.items():
        assert iv["low"] <= iv["estimate"] <= iv["high"], name
        assert large[name]["high"] - large[name]["low"] < iv["high"] - iv["low"], name
    ppl = large["ppl_change_percent"]
    assert ppl["estimate"] == pytest.approx((math.exp(0.13) - 1) * 100, abs=0.6)


def test_bootstrap_covers_the_true_value_about_95_percent_of_the_time():
    """Coverage on independent draws of a known ratio: the percentile interval is not a decoration."""
    hits = 0
    trials = 60
    for seed in range(trials):
        rng = np.random.default_rng(100 + seed)
        kld = rng.exponential(0.05, 2048)
        iv = U.bootstrap(U.block_sums({"kld": kld}), U.mean_of("kld"), resamples=500)
        hits += iv.low <= 0.05 <= iv.high
    assert 0.85 <= hits / trials <= 1.0


@pytest.mark.parametrize("estimate, low, high, expected", [
    (14.0, 13.0, 14.9, U.PASS), (16.0, 15.1, 17.0, U.FAIL), (14.8, 13.5, 16.2, U.INCONCLUSIVE)])
def test_classify_against_an_upper_threshold(estimate, low, high, expected):
    assert U.classify(U.Interval(estimate, low, high), 15.0, higher_is_better=False) == expected


def test_tokens_to_decide_scales_with_the_squared_ratio():
    iv = U.Interval(14.0, 12.0, 16.0)  # half-width 2, one point from the threshold
    assert U.tokens_to_decide(iv, 15.0, 4096) == 4 * 4096
    assert U.tokens_to_decide(U.Interval(15.0, 14.0, 16.0), 15.0, 4096) is None


def test_paired_difference_tells_apart_what_independent_intervals_cannot():
    base = _series(8192, shift=0.13, seed=1)
    rng = np.random.default_rng(7)
    other = dict(base, nll_candidate=base["nll_candidate"] + 0.01 + rng.normal(0, 0.01, 8192))  # 1 % worse, tightly paired
    a, b = U.block_sums(base), U.block_sums(other)
    ia, ib = U.intervals(a)["ppl_change_percent"], U.intervals(b)["ppl_change_percent"]
    assert ia["high"] > ib["low"]  # the two intervals overlap...
    diff = U.paired_difference(b, a, "ppl_change_percent")
    assert diff.low > 0  # ...but the paired difference is clearly positive
    with pytest.raises(ValueError, match="same tokens"):
        U.paired_difference(a, U.block_sums(_series(4096)), "ppl_change_percent")


def test_token_comparison_agrees_with_the_separate_metrics():
    g = torch.Generator().manual_seed(0)
    ref, cand = torch.randn(50, 300, generator=g), torch.randn(50, 300, generator=g)
    targets = torch.randint(0, 300, (50,), generator=g)
    out = token_comparison(ref, cand, targets)
    kld, match = token_kl_divergence(ref, cand)
    assert torch.allclose(out["kld"], kld) and torch.equal(out["top1"], match)
    log_p, log_q = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    picked = torch.arange(50), targets
    assert torch.allclose(out["nll_original"], -log_p[picked]) and torch.allclose(out["nll_candidate"], -log_q[picked])
    assert torch.allclose(out["delta_p"], log_q[picked].exp() - log_p[picked].exp())


@pytest.mark.parametrize("noise", [1e-3, 0.05, 1.0])
def test_token_comparison_in_float32_matches_a_float64_log_softmax_at_a_real_vocabulary(noise):
    """SmolLM2's vocabulary, candidates from nearly equal to far apart: KL within 1e-7 absolute of the
    float64 computation (float16 stored logits are already 1e-3 relative), never negative."""
    g = torch.Generator().manual_seed(1)
    ref = 3 * torch.randn(64, 49152, generator=g)
    cand = ref + noise * torch.randn(64, 49152, generator=g)
    targets = torch.randint(0, 49152, (64,), generator=g)
    out = token_comparison(ref, cand, targets)
    log_p, log_q = torch.log_softmax(ref.double(), -1), torch.log_softmax(cand.double(), -1)
    exact = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert torch.allclose(out["kld"], exact, rtol=1e-6, atol=1e-7) and (out["kld"] >= 0).all()
    picked = torch.arange(64), targets
    assert torch.allclose(out["nll_candidate"] - out["nll_original"], log_p[picked] - log_q[picked], atol=1e-7)


def test_divergence_statistics_are_llama_cpp_shaped():
    rng = np.random.default_rng(3)
    kld = torch.from_numpy(rng.exponential(0.02, 5000))
    dp = torch.from_numpy(rng.normal(-0.01, 0.05, 5000))
    top1 = torch.from_numpy(rng.random(5000) < 0.9)
    stats = U.divergence_statistics(kld, dp, top1)
    assert set(stats["kld"]) >= {"mean", "mean_se", "max", "p99.9", "p99", "p90", "p50", "p10", "p5", "p1"}
    assert stats["kld"]["p99.9"] >= stats["kld"]["p99"] >= stats["kld"]["p50"]
    assert stats["delta_p"]["rms"] == pytest.approx(float(np.sqrt(np.mean(dp.numpy() ** 2))))
    assert stats["same_top1"]["se"] == pytest.approx(math.sqrt(0.9 * 0.1 / 5000), rel=0.1)


def _metrics(ppl_iv):
    est, low, high = ppl_iv
    return {"cosine_similarity": 0.99, "ppl": {"delta_percent": est, "num_tokens": 4096},
            "intervals": {"ppl_change_percent": {"estimate": est, "low": low, "high": high},
                          "cosine": {"estimate": 0.99, "low": 0.985, "high": 0.995}}}


def test_judge_is_three_way_and_says_how_many_tokens_would_decide():
    t = Thresholds(cosine=0.95, ppl_increase=0.15)
    assert judge(_metrics((10.0, 8.0, 12.0)), t)["outcome"] == U.PASS
    failed = judge(_metrics((20.0, 18.0, 22.0)), t)
    assert failed["outcome"] == U.FAIL and not failed["passed"]
    undecided = judge(_metrics((14.8, 13.5, 16.2)), t)
    assert undecided["outcome"] == U.INCONCLUSIVE and not undecided["passed"]
    check = next(c for c in undecided["checks"] if c["name"] == "ppl_increase")
    assert check["passed"] is None and check["tokens_to_decide"] == pytest.approx(4096 * (1.35 / 0.2) ** 2, abs=2)
    assert "straddles" in undecided["reasons"][0] and "+14.80%" in undecided["reasons"][0]
    # without intervals (older records, encoders without sentences) the estimate decides, as before
    plain = judge({"cosine_similarity": 0.99, "ppl": {"delta_percent": 14.8}}, t)
    assert plain["outcome"] == U.PASS and plain["passed"]
