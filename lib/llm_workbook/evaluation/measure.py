"""How a figure is measured: in a fresh Python process, with its repeats summarized, its memory read off
the process, and its time on the wall clock. ``perf`` (the CPU runtimes) and ``perf_gpu`` (the GPU runtime)
both stand on it.

``run_child(entry, spec)`` runs the function ``entry`` names (``module:function``) on ``spec`` in a new
process and returns its result: the parent names what to run, so this module imports neither runtime.
The processes fork from multiprocessing's fork server, which has imported torch and transformers once
(``PRELOAD``) and never runs a model: each child starts in its own copy of that import-only address space,
its high-water mark reset to it, instead of paying about 4 s of imports per figure (``spawn`` where there
is no fork server).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics

import torch

# What the fork server imports once: transformers' model machinery is most of a model class's import time;
# a child imports its model's own modules itself (``perf._preimport``, well under a second).
PRELOAD = ["torch", "psutil", "transformers", "transformers.modeling_utils", "transformers.generation.utils",
           "transformers.models.auto.configuration_auto", "llm_workbook.runtime.load", "llm_workbook.evaluation.perf"]
# A child's tokenizer must not start threads of its own beside the model's (children read local files only).
CHILD_ENVIRONMENT = {"TOKENIZERS_PARALLELISM": "false"}
_context: multiprocessing.context.BaseContext | None = None


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


def child_context() -> multiprocessing.context.BaseContext:
    """The fork server with ``PRELOAD`` imported (started on first use, shared by every later child)."""
    global _context
    if _context is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        else:
            _context = multiprocessing.get_context("spawn")
    return _context


def start_child_server() -> None:
    """Start the fork server now: it imports ``PRELOAD`` beside the caller's work, not in front of the first child."""
    if child_context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def run_child(entry: str, spec: dict, timeout: float) -> dict:
    """Run ``entry`` (``module:function``) on ``spec`` in a new process; its result (or error) as a dict."""
    context = child_context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=child_main, args=(entry, spec, sender), name=f"llmc-{spec['op']}")
    what = f"{spec['op']} of {spec['source']}"
    process.start()
    sender.close()  # the child holds the only writer: its death reads as end of file here
    try:
        if not receiver.poll(timeout):
            process.kill()
            return {"error": f"{what} timed out after {timeout:.0f} s"}
        try:
            return receiver.recv()
        except EOFError:
            process.join()
            code = process.exitcode
            how = f"was killed by {signal.Signals(-code).name}" if code and code < 0 else f"exited with code {code}"
            return {"error": f"{what} {how} before reporting a result"}
    finally:
        receiver.close()
        process.join(timeout=30)
        if process.is_alive():  # timed out, or stuck on its way out: it must not outlive the measurement
            process.kill()
            process.join()


def child_main(entry: str, spec: dict, sender) -> None:
    """The child's side of ``run_child``: the named function on the spec, its result (or error) to the parent."""
    import importlib

    for key, value in CHILD_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    if spec["settings"].get("threads"):
        torch.set_num_threads(int(spec["settings"]["threads"]))
    module, function = entry.split(":")
    try:
        result = getattr(importlib.import_module(module), function)(spec)
    except Exception as exc:  # reported to the parent, which decides whether it is fatal
        result = {"error": f"{type(exc).__name__}: {exc}"}
    sender.send(result)
    sender.close()


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


def prefill_for_decode(model, prompt: torch.Tensor) -> tuple[torch.Tensor, tuple[str, object] | None]:
    """Prefill ``prompt`` once: the first greedy token and the KV cache (with its keyword) to decode from."""
    from llm_workbook.evaluation.metrics import cache_of  # the cache keyword differs between transformers 4 and 5

    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        return out.logits[:, -1:].argmax(dim=-1), cache_of(out)


def repeated_start(start: tuple, batch: int) -> tuple | None:
    """``start`` (one prompt's ``prefill_for_decode``) as the start of ``batch`` copies of that prompt, without
    prefilling them: each row of a batch of one repeated prompt holds that prompt's token and cache. None where
    the cache cannot repeat itself (transformers 4's tuples): then prefill the batch."""
    import copy

    token, cache = start
    if cache is None or not hasattr(cache[1], "batch_repeat_interleave"):
        return None
    with torch.inference_mode():
        rows = copy.deepcopy(cache[1])
        rows.batch_repeat_interleave(batch)
        return token.repeat(batch, 1), (cache[0], rows)


def greedy_decode(model, prompt: torch.Tensor, steps: int, start: tuple | None = None) -> list[float]:
    """``steps`` cached greedy steps after ``prompt``; returns each step's seconds, timed alone. ``start`` (from
    ``prefill_for_decode`` on the same prompt) saves the prefill: the steps run on a copy of its cache, so a
    decode starts from the same state each time, as after a prefill of its own."""
    import copy
    import time

    from llm_workbook.evaluation.metrics import cache_of

    seconds = []
    with torch.inference_mode():
        token, cache = start if start is not None else prefill_for_decode(model, prompt)
        cache = copy.deepcopy(cache)
        for _ in range(steps):
            begin = time.perf_counter()
            out = model(token, use_cache=True, **({cache[0]: cache[1]} if cache else {}))
            cache = cache_of(out)
            token = out.logits[:, -1:].argmax(dim=-1)
            seconds.append(time.perf_counter() - begin)
    return seconds


__all__ = ["PRELOAD", "child_context", "child_main", "greedy_decode", "peak_rss_bytes", "prefill_for_decode",
           "release_freed_memory", "repeated_start", "reset_peak_rss", "rss_bytes", "run_child", "start_child_server",
           "summarize", "timed"]
