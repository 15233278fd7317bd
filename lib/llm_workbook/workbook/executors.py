"""How a batch runs: locally, one run after another, or on Ray, one task per run; then the comparison
notebook and the index, once. Both executors publish a run's files through ``run.publish_run_files``.

On Ray, a task runs ``workbook.run.run_one`` in a scratch reports directory on its worker and returns the run's files
(record, executed notebook, HTML); the driver writes them under ``reports/`` exactly as a sequential run
does (each atomically, the record last), so a cancelled sweep leaves no half-written report. A task's
resources come from the run's ``resources`` parameter (default one CPU). Without an address a local Ray
starts on this machine with its CPUs; ``address="auto"`` joins the cluster this node belongs to and
``ray://HOST:10001`` a remote one (its workers need this project installed, see the README).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from llm_workbook.paths import REPO_ROOT, reports_root
from llm_workbook.store import atomic
from llm_workbook.workbook.parameters import ParameterError, load_parameters
from llm_workbook.workbook.run import (COMPARE_NOTEBOOK, RUN_FILES, RunOutcome, batch_lock,
                                       error_outcome, execute, publish_run_files, render_html,
                                       run_one, unchanged)
from llm_workbook.workbook import kernel_server
from llm_workbook.workbook.index import write_index
from llm_workbook.workbook.status import RunStatus

INSTALL_HINT = "Ray is an optional extra: pip install -e '.[cluster]' (make setup installs it)"


def _ray():
    try:
        import ray
    except ImportError:
        raise ParameterError(f"--executor ray needs Ray, which is not installed. {INSTALL_HINT}") from None
    return ray


def execute_run(params: dict) -> dict:
    """The body of one Ray task: run the notebook in a scratch directory, return the files it wrote."""
    threads = str(int((params.get("resources") or {}).get("num_cpus") or 1))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the kernel inherits these: no oversubscription
        os.environ[name] = threads
    with tempfile.TemporaryDirectory(prefix="llmc-ray-run-") as scratch:
        outcome = run_one(params, Path(scratch), force=True)
        files = {suffix: (Path(scratch) / f"{params['run']}{suffix}").read_bytes()
                 for suffix in RUN_FILES if (Path(scratch) / f"{params['run']}{suffix}").exists()}
    return {"status": outcome.status, "message": outcome.message, "expected": outcome.expected, "files": files,
            "node": os.uname().nodename, "seconds": outcome.seconds}


def _options(params: dict) -> dict:
    resources = dict(params.get("resources") or {})
    options = {"num_cpus": float(resources.pop("num_cpus", 1)), "num_gpus": float(resources.pop("num_gpus", 0))}
    if resources:  # custom Ray resources, e.g. {"accelerator_type:A100": 1}
        options["resources"] = {k: float(v) for k, v in resources.items()}
    return options


def run_on_ray(runs: list, reports: Path, force: bool, progress: bool, overrides: dict | None,
               address: str | None = None) -> list[RunOutcome]:
    """Every run as a Ray task; returns the outcomes in the order given. One failing task is a failed row."""
    ray = _ray()
    outcomes: dict[str, RunOutcome] = {}
    order: list[str] = []
    pending: dict = {}
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    task = ray.remote(execute_run)
    try:
        for item in runs:
            name = item["run"] if isinstance(item, dict) else Path(item).stem
            order.append(name)
            try:
                params = dict(item) if isinstance(item, dict) else load_parameters(item, overrides)
            except ParameterError as exc:
                outcomes[name] = error_outcome(reports, name, str(exc))
                continue
            if not force and unchanged(params, reports):
                outcomes[name] = RunOutcome(name, RunStatus.SKIPPED, reports / f"{name}.ipynb", reports / f"{name}.html",
                                            reports / f"{name}.json", "inputs unchanged")
                continue
            pending[task.options(**_options(params)).remote(params)] = name
        bar = tqdm(total=len(pending), desc="ray tasks", unit="run", disable=not progress)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            name = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # the task itself died (worker lost, out of memory...): a failed row
                outcomes[name] = error_outcome(reports, name, f"Ray task failed: {type(exc).__name__}: {exc}")
            else:
                publish_run_files(reports, name, result["files"])
                html = reports / f"{name}.html"
                outcomes[name] = RunOutcome(name, result["status"], reports / f"{name}.ipynb",
                                            html if html.exists() else None, reports / f"{name}.json",
                                            result["message"], result.get("expected", False), result.get("seconds"))
            bar.update(1)
        bar.close()
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started_here:
            ray.shutdown()
    return [outcomes[name] for name in order]


EXECUTORS = ("local", "ray")


def run_batch(param_files: list[str | os.PathLike | dict], reports: str | os.PathLike | None = None, force: bool = False,
              progress: bool = True, overrides: dict | None = None, executor: str = "local",
              address: str | None = None) -> list[RunOutcome]:
    """Execute every run (a YAML path or a parameter mapping each; ``overrides`` apply to every YAML), then
    the comparison notebook, then write reports/index.html. ``executor="ray"`` runs each as a Ray task
    (``run_on_ray``), on a local Ray or the cluster at ``address``."""
    reports = Path(reports) if reports else reports_root()
    reports.mkdir(parents=True, exist_ok=True)
    runs = [p if isinstance(p, dict) else Path(p) for p in param_files]
    if not runs:
        raise ParameterError("no parameter files given")
    if executor not in EXECUTORS:
        raise ParameterError(f"unknown executor {executor!r}; choose one of {list(EXECUTORS)}")
    with batch_lock(reports):
        if executor == "ray":
            outcomes = run_on_ray(runs, reports, force, progress, overrides, address)
            return finish_batch(reports, outcomes)
        return _run_batch(runs, reports, force, progress, overrides)


def _run_batch(runs: list, reports: Path, force: bool, progress: bool, overrides: dict | None) -> list[RunOutcome]:
    outcomes = []
    with kernel_server.serving():  # every notebook's kernel forked from one that imported once
        bar = tqdm(runs, desc="runs", unit="run", disable=not progress)
        for param_file in bar:
            name = param_file["run"] if isinstance(param_file, dict) else param_file.stem
            bar.set_postfix_str(name)
            try:
                outcomes.append(run_one(param_file, reports, force, overrides))
            except ParameterError as exc:
                outcomes.append(error_outcome(reports, name, str(exc)))
        return finish_batch(reports, outcomes)


def finish_batch(reports: Path, outcomes: list[RunOutcome]) -> list[RunOutcome]:
    """The comparison notebook and the index, once, after every run."""
    import papermill

    compare = reports / "compare_models.ipynb"
    try:
        with atomic.replacing(compare, fsync=False) as staged:
            staged_nb = staged.with_name(staged.name + ".ipynb")
            try:
                execute(COMPARE_NOTEBOOK, staged_nb, {"reports_dir": str(reports.resolve())}, REPO_ROOT)
            except papermill.PapermillExecutionError as exc:  # its report shows the error; the index still follows
                print(f"compare_models.ipynb failed: {exc.ename}: {exc.evalue}", file=sys.stderr)
            finally:
                if staged_nb.exists():
                    os.replace(staged_nb, staged)
    finally:
        if compare.exists():
            render_html(compare)
    write_index(reports, outcomes)
    return outcomes
