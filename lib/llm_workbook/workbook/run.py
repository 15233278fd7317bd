"""The workbook: parameter files -> papermill runs of evaluate_model.ipynb -> HTML reports -> index.

One YAML per run. A run whose inputs (parameters, notebook, package version) have not changed since
its last successful execution is skipped unless ``force``. A failing run does not stop the batch:
its executed notebook keeps the error cell and its record says ``failed``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


from llm_workbook.paths import REPO_ROOT, __version__, reports_root
from llm_workbook.store import atomic
from llm_workbook.workbook.parameters import ParameterError, load_parameters
from llm_workbook.workbook.run_record import RunRecord
from llm_workbook.workbook.status import RunStatus
from llm_workbook.workbook.index import load_records, write_index  # noqa: F401  (load_records: its old home)

NOTEBOOKS = REPO_ROOT / "notebooks"
EVALUATE_NOTEBOOK = NOTEBOOKS / "evaluate_model.ipynb"
COMPARE_NOTEBOOK = NOTEBOOKS / "compare_models.ipynb"
KERNEL = "python3"

def inputs_digest(params: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(params, sort_keys=True).encode())
    h.update(EVALUATE_NOTEBOOK.read_bytes())
    h.update(__version__.encode())
    return h.hexdigest()[:16]


@dataclass
class RunOutcome:
    run: str
    status: RunStatus
    notebook: Path
    html: Path | None
    record: Path
    message: str = ""
    expected: bool = False  # an error the run's ``expect_error`` names: documented, not a failure of the batch
    seconds: float | None = None  # wall time of the run (builds of the builtins it used first included); None: skipped

    @property
    def evaluated(self) -> bool:
        """Did the run reach a verdict (a failed check is a verdict), or fail as documented?"""
        return self.status != RunStatus.ERROR or self.expected


def exit_status(outcomes: list[RunOutcome]) -> int:
    """0 when every run reached a verdict (or failed as its ``expect_error`` says), 1 otherwise."""
    return 0 if all(o.evaluated for o in outcomes) else 1


TEMPLATES = Path(__file__).parent / "templates"  # "report": the lab template without network scripts
VERDICT_TAG, HEADING_TAG = "verdict", "heading"


def tagged(cell, tag: str) -> bool:
    return tag in cell.get("metadata", {}).get("tags", [])


def verdict_first(nb):
    """The notebook as a report reads it: the cells tagged ``verdict`` (computed last) moved to just after the
    cell tagged ``heading``, so a meeting reads the verdict before the figures that support it."""
    cells = list(nb.cells)
    verdict = [c for c in cells if tagged(c, VERDICT_TAG)]
    rest = [c for c in cells if not tagged(c, VERDICT_TAG)]
    at = next((i + 1 for i, c in enumerate(rest) if tagged(c, HEADING_TAG)), None)
    if not verdict or at is None:
        return nb
    reordered = nb.copy()
    reordered.cells = rest[:at] + verdict + rest[at:]
    return reordered


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def without_progress_bars(nb):
    """The notebook without its progress-bar widgets (a notebook saved from Lab keeps them): in a static page
    a widget shows only its text fallback, the bar as it was when first drawn (0 %)."""
    for cell in nb.cells:
        if cell.get("outputs"):
            cell.outputs = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
    return nb


def render_html(notebook: Path) -> tuple[Path, Path]:
    """Full HTML and a meeting version (inputs hidden) next to the executed notebook (each written atomically):
    the verdict first, wide tables scrolling in their own box, nothing loaded from the network."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = verdict_first(without_progress_bars(nbformat.read(notebook, as_version=4)))
    style = dict(template_name="report", extra_template_basedirs=[str(TEMPLATES)])
    full, _ = HTMLExporter(**style).from_notebook_node(nb)
    meeting_exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True, **style)
    meeting, _ = meeting_exporter.from_notebook_node(nb)
    full_path = notebook.with_suffix(".html")
    meeting_path = notebook.with_suffix(".meeting.html")
    atomic.write_text(full_path, full)
    atomic.write_text(meeting_path, meeting)
    return full_path, meeting_path


def execute(notebook: Path, output: Path, parameters: dict, cwd: Path) -> None:
    """Run ``notebook`` with ``parameters`` (papermill) in a new kernel: forked from the batch's kernel server
    while one is serving (``kernel_server``), started as usual otherwise."""
    import papermill

    from llm_workbook.workbook import kernel_server

    papermill.execute_notebook(
        str(notebook), str(output), parameters=parameters, kernel_name=KERNEL, cwd=str(cwd),
        progress_bar=False, log_output=False,
        # ipykernel warns on every start that its local TCP channel is unencrypted; keep the batch output readable.
        extra_arguments=["--IPKernelApp.log_level=ERROR"], **kernel_server.papermill_options(),
    )


def _error_summary(params: dict) -> dict:
    """Who made the candidate and which model it is, for a run that stopped before its record was written."""
    from llm_workbook.workbook import builtins

    try:
        producer = params.get("producer") or builtins.producer(params["model"])
        model = params.get("model_name") or builtins.model_name(params["reference"])
    except builtins.BuiltinError:
        producer, model = None, None
    return {"run": params["run"], "title": params["title"], "model": params["model"], "reference": params["reference"],
            "producer": producer, "original_model": model, "passed": False}


def unchanged(params: dict, reports: Path) -> bool:
    """Did the last successful run of these parameters (same notebook and package version) already write its reports?"""
    record = reports / f"{params['run']}.json"
    if not (record.exists() and (reports / f"{params['run']}.html").exists()):
        return False
    old = RunRecord.read(record)
    return old is not None and old.inputs_digest == inputs_digest(params) and not old.is_error


RUN_FILES = (".ipynb", ".html", ".meeting.html", ".json")  # published in this order: the record last


def publish_run_files(reports: Path, run: str, files: dict[str, Path | bytes]) -> None:
    """Put a finished run's files (suffix -> a file to move, or its bytes, from a Ray worker) into ``reports``,
    each atomically, the record last (it marks the run complete), replacing the previous run's. The one
    publish of both executors."""
    for suffix in RUN_FILES:
        produced = files.get(suffix)
        if isinstance(produced, Path):
            os.replace(produced, reports / f"{run}{suffix}")
        elif produced is not None:
            atomic.write_bytes(reports / f"{run}{suffix}", produced)


def _publish(staging: Path, reports: Path, run: str) -> None:
    """Publish the files a run left in its staging directory."""
    publish_run_files(reports, run, {suffix: staging / f"{run}{suffix}" for suffix in RUN_FILES
                                     if (staging / f"{run}{suffix}").exists()})


def run_one(param_file: Path | dict, reports: Path, force: bool = False, overrides: dict | None = None) -> RunOutcome:
    """Execute one run in a staging directory beside ``reports`` and publish its files when it ends: a run
    that is stopped or killed leaves the previous run's reports as they were. ``param_file``: a YAML path
    or an already checked parameter mapping (``llmc evaluate``)."""
    import papermill

    params = dict(param_file) if isinstance(param_file, dict) else load_parameters(param_file, overrides)
    run = params["run"]
    notebook = reports / f"{run}.ipynb"
    record = reports / f"{run}.json"
    digest = inputs_digest(params)
    if not force and unchanged(params, reports):
        return RunOutcome(run, RunStatus.SKIPPED, notebook, notebook.with_suffix(".html"), record, "inputs unchanged")
    staging = atomic.temp_path(reports / run)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    params["output_dir"] = str(staging.resolve())
    params["inputs_digest"] = digest
    params["progress"] = False  # bars would land in the report; the batch shows its own
    status, message = RunStatus.PASSED, ""
    staged_record = staging / f"{run}.json"
    started = time.monotonic()
    try:
        try:
            execute(EVALUATE_NOTEBOOK, staging / notebook.name, params, REPO_ROOT)
        except papermill.PapermillExecutionError as exc:
            status, message = RunStatus.ERROR, f"{exc.ename}: {exc.evalue}"
        except Exception as exc:  # kernel died, bad notebook...
            status, message = RunStatus.ERROR, f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        if status == RunStatus.ERROR:
            RunRecord.failed(run, message, params, digest, _error_summary(params)).write(staging)
        elif (written := RunRecord.read(staged_record)) is not None:
            status, message = written.outcome()
        else:
            status, message = RunStatus.ERROR, "the notebook finished without writing its record"
            RunRecord.failed(run, message, inputs_digest=digest).write(staging)
        if (staging / notebook.name).exists():
            render_html(staging / notebook.name)
        _publish(staging, reports, run)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    html_path = notebook.with_suffix(".html") if notebook.with_suffix(".html").exists() else None
    expected = bool(status == RunStatus.ERROR and params.get("expect_error") and str(params["expect_error"]) in message)
    if params.get("expect_error") and status != RunStatus.ERROR:
        message = f"{message + '; ' if message else ''}the documented error ({params['expect_error']}) did not happen"
    return RunOutcome(run, status, notebook, html_path, record, message, expected, time.monotonic() - started)


def notebook_run_name(nb) -> str:
    """The ``run`` an executed evaluation notebook ran as: the last assignment in its parameters cells
    (papermill's injected cell follows the defaults cell)."""
    import ast

    run = None
    for cell in nb.cells:
        if cell.cell_type == "code" and (tagged(cell, "parameters") or tagged(cell, "injected-parameters")):
            for node in ast.parse(cell.source).body:
                if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "run" for t in node.targets)
                        and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                    run = node.value.value
    if not run:
        raise ParameterError("no `run = '...'` in the notebook's parameters cell: is it evaluate_model.ipynb?")
    return run


def publish_notebook(notebook: str | os.PathLike, reports: str | os.PathLike | None = None) -> RunOutcome:
    """An evaluation notebook run to its end in JupyterLab and saved: copy it into ``reports`` beside the record
    it wrote there, render its HTML reports and rewrite the index, as ``llmc run`` leaves a run."""
    import nbformat

    notebook = Path(notebook)
    reports = Path(reports) if reports else reports_root()
    try:
        nb = nbformat.read(notebook, as_version=4)
    except (OSError, ValueError) as exc:
        raise ParameterError(f"{notebook}: not a readable notebook ({exc})") from None
    run = notebook_run_name(nb)
    record = reports / f"{run}.json"
    if not record.is_file():
        raise ParameterError(f"{notebook}: run {run!r} has no record in {reports} (run the notebook to its end, "
                             f"with output_dir unset or {str(reports)!r}, then save it)")
    written = RunRecord.read(record)
    if written is None:
        raise ParameterError(f"{record}: not a run record")
    status, message = written.outcome()
    outcome = RunOutcome(run, status, reports / f"{run}.ipynb", reports / f"{run}.html", record, message)
    with batch_lock(reports):
        staging = atomic.temp_path(reports / run)
        staging.mkdir()
        try:
            shutil.copyfile(notebook, staging / f"{run}.ipynb")
            render_html(staging / f"{run}.ipynb")
            _publish(staging, reports, run)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        write_index(reports, [outcome])
    return outcome


def batch_lock(reports: Path, wait: bool = True):
    """One batch at a time per reports directory: a second ``llmc run`` waits, saying for whom."""
    def busy(holder: str) -> None:
        if not wait:
            raise ParameterError(f"{reports}: another llmc run ({holder}) is writing reports there")
        print(f"{reports}: waiting for another llmc run ({holder}) to finish writing there ...", file=sys.stderr,
              flush=True)

    return atomic.file_lock(reports / ".llmc-run.lock", on_busy=busy)


def error_outcome(reports: Path, name: str, message: str) -> RunOutcome:
    """A run that could not start (bad parameters file): its record says why."""
    record = reports / f"{name}.json"
    RunRecord.failed(name, message).write(reports)
    return RunOutcome(name, RunStatus.ERROR, reports / f"{name}.ipynb", None, record, message)
