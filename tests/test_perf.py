"""perf: figures measured in fresh subprocesses (structure and positivity only: no timing asserts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm_workbook import HuggingFaceToParquetConverter
from llm_workbook.evaluation.perf import PerfSettings, measure, model_size, summarize

QUICK = PerfSettings(warmup=1, repeats=2, prompt_tokens=16, decode_tokens=4, sentences=8, batch_size=4)


def _assert_timing(block: dict, n: int) -> None:
    assert block["n"] == n and len(block["values"]) == n
    assert 0 < block["min"] <= block["q1"] <= block["median"] <= block["q3"] <= block["max"]
    assert block["iqr"] == pytest.approx(block["q3"] - block["q1"])


def test_summarize_quartiles():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (2.5, 1.75, 3.25, 1.0, 4.0, 4)
    assert s["values"] == [4.0, 1.0, 3.0, 2.0]  # kept in measurement order
    one = summarize([0.5])
    assert one["median"] == one["q1"] == one["q3"] == 0.5 and one["iqr"] == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_perf_settings_validated():
    with pytest.raises(ValueError, match="repeats"):
        PerfSettings(repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        PerfSettings(warmup=-1)


def test_model_size_hf_and_parquet(qwen3_dir, tmp_path):
    parquet = tmp_path / "m.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, parquet)
    hf = model_size(qwen3_dir)
    pq = model_size(parquet)
    assert hf["bits_per_weight"] == 16.0 and hf["compression_vs_bf16"] == 1.0  # saved in bf16
    assert hf["file_bytes"] == (qwen3_dir / "model.safetensors").stat().st_size
    assert pq["file_bytes"] == parquet.stat().st_size and pq["bits_per_weight"] == pytest.approx(16.0)
    assert pq["parameters"] == hf["parameters"] and pq["stored_bytes"] == hf["stored_bytes"]


def test_measure_encoder_throughput(minilm_dir):
    result = measure(minilm_dir, settings=PerfSettings(warmup=1, repeats=2, sentences=8, batch_size=4,
                                                       compare_hf_load=False))
    assert result["kind"] == "encoder" and result["sentences"] == 8
    _assert_timing(result["embedding_sentences_per_s"], 2)
    assert result["load"]["parquet_s"] is None and result["load"]["ratio_parquet_vs_hf"] is None
    _assert_timing(result["load"]["hf_s"], 2)
    assert result["memory"]["load_peak_rss_bytes"] > result["memory"]["baseline_rss_bytes"] > 0
    assert result["memory"]["inference_peak_rss_bytes"] > result["memory"]["baseline_rss_bytes"]
    assert result["disk"]["source_bytes"] == (Path(minilm_dir) / "model.safetensors").stat().st_size


def test_evaluate_with_perf_block_causal_lm(qwen3_dir, tmp_path):
    """The candidate's perf block inside an evaluation record: load from Parquet vs from_pretrained on
    the exported safetensors, prefill and decode, memory; every figure from a child process."""
    from llm_workbook.evaluation.record import EvaluationRecord
    from llm_workbook.evaluation.compare import evaluate

    parquet = tmp_path / "m.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(qwen3_dir, parquet)
    record = evaluate(qwen3_dir, parquet, texts=["w5 w6 w7 w8 " * 40], context_length=32, max_eval_tokens=64,
                      gen_tokens=2, generation_prompts=1, prompt_tokens=4, perf=QUICK, perf_models=("candidate",))
    assert set(record.perf) == {"candidate"}
    result = record.perf["candidate"]
    assert result["pid"] != os.getpid()  # measured in a child process
    assert result["kind"] == "causal-lm" and result["prefill_tokens"] == 16 and result["decode_tokens"] == 4
    load = result["load"]
    _assert_timing(load["parquet_s"], 2)
    _assert_timing(load["hf_s"], 2)  # the same weights exported to safetensors, loaded with from_pretrained
    assert load["hf_error"] is None and load["ratio_parquet_vs_hf"] > 0
    _assert_timing(result["prefill_ms_per_token"], 2)
    _assert_timing(result["decode_tokens_per_s"], 2)
    mem = result["memory"]
    assert 0 < mem["baseline_rss_bytes"] < mem["load_peak_rss_bytes"] and mem["model_rss_bytes"] <= mem["load_peak_rss_bytes"]
    assert mem["inference_peak_rss_bytes"] > mem["baseline_rss_bytes"] and result["first_load_s"] > 0
    assert mem["peak_source"] in ("VmHWM", "ru_maxrss")
    assert result["disk"]["source_bytes"] == parquet.stat().st_size
    path = tmp_path / "r.json"
    record.to_json(path)
    assert EvaluationRecord.from_json(path).perf == record.perf
    with pytest.raises(ValueError, match="perf_models"):
        evaluate(qwen3_dir, parquet, perf_models=("baseline",))
