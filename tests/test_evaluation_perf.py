"""perf: figures measured in processes of their own (structure and positivity only: no timing asserts)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from llm_workbook import HuggingFaceToParquetConverter
from llm_workbook.evaluation.perf import (PerfSettings, measure, memory_bandwidth, model_size, summarize,
                                         weight_bytes_per_token)

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
    with pytest.raises(ValueError, match="unknown \\['tpu'\\]"):
        PerfSettings(runtimes=("aios", "tpu"))


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
    assert result["load"]["hf_s"] is None and result["load"]["ratio_parquet_vs_hf"] is None
    _assert_timing(result["load"]["parquet_s"], 1)  # no comparison asked: the run's first load, from the store
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
    _assert_timing(result["decode_tokens_per_s"], 4)  # one sample per cached step
    mem = result["memory"]
    assert 0 < mem["baseline_rss_bytes"] < mem["load_peak_rss_bytes"] and mem["model_rss_bytes"] <= mem["load_peak_rss_bytes"]
    assert mem["inference_peak_rss_bytes"] > mem["baseline_rss_bytes"] and result["first_load_s"] > 0
    assert mem["peak_source"] in ("VmHWM", "ru_maxrss")
    assert result["disk"]["source_bytes"] == parquet.stat().st_size
    # the same run in each runtime, beside the bandwidth limit; the top-level figures are AI-OS's (float32)
    runtimes = result["runtimes"]
    assert list(runtimes) == ["aios", "kernels", "llama.cpp", "gpu"]
    assert result["prefill_ms_per_token"] == runtimes["aios"]["prefill_ms_per_token"]
    assert runtimes.pop("llama.cpp")["unavailable"].startswith("not a GGUF checkpoint")
    from llm_workbook.evaluation.perf_gpu import NO_CUDA

    assert runtimes.pop("gpu")["unavailable"] == NO_CUDA  # this machine has no CUDA device
    assert runtimes["kernels"]["kernel_layers"] == {}  # a dense file: nothing for the kernels to run
    # float32 weights read twice the bytes of bfloat16 ones, every tensor alike
    assert runtimes["aios"]["weight_bytes_per_token"] == 2 * runtimes["kernels"]["weight_bytes_per_token"]
    bandwidth = result["bandwidth"]["copy_gb_per_s"]["median"]
    for figures in runtimes.values():
        _assert_timing(figures["decode_batch_tokens_per_s"], 4)
        assert figures["decode_batch"] == 8 and figures["memory"]["inference_peak_rss_bytes"] > 0
        limit = bandwidth * 1e9 / figures["weight_bytes_per_token"]
        assert figures["limit_tokens_per_s"] == pytest.approx(limit)
        assert figures["fraction_of_limit"] == pytest.approx(figures["decode_tokens_per_s"]["median"] / limit)
    path = tmp_path / "r.json"
    record.to_json(path)
    assert EvaluationRecord.from_json(path).perf == record.perf
    with pytest.raises(ValueError, match="perf_models"):
        evaluate(qwen3_dir, parquet, perf_models=("baseline",))


def test_memory_bandwidth_is_a_positive_rate_with_its_spread():
    result = memory_bandwidth(buffer_mb=16, repeats=3)
    _assert_timing(result["copy_gb_per_s"], 3)
    assert result["buffer_mb"] == 16 and result["threads"] >= 1


def test_weight_bytes_per_token_counts_one_embedding_row_and_a_tied_head_in_full(tmp_path):
    from conftest import make_checkpoint
    from llm_workbook.runtime.load import load_model

    for tie in (False, True):
        model, _ = load_model(make_checkpoint(tmp_path / f"tie-{tie}", "qwen3", seed=3, tie=tie), dtype=torch.float32)
        embedding = model.get_input_embeddings().weight
        linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # the head too
        norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
        expected = 4 * (linears + norms + embedding.shape[1])
        assert weight_bytes_per_token(model) == expected, tie


def test_a_quantized_candidate_runs_packed_on_the_kernels_and_reads_fewer_bytes(tmp_path):
    from conftest import make_checkpoint
    from llm_workbook.quantize.run import quantize

    original = make_checkpoint(tmp_path / "original", "qwen3", seed=4)
    quantize(original, tmp_path / "int4.parquet", method="int4", group_size=32, progress=False)
    result = measure(tmp_path / "int4.parquet", settings=PerfSettings(
        warmup=1, repeats=2, prompt_tokens=8, decode_tokens=4, compare_hf_load=False, bandwidth_mb=16))
    aios, kernels = result["runtimes"]["aios"], result["runtimes"]["kernels"]
    assert kernels["kernel_layers"] == {"int4 groups": 14} and "kernel_layers" not in aios  # 2 layers x 7 Linears
    # 4-bit codes (+ bfloat16 scales and zeros per 32) against float32: about a sixth of the bytes per Linear
    assert kernels["weight_bytes_per_token"] < aios["weight_bytes_per_token"] / 3
    assert aios["runtime"].startswith("AI-OS as it is") and kernels["runtime"].startswith("weight-only kernels")
    _assert_timing(result["load"]["parquet_s"], 1)  # no HF comparison: the run's first load


def test_llama_cpp_runs_the_gguf_a_parquet_file_came_from_or_says_how_to_get_it(tmp_path, monkeypatch):
    """SmolLM2's GGUF from PyPI, stored in Parquet: llama.cpp runs the GGUF written back byte for byte. Without
    llama-cpp-python the figure says how to build it; with it (make llama-cpp), the figures are real."""
    import importlib.util

    from llm_workbook.evaluation import perf
    from llm_workbook.store.gguf import convert_gguf
    from llm_workbook.workbook.builtins import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    parquet = tmp_path / "smollm2.parquet"
    convert_gguf(gguf, parquet, progress=False)
    settings = PerfSettings(warmup=1, repeats=2, prompt_tokens=8, decode_tokens=4, compare_hf_load=False)
    common = {"settings": {**settings.__dict__, "runtimes": list(settings.runtimes)}}
    # the token embedding is read whole: SmolLM2 ties it to the output head (no output.weight)
    assert perf.gguf_bytes_per_token(str(gguf)) == sum(int(t.n_bytes) for t in __import__("gguf").GGUFReader(gguf).tensors)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    assert perf._measure_llama_cpp(str(parquet), common, settings, tmp_path) == {"unavailable": perf.LLAMA_CPP_MISSING}
    monkeypatch.undo()
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(perf.LLAMA_CPP_MISSING)
    result = perf._measure_llama_cpp(str(parquet), common, settings, tmp_path)
    assert result["engine"].startswith("llama-cpp-python") and result["pid"] != os.getpid()
    _assert_timing(result["decode_tokens_per_s"], 4)  # one sample per cached step
    _assert_timing(result["prefill_ms_per_token"], 2)
    assert result["weight_bytes_per_token"] == perf.gguf_bytes_per_token(str(gguf))
    assert result["memory"]["inference_peak_rss_bytes"] > result["memory"]["baseline_rss_bytes"]


def _gpu_settings() -> PerfSettings:
    return PerfSettings(warmup=1, repeats=2, prompt_tokens=8, decode_tokens=4, decode_batch=3,
                        compare_hf_load=False, bandwidth_mb=16, runtimes=("gpu",))


def test_the_gpu_runtime_runs_the_published_checkpoint_where_the_device_check_finds_a_device(qwen3_seed5_dir, tmp_path,
                                                                                             monkeypatch):
    """The GPU path with its device check answered (no CUDA here): the store's file is exported as published and
    measured in a child by transformers (vLLM is not installed), on the device the check named."""
    from llm_workbook.evaluation import perf_gpu
    from llm_workbook.runtime.load import load_model

    original = qwen3_seed5_dir
    parquet = tmp_path / "m.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(original, parquet)
    monkeypatch.setattr(perf_gpu, "gpu_device", lambda: "cpu")
    result = measure(parquet, settings=_gpu_settings())
    gpu = result["runtimes"]["gpu"]
    assert gpu["pid"] != os.getpid() and gpu["engine"] == "transformers" and gpu["device"] == "cpu"
    assert gpu["quantization"] == "dense (no quantization_config)"
    for name in ("prefill_ms_per_token", "decode_tokens_per_s", "decode_batch_tokens_per_s"):
        _assert_timing(gpu[name], 2)
    assert gpu["decode_batch"] == 3 and gpu["memory"]["device_peak_bytes"] > 0
    # bytes per token from the safetensors header equal the module tree's count of the same weights
    model, _ = load_model(original, dtype=torch.bfloat16)
    assert gpu["weight_bytes_per_token"] == weight_bytes_per_token(model)
    # against the device's own bandwidth, measured in the same child
    limit = gpu["device_bandwidth"]["copy_gb_per_s"]["median"] * 1e9 / gpu["weight_bytes_per_token"]
    assert gpu["limit_tokens_per_s"] == pytest.approx(limit)
    monkeypatch.setattr(perf_gpu, "gpu_device", lambda: None)
    assert perf_gpu.measure_gpu(str(parquet), False, {}, _gpu_settings(), tmp_path) == {"unavailable": perf_gpu.NO_CUDA}
    monkeypatch.setattr(perf_gpu, "gpu_device", lambda: "cuda")
    assert perf_gpu.measure_gpu(str(parquet), True, {}, _gpu_settings(), tmp_path) == {"unavailable": perf_gpu.GGUF_ON_GPU}


def test_the_gpu_runtime_drives_vllm_with_the_protocol(tmp_path, monkeypatch):
    """vLLM's side of the GPU path against a stand-in of its documented API (LLM, SamplingParams,
    generate on token-id prompts): the checkpoint directory goes in as published, the prompts have the
    protocol's length and batch sizes, and each request must come back with every token asked for."""
    import json
    import sys
    import types

    from conftest import make_checkpoint
    from llm_workbook.evaluation import perf_gpu

    hf = make_checkpoint(tmp_path / "ct", "qwen3", seed=6)
    config = json.loads((hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    (hf / "config.json").write_text(json.dumps(config))
    calls: dict = {"generate": []}

    class SamplingParams:
        def __init__(self, max_tokens, temperature, ignore_eos):
            self.max_tokens = max_tokens

    class LLM:
        short = False

        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def get_tokenizer(self):
            return types.SimpleNamespace(vocab_size=96)

        def generate(self, prompts, params, use_tqdm):
            calls["generate"].append((len(prompts), params.max_tokens, prompts[0]["prompt_token_ids"]))
            count = params.max_tokens - (1 if LLM.short else 0)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[0] * count)]) for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams,
                                                                   __version__="0.0-stand-in"))
    settings = _gpu_settings()
    spec = {"op": "gpu", "via": "vllm", "device": "cpu", "source": str(hf),
            "settings": {**settings.__dict__, "runtimes": list(settings.runtimes)}}
    result = perf_gpu.child_gpu(spec)
    assert calls["llm"]["model"] == str(hf) and calls["llm"]["max_model_len"] == 8 + 4 + 8
    assert calls["llm"]["gpu_memory_utilization"] == perf_gpu.VLLM_MEMORY_SHARE
    asked = [(batch, tokens) for batch, tokens, _ in calls["generate"]]
    # warm-up (prefill, decode, batch decode), then repeats of prefill, batch prefill, decode, batch decode
    assert asked == [(1, 1), (1, 5), (3, 5), (1, 1), (1, 1), (3, 1), (3, 1), (1, 5), (1, 5), (3, 5), (3, 5)]
    ids = calls["generate"][0][2]
    assert len(ids) == 8 and all(0 <= i < 96 for i in ids) and all(c[2] == ids for c in calls["generate"])
    assert result["engine"] == "vLLM 0.0-stand-in" and result["quantization"] == "compressed-tensors kernels"
    _assert_timing(result["decode_tokens_per_s"], 2)
    _assert_timing(result["decode_batch_tokens_per_s"], 2)
    LLM.short = True
    with pytest.raises(RuntimeError, match="not all of 1 tokens"):
        perf_gpu.child_gpu(spec)


def test_a_format_without_a_cpu_kernel_runs_dense_in_the_kernels_runtime_and_says_why(tmp_path):
    """FP8 has no CPU kernel here: its Linears run dense bfloat16, and the row says so rather than timing a
    simulation of FP8 arithmetic."""
    from conftest import make_checkpoint
    from llm_workbook.synthetic.checkpoints import write_checkpoint

    original = make_checkpoint(tmp_path / "original", "qwen3", seed=4)
    fp8 = write_checkpoint(original, tmp_path / "fp8", "fp8_dynamic")
    result = measure(fp8, settings=PerfSettings(warmup=1, repeats=2, prompt_tokens=8, decode_tokens=4,
                                                compare_hf_load=False, bandwidth_mb=16, runtimes=("kernels",)))
    [(why, count)] = result["runtimes"]["kernels"]["kernel_layers"].items()
    assert count == 14 and why.startswith("dense (fp8") and "has no CPU kernel" in why
