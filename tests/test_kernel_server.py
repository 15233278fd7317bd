"""The batch's kernel server: kernels forked from it behave as kernels started as usual, and go when their launcher
goes; interrupts reach them; without a server, kernels start as usual."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from llm_workbook.workbook import kernel_server
from llm_workbook.workbook.run import execute

REPO = Path(__file__).resolve().parents[1]

FIRST = "import os, sys\npreloaded = 'seaborn' in sys.modules\nprint(preloaded, os.getcwd(), repr(sys.path[0]))"
FIGURE = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]);"


def _notebook(path: Path, *cells: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nbformat.write(nb, path)
    return path


def _run(notebook: Path, tmp_path: Path) -> list:
    out = tmp_path / f"out-{time.monotonic_ns()}.ipynb"
    execute(notebook, out, {}, REPO)
    return nbformat.read(out, as_version=4).cells


def _kernels_of(server: psutil.Process) -> list[psutil.Process]:
    return [p for p in server.children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _server(path: str) -> psutil.Process:
    found = [p for p in psutil.Process().children() if p.cmdline()[-2:] == ["serve", path]]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture(scope="module")
def served():
    """One server for the tests that only use it (each server imports for about 5 s)."""
    with kernel_server.serving() as path:
        assert path and Path(path).exists()
        yield path


def test_a_served_kernel_runs_a_notebook_as_a_usual_one_does(served, tmp_path, monkeypatch):
    notebook = _notebook(tmp_path / "nb.ipynb", FIRST, FIGURE)
    forked = _run(notebook, tmp_path)
    monkeypatch.setattr(kernel_server, "_serving", None)
    usual = _run(notebook, tmp_path)
    printed = [cells[0].outputs[0]["text"].split() for cells in (usual, forked)]
    assert printed[0][0] == "False" and printed[1][0] == "True"  # only the served one started with the imports done
    assert printed[0][1:] == printed[1][1:] == [str(REPO), printed[0][2]]  # same working directory and sys.path head
    for cells in (usual, forked):  # the inline figure: matplotlib's backend hooks into the kernel's own shell
        assert "image/png" in cells[1].outputs[0]["data"]


def test_serving_ends_with_its_block():
    before = kernel_server._serving  # another test's server, or none
    with kernel_server.serving() as path:
        assert kernel_server._serving == path != before
        server = _server(path)
    assert kernel_server._serving == before
    server.wait(timeout=30)
    assert not Path(path).parent.exists()


def test_a_killed_launcher_takes_its_kernel_along(served, tmp_path):
    from jupyter_client.connect import write_connection_file

    connection, _ = write_connection_file(str(tmp_path / "kernel.json"))
    server = _server(served)
    launcher = subprocess.Popen([sys.executable, "-P", kernel_server.__file__, "launch", served, "-f", connection],
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not _kernels_of(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        (kernel,) = _kernels_of(server)
        assert os.getpgid(kernel.pid) == kernel.pid  # a group of its own: what the launcher signals
        os.killpg(launcher.pid, signal.SIGKILL)  # as jupyter_client kills a kernel
        launcher.wait(timeout=10)
        kernel.wait(timeout=10)
    finally:
        launcher.kill()


def test_an_interrupt_reaches_the_served_kernel(served, tmp_path):
    async def interrupted() -> str:
        manager_class = kernel_server.papermill_options()["kernel_manager_class"]
        manager = manager_class(kernel_name="python3")
        await manager.start_kernel(cwd=str(tmp_path))
        client = manager.client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=60)
            client.execute("import time; time.sleep(60)")
            await asyncio.sleep(1)
            started = time.monotonic()
            await manager.interrupt_kernel()
            while True:
                reply = await client.get_shell_msg(timeout=20)
                if reply["msg_type"] == "execute_reply":
                    assert time.monotonic() - started < 20
                    return reply["content"].get("ename", reply["content"]["status"])
        finally:
            client.stop_channels()
            await manager.shutdown_kernel(now=True)

    assert asyncio.run(interrupted()) == "KeyboardInterrupt"


def test_without_a_server_the_kernel_starts_as_usual(tmp_path, monkeypatch):
    monkeypatch.setattr(kernel_server, "_serving", str(tmp_path / "no-server.sock"))
    cells = _run(_notebook(tmp_path / "nb.ipynb", FIRST), tmp_path)
    assert cells[0].outputs[0]["text"].split()[0] == "False"


def test_the_launcher_imports_nothing_of_the_package():
    """It stands in for every kernel: the standard library only (the package imports torch)."""
    probe = (f"import runpy, sys; sys.argv = ['x']\ntry:\n    runpy.run_path({kernel_server.__file__!r}, run_name='__main__')\n"
             "except SystemExit:\n    pass\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('llm_workbook', 'torch', 'numpy', 'jupyter_client'))))")
    result = subprocess.run([sys.executable, "-P", "-c", "import json\n" + probe], capture_output=True, text=True,
                            timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
