"""How a figure is measured: in a fresh Python process, with its repeats summarized, its memory read off
the process, and its time on the wall clock. ``perf`` (the CPU runtimes) and ``perf_gpu`` (the GPU runtime)
both stand on it.

``run_child(entry, spec)`` starts ``python -c`` on ``child_main``, which imports the function ``entry`` names
(``module:function``), hands it the JSON ``spec`` and prints its result as one marked JSON line: the parent
names what to run, so this module imports neither runtime.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys

import torch

RESULT_MARKER = "LLMC_PERF_RESULT "


def summarize(values: list[float]) -> dict:
    """Median, quartiles (IQR), min, max and the raw values of a list of measurements."""
    if not values:
        raise ValueError("summarize: no values")
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": ordered[0],
            "max": ordered[-1], "n": len(ordered), "values": list(values)}


def run_child(entry: str, spec: dict, timeout: float) -> dict:
    """Run ``entry`` (``module:function``) on ``spec`` in a fresh interpreter; its result (or error) as a dict."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = "from llm_workbook.evaluation.measure import child_main; child_main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps({**spec, "entry": entry}),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"{spec['op']} of {spec['source']} timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
    return {"error": f"{spec['op']} of {spec['source']} exited with code {proc.returncode}: {tail}"}


def child_main() -> None:
    """The child's side of ``run_child``: the named function on the spec from stdin, its result on stdout."""
    spec = json.loads(sys.stdin.read())
    if spec["settings"].get("threads"):
        torch.set_num_threads(int(spec["settings"]["threads"]))
    module, function = spec["entry"].split(":")
    try:
        result = getattr(importlib.import_module(module), function)(spec)
    except Exception as exc:  # reported to the parent, which decides whether it is fatal
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write("\n" + RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def peak_rss_bytes() -> tuple[int, str]:
    """Peak RSS of this process and where it was read.

    Linux: ``VmHWM`` of /proc/self/status, the high-water mark of this address space. ``ru_maxrss``
    is only the fallback: after fork/vfork + exec it starts at the *parent's* peak, so a child of a
    large parent would report the parent's memory.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "VmHWM"
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "ru_maxrss"


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """gc, then glibc's malloc_trim: the allocator otherwise keeps the load's freed temporaries (dequantized
    copies, decoded codes) resident, and the peak while decoding would count them."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to release
        pass


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def timed(fn) -> float:
    import time

    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def greedy_decode(model, prompt: torch.Tensor, steps: int) -> float:
    """Prefill ``prompt``, then ``steps`` cached greedy steps; returns the seconds of the cached steps alone."""
    import time

    from llm_workbook.evaluation.metrics import cache_of  # the cache keyword differs between transformers 4 and 5

    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        start = time.perf_counter()
        for _ in range(steps):
            cache = cache_of(out)
            token = out.logits[:, -1:].argmax(dim=-1)
            out = model(token, use_cache=True, **({cache[0]: cache[1]} if cache else {}))
        return time.perf_counter() - start


__all__ = ["RESULT_MARKER", "child_main", "greedy_decode", "peak_rss_bytes", "release_freed_memory", "reset_peak_rss",
           "rss_bytes", "run_child", "summarize", "timed"]
