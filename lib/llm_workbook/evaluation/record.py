"""What an evaluation returns: the record (one JSON per run), the thresholds and the verdict they give, and
the faults that stop an evaluation (not comparable, non-finite logits).

The record's fields are documented in ``docs/evaluation_record.md``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from llm_workbook.evaluation import uncertainty as U

SCHEMA_VERSION = "1.1"
# Config fields that must agree for two checkpoints to be the same architecture.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


# ============================================================================================
# Thresholds and verdict
# ============================================================================================


@dataclass
class Thresholds:
    """Pass/fail limits; None switches a check off.

    ``cosine``: minimum mean cosine (last hidden state for causal LMs, sentence embedding for
    encoders). ``ppl_increase``: maximum perplexity increase as a fraction (0.15 = 15 %).
    ``kld``: maximum mean KL divergence (nats). ``top1``: minimum top-1 agreement.
    """

    cosine: float | None = 0.95
    ppl_increase: float | None = 0.15
    kld: float | None = None
    top1: float | None = None


def _check(name: str, value: float | None, threshold: float | None, higher_is_better: bool, reason: str,
           interval: dict | None = None, scale: float = 1.0, tokens: int | None = None) -> dict:
    """One check. With an ``interval`` (in units of ``value * scale``) the outcome is three-way: pass or fail
    only when the whole interval clears the threshold, else inconclusive (``passed`` None)."""
    if threshold is None:
        return {"name": name, "value": value, "threshold": None, "passed": None, "outcome": None, "note": "no threshold"}
    if value is None:
        return {"name": name, "value": None, "threshold": threshold, "passed": None, "outcome": None,
                "note": "not applicable to this model"}
    check = {"name": name, "value": value, "threshold": threshold}
    if interval is None:
        ok = value >= threshold if higher_is_better else value <= threshold  # NaN fails both ways
        outcome = U.PASS if ok else U.FAIL
    else:
        outcome = U.classify(interval, threshold * scale, higher_is_better)
        check["interval"] = interval
    check["outcome"] = outcome
    check["passed"] = {U.PASS: True, U.FAIL: False}.get(outcome)
    if outcome == U.PASS:
        check["note"] = None
    elif outcome == U.FAIL:
        check["note"] = reason
    else:
        needed = U.tokens_to_decide(interval, threshold * scale, tokens) if tokens else None
        check["tokens_to_decide"] = needed
        around = f"[{_fmt(interval['low'], scale)}, {_fmt(interval['high'], scale)}]"
        check["note"] = (f"{name} {_fmt(interval['estimate'], scale)} {around} straddles {_fmt(threshold * scale, scale)}: "
                         + (f"about {needed:,} tokens would decide it" if needed else "more text cannot decide it"))
    return check


def _fmt(value: float, scale: float) -> str:
    return f"{value:+.2f}%" if scale == 100.0 else f"{value:.4g}"


def judge(metrics: dict, thresholds: Thresholds) -> dict:
    """The verdict: every check with its value, interval and threshold; ``outcome`` pass / fail /
    inconclusive (fail if any check fails, inconclusive if any cannot be decided), ``passed`` only for
    pass, and one reason per failed or undecided check."""
    cos = metrics.get("cosine_similarity")
    ppl = (metrics.get("ppl") or {}).get("delta_percent")
    ppl_frac = None if ppl is None else ppl / 100.0
    kld = (metrics.get("kld") or {}).get("mean")
    top1 = metrics.get("top1_agreement")
    basis = metrics.get("cosine_basis", "")
    iv = metrics.get("intervals") or {}
    tokens = (metrics.get("ppl") or {}).get("num_tokens") or (metrics.get("embedding_cosine") or {}).get("count")
    checks = [
        _check("cosine", cos, thresholds.cosine, True, f"cosine {cos:.4f} < {thresholds.cosine} ({basis})" if cos is not None and thresholds.cosine is not None else "",
               iv.get("cosine"), tokens=tokens),
        _check("ppl_increase", ppl_frac, thresholds.ppl_increase, False,
               f"ppl increase {_percent(100 * ppl_frac)} > {100 * thresholds.ppl_increase:.2f}%" if ppl_frac is not None and thresholds.ppl_increase is not None else "",
               iv.get("ppl_change_percent"), scale=100.0, tokens=tokens),
        _check("kld", kld, thresholds.kld, False, f"kld mean {kld:.4g} > {thresholds.kld}" if kld is not None and thresholds.kld is not None else "",
               iv.get("kld_mean"), tokens=tokens),
        _check("top1", top1, thresholds.top1, True, f"top-1 agreement {top1:.4f} < {thresholds.top1}" if top1 is not None and thresholds.top1 is not None else "",
               iv.get("top1_agreement"), tokens=tokens),
    ]
    outcomes = {c["outcome"] for c in checks}
    outcome = U.FAIL if U.FAIL in outcomes else U.INCONCLUSIVE if U.INCONCLUSIVE in outcomes else U.PASS
    failed = [c["note"] for c in checks if c["outcome"] == U.FAIL]
    undecided = [c["note"] for c in checks if c["outcome"] == U.INCONCLUSIVE]
    return {"passed": outcome == U.PASS, "outcome": outcome, "reasons": failed + undecided, "checks": checks}


# ============================================================================================
# The record
# ============================================================================================


def _encode(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


_NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


@dataclass
class EvaluationRecord:
    """One evaluation run (schema: docs/evaluation_record.md)."""

    schema_version: str
    created_at: str
    kind: str  # "causal-lm" or "encoder"
    original: dict  # ModelInfo of the original
    candidate: dict  # ModelInfo of the candidate
    settings: dict
    metrics: dict
    sizes: dict
    thresholds: dict
    verdict: dict
    perf: dict | None = None
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    elapsed_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.verdict.get("passed"))

    def to_dict(self) -> dict:
        return _encode(asdict(self))

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The record as JSON text (non-finite floats as "inf"/"-inf"/"nan"); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "EvaluationRecord":
        """Read a record written by ``to_json`` (a path, or the JSON text itself)."""
        text = str(path)
        if not text.lstrip().startswith("{"):
            text = Path(path).read_text(encoding="utf-8")
        raw = _decode(json.loads(text))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known) if isinstance(raw, dict) else []
        if not isinstance(raw, dict) or unknown:
            raise ValueError(f"{path}: not an evaluation record (unknown fields {unknown})")
        try:
            return cls(**raw)
        except TypeError as exc:
            raise ValueError(f"{path}: not an evaluation record ({exc})") from None


# ============================================================================================
# Input checks
# ============================================================================================


class EvaluationFault(ValueError):
    """The two models cannot be compared, or the candidate computes garbage (NaN/Inf): the run fails with this
    reason instead of raising out of the notebook."""


def _percent(pct: float) -> str:
    """``23.00%``, and an exploded perplexity as ``x 316,333`` rather than ``31633168.43%``."""
    return f"x {1 + pct / 100:,.0f}" if pct >= 1000 else f"{pct:.2f}%"


def check_compatible(original: str, candidate: str, orig_config: dict, cand_config: dict) -> None:
    """EvaluationFault naming both models when their architecture or vocabulary differ."""
    for key in ARCHITECTURE_FIELDS:
        a, b = orig_config.get(key), cand_config.get(key)
        if a is not None and b is not None and a != b:
            raise EvaluationFault(f"original '{original}' and candidate '{candidate}' are different architectures: "
                             f"{key} {a!r} vs {b!r}")
    arch_a, arch_b = orig_config.get("architectures"), cand_config.get("architectures")
    if arch_a and arch_b and arch_a[0] != arch_b[0]:
        raise EvaluationFault(f"original '{original}' and candidate '{candidate}' are different architectures: "
                         f"{arch_a[0]} vs {arch_b[0]}")
    va, vb = orig_config.get("vocab_size"), cand_config.get("vocab_size")
    if va != vb:
        raise EvaluationFault(f"original '{original}' has vocab_size {va} but candidate '{candidate}' has {vb}: "
                         "their outputs cannot be compared token by token")


def check_tokenizers(original: str, candidate: str, tok_a, tok_b) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise EvaluationFault(f"original '{original}' and candidate '{candidate}' have different tokenizer vocabularies "
                         f"({len(tok_a)} vs {len(tok_b)} entries)")


def check_texts(texts: Sequence[str] | None) -> list[str]:
    if texts is None:
        return []
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, got a single string")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: give at least one text to evaluate on (or texts=None for the corpus)")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts[{bad[0]}] is not a string")
    if not any(t.strip() for t in texts):
        raise ValueError("texts holds only empty strings: nothing to evaluate on")
    return texts
