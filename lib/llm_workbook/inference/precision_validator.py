"""AI-OS's ``llm_compression.inference.precision_validator``: ``PrecisionValidator`` and ``ValidationResult``
with AI-OS's names, arguments, fields and report formats.

The measurement is ours (``evaluation.compare.evaluate`` on ``test_texts``): for encoders the cosine of
the L2-normalised sentence embeddings, as AI-OS compares; for causal LMs the per-token cosine of the last
hidden state (AI-OS's engine compares one normalised vector per text). Where we differ from AI-OS on
purpose: with ``validate_ppl=True`` the perplexities are measured on ``test_texts`` (AI-OS returns the
constants 10.0 and 11.0), and a failed perplexity fails the validation. Our richer validator, with KL
divergence and top-1 agreement, is ``llm_workbook.PrecisionValidator``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

from llm_workbook.logger import logger


@dataclass
class ValidationResult:
    passed: bool
    cosine_similarity: float
    min_cosine_similarity: float
    max_cosine_similarity: float
    ppl_increase: Optional[float] = None
    original_ppl: Optional[float] = None
    quantized_ppl: Optional[float] = None
    error_message: Optional[str] = None
    num_samples: int = 0
    validation_time_ms: float = 0.0
    timestamp: str = field(default_factory=lambda: datetime.now().isoformat())

    def to_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __str__(self) -> str:
        lines = [f"Validation Result: {'PASSED' if self.passed else 'FAILED'}",
                 f"  Cosine Similarity: {self.cosine_similarity:.4f} (min: {self.min_cosine_similarity:.4f}, "
                 f"max: {self.max_cosine_similarity:.4f})"]
        if self.ppl_increase is not None:
            lines.append(f"  PPL Increase: {self.ppl_increase:.2%} (original: {self.original_ppl:.2f}, "
                         f"quantized: {self.quantized_ppl:.2f})")
        lines += [f"  Samples: {self.num_samples}", f"  Time: {self.validation_time_ms:.2f}ms"]
        if self.error_message:
            lines.append(f"  Error: {self.error_message}")
        return "\n".join(lines)


class PrecisionValidator:
    """Accept a quantized model when its mean cosine >= ``cosine_threshold`` and, with ``validate_ppl``,
    its perplexity increase <= ``ppl_threshold`` (a fraction: 0.15 = 15 %)."""

    def __init__(self, cosine_threshold: float = 0.95, ppl_threshold: float = 0.15, validate_ppl: bool = False):
        self.cosine_threshold = cosine_threshold
        self.ppl_threshold = ppl_threshold
        self.validate_ppl = validate_ppl

    def validate(self, original_model_path: str, quantized_model_path: str, test_texts: List[str]) -> ValidationResult:
        """Compare the two models on ``test_texts``; any failure gives a failed result with its message."""
        from llm_workbook.evaluation.compare import evaluate

        start = time.time()
        try:
            for path in (original_model_path, quantized_model_path):
                if not Path(path).exists():
                    raise FileNotFoundError(f"model not found: {path}")
            if not test_texts:
                raise ValueError("No test texts provided")
            record = evaluate(original_model_path, quantized_model_path, texts=list(test_texts), perf=False,
                              thresholds={"cosine": self.cosine_threshold,
                                          "ppl_increase": self.ppl_threshold if self.validate_ppl else None})
            m = record.metrics
            spread = m.get("embedding_cosine") or m.get("hidden_cosine") or {}
            ppl = (m.get("ppl") or {}) if self.validate_ppl else {}
            delta = ppl.get("delta_percent")
            reasons = list(record.verdict["reasons"])
            return ValidationResult(
                passed=record.passed, cosine_similarity=float(m["cosine_similarity"]),
                min_cosine_similarity=float(spread.get("min", m["cosine_similarity"])),
                max_cosine_similarity=float(spread["max"]),
                ppl_increase=None if delta is None else delta / 100.0, original_ppl=ppl.get("original"),
                quantized_ppl=ppl.get("candidate"), error_message="; ".join(reasons) or None,
                num_samples=len(test_texts), validation_time_ms=(time.time() - start) * 1000)
        except Exception as exc:  # AI-OS's contract: a failed result, not an exception
            logger.error(f"Validation failed: {exc}")
            return ValidationResult(passed=False, cosine_similarity=0.0, min_cosine_similarity=0.0,
                                    max_cosine_similarity=0.0, error_message=str(exc),
                                    num_samples=len(test_texts) if test_texts else 0,
                                    validation_time_ms=(time.time() - start) * 1000)

    def generate_report(self, result: ValidationResult, output_path: Optional[str] = None, format: str = "json") -> str:
        if format == "json":
            report = result.to_json(indent=2)
        elif format == "text":
            report = str(result)
        else:
            raise ValueError(f"Unsupported format: {format}")
        if output_path:
            Path(output_path).write_text(report, encoding="utf-8")
        return report


__all__ = ["PrecisionValidator", "ValidationResult"]
