"""How a figure is measured: each child is a process of its own, forked from an import-only server, and a child
that fails, dies or hangs comes back as one error naming what it measured; decode repeats start from the same
prefilled state."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import pytest
import torch

from llm_workbook.evaluation import measure

SETTINGS = {"threads": None}


def report_memory(spec: dict) -> dict:
    held = torch.ones(spec["mb"] * 2**18)  # float32: spec["mb"] MB touched
    return {"pid": os.getpid(), "peak": measure.peak_rss_bytes()[0], "held": float(held[-1]),
            "preloaded": [name for name in measure.PRELOAD if sys.modules.get(name)]}


def fail(spec: dict) -> dict:
    raise ValueError(f"bad tensor in {spec['source']}")


def die(spec: dict) -> dict:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def hang(spec: dict) -> dict:
    time.sleep(60)
    return {}


def _spec(op: str, **extra) -> dict:
    return {"op": op, "source": "model.parquet", "settings": SETTINGS, **extra}


def test_a_child_is_a_process_of_its_own_holding_the_preloaded_imports_and_its_own_peak():
    ballast = torch.ones(400 * 2**18)  # 400 MB in the parent, which a child must not count
    ballast[0] = 2.0
    first = measure.run_child(f"{__name__}:report_memory", _spec("memory", mb=16), 60)
    second = measure.run_child(f"{__name__}:report_memory", _spec("memory", mb=16), 60)
    assert first["pid"] != os.getpid() and second["pid"] not in (os.getpid(), first["pid"])
    assert first["held"] == 1.0 and set(first["preloaded"]) == set(measure.PRELOAD)
    assert first["peak"] < measure.peak_rss_bytes()[0] - 300 * 2**20  # not the parent's high-water mark
    del ballast


def test_a_child_that_fails_dies_or_hangs_is_one_error_naming_what_it_measured():
    got = measure.run_child(f"{__name__}:fail", _spec("run"), 60)
    assert got == {"error": "ValueError: bad tensor in model.parquet"}
    got = measure.run_child(f"{__name__}:die", _spec("run"), 60)
    assert got["error"] == "run of model.parquet was killed by SIGKILL before reporting a result"
    start = time.perf_counter()
    got = measure.run_child(f"{__name__}:hang", _spec("load"), 2)
    assert got["error"] == "load of model.parquet timed out after 2 s"
    assert time.perf_counter() - start < 20  # stopped, not waited for
    assert not [p for p in multiprocessing.active_children() if p.name == "llmc-load"]


def test_every_decode_repeat_starts_from_the_same_prefilled_state(tiny_lm):
    from llm_workbook.runtime.load import load_model

    model, _ = load_model(tiny_lm, dtype=torch.float32)
    prompt = torch.arange(8).unsqueeze(0) % model.config.vocab_size
    start = measure.prefill_for_decode(model, prompt)
    length = start[1][1].get_seq_length()
    steps = [measure.greedy_decode(model, prompt, 4, start) for _ in range(3)]
    assert all(len(seconds) == 4 and min(seconds) > 0 for seconds in steps)  # each step timed alone
    assert start[1][1].get_seq_length() == length == 8  # the repeats decoded copies of it
    fresh = measure.prefill_for_decode(model, prompt)
    assert torch.equal(fresh[0], start[0])


def test_a_batch_of_one_repeated_prompt_starts_from_that_prompts_cache_as_from_its_own_prefill(tiny_lm):
    from llm_workbook.runtime.load import load_model

    model, _ = load_model(tiny_lm, dtype=torch.float32)
    prompt = torch.arange(8).unsqueeze(0) % model.config.vocab_size
    start = measure.prefill_for_decode(model, prompt)
    repeated = measure.repeated_start(start, 3)
    prefilled = measure.prefill_for_decode(model, prompt.expand(3, -1).contiguous())
    assert torch.equal(repeated[0], prefilled[0]) and start[1][1].get_seq_length() == 8
    with torch.inference_mode():  # one step from each: the same logits, row for row
        steps = [model(token, use_cache=True, **{cache[0]: cache[1]}).logits for token, cache in (repeated, prefilled)]
    assert steps[0].shape[0] == 3 and torch.allclose(steps[0], steps[1], atol=1e-5)
