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


def test_summary_rows_say_why_a_figure_is_missing():
    from llm_workbook.workbook.report import SUMMARY_ROWS, summary_rows

    summary = {key: None for key in SUMMARY_ROWS} | {"cosine": 0.99871, "format": "int8"}
    not_run = summary_rows({"summary": summary, "perf": None})
    assert "None" not in not_run.values() and len(not_run) == len(SUMMARY_ROWS)
    assert not_run["cosine similarity (mean)"] == "0.9987"
    assert not_run["peak memory, dequantized (MB)"] == "not measured (measure_perf: false)"
    assert summary_rows({"summary": summary | {"latency_label": "not measured"}, "perf": None})["latency"] != "not measured"
    only_original = summary_rows({"summary": summary, "perf": {"original": {"peak_rss_mb": 900}}})
    assert only_original["latency"] == "not measured for the candidate (perf_models)"


def test_verdict_cells_move_after_the_heading_in_the_report():
    import nbformat

    from llm_workbook.workbook.run import verdict_first

    cell = lambda text, *tags: nbformat.v4.new_code_cell(text, metadata={"tags": list(tags)})  # noqa: E731
    nb = nbformat.v4.new_notebook(cells=[cell("params", "parameters"), cell("head", "heading"), cell("figures"),
                                         cell("## Verdict", "verdict"), cell("verdict", "verdict"), cell("raw")])
    assert [c.source for c in verdict_first(nb).cells] == ["params", "head", "## Verdict", "verdict", "figures", "raw"]
    assert [c.source for c in nb.cells][2] == "figures"  # the executed notebook itself is left as it ran


def test_reports_root_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    from llm_workbook import REPO_ROOT, reports_root

    monkeypatch.delenv("LLMC_REPORTS_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert reports_root() == REPO_ROOT / "reports"
    monkeypatch.setenv("LLMC_REPORTS_DIR", str(tmp_path / "elsewhere"))
    assert reports_root() == tmp_path / "elsewhere"
