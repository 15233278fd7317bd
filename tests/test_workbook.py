"""The workbook: papermill batch over parameter files, HTML reports, index, nbval, and the rendered page."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from llm_workbook.workbook import parameters
from llm_workbook.workbook import run as workbook
from llm_workbook.workbook.executors import run_batch

from conftest import REPO, int8_copy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batch(tmp_path_factory, qwen3_seed5_dir):
    root = tmp_path_factory.mktemp("workbook")
    original = qwen3_seed5_dir
    candidate = int8_copy(original, root / "int8")
    (candidate / "README.md").write_text("---\ntags: [llmc-stand-in]\n---\n# Stand-in for tiny/INT8\n")
    params = root / "params"
    params.mkdir()
    common = {"reference": str(original), "context_length": 32, "stride": 32, "max_eval_tokens": 192,
              "gen_tokens": 4, "measure_perf": False}
    (params / "tiny-int8.yaml").write_text(yaml.safe_dump({"title": "tiny INT8", "model": str(candidate), **common}))
    (params / "broken.yaml").write_text(yaml.safe_dump({"model": str(root / "missing"), **common}))
    reports = root / "reports"
    outcomes = run_batch(sorted(params.glob("*.yaml")), reports=reports, progress=False)
    return reports, {o.run: o for o in outcomes}, params


def test_batch_writes_reports_and_marks_the_broken_run(batch):
    reports, outcomes, _ = batch
    assert outcomes["tiny-int8"].status == "passed", outcomes["tiny-int8"].message
    assert outcomes["broken"].status == "error"
    for run in ("tiny-int8", "broken"):
        for suffix in (".ipynb", ".html", ".meeting.html", ".json"):
            assert (reports / f"{run}{suffix}").is_file(), (run, suffix)
    record = json.loads((reports / "tiny-int8.json").read_text())
    assert record["summary"]["cosine"] > 0.99 and record["store"]["export_bit_exact"] is True
    broken = json.loads((reports / "broken.json").read_text())
    assert broken["status"] == "error" and "missing does not exist" in broken["error"]
    # the broken run's executed notebook keeps the error cell, one clear error naming the source
    assert "ParameterError" in (reports / "broken.html").read_text()
    # the meeting version hides code
    assert "store_candidate" in (reports / "tiny-int8.html").read_text()
    assert "store_candidate" not in (reports / "tiny-int8.meeting.html").read_text()
    index = (reports / "index.html").read_text()
    assert "tiny-int8" in index and "broken" in index and "ERROR" in index and "PASS" in index
    # a stand-in candidate (its model card says so) is named as one in its record, its report and the index
    assert record["summary"]["stand_in"] == [str(candidate_dir(reports))]
    assert "Stand-in, not the release" in (reports / "tiny-int8.html").read_text()
    assert "1 of 2 runs compare stand-ins" in index
    assert (reports / "compare_models.html").is_file()


def candidate_dir(reports):
    return reports.parent / "int8"


def test_rerun_skips_unchanged_inputs_unless_forced(batch):
    reports, _, params = batch
    again = {o.run: o for o in run_batch([params / "tiny-int8.yaml"], reports=reports, progress=False)}
    assert again["tiny-int8"].status == "skipped" and again["tiny-int8"].seconds is None


def test_evaluate_command_with_overrides_writes_record_report_and_index(batch, tmp_path, capsys):
    from llm_workbook.cli import main

    reports, _, params = batch
    common = yaml.safe_load((params / "tiny-int8.yaml").read_text())
    out = tmp_path / "reports"
    argv = ["evaluate", common["model"], "--reference", common["reference"], "--run", "cli-int8", "--reports", str(out),
            "-q", "-p", "context_length", "32", "-p", "stride", "32", "-p", "max_eval_tokens", "96", "-p", "gen_tokens",
            "2", "-p", "measure_perf", "false", "-p", "ppl_threshold", "0.5"]
    assert main(argv) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("cli-int8"))
    assert re.search(r"passed\s+\d+ s ", line), line  # each run's wall time, so a batch's costs can be read off
    record = json.loads((out / "cli-int8.json").read_text())
    assert record["status"] == "passed"
    assert record["parameters"]["overrides"] == {"context_length": 32, "stride": 32, "max_eval_tokens": 96,
                                                 "gen_tokens": 2, "measure_perf": False, "ppl_threshold": 0.5}
    assert record["settings"]["eval_tokens"] == 97 and record["thresholds"]["ppl_increase"] == 0.5
    for suffix in (".html", ".meeting.html", ".ipynb"):
        assert (out / f"cli-int8{suffix}").is_file()
    index = (out / "index.html").read_text()
    assert "cli-int8" in index and 'id="decision"' in index and "No AngelSlim run in this batch" in index


def test_missing_source_is_one_clear_error(tmp_path, capsys):
    from llm_workbook.cli import main

    assert main(["evaluate", str(tmp_path / "nope"), "--reference", "builtin:smollm2", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"candidate: {tmp_path / 'nope'} does not exist" in err[0]
    assert main(["run", str(tmp_path / "x.yaml"), "-p", "nonsense_key", "1", "--reports", str(tmp_path / "r"), "-q"]) == 1  # the run could not be evaluated
    record = json.loads((tmp_path / "r" / "x.json").read_text())
    assert record["status"] == "error" and "cannot read parameters" in record["error"]


def test_notebooks_pass_nbval_with_small_parameters(batch, tmp_path):
    """nbval re-executes the executed (small-parameter) notebooks; --nbval-lax: no cell may raise."""
    reports, _, _ = batch
    work = tmp_path / "nb"
    work.mkdir()
    shutil.copy(reports / "tiny-int8.ipynb", work / "evaluate_model.ipynb")
    shutil.copy(reports / "compare_models.ipynb", work / "compare_models.ipynb")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--nbval-lax", "-p", "no:cacheprovider", str(work)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


def test_index_renders_in_headless_chromium(batch, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Chromium not installed: run `make setup-browser` (Debian package chromium)")
    reports, _, _ = batch
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (reports / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    dom = result.stdout
    assert 'id="decision-table"' in dom
    table = dom.split('id="decision-table"', 1)[1]
    assert "<table" in table and "tiny-int8" in table and "PASS" in table and "ERROR" in table


def test_reports_render_offline_with_the_verdict_first(batch):
    reports, _, _ = batch
    for name in ("tiny-int8.html", "tiny-int8.meeting.html", "compare_models.html"):
        page = (reports / name).read_text()
        # one self-contained file: no script, stylesheet or module fetched from the network
        assert not re.search(r'<script[^>]+src="https?:|<link[^>]+href="https?:|import\("https?:', page), name
    meeting = (reports / "tiny-int8.meeting.html").read_text()
    verdict = meeting.index("PASS: tiny INT8")
    assert verdict < meeting.index("1. Convert into the Parquet weight store")
    summary = meeting[verdict:meeting.index("1. Convert into the Parquet weight store")]
    assert ">None<" not in summary and "not measured (measure_perf: false" in summary
    assert "<details><summary>All metrics" in meeting  # the raw figures, collapsed, last
    assert meeting.index("<details><summary>All metrics") > meeting.index("Speed, memory and size")


def test_compare_notebook_without_records_says_so_in_one_line(tmp_path):
    empty = tmp_path / "reports"
    empty.mkdir()
    out = tmp_path / "compare.ipynb"
    workbook.execute(workbook.COMPARE_NOTEBOOK, out, {"reports_dir": str(empty)}, tmp_path)
    outputs = [o for cell in json.loads(out.read_text())["cells"] for o in cell.get("outputs", [])]
    shown = [o for o in outputs if o.get("output_type") in ("display_data", "execute_result")]
    assert len(shown) == 1 and "No run records" in "".join(shown[0]["data"]["text/markdown"])


def test_notebook_run_from_elsewhere_writes_to_the_reports_root_and_shows_progress(batch, tmp_path, monkeypatch):
    """As in Lab: the notebook runs in another directory, without output_dir, with progress bars on."""
    _, _, params = batch
    run = yaml.safe_load((params / "tiny-int8.yaml").read_text())
    reports = tmp_path / "reports-root"
    monkeypatch.setenv("LLMC_REPORTS_DIR", str(reports))
    cwd = tmp_path / "notebooks"
    cwd.mkdir()
    out = tmp_path / "executed.ipynb"
    workbook.execute(workbook.EVALUATE_NOTEBOOK, out, {**run, "run": "from-lab", "progress": True}, cwd)
    assert (reports / "from-lab.json").is_file()
    assert not list(cwd.iterdir())  # nothing written where the notebook ran
    outputs = json.dumps([cell.get("outputs", []) for cell in json.loads(out.read_text())["cells"]])
    # a tqdm bar: a widget where ipywidgets is installed (Lab), else text naming the step
    # (the original's side may come from the cache, so only the candidate's bar is certain)
    assert "application/vnd.jupyter.widget-view+json" in outputs or "candidate: scoring" in outputs


def test_notebooks_name_the_kernel_make_setup_installs():
    name = re.search(r"ipykernel install .*--name (\S+)", (REPO / "Makefile").read_text()).group(1)
    for notebook in (workbook.EVALUATE_NOTEBOOK, workbook.COMPARE_NOTEBOOK):
        assert json.loads(notebook.read_text())["metadata"]["kernelspec"]["name"] == name


def test_make_lab_allows_root_only_for_root():
    dry = subprocess.run(["make", "-n", "-o", ".venv/.installed", "lab"], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert ("--allow-root" in dry.stdout) == (os.getuid() == 0)
    assert "--notebook-dir=notebooks" in dry.stdout


def test_publish_names_the_notebook_when_its_record_is_missing(tmp_path):
    """`llmc publish` on a notebook that has not been run to its end: one message, exit 2, nothing written."""
    reports = tmp_path / "reports"
    reports.mkdir()
    result = subprocess.run([sys.executable, "-m", "llm_workbook", "publish", str(workbook.EVALUATE_NOTEBOOK),
                             "--reports", str(reports)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "evaluate_model.ipynb" in result.stderr and "'example' has no record" in result.stderr
    assert not list(reports.iterdir())


def test_publish_refuses_a_notebook_without_a_run_name(tmp_path):
    bare = tmp_path / "bare.ipynb"
    bare.write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    with pytest.raises(parameters.ParameterError, match="no `run = "):
        workbook.publish_notebook(bare, tmp_path)
