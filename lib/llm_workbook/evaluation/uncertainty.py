"""How sure a figure is: 95 % intervals by a paired block bootstrap, llama.cpp's divergence statistics,
and the three-way verdict (pass, fail, not enough evidence) they allow.

Every causal-LM figure is a ratio of sums over the scored tokens (perplexity change from the summed
negative log-likelihoods of original and candidate, mean KLD, same-top-1, mean cosine). Neighbouring
tokens are not independent (one passage is easy, the next hard), so the interval resamples **blocks** of
``BLOCK_TOKENS`` consecutive scored tokens, the same blocks for original and candidate (paired): the
per-block sums are drawn ``RESAMPLES`` times with replacement (seeded, so a figure's interval is the same
on every run) and the 2.5th and 97.5th percentiles of the statistic are the interval.

A verdict compares an interval with its threshold: **pass** when the whole interval is on the good side,
**fail** when it is all on the bad side, otherwise **inconclusive**, with the number of tokens that
would decide it if the estimate held (an interval's half-width shrinks as one over the square root of
the tokens: ``n_needed = n * (half_width / |estimate - threshold|)**2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

BLOCK_TOKENS = 128
RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
# llama.cpp's --kl-divergence report: KLD and delta-p percentiles (its "99.9%" ... "1.0%" lines).
KLD_PERCENTILES = (99.9, 99.0, 90.0, 50.0, 10.0, 5.0, 1.0)
DELTA_P_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95 % interval."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def as_dict(self) -> dict:
        return asdict(self)


def block_sums(per_token: dict[str, torch.Tensor | np.ndarray], block: int = BLOCK_TOKENS) -> dict[str, np.ndarray]:
    """Sums of each per-token series over consecutive blocks of ``block`` tokens (the last may be shorter),
    plus ``count``, the tokens per block."""
    series = {k: np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64).reshape(-1)
              for k, v in per_token.items()}
    sizes = {v.size for v in series.values()}
    if len(sizes) != 1:
        raise ValueError(f"per-token series differ in length: { {k: v.size for k, v in series.items()} }")
    n = sizes.pop()
    if n == 0:
        raise ValueError("no scored tokens")
    starts = np.arange(0, n, block)
    out = {k: np.add.reduceat(v, starts) for k, v in series.items()}
    out["count"] = np.diff(np.append(starts, n)).astype(np.float64)
    return out


def bootstrap(blocks: dict[str, np.ndarray], statistic: Callable[[dict[str, np.ndarray]], np.ndarray],
              resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """Percentile interval of ``statistic`` over block resamples. ``statistic`` maps a dict of summed
    series (arrays: one value per resample, or scalars for the estimate) to the figure."""
    sums = {k: np.asarray(v, dtype=np.float64) for k, v in blocks.items()}
    n = len(sums["count"])
    estimate = float(statistic({k: v.sum() for k, v in sums.items()}))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)  # [R, n]
    values = np.asarray(statistic({k: weights @ v for k, v in sums.items()}), dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(estimate, math.nan, math.nan)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high))


def combine(blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Blocks of several records concatenated (e.g. rebuilt, so that their spread counts)."""
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


# --- the headline figures ------------------------------------------------------------------------------


def ppl_change_percent(s: dict) -> np.ndarray:
    """Perplexity change of candidate over original, in percent: ``exp((NLL_c - NLL_o) / n) - 1``."""
    return (np.exp((s["nll_candidate"] - s["nll_original"]) / s["count"]) - 1.0) * 100.0


def mean_of(key: str) -> Callable[[dict], np.ndarray]:
    return lambda s: s[key] / s["count"]


HEADLINES = {  # name -> (statistic, per-token series it needs)
    "ppl_change_percent": (ppl_change_percent, ("nll_original", "nll_candidate")),
    "kld_mean": (mean_of("kld"), ("kld",)),
    "top1_agreement": (mean_of("top1"), ("top1",)),
    "cosine": (mean_of("cosine"), ("cosine",)),
}


def intervals(blocks: dict[str, np.ndarray]) -> dict[str, dict]:
    """Every headline figure the blocks allow, with its interval."""
    return {name: bootstrap(blocks, stat).as_dict() for name, (stat, needs) in HEADLINES.items()
            if all(k in blocks for k in needs)}


def paired_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray], name: str) -> Interval:
    """Interval of ``name``(a) - ``name``(b) for two candidates scored on the same blocks of the same text."""
    stat, needs = HEADLINES[name]
    if len(a["count"]) != len(b["count"]) or not np.array_equal(a["count"], b["count"]):
        raise ValueError("the two candidates were not scored on the same tokens")
    joined = {**{f"a.{k}": a[k] for k in (*needs, "count")}, **{f"b.{k}": b[k] for k in needs}, "count": a["count"]}

    def difference(s: dict) -> np.ndarray:
        first = {k: s[f"a.{k}"] for k in needs} | {"count": s["count"]}
        second = {k: s[f"b.{k}"] for k in needs} | {"count": s["count"]}
        return stat(first) - stat(second)

    return bootstrap(joined, difference)


# --- llama.cpp's statistic set ---------------------------------------------------------------------------


def _percentiles(values: np.ndarray, which: tuple[float, ...]) -> dict[str, float]:
    points = np.percentile(values, which)
    return {f"p{w:g}": float(v) for w, v in zip(which, points)}


def divergence_statistics(kld: torch.Tensor, delta_p: torch.Tensor, top1: torch.Tensor) -> dict:
    """KLD and delta-p (the correct token's probability, candidate minus original) as llama.cpp's
    ``llama-perplexity --kl-divergence`` reports them; ± are standard errors over tokens, as llama.cpp
    computes them (tokens taken as independent, so narrower than the block-bootstrap intervals)."""
    k = kld.detach().double().cpu().numpy().reshape(-1)
    d = delta_p.detach().double().cpu().numpy().reshape(-1)
    t = top1.detach().double().cpu().numpy().reshape(-1)
    n = k.size
    rms = float(np.sqrt(np.mean(d**2)))
    return {
        "tokens": n,
        "kld": {"mean": float(k.mean()), "mean_se": float(k.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
                "max": float(k.max()), **_percentiles(k, KLD_PERCENTILES)},
        "delta_p": {"mean": float(d.mean()), "mean_se": float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
                    "rms": rms,
                    # delta method: d(rms)/d(mean of squares) = 1 / (2 rms)
                    "rms_se": float(np.std(d**2, ddof=1) / math.sqrt(n) / (2 * rms)) if n > 1 and rms > 0 else math.nan,
                    "max": float(d.max()), "min": float(d.min()), **_percentiles(d, DELTA_P_PERCENTILES)},
        "same_top1": {"mean": float(t.mean()), "se": float(math.sqrt(t.mean() * (1 - t.mean()) / n))},
    }


# --- verdicts ----------------------------------------------------------------------------------------------


def classify(interval: Interval | dict, threshold: float, higher_is_better: bool) -> str:
    """pass / fail / inconclusive of one interval against its threshold."""
    iv = interval if isinstance(interval, Interval) else Interval(**interval)
    if not (math.isfinite(iv.low) and math.isfinite(iv.high)):
        good = iv.estimate >= threshold if higher_is_better else iv.estimate <= threshold
        return PASS if good else FAIL  # no interval (one block): the estimate decides, and the record says so
    if higher_is_better:
        return PASS if iv.low >= threshold else FAIL if iv.high < threshold else INCONCLUSIVE
    return PASS if iv.high <= threshold else FAIL if iv.low > threshold else INCONCLUSIVE


def tokens_to_decide(interval: Interval | dict, threshold: float, tokens: int) -> int | None:
    """Tokens at which the interval would clear the threshold if the estimate held; None if it never would."""
    iv = interval if isinstance(interval, Interval) else Interval(**interval)
    gap = abs(iv.estimate - threshold)
    if gap == 0 or not math.isfinite(iv.half_width):
        return None
    return int(math.ceil(tokens * (iv.half_width / gap) ** 2))
