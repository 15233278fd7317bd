"""The decision table the meeting reads: ordering, failure reasons, and what unmeasured runs show."""

from __future__ import annotations

import math

from llm_workbook.workbook import tables


def _record(run: str, *, ppl: float, passed: bool, reasons: list[str] = (), perf: dict | None = None) -> dict:
    data = {
        "kind": "causal-lm",
        "sizes": {"candidate": {"file_bytes": 4_000_000, "bits_per_weight": 7.2, "quantized_bits_per_weight": 4.25,
                                "compression_vs_bf16": 2.2, "formats": ["dense", "gptq"]}},
        "metrics": {"cosine_similarity": 0.999, "kld": {"mean": 0.001}, "top1_agreement": 0.97,
                    "ppl": {"delta_percent": ppl}},
        "perf": perf,
        "verdict": {"passed": passed, "reasons": list(reasons)},
    }
    summary = tables.run_summary(data, {"run": run, "title": run, "model": "m", "reference": "r"})
    return {"run": run, "status": "passed" if passed else "failed-check", "verdict": data["verdict"], "summary": summary}


def test_summary_carries_quantized_bits_and_says_when_speed_was_not_measured() -> None:
    s = _record("a", ppl=0.1, passed=True)["summary"]
    assert s["format"] == "gptq" and s["quantized_bits_per_weight"] == 4.25
    assert s["latency"] is None and s["latency_label"] == "not measured"

    perf = {"candidate": {"prefill_ms_per_token": {"median": 0.5}, "memory": {"inference_peak_rss_bytes": 3e8}}}
    measured = _record("b", ppl=0.1, passed=True, perf=perf)["summary"]
    assert measured["latency_label"] == "0.50 ms/token (prefill)" and measured["peak_rss_mb"] == 300


def test_table_puts_passing_runs_first_by_ppl_and_shows_why_failures_failed() -> None:
    records = [
        _record("worse", ppl=2.0, passed=True),
        _record("broken", ppl=40.0, passed=False, reasons=["ppl increase 40.00% > 15.00%"]),
        _record("better", ppl=-0.1, passed=True),
        {"run": "crashed", "status": "error", "error": "ValueError: no such file", "verdict": {"passed": False}},
    ]
    table = tables.decision_table(records)
    assert list(table["run"]) == ["better", "worse", "broken", "crashed"]
    assert list(table["verdict"]) == ["PASS", "PASS", "FAIL", "ERROR"]
    assert list(table["why"]) == ["", "", "ppl increase 40.00% > 15.00%", "ValueError: no such file"]
    assert math.isnan(table.loc[3, "cosine"])

    html = tables.style_decision_table(table).to_html()
    assert "why (failed or undecided)" in html and "ppl increase 40.00% &gt; 15.00%" in html
    assert "bits/weight (quantized)" in html and "4.25" in html


def test_why_column_is_left_out_when_everything_passed() -> None:
    html = tables.style_decision_table(tables.decision_table([_record("a", ppl=0.0, passed=True)])).to_html()
    assert "why it failed" not in html and "PASS" in html


def test_undecided_runs_sit_between_passes_and_fails_with_their_interval_and_round_trips_last() -> None:
    undecided = _record("undecided", ppl=14.8, passed=False, reasons=["ppl_increase straddles"])
    undecided["verdict"]["outcome"] = "inconclusive"
    undecided["summary"]["ppl_interval"] = [13.5, 16.2]
    trip = _record("trip", ppl=0.0, passed=True)
    trip["summary"]["self_source"] = True
    records = [_record("bad", ppl=40.0, passed=False, reasons=["ppl increase 40.00% > 15.00%"]), trip, undecided,
               _record("good", ppl=1.0, passed=True)]
    table = tables.decision_table(records)
    assert list(table["run"]) == ["good", "undecided", "bad", "trip"]
    assert list(table["verdict"]) == ["PASS", "UNDECIDED", "FAIL", "ROUND TRIP"]
    html = tables.style_decision_table(table).to_html()
    assert "+14.8 % [+13.5, +16.2]" in html
    assert "activations" not in html  # a column no run fills is left out: the table fits the page


def test_the_index_table_keeps_to_what_every_run_has_and_speed_gets_its_own_table() -> None:
    perf = {"candidate": {"prefill_ms_per_token": {"median": 0.5}, "memory": {"inference_peak_rss_bytes": 3e8}}}
    table = tables.decision_table([_record("fast", ppl=0.1, passed=True, perf=perf), _record("plain", ppl=0.2, passed=True)])
    compact = tables.style_decision_table(table, compact=True).to_html()
    full = tables.style_decision_table(table).to_html()
    for column in ("latency", "peak RSS, dequantized (MB)", "× vs bf16", "bits/weight (all)"):
        assert column in full and column not in compact
    assert "bits/weight (quantized)" in compact and "PPL change" in compact
    speed = tables.perf_table(table).to_html()
    assert "fast" in speed and "plain" not in speed and "0.50 ms/token (prefill)" in speed
    assert tables.perf_table(tables.decision_table([_record("plain", ppl=0.2, passed=True)])) is None


def test_an_aios_file_read_otherwise_by_aios_says_so_in_the_why_column_even_when_it_passes() -> None:
    record = _record("users-file", ppl=0.3, passed=True)
    record["summary"]["as_aios_reads"] = "as AI-OS reads the file (30 tensors read wrong): FAIL, PPL × 316,000"
    table = tables.decision_table([record])
    assert table.loc[0, "verdict"] == "PASS" and table.loc[0, "why"].startswith("as AI-OS reads the file")


def _runtime(decode: float, rss_mb: float, per_token_mb: float, kernels: dict | None = None) -> dict:
    timing = {"median": decode, "q1": decode * 0.99, "q3": decode * 1.01}
    figures = {"runtime": "label", "decode_tokens_per_s": timing, "decode_batch": 8,
               "decode_batch_tokens_per_s": {"median": 4 * decode}, "weight_bytes_per_token": per_token_mb * 1e6,
               "limit_tokens_per_s": 20e3 / per_token_mb, "fraction_of_limit": decode / (20e3 / per_token_mb),
               "memory": {"inference_peak_rss_bytes": rss_mb * 1e6}}
    return figures if kernels is None else {**figures, "kernel_layers": kernels}


def _measured(run: str, candidate: dict, original: dict | None = None, size: float = 100e6) -> dict:
    perf = {"candidate": {"runtimes": candidate, "bandwidth": {"copy_gb_per_s": {"median": 20.0}}}}
    if original:
        perf["original"] = {"runtimes": original}
    data = {"kind": "causal-lm", "perf": perf, "verdict": {"passed": True, "reasons": []}, "metrics": {},
            "sizes": {"candidate": {"file_bytes": size}, "original": {"file_bytes": 270e6}}}
    summary = tables.run_summary(data, {"run": run, "title": run, "model": run, "reference": "smollm2"})
    return {"run": run, "status": "passed", "verdict": data["verdict"], "summary": summary}


ORIGINAL = {"aios": _runtime(28.0, 1300, 538), "kernels": _runtime(25.0, 890, 269, {})}


def test_the_speed_panel_puts_each_runtime_beside_the_original_measured_in_another_run():
    records = [
        _measured("int8", {"aios": _runtime(28.0, 1310, 538), "kernels": _runtime(42.0, 860, 163, {"int8 per channel": 210})},
                  ORIGINAL),
        _measured("int4", {"aios": _runtime(27.9, 1300, 538), "kernels": _runtime(50.0, 700, 117, {"int4 groups": 210})},
                  size=80e6),
        _measured("fp8", {"aios": _runtime(28.0, 1300, 538), "kernels": {"error": "RuntimeError: boom\nmore"}}),
    ]
    panel = tables.speed_panel(records).set_index("run")
    assert panel.index[0] == "original: smollm2" and panel.iloc[0]["finding"] == "the yardstick (measured in int8)"
    assert panel.loc["original: smollm2", "AI-OS as it is (float32): peak RSS MB"] == "1300"
    assert panel.loc["int4", "weight-only kernels (bfloat16): speed"] == "50.0 tokens/s (2.00x); 29% of the bandwidth limit"
    assert panel.loc["int4", "AI-OS as it is (float32): peak RSS MB"] == "1300 (1.00x)"
    finding = panel.loc["int4", "finding"]
    assert finding.startswith("70% less disk; in AI-OS as it is nothing else (decode 1.00x, peak memory 1.00x)")
    assert "with weight-only kernels decode 2.00x, peak memory 0.79x" in finding and "measured in int8" in finding
    assert panel.loc["fp8", "weight-only kernels (bfloat16): speed"] == "failed: RuntimeError: boom"
    assert "with weight-only kernels not measured" in panel.loc["fp8", "finding"]
    assert tables.speed_panel([_measured("plain", {})]) is None


def test_a_run_without_a_measured_original_says_how_to_get_one():
    record = _measured("alone", {"aios": _runtime(28.0, 1300, 538)})
    record["summary"]["reference"] = "another original"
    panel = tables.speed_panel([record])
    assert len(panel) == 1 and "perf_models original,candidate" in panel.loc[0, "finding"]


def test_runtime_rows_give_the_interval_the_limit_and_what_ran_where():
    from llm_workbook.workbook import report

    data = {"perf": {"candidate": {"runtimes": {"kernels": _runtime(42.0, 860, 163, {"int8 per channel": 210})}}}}
    [row] = report.runtime_rows(data)
    assert row["model"] == "candidate" and row["runtime"] == "weight-only kernels (bfloat16)"
    assert row["decode tokens/s (batch 1)"] == "42.0 [IQR 41.6, 42.4]" and row["decode tokens/s (batch 8)"] == "168.0"
    assert row["bandwidth limit (tokens/s)"] == "123" and row["share of the limit"] == "34%"
    assert row["quantized layers run as"] == "210 int8 per channel"
    fp8 = {"perf": {"candidate": {"runtimes": {"kernels": _runtime(25.0, 890, 269, {
        "dense (fp8 has no CPU kernel: not an integer grid)": 210})}}}}
    assert report.runtime_rows(fp8)[0]["quantized layers run as"] == "210 dense (fp8 has no CPU kernel: not an integer grid)"
    data["perf"]["candidate"]["runtimes"]["gpu"] = {"unavailable": "no CUDA device on this machine"}
    kernels, gpu = report.runtime_rows(data)
    assert gpu["decode tokens/s (batch 1)"] == "no CUDA device on this machine" and set(gpu) == set(kernels)
    assert gpu["peak memory decoding (MB)"] == "—"


def test_llama_cpp_gets_a_column_only_where_a_gguf_candidate_was_measured_or_could_be():
    plain = _measured("int8", {"aios": _runtime(28.0, 1310, 538), "kernels": _runtime(42.0, 860, 163, {}),
                               "llama.cpp": {"unavailable": "not a GGUF checkpoint: llama.cpp runs GGUF files only"}},
                      ORIGINAL)
    assert not any("llama.cpp" in c for c in tables.speed_panel([plain]).columns)
    llama = {**_runtime(92.0, 400, 105), "engine": "llama-cpp-python 0.3.36"}
    gguf = _measured("gguf", {"aios": _runtime(28.0, 1310, 538), "kernels": _runtime(27.0, 900, 269, {}),
                              "llama.cpp": llama})
    missing = _measured("gguf-2", {"aios": _runtime(28.0, 1310, 538), "llama.cpp": {"unavailable": "make llama-cpp"}})
    panel = tables.speed_panel([plain, gguf, missing]).set_index("run")
    assert panel.loc["gguf", "llama.cpp (GGUF): speed"] == "92.0 tokens/s; 48% of the bandwidth limit"
    assert panel.loc["gguf-2", "llama.cpp (GGUF): speed"] == "make llama-cpp"
    assert panel.loc["int8", "llama.cpp (GGUF): speed"] == "—"
    assert "in llama.cpp it decodes 92.0 tokens/s (48% of its bandwidth limit)" in panel.loc["gguf", "finding"]


def test_the_gpu_gets_a_column_only_where_a_device_was_there():
    no_device = {"unavailable": "no CUDA device on this machine"}
    here = _measured("int4", {"aios": _runtime(28.0, 1310, 538), "gpu": no_device}, ORIGINAL)
    assert not any("GPU" in c for c in tables.speed_panel([here]).columns)
    gpu = {**_runtime(900.0, 2100, 117), "engine": "vLLM 0.11", "device": "cuda",
           "quantization": "compressed-tensors kernels", "memory": {"device_peak_bytes": 2100e6}}
    original = {**ORIGINAL, "gpu": {**_runtime(450.0, 2600, 269), "engine": "vLLM 0.11", "device": "cuda",
                                    "quantization": "dense (no quantization_config)"}}
    there = _measured("int4-gpu", {"aios": _runtime(28.0, 1310, 538), "gpu": gpu}, original)
    panel = tables.speed_panel([there, here]).set_index("run")
    assert panel.loc["int4-gpu", "GPU (CUDA): speed"].startswith("900.0 tokens/s (2.00x)")
    assert panel.loc["int4", "GPU (CUDA): speed"] == "no CUDA device on this machine"
    assert ("on the GPU (vLLM 0.11 on cuda: compressed-tensors kernels) it decodes 900.0 tokens/s, 2.00x the "
            "original's") in panel.loc["int4-gpu", "finding"]


def test_an_encoder_is_measured_in_sentences_per_second_without_a_decode_limit():
    from llm_workbook.workbook import report

    def encoder(rate: float, rss_mb: float, kernels: dict | None = None) -> dict:
        figures = {"runtime": "label", "kind": "encoder", "embedding_sentences_per_s":
                   {"median": rate, "q1": rate * 0.98, "q3": rate * 1.02}, "memory": {"inference_peak_rss_bytes": rss_mb * 1e6}}
        return figures if kernels is None else {**figures, "kernel_layers": kernels}

    original = {"aios": encoder(96.0, 573), "kernels": encoder(177.0, 506, {})}
    record = _measured("minilm-int8", {"aios": encoder(96.0, 588), "kernels": encoder(81.0, 518, {"int8 per channel": 36})},
                       original)
    panel = tables.speed_panel([record]).set_index("run")
    assert panel.loc["minilm-int8", "weight-only kernels (bfloat16): speed"] == "81.0 sentences/s (0.46x)"
    assert "embedding 0.46x" in panel.loc["minilm-int8", "finding"]
    kernels = encoder(81.0, 518, {"int8 per channel": 36})
    [row] = report.runtime_rows({"perf": {"candidate": {"runtimes": {"kernels": kernels}}}})
    assert row["embedding sentences/s"] == "81.0 [IQR 79.4, 82.6]" and "decode tokens/s (batch 1)" not in row
    assert row["quantized layers run as"] == "36 int8 per channel"
