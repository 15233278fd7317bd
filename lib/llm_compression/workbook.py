"""The workbook: parameter files -> papermill runs of evaluate_model.ipynb -> HTML reports -> index.

One YAML per run. A run whose inputs (parameters, notebook, package version) have not changed since
its last successful execution is skipped unless ``force``. A failing run does not stop the batch:
its executed notebook keeps the error cell and its record says ``failed``.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from . import __version__

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
EVALUATE_NOTEBOOK = NOTEBOOKS / "evaluate_model.ipynb"
COMPARE_NOTEBOOK = NOTEBOOKS / "compare_models.ipynb"
KERNEL = "python3"

# Every parameter the evaluation notebook takes, with its default.
DEFAULTS: dict = {
    "run": None,  # name of the run: reports/<run>.*
    "title": None,
    "model": None,  # candidate: HF dir, hub id, .parquet, or builtin:<name>
    "reference": None,  # original: same kinds of source
    "format_notes": "",
    "task": "causal-lm",  # causal-lm | encoder
    "corpus": "pydoc",  # offline default; a .txt/.jsonl path or (online) a datasets id
    "context_length": 128,
    "stride": 128,
    "max_eval_tokens": 2048,
    "gen_tokens": 16,
    "dtype": "float32",
    "device": "cpu",
    "activation_quant": True,
    "keep_packed": False,
    "measure_perf": True,
    "perf_models": "original,candidate",  # whose speed and memory to measure (each costs fresh processes)
    "perf_hf_load": True,  # also time loading from HF safetensors, for the Parquet/HF load-time ratio
    "cosine_threshold": 0.95,
    "ppl_threshold": 0.15,
    "kld_threshold": None,
    "top1_threshold": None,
    "output_dir": "reports",
}


class ParameterError(ValueError):
    pass


def load_parameters(path: str | os.PathLike) -> dict:
    """A run's parameters: the YAML merged over DEFAULTS, checked for unknown keys and required ones."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ParameterError(f"{path}: cannot read parameters ({exc})") from None
    if not isinstance(raw, dict):
        raise ParameterError(f"{path}: expected a mapping of parameters")
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ParameterError(f"{path}: unknown parameters {unknown}; known: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **raw}
    params["run"] = params["run"] or path.stem
    for key in ("model", "reference"):
        if not params[key]:
            raise ParameterError(f"{path}: parameter {key!r} is required")
    params["title"] = params["title"] or params["run"]
    return params


def inputs_digest(params: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(EVALUATE_NOTEBOOK.read_bytes())
    h.update(__version__.encode())
    return h.hexdigest()[:16]


@dataclass
class RunOutcome:
    run: str
    status: str  # passed | failed-check | error | skipped
    notebook: Path
    html: Path | None
    record: Path
    message: str = ""


def render_html(notebook: Path) -> tuple[Path, Path]:
    """Full HTML and a meeting version (inputs hidden) next to the executed notebook."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook, as_version=4)
    full, _ = HTMLExporter().from_notebook_node(nb)
    meeting_exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    meeting, _ = meeting_exporter.from_notebook_node(nb)
    full_path = notebook.with_suffix(".html")
    meeting_path = notebook.with_suffix(".meeting.html")
    full_path.write_text(full, encoding="utf-8")
    meeting_path.write_text(meeting, encoding="utf-8")
    return full_path, meeting_path


def execute(notebook: Path, output: Path, parameters: dict, cwd: Path) -> None:
    import papermill

    papermill.execute_notebook(
        str(notebook), str(output), parameters=parameters, kernel_name=KERNEL, cwd=str(cwd),
        progress_bar=False, log_output=False,
        # ipykernel warns on every start that its local TCP channel is unencrypted; keep the batch output readable.
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
    )


def run_one(param_file: Path, reports: Path, force: bool = False) -> RunOutcome:
    import papermill

    params = load_parameters(param_file)
    params["output_dir"] = str(reports.resolve())
    run = params["run"]
    notebook = reports / f"{run}.ipynb"
    record = reports / f"{run}.json"
    digest = inputs_digest(params)
    if not force and record.exists() and notebook.with_suffix(".html").exists():
        try:
            old = json.loads(record.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("inputs_digest") == digest and old.get("status") != "error":
            return RunOutcome(run, "skipped", notebook, notebook.with_suffix(".html"), record, "inputs unchanged")
    params["inputs_digest"] = digest
    status, message = "passed", ""
    try:
        execute(EVALUATE_NOTEBOOK, notebook, params, REPO)
    except papermill.PapermillExecutionError as exc:
        status, message = "error", f"{exc.ename}: {exc.evalue}"
    except Exception as exc:  # kernel died, bad notebook...
        status, message = "error", f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if status == "error":
        record.write_text(json.dumps({
            "run": run, "title": params["title"], "model": params["model"], "reference": params["reference"],
            "status": "error", "error": message, "inputs_digest": digest,
            "verdict": {"passed": False, "reasons": [f"run failed: {message}"]},
        }, indent=2))
    elif record.exists():
        data = json.loads(record.read_text())
        status = "passed" if data.get("verdict", {}).get("passed") else "failed-check"
    else:
        status, message = "error", "the notebook finished without writing its record"
    html_path = None
    if notebook.exists():
        html_path, _ = render_html(notebook)
    return RunOutcome(run, status, notebook, html_path, record, message)


def run_batch(param_files: list[str | os.PathLike], reports: str | os.PathLike = "reports", force: bool = False,
              progress: bool = True) -> list[RunOutcome]:
    """Execute every run, then the comparison notebook, then write reports/index.html."""
    reports = Path(reports)
    reports.mkdir(parents=True, exist_ok=True)
    files = [Path(p) for p in param_files]
    if not files:
        raise ParameterError("no parameter files given")
    outcomes = []
    bar = tqdm(files, desc="runs", unit="run", disable=not progress)
    for param_file in bar:
        bar.set_postfix_str(param_file.stem)
        try:
            outcomes.append(run_one(param_file, reports, force))
        except ParameterError as exc:
            record = reports / f"{param_file.stem}.json"
            record.write_text(json.dumps({"run": param_file.stem, "status": "error", "error": str(exc),
                                          "verdict": {"passed": False, "reasons": [str(exc)]}}, indent=2))
            outcomes.append(RunOutcome(param_file.stem, "error", reports / f"{param_file.stem}.ipynb", None, record, str(exc)))
    compare = reports / "compare_models.ipynb"
    try:
        execute(COMPARE_NOTEBOOK, compare, {"reports_dir": str(reports.resolve())}, REPO)
    finally:
        if compare.exists():
            render_html(compare)
    write_index(reports, outcomes)
    return outcomes


def load_records(reports: Path, runs: list[str] | None = None) -> list[dict]:
    records = []
    for path in sorted(Path(reports).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if not isinstance(data, dict) or "run" not in data:
            continue
        if runs is None or data["run"] in runs:
            records.append(data)
    return records


def write_index(reports: Path, outcomes: list[RunOutcome]) -> Path:
    """reports/index.html: the decision table and links to every run's reports."""
    from .decision import decision_table, style_decision_table

    records = load_records(reports)  # every run in the directory, not only this batch's
    table = decision_table(records)
    this_batch = {o.run: o for o in outcomes}
    outcomes = list(outcomes) + [
        RunOutcome(r["run"], r.get("status", "?"), reports / f"{r['run']}.ipynb", None, reports / f"{r['run']}.json",
                   "from an earlier batch")
        for r in records if r["run"] not in this_batch
    ]
    table_html = style_decision_table(table).to_html() if len(table) else "<p>No runs.</p>"
    items = []
    for o in outcomes:
        links = []
        for suffix, label in ((".html", "full report"), (".meeting.html", "meeting version"), (".json", "record")):
            target = reports / f"{o.run}{suffix}"
            if target.exists():
                links.append(f'<a href="{html.escape(target.name)}">{label}</a>')
        items.append(f"<li><b>{html.escape(o.run)}</b> — {html.escape(o.status)}"
                     f"{' (' + html.escape(o.message) + ')' if o.message else ''}: {' · '.join(links)}</li>")
    compare = '<p><a href="compare_models.html">Comparison notebook (plots)</a></p>' if (reports / "compare_models.html").exists() else ""
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Quantized checkpoint evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse}}
td,th{{padding:4px 8px;border:1px solid #ccc}}</style></head>
<body><h1>Quantized checkpoint evaluation</h1>
<p>One row per model/format, sorted by verdict then PPL change. Failures are highlighted.</p>
<div id="decision-table">{table_html}</div>
{compare}
<h2>Runs</h2><ul>{''.join(items)}</ul>
<p><small>llm_compression {__version__}</small></p>
</body></html>"""
    index = reports / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
