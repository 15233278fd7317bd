"""A batch's kernels, forked from one process that has already imported what a run imports.

papermill starts a kernel per notebook, and each kernel spent about 5 s importing torch, transformers, pandas and
seaborn before its first line of work: 20 times a report. While a batch runs (``serving()``), its kernels are
forked from a server that imported those once (``PRELOAD``) and never runs anything else. Each kernel is then an
ordinary ipykernel in its own copy of that address space: the idea of ``evaluation.measure``'s fork server for
the speed runs, applied to the notebooks.

How a kernel starts: jupyter_client runs this file as a small launcher (standard library only, no import of the
package) in place of ``python -m ipykernel_launcher``. The launcher hands the server its arguments, working
directory, environment and standard streams; the server forks, and the child becomes the kernel. The launcher
stays the process jupyter_client manages: it passes signals (an interrupt) on to the kernel's process group and
exits with the kernel's status, and when it is killed, the kernel is killed with it. Where the server cannot be
reached, the launcher starts the kernel as usual.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

# Imported once by the server: the notebooks' imports and what every run goes on to import.
# Not matplotlib's inline backend: it hooks itself into the IPython shell that exists when it is imported.
PRELOAD = ("ipykernel.kernelapp", "seaborn", "pandas", "transformers",
           "transformers.modeling_utils", "transformers.generation.utils", "transformers.models.llama.modeling_llama",
           "transformers.models.bert.modeling_bert", "llm_workbook.workbook.sections", "llm_workbook.workbook.report",
           "llm_workbook.evaluation.compare", "llm_workbook.runtime.load", "lm_eval.evaluator",
           "lm_eval.models.huggingface")
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"  # what ipykernel sets when MPLBACKEND is unset
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
MESSAGE_BYTES = 1 << 20  # one request (arguments, environment) or reply, as one datagram
_serving: str | None = None  # the socket of this process's server while ``serving()``


def _connection() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # reliable, with message boundaries


# --- the launcher: the process jupyter_client starts ------------------------------------------------------------

def launch(server: str, arguments: list[str]) -> None:
    """Have the server fork a kernel with ``arguments`` (ipykernel's: ``-f <connection file>`` ...), then stand in
    for it until it exits."""
    try:
        conn = _connection()
        conn.connect(server)
        request = {"argv": arguments, "cwd": os.getcwd(), "env": dict(os.environ)}
        socket.send_fds(conn, [json.dumps(request).encode()], [0, 1, 2])
        kernel = json.loads(conn.recv(MESSAGE_BYTES))["pid"]
    except (OSError, ValueError, KeyError):  # no server (the batch ended, or it failed): the usual start
        os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *arguments])

    def forward(signum, _frame):
        try:
            os.killpg(kernel, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    status = 1  # the kernel ended without saying how: killed
    while message := conn.recv(MESSAGE_BYTES):  # the kernel's connection closes when it exits
        status = json.loads(message)["exit"]
    sys.exit(status)


# --- the server ----------------------------------------------------------------------------------------------

def serve(path: str) -> tuple[socket.socket, dict] | None:
    """Import ``PRELOAD``, then fork a kernel for each launcher that connects to ``path``, until standard input
    (a pipe from the batch) closes. Returns only in a forked child: its launcher's connection and request."""
    import gc
    import importlib
    import select
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the batch, which then closes standard input
    listener = _connection()
    listener.bind(path)  # before the imports: a launcher that comes early waits in the backlog
    listener.listen(8)
    os.environ.setdefault("MPLBACKEND", INLINE_BACKEND)
    for module in PRELOAD:
        importlib.import_module(module)
    if threading.active_count() != 1:  # forking a process with threads is not safe: no server, kernels start as usual
        raise RuntimeError(f"importing {PRELOAD} started threads: {threading.enumerate()}")
    gc.freeze()  # the imports stay out of every collection in the kernels (and their pages stay shared)
    server = os.getpid()
    try:
        while True:
            ready, _, _ = select.select([listener, sys.stdin], [], [], 1.0)
            _reap()
            if sys.stdin in ready and not os.read(sys.stdin.fileno(), 1):
                return None
            if listener in ready:
                conn, _ = listener.accept()
                forked = _fork_kernel(conn)
                if forked is not None:  # the kernel: it does not listen
                    listener.close()
                    return forked
    finally:
        if os.getpid() == server:
            listener.close()
            os.unlink(path)


def _reap() -> None:
    """Collect the exit status of kernels that ended (the launchers learn theirs from the kernels themselves)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _fork_kernel(conn: socket.socket) -> tuple[socket.socket, dict] | None:
    """Read a launcher's request and fork; in the child, become that launcher's kernel (its streams, working
    directory, environment and a process group of its own) and return the request. None in the server."""
    fds: list[int] = []
    try:
        message, fds, _, _ = socket.recv_fds(conn, MESSAGE_BYTES, 3)
        request = json.loads(message)
        if len(fds) != 3:
            raise ValueError(f"{len(fds)} standard streams")
    except (OSError, ValueError):  # not a launcher's request: its launcher (if any) starts the kernel as usual
        conn.close()
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    server_cwd = os.getcwd()
    if os.fork():
        conn.close()
        for fd in fds:
            os.close(fd)
        return None
    os.setpgid(0, 0)  # the launcher signals this group: the kernel and what it starts
    signal.signal(signal.SIGINT, signal.default_int_handler)  # an interrupt is a KeyboardInterrupt again
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    if sys.path and sys.path[0] == server_cwd:  # what ipykernel_launcher removes (IPython puts it back)
        del sys.path[0]
    os.environ.clear()
    os.environ.update(request["env"])
    # ipykernel ends itself when this parent goes (the batch ended or died), as a kernel does when its manager goes
    os.environ["JPY_PARENT_PID"] = str(os.getppid())
    _reseed()
    return conn, request


def _reseed() -> None:
    """Fresh entropy for NumPy's global generator, as a new process would have (``random`` reseeds itself at fork)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def _die_with_launcher(conn: socket.socket) -> None:
    """A thread of the kernel: when the launcher goes (jupyter_client killed it), the kernel and its group go too."""
    import threading

    def watch():
        while conn.recv(MESSAGE_BYTES):
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="llmc-launcher-watch", daemon=True).start()


def run_kernel(conn: socket.socket, request: dict) -> None:
    """The forked child's life: tell the launcher who it is, run the kernel, tell the launcher how it ended."""
    import importlib.util

    from ipykernel import kernelapp

    # ipykernel reads JPY_PARENT_PID when it is imported (here: in the server): the parent to outlive is given instead
    argv = [*request["argv"], f"--IPKernelApp.parent_handle={os.environ['JPY_PARENT_PID']}"]
    sys.argv = [importlib.util.find_spec("ipykernel_launcher").origin, *argv]
    conn.send(json.dumps({"pid": os.getpid()}).encode())
    _die_with_launcher(conn)
    status = 0
    try:
        kernelapp.IPKernelApp.launch_instance(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    conn.send(json.dumps({"exit": status}).encode())
    sys.exit(status)


# --- the batch's side ----------------------------------------------------------------------------------------

def serving():
    """While the block runs, notebooks that ``execute`` runs get kernels forked from a server started here."""
    import contextlib
    import shutil
    import subprocess
    import tempfile
    import time

    @contextlib.contextmanager
    def served():
        global _serving
        outer = _serving  # a batch inside a batch: the outer one's server again afterwards
        directory = tempfile.mkdtemp(prefix="llmc-kernels-")
        path = os.path.join(directory, "server.sock")
        server = subprocess.Popen([sys.executable, "-m", __spec__.name, "serve", path], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(path) and server.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            _serving = path if os.path.exists(path) else None  # no server: kernels start as usual
            yield _serving
        finally:
            _serving = outer
            server.stdin.close()  # the server's signal to stop
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            shutil.rmtree(directory, ignore_errors=True)

    return served()


def papermill_options() -> dict:
    """``papermill.execute_notebook`` keywords that give its kernel from the server, while one is serving."""
    if _serving is None:
        return {}
    from jupyter_client import AsyncKernelManager

    server = _serving

    class ServedKernelManager(AsyncKernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            command = super().format_kernel_cmd(extra_arguments)
            if command[0] != sys.executable or command[1:3] != ["-m", "ipykernel_launcher"]:
                return command  # another interpreter's kernel: not ours to fork
            return [sys.executable, "-P", __file__, "launch", server, *command[3:]]

    return {"kernel_manager_class": ServedKernelManager}


def main(argv: list[str]) -> None:
    if argv[:1] == ["launch"]:
        launch(argv[1], argv[2:])
    elif argv[:1] == ["serve"]:
        forked = serve(argv[1])
        if forked is not None:
            run_kernel(*forked)
    else:
        sys.exit("usage: kernel_server.py launch SOCKET ARGS... | serve SOCKET")


if __name__ == "__main__":
    main(sys.argv[1:])
