"""Every input fuzzing ever found (tests/fuzz_cases/, from `make fuzz`) ends in a correct read or one
StoreError; and random damage to small real files does too (hypothesis, a few hundred inputs per reader)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fuzz_targets

CASES = fuzz_targets.cases()


@pytest.mark.parametrize("target, case", CASES, ids=[f"{t}/{c.name[:20]}" for t, c in CASES])
def test_a_kept_fuzz_case_is_refused_cleanly(target, case):
    fuzz_targets.run(target, case.read_bytes())


@pytest.mark.parametrize("target", sorted(fuzz_targets.TARGETS))
def test_every_seed_reads_cleanly(target):
    for seed in fuzz_targets.seeds(target):
        fuzz_targets.TARGETS[target](seed)  # no StoreError: a seed the reader refuses fuzzes nothing


def _damaged(seed: bytes):
    """(Derandomized: the same inputs every run, so CI is stable; exploring is make fuzz's job.) A seed with a few bytes overwritten, a slice cut out, or truncated: what a bad disk or a hostile
    sender makes of a real file."""
    n = len(seed)
    overwrite = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: _apply(seed, edits))
    cut = st.tuples(st.integers(0, n), st.integers(0, n)).map(lambda ab: seed[:min(ab)] + seed[max(ab):])
    return st.one_of(overwrite, cut, st.integers(0, n).map(lambda k: seed[:k]))


def _apply(seed: bytes, edits) -> bytes:
    data = bytearray(seed)
    for at, value in edits:
        data[at] = value
    return bytes(data)


@pytest.mark.parametrize("target", ["parquet", "aios", "safetensors", "gguf"])
def test_damaged_files_end_in_a_read_or_one_store_error(target):
    seeds = fuzz_targets.seeds(target)

    @settings(max_examples=60 if target == "gguf" else 150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(range(len(seeds))).flatmap(lambda i: _damaged(seeds[i])))
    def check(data):
        fuzz_targets.run(target, data)

    check()
