"""workbook/report.py: the tables the evaluation notebook shows, computed in the library."""

from __future__ import annotations

from llm_workbook.workbook import report


def record_data(packed: bool) -> dict:
    perf = {
        "original": {"load": {"parquet_s": {"median": 0.5}}, "prefill_ms_per_token": {"median": 2.0},
                     "memory": {"inference_peak_rss_bytes": 900e6}},
        "candidate": {"load": {"parquet_s": {"median": 0.4}}, "decode_tokens_per_s": {"median": 30.0}},
    }
    if packed:
        perf["candidate_packed"] = {"memory": {"inference_peak_rss_bytes": 500e6}}
    return {
        "verdict": {"checks": [
            {"name": "cosine", "value": 0.99, "threshold": 0.95, "passed": True},
            {"name": "ppl_increase", "value": 0.3, "threshold": 0.15, "passed": False},
            {"name": "kld", "value": 0.01, "threshold": None, "passed": None},
        ]},
        "perf": perf,
        "sizes": {"original": {"file_bytes": 2e6}, "candidate": {"file_bytes": 1e6}},
    }


def test_quality_rows_label_each_check_and_say_whether_it_passed():
    rows = report.quality_rows(record_data(False))
    assert [r["check"] for r in rows] == ["cosine similarity (at least)", "perplexity increase, fraction (at most)",
                                          "KL divergence, mean (at most)"]
    assert [r["passed"] for r in rows] == ["yes", "NO", "—"]
    assert rows[2]["threshold"] == "none set"


def test_perf_rows_show_the_packed_candidate_only_when_it_was_measured():
    assert [r["model"] for r in report.perf_rows(record_data(False))] == ["original", "candidate"]
    rows = report.perf_rows(record_data(True))
    assert [r["model"] for r in rows] == ["original", "candidate", "candidate (packed)"]
    assert rows[2]["size on disk (MB)"] == 1.0 and rows[2]["peak RSS (MB)"] == 500.0
    assert rows[0]["load time (s)"] == 0.5 and rows[1]["decode (tokens/s)"] == 30.0
    assert rows[1]["peak RSS (MB)"] is None  # not measured is not zero


def test_evaluated_names_producer_and_original_from_parameters_or_the_catalogue():
    class Record:
        def to_dict(self):
            return {"candidate": {}, "original": {}}

    given = report.evaluated(Record(), {"producer": "someone", "model_name": "M", "model": "x", "reference": "y"})
    assert given["candidate"]["producer"] == "someone" and given["original"]["model"] == "M"
    from_catalogue = report.evaluated(Record(), {"model": "builtin:smollm2/ptq-int8", "reference": "builtin:smollm2"})
    assert from_catalogue["candidate"]["producer"].startswith("llmc ptq")
    assert "SmolLM2" in from_catalogue["original"]["model"]
