"""A run's status: one word in its record, the batch's table, the index and `llmc run`'s exit code. A ``StrEnum``,
so records keep the same strings and a status read back from JSON compares equal to its member."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    PASSED = "passed"  # evaluated, every check passed
    FAILED_CHECK = "failed-check"  # evaluated, a check failed
    INCONCLUSIVE = "inconclusive"  # evaluated, a check is still undecided on all of the text
    FAILED = "failed"  # the evaluation refused the pair (NaN logits, another vocabulary or architecture...)
    ERROR = "error"  # the run could not finish (bad parameters, a build or notebook error)
    SKIPPED = "skipped"  # its inputs did not change since its last run


__all__ = ["RunStatus"]
