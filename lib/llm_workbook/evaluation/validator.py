"""PrecisionValidator: does a quantized model stay close enough to its original?

A thin verdict layer over ``evaluation.compare.evaluate``: the thresholds become checks, every failed check a
reason ("cosine 0.9100 < 0.95 (last_hidden_state)", "ppl increase 23.00% > 15.00%"), and the full
evaluation record rides along. For encoders (all-MiniLM-L6-v2 and the like) the cosine is that of the
L2-normalized sentence embeddings, as our first validator compared; perplexity and KLD checks do not
apply to them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llm_workbook.evaluation.record import EvaluationRecord, Thresholds
from llm_workbook.evaluation.compare import evaluate


@dataclass
class ValidationResult:
    """The verdict and the numbers it rests on; ``record`` holds everything measured."""

    passed: bool
    cosine_similarity: float  # mean cosine: last hidden state (causal LM) or sentence embedding (encoder)
    ppl_increase: float | None  # fraction: 0.15 = perplexity 15 % above the original's; None for encoders
    kld_mean: float | None
    top1_agreement: float | None
    generation_agreement: float | None
    ppl_original: float | None
    ppl_candidate: float | None
    reasons: list[str] = field(default_factory=list)
    record: EvaluationRecord | None = None

    def __bool__(self) -> bool:
        return self.passed


class PrecisionValidator:
    """Compare a quantized model with its original against thresholds.

    Args:
        cosine_threshold: minimum mean cosine.
        ppl_threshold: maximum perplexity increase as a fraction (0.15 = 15 %).
        kld_threshold: maximum mean KL divergence in nats (None: not checked).
        top1_threshold: minimum top-1 agreement (None: not checked).
        **eval_options: passed to ``evaluation.compare.evaluate`` (context_length, max_eval_tokens, dtype,
            activation_quant, keep_packed, gen_tokens, perf...). ``perf`` defaults to False here:
            validation is about precision.
    """

    def __init__(self, cosine_threshold: float | None = 0.95, ppl_threshold: float | None = 0.15,
                 kld_threshold: float | None = None, top1_threshold: float | None = None, **eval_options: Any):
        for name, value in (("cosine_threshold", cosine_threshold), ("ppl_threshold", ppl_threshold),
                            ("kld_threshold", kld_threshold), ("top1_threshold", top1_threshold)):
            if value is not None and not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number or None, got {value!r}")
        if "thresholds" in eval_options:
            raise ValueError("pass thresholds as cosine_threshold / ppl_threshold / kld_threshold / top1_threshold")
        self.thresholds = Thresholds(cosine=cosine_threshold, ppl_increase=ppl_threshold, kld=kld_threshold,
                                     top1=top1_threshold)
        self.eval_options = {"perf": False, **eval_options}

    def validate(self, original_model_path: str | os.PathLike, quantized_model_path: str | os.PathLike,
                 test_texts: Sequence[str] | None = None) -> ValidationResult:
        """Evaluate ``quantized_model_path`` against ``original_model_path`` on ``test_texts``.

        Paths may be Parquet files, HF directories or hub ids. ``test_texts=None`` uses the eval
        split of the corpus (``corpus`` option, default "pydoc").
        """
        record = evaluate(original_model_path, quantized_model_path, texts=test_texts, thresholds=self.thresholds,
                          **self.eval_options)
        m = record.metrics
        ppl = m.get("ppl") or {}
        delta = ppl.get("delta_percent")
        generation = m.get("generation") or {}
        return ValidationResult(
            passed=record.passed,
            cosine_similarity=m["cosine_similarity"],
            ppl_increase=None if delta is None else delta / 100.0,
            kld_mean=(m.get("kld") or {}).get("mean"),
            top1_agreement=m.get("top1_agreement"),
            generation_agreement=generation.get("agreement"),
            ppl_original=ppl.get("original"),
            ppl_candidate=ppl.get("candidate"),
            reasons=list(record.verdict["reasons"]),
            record=record,
        )


__all__ = ["PrecisionValidator", "ValidationResult"]
