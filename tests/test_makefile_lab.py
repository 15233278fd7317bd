"""The workbook as a user drives it: `make lab`, Run All in a real Chromium, `llmc publish`, and the reports
read at 1,400 and 900 px (Playwright driving Debian's Chromium; no browser is downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from llm_workbook.workbook import run as workbook
from llm_workbook.workbook.executors import run_batch

from conftest import REPO, int8_copy

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
QUICK = {"run": "from-lab", "title": "tiny INT8 from Lab", "context_length": 32, "stride": 32, "max_eval_tokens": 192,
         "gen_tokens": 4, "measure_perf": False}
# Lab's own settings for this test: every cell rendered (Lab 4 draws only the visible ones by default), no news.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _with_parameters(source: Path, target: Path, values: dict) -> None:
    """What a user does first: edit the assignments in the parameters cell."""
    nb = nbformat.read(source, as_version=4)
    cell = next(c for c in nb.cells if workbook.tagged(c, "parameters"))
    lines = cell.source.splitlines()
    for key, value in values.items():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key} = "))
        lines[at] = f"{key} = {value!r}"
    cell.source = "\n".join(lines)
    nbformat.write(nb, target)


@pytest.fixture
def lab(tmp_path, qwen3_seed5_dir):
    """`make lab` on a copy of notebooks/ whose parameters name a tiny checkpoint; yields (url, notebooks, reports, sources)."""
    if not CHROMIUM:
        pytest.skip("Chromium not installed: run `make setup-browser` (Debian package chromium)")
    if not (REPO / ".venv" / "bin" / "jupyter").exists():
        pytest.skip("no .venv with JupyterLab: run `make setup`")
    original = qwen3_seed5_dir
    candidate = int8_copy(original, tmp_path / "int8")
    notebooks, reports, settings = tmp_path / "notebooks", tmp_path / "reports", tmp_path / "lab-settings"
    notebooks.mkdir()
    reports.mkdir()
    for name, value in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    sources = {"model": str(candidate), "reference": str(original)}
    _with_parameters(workbook.EVALUATE_NOTEBOOK, notebooks / "evaluate_model.ipynb", {**QUICK, **sources})
    port, token = _free_port(), "lab-test-token"
    lab_args = (f"--no-browser --port={port} --ServerApp.ip=127.0.0.1 "
                f"--IdentityProvider.token={token} --LabApp.expose_app_in_browser=True")
    env = {**os.environ, "LLMC_REPORTS_DIR": str(reports), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    log = open(tmp_path / "lab.log", "w")
    server = subprocess.Popen(["make", "-s", "-o", ".venv/.installed", "lab", f"LAB_DIR={notebooks}", f"LAB_ARGS={lab_args}"], cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and f":{port}/" not in (tmp_path / "lab.log").read_text():
            assert server.poll() is None, (tmp_path / "lab.log").read_text()[-3000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/lab/tree/evaluate_model.ipynb?token={token}", notebooks, reports, sources
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
        log.close()


def _kernel_status(page) -> str:
    return page.evaluate("() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status ?? ''")


def test_run_all_in_lab_then_publish_reports_that_read_at_1400_and_900_px(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, notebooks, reports, sources = lab
    shots = tmp_path / "screenshots"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)
        page.goto(url)
        # the notebook opens on the project's kernel, named in its metadata
        expect(page.locator(".jp-KernelName").first).to_have_text("llm-workbook (.venv)")
        page.wait_for_function("() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status"
                               " === 'idle'")
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        # progress on screen while it works: tqdm's notebook bar
        expect(page.locator(".jp-OutputArea .widget-hprogress").first).to_be_visible(timeout=240_000)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not ((reports / "from-lab.json").exists() and _kernel_status(page) == "idle"):
            time.sleep(1)
        assert (reports / "from-lab.json").exists(), "Run All did not write the run's record"
        page.screenshot(path=str(shots / "lab-1400.png"))
        page.keyboard.press("Control+s")
        page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty")
        browser.close()

    executed = nbformat.read(notebooks / "evaluate_model.ipynb", as_version=4)
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a cell did not run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not any(notebooks.glob("*.json")) and not (notebooks / "artifacts").exists()  # nothing under notebooks/

    # the same record as `llmc run` with the same parameters
    params = tmp_path / "params" / "from-lab.yaml"
    params.parent.mkdir()
    lab_record = json.loads((reports / "from-lab.json").read_text())
    params.write_text(yaml.safe_dump({**QUICK, **sources}))
    batch = tmp_path / "batch"
    [outcome] = run_batch([params], reports=batch, progress=False)
    assert outcome.status == "passed", outcome.message
    batch_record = json.loads((batch / "from-lab.json").read_text())
    for key in ("cosine", "kld_mean", "top1_agreement", "ppl_delta_pct"):
        assert lab_record["summary"].get(key) == batch_record["summary"].get(key), key
    assert lab_record["verdict"] == batch_record["verdict"]

    published = subprocess.run([sys.executable, "-m", "llm_workbook", "publish", str(notebooks / "evaluate_model.ipynb"),
                                "--reports", str(reports)], capture_output=True, text=True, cwd=tmp_path)
    assert published.returncode == 0, published.stdout + published.stderr
    for suffix in (".ipynb", ".html", ".meeting.html"):
        assert (reports / f"from-lab{suffix}").is_file(), suffix
    # Lab's progress widgets are not in the static report (it could only show their first frame, 0 %)
    assert "0/192" not in (reports / "from-lab.meeting.html").read_text()

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for width in (1400, 900):
            page = browser.new_page(viewport={"width": width, "height": 900})
            for name, verdict in (("from-lab.meeting.html", "h1:has-text('PASS: tiny INT8 from Lab')"),
                                  ("index.html", "#decision-table tbody tr:has-text('from-lab') td:nth-child(2)")):
                page.goto((reports / name).as_uri())
                box = page.locator(verdict).first.bounding_box()
                assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (name, width, box)
                assert box["y"] < 900 or name == "index.html", (name, width, box)  # the run's verdict above the fold
                sideways = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
                assert sideways <= 0, f"{name} scrolls {sideways} px sideways at {width} px"
                page.screenshot(path=str(shots / f"{name}-{width}.png"), full_page=True)
            page.close()
        browser.close()
    kept = os.environ.get("LLMC_TEST_SCREENSHOTS")  # where to keep the pictures for a look, if set
    if kept:
        shutil.copytree(shots, kept, dirs_exist_ok=True)
