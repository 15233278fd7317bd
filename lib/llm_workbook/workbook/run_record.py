"""A run's record (reports/<run>.json): what the notebook, ``llmc run`` and the executors write, and what the
index, the decision and the tables read, through these fields rather than dictionary keys.

The JSON keeps its layout: the evaluation's own record (metrics, perf, candidate, original...) sits at the top
level beside the run's fields, so records written before this type read back the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llm_workbook.store import atomic
from llm_workbook.workbook.status import RunStatus

OUTCOME_STATUS = {"pass": RunStatus.PASSED, "fail": RunStatus.FAILED_CHECK, "inconclusive": RunStatus.INCONCLUSIVE}


@dataclass
class RunRecord:
    run: str
    status: RunStatus | None  # None: a record too old or too broken to say
    title: str | None = None
    inputs_digest: str | None = None
    parameters: dict = field(default_factory=dict)
    store: dict = field(default_factory=dict)  # the store check: size, checksums, bit-exact round trip
    verdict: dict = field(default_factory=dict)  # passed, outcome, reasons, checks
    summary: dict = field(default_factory=dict)  # the figures the index and the decision show
    error: str | None = None  # why a run could not finish
    aios_engine: dict = field(default_factory=dict)  # whether AI-OS's engine can run the file
    evaluation: dict = field(default_factory=dict)  # the evaluation's record: metrics, perf, candidate, original...
    model: str | None = None  # the sources as named (kept by a run that failed before its summary)
    reference: str | None = None

    # -- constructors: one per way a run ends --

    @classmethod
    def evaluated(cls, params: dict, evaluation: dict, store: dict, verdict: dict, summary: dict,
                  aios_engine: dict) -> RunRecord:
        """Evaluated to the end: passed, failed a check, or undecided, as its verdict's outcome says."""
        return cls(params["run"], OUTCOME_STATUS[verdict["outcome"]], params["title"], params.get("inputs_digest"),
                   _kept(params), store, verdict, summary, aios_engine=aios_engine, evaluation=evaluation)

    @classmethod
    def fault(cls, params: dict, reason: str, store: dict | None = None) -> RunRecord:
        """The evaluation refused the pair (NaN logits, another vocabulary or architecture...): failed, with why."""
        summary = {"run": params["run"], "title": params["title"], "model": params.get("model"),
                   "reference": params.get("reference"), "producer": params.get("producer"), "passed": False}
        return cls(params["run"], RunStatus.FAILED, params["title"], params.get("inputs_digest"), _kept(params),
                   store or {}, {"passed": False, "reasons": [reason], "checks": []}, summary)

    @classmethod
    def failed(cls, run: str, message: str, params: dict | None = None, inputs_digest: str | None = None,
               summary: dict | None = None) -> RunRecord:
        """The run could not finish (bad parameters, a build or notebook error): status error, with the message."""
        params = params or {}
        return cls(run, RunStatus.ERROR, params.get("title"), inputs_digest, error=message,
                   verdict={"passed": False, "reasons": [f"run failed: {message}" if params else message]},
                   summary=summary or {}, model=params.get("model"), reference=params.get("reference"))

    # -- reading --

    @classmethod
    def of(cls, value: RunRecord | dict) -> RunRecord:
        """A record as read from JSON (a ``RunRecord`` is returned as it is)."""
        if isinstance(value, RunRecord):
            return value
        data = dict(value)
        status = data.pop("status", None)
        known = {name: data.pop(name) for name in FIELDS if name in data}
        for name in ("parameters", "store", "verdict", "summary", "aios_engine"):
            known[name] = known.get(name) or {}
        known.setdefault("run", "")  # a part of a record (a summary and its perf) reads as one too
        return cls(status=RunStatus(status) if status in set(RunStatus) else None, evaluation=data, **known)

    @classmethod
    def read(cls, path: str | Path) -> RunRecord | None:
        """The record in ``path``, or None when it is not one (not JSON, or no run name)."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return cls.of(data) if isinstance(data, dict) and "run" in data else None

    @property
    def is_error(self) -> bool:
        return self.status == RunStatus.ERROR

    @property
    def passed(self) -> bool:
        return bool(self.verdict.get("passed")) and not self.is_error

    @property
    def metrics(self) -> dict:
        return self.evaluation.get("metrics") or {}

    @property
    def candidate(self) -> dict:
        return self.evaluation.get("candidate") or {}

    @property
    def original(self) -> dict:
        return self.evaluation.get("original") or {}

    @property
    def perf(self) -> dict:
        return self.evaluation.get("perf") or {}

    def outcome(self) -> tuple[RunStatus, str]:
        """The status ``llmc run`` reports for a finished notebook, and the message beside it (a fault's reason)."""
        if self.status in (RunStatus.FAILED, RunStatus.INCONCLUSIVE):
            status = self.status
        else:
            status = RunStatus.PASSED if self.verdict.get("passed") else RunStatus.FAILED_CHECK
        return status, "; ".join(self.verdict.get("reasons") or []) if status == RunStatus.FAILED else ""

    # -- writing --

    def to_dict(self) -> dict:
        """The JSON layout: the run's empty fields left out, the evaluation's keys at the top level as they are."""
        head = {"run": self.run, "title": self.title, "status": self.status, "inputs_digest": self.inputs_digest,
                "model": self.model, "reference": self.reference, "error": self.error, "parameters": self.parameters,
                "store": self.store}
        tail = {"verdict": self.verdict, "summary": self.summary, "aios_engine": self.aios_engine}
        return {**_without_empty(head), **self.evaluation, **_without_empty(tail)}

    def write(self, out_dir: str | Path) -> Path:
        """Write ``<run>.json`` into ``out_dir`` atomically."""
        return atomic.write_text(Path(out_dir) / f"{self.run}.json", json.dumps(self.to_dict(), indent=2, default=str))


def _without_empty(part: dict) -> dict:
    return {k: v for k, v in part.items() if k in ("run", "status", "verdict") or v not in (None, {}, "")}


FIELDS = ("run", "title", "inputs_digest", "parameters", "store", "verdict", "summary", "error", "aios_engine",
          "model", "reference")


# The parameters a record keeps: what was compared and how (not where it wrote or how it was scheduled).
KEPT_PARAMETERS = ("model", "reference", "format_notes", "corpus", "context_length", "stride", "max_eval_tokens",
                   "stage_tokens", "reference_precision", "dtype", "activation_quant", "keep_packed",
                   "cosine_threshold", "ppl_threshold", "kld_threshold", "top1_threshold", "lm_eval_tasks",
                   "lm_eval_limit", "overrides")


def _kept(params: dict) -> dict:
    return {k: params.get(k) for k in KEPT_PARAMETERS}


__all__ = ["RunRecord", "OUTCOME_STATUS"]
