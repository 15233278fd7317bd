"""Performance figures of one model, each measured in a process of its own (``measure.run_child``).

``measure(source)`` runs three children:

* ``load`` from Parquet: ``runtime.load.load_model`` on the Parquet file (warm-up, then repeats);
* ``load`` from HF safetensors: ``from_pretrained`` on the same checkpoint as an HF directory
  (a Parquet source is exported to a temporary directory, an HF source converted to a temporary
  Parquet file), so the two load times compare the same weights; their ratio is reported;
* ``run``: one load (peak RSS of the load), then warm-up and repeats of prefill at a fixed prompt
  length and greedy decode with the KV cache (causal LMs) or sentence embedding (encoders), and the
  peak RSS while running (the high-water mark is reset after the load where Linux allows it).

With ``runtimes``, the ``run`` child is repeated once per runtime the checkpoint would be served in
(``RUNTIMES``): AI-OS as it is (every weight dequantized to float32 at load, what AI-OS's engine does),
weight-only kernels (bfloat16, int8/int4 codes kept packed and run by PyTorch's CPU kernels where the
format maps onto them, ``runtime.kernels``), llama.cpp for GGUF files, and a CUDA device where there is one
(``perf_gpu``). Each runtime also reports the weight bytes a decoded token
reads and, against this machine's memory bandwidth (``memory_bandwidth``, measured in the same call), the
decode speed that bandwidth allows: decoding one token at batch 1 reads every weight once, so
tokens/s <= bandwidth / bytes per token.

Every timing reports the median, the quartiles (IQR) and min/max of its samples: the repeats of a load or a
prefill, the cached steps of a decode (each timed alone). Peak RSS is the
child's ``VmHWM`` (Linux; ``ru_maxrss`` elsewhere), current RSS comes from psutil.
``model_size(source)`` gives the size on disk and bits per weight without running anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llm_workbook.store.source import Kind, Source
from llm_workbook.evaluation.measure import (greedy_decode, peak_rss_bytes, prefill_for_decode, release_freed_memory,
                                              repeated_start, reset_peak_rss, rss_bytes, run_child, summarize, timed)

@dataclass
class PerfSettings:
    """Sizes of the perf runs; the defaults keep a tiny model's perf block to a few seconds of work."""

    warmup: int = 1
    repeats: int = 3
    prompt_tokens: int = 64  # prefill length
    decode_tokens: int = 16  # cached greedy steps per decode, each timed alone: the decode figure's samples
    warmup_decode_tokens: int = 2  # per warm-up round: the first calls' one-off costs, not a whole run
    sentences: int = 32  # encoder: sentences per embedding run
    batch_size: int = 16
    threads: int | None = None  # torch threads in the child (None: torch's default)
    timeout_s: float = 900.0
    compare_hf_load: bool = True  # also time from_pretrained on an HF copy
    decode_batch: int = 8  # decode tokens/s also at this batch size (sequences decoded together)
    bandwidth_mb: int = 256  # buffer of the memory-bandwidth copy benchmark
    # RUNTIMES to run in (a keep_packed measurement runs as given); llama.cpp reports why it is absent where it is
    runtimes: tuple[str, ...] = ("aios", "kernels", "llama.cpp", "gpu")

    def __post_init__(self) -> None:
        for name in ("repeats", "prompt_tokens", "decode_tokens", "warmup_decode_tokens", "sentences", "batch_size",
                     "decode_batch", "bandwidth_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"PerfSettings.{name} must be >= 1, got {getattr(self, name)}")
        self.runtimes = tuple(self.runtimes)
        unknown = [r for r in self.runtimes if r not in RUNTIMES]
        if unknown:
            raise ValueError(f"PerfSettings.runtimes: unknown {unknown}; known: {list(RUNTIMES)}")
        if self.warmup < 0:
            raise ValueError(f"PerfSettings.warmup must be >= 0, got {self.warmup}")


# ============================================================================================
# Size on disk
# ============================================================================================


def model_size(source: Source | str | os.PathLike) -> dict:
    """Bytes on disk, parameters and bits per weight of a Parquet file or an HF checkpoint.

    Parquet files use ``inventory.summary`` (quantized groups counted by their dequantized shape);
    an HF directory counts its safetensors files (exact for unquantized checkpoints).
    """
    from llm_workbook.store import inventory

    source = Source.of(source)
    if source.is_parquet:
        s = inventory.summary(source.loader())
        return {"path": source.name, "file_bytes": s["file_bytes"], "stored_bytes": s["stored_bytes"],
                "parameters": s["parameters"], "bits_per_weight": s["bits_per_weight"],
                "compression_vs_bf16": s["compression_vs_bf16"], "quantized_bits_per_weight": s["quantized_bits_per_weight"],
                "formats": s["formats"]}
    from llm_workbook.schema import torch_dtype

    if source.kind is Kind.GGUF:  # its blocks' sizes: convert it to Parquet for bits per weight
        gguf = source.gguf()
        return {"path": str(gguf), "file_bytes": os.path.getsize(gguf), "stored_bytes": None, "parameters": None,
                "bits_per_weight": None, "compression_vs_bf16": None, "quantized_bits_per_weight": None, "formats": None}

    root = source.root()
    ckpt = source.checkpoint()
    stored = numel = 0
    for info in ckpt.tensors.values():
        n = 1
        for d in info.shape:
            n *= d
        numel += n
        stored += n * torch.empty((), dtype=torch_dtype(info.dtype)).element_size()
    file_bytes = sum(p.stat().st_size for p in {*ckpt.tensor_file.values()})
    bpw = 8.0 * stored / numel if numel else 0.0
    quantized = bool(ckpt.quantization_config)
    return {"path": str(root), "file_bytes": file_bytes, "stored_bytes": stored,
            "parameters": None if quantized else numel,
            "bits_per_weight": None if quantized else bpw,  # packed codes: convert to Parquet for exact figures
            "compression_vs_bf16": None if quantized or not bpw else 16.0 / bpw, "quantized_bits_per_weight": None,
            "formats": None if quantized else ["dense"]}


# ============================================================================================
# Parent side
# ============================================================================================

# The runtimes a checkpoint is measured in: compute dtype, weight-only kernels, and what a reader is told.
RUNTIMES = {
    "aios": {"dtype": "float32", "kernels": False,
             "label": "AI-OS as it is: every weight dequantized to float32 at load"},
    "kernels": {"dtype": "bfloat16", "kernels": True,
                "label": "weight-only kernels: bfloat16, int8/int4 codes kept packed (PyTorch CPU kernels)"},
    "llama.cpp": {"dtype": None, "kernels": False,
                  "label": "llama.cpp: the GGUF file as written (llama-cpp-python), for GGUF candidates"},
    "gpu": {"dtype": None, "kernels": False,
            "label": "GPU: the checkpoint as published, in vLLM's kernels (or transformers') on a CUDA device"},
}
NOT_GGUF = "not a GGUF checkpoint: llama.cpp runs GGUF files only"  # no llama.cpp figure, and none expected
LLAMA_CPP_MISSING = "llama-cpp-python is not installed: `make llama-cpp` builds it into .venv (about 4 minutes)"


def _is_gguf(source: Source | str) -> bool:
    """A GGUF file, or a Parquet file of GGUF blocks (which export writes back byte for byte)."""
    source = Source.of(source)
    if source.kind is Kind.GGUF:
        return True
    return source.is_parquet and "gguf" in {i.format for i in source.loader().rows.values()}


def _measure_llama_cpp(source: Source | str, common: dict, settings: PerfSettings, workdir: Path) -> dict:
    """The llama.cpp runtime: what the GGUF runs at in llama.cpp itself, or why there is no figure."""
    import importlib.util

    from llm_workbook.store.gguf import export_gguf

    source = Source.of(source)

    if not _is_gguf(source):
        return {"unavailable": NOT_GGUF}
    if importlib.util.find_spec("llama_cpp") is None:
        return {"unavailable": LLAMA_CPP_MISSING}
    if source.kind is Kind.GGUF:
        gguf = str(source.gguf())
    else:
        gguf = str(workdir / "model.gguf")
        export_gguf(source.location, gguf, progress=False)
    return run_child(f"{__name__}:child_llama_cpp", {"op": "llama.cpp", "via": "gguf", "source": gguf, **common},
                     settings.timeout_s)


def memory_bandwidth(buffer_mb: int = 256, repeats: int = 5) -> dict:
    """This machine's memory bandwidth from a copy benchmark: a ``buffer_mb`` float32 buffer copied into
    another (far larger than the caches) after a warm-up; bytes read plus bytes written per second, as
    STREAM's copy counts them, in GB/s (median and IQR of ``repeats``)."""
    import time

    count = buffer_mb * 2**20 // 4
    src = torch.ones(count, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - start)
    moved = 2 * count * 4
    return {"copy_gb_per_s": summarize([moved / s / 1e9 for s in seconds]), "buffer_mb": buffer_mb,
            "threads": torch.get_num_threads(), "method": "torch copy of a float32 buffer, read + write bytes"}


def against_bandwidth(run: dict, bandwidth: dict) -> dict:
    """Decode at batch 1 beside the limit the bandwidth sets for this runtime's bytes per token."""
    per_token = run.get("weight_bytes_per_token")
    decode = (run.get("decode_tokens_per_s") or {}).get("median")
    if not per_token or decode is None:
        return {}
    limit = bandwidth["copy_gb_per_s"]["median"] * 1e9 / per_token
    return {"limit_tokens_per_s": limit, "fraction_of_limit": decode / limit}


def _store_copy(source: Source | str, workdir: Path) -> str:
    """The source in the Parquet store (written into ``workdir``): a GGUF file as its blocks, an HF directory
    through the converter."""
    from llm_workbook.store.gguf import convert_gguf

    source = Source.of(source)

    if source.kind is Kind.GGUF:
        convert_gguf(source.gguf(), workdir / "gguf.parquet", progress=False)
        return str(workdir / "gguf.parquet")
    return _counterparts(source, workdir)[0]


def _counterparts(source: Source | str, workdir: Path) -> tuple[str, str]:
    """(parquet, hf_dir) holding the same checkpoint; the missing one is written into ``workdir``."""
    source = Source.of(source)
    if source.is_parquet:
        from llm_workbook.store.convert import export_to_hf

        return os.fspath(source), str(export_to_hf(source.location, workdir / "hf", progress=False))
    from llm_workbook.store.convert import HuggingFaceToParquetConverter

    root = source.root()
    parquet = workdir / "model.parquet"
    HuggingFaceToParquetConverter(progress=False).convert(source, parquet)
    return str(parquet), str(root)


def measure(
    source: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    task: str | None = None,
    activation_quant: bool = True,
    keep_packed: bool = False,
    settings: PerfSettings | None = None,
) -> dict:
    """Load time (Parquet vs HF safetensors), latency / throughput and peak memory of one model.

    Each figure comes from its own fresh subprocess. ``settings.runtimes`` (names in ``RUNTIMES``): the run
    is measured once in each, under ``runtimes``, each beside the bandwidth limit; the first one's figures
    are also the top-level ones, and a later runtime that fails reports its error there. Without runtimes
    (or with ``keep_packed``) one run uses ``dtype``, ``activation_quant`` and ``keep_packed`` as given.
    Load times come from their own children (warm-up and repeats) only for the Parquet-vs-HF comparison
    (``compare_hf_load``); otherwise the load time is the run's first load (n = 1). A failed HF load (e.g. a quantization method
    transformers cannot run on CPU) is reported as ``load.hf_error``; a failed Parquet load or run
    raises ``RuntimeError`` with the child's message.
    """
    settings = settings or PerfSettings()
    runtimes = () if keep_packed else settings.runtimes
    source = Source.of(source)
    common = {"dtype": str(dtype).removeprefix("torch."), "task": task, "activation_quant": activation_quant,
              "keep_packed": keep_packed, "settings": {**asdict(settings), "runtimes": list(settings.runtimes)}}
    workdir = Path(tempfile.mkdtemp(prefix="llmc-perf-"))
    load: dict[str, Any] = {"parquet_s": None, "hf_s": None, "ratio_parquet_vs_hf": None, "hf_error": None}
    try:
        if settings.compare_hf_load:
            parquet, hf_dir = _counterparts(source, workdir)
        else:
            parquet, hf_dir = (os.fspath(source), None) if source.is_parquet else (None, os.fspath(source))
        disk = {"source_bytes": model_size(source)["file_bytes"],
                "parquet_bytes": os.path.getsize(parquet) if parquet else None}
        if parquet and hf_dir:
            load_pq = run_child(f"{__name__}:child_load", {"op": "load", "via": "parquet", "source": parquet, **common},
                                settings.timeout_s)
            if "error" in load_pq:
                raise RuntimeError(f"perf: Parquet load failed: {load_pq['error']}")
            load["parquet_s"] = summarize(load_pq["seconds"])
        if parquet and hf_dir:
            load_hf = run_child(f"{__name__}:child_load", {"op": "load", "via": "hf", "source": hf_dir, **common},
                                settings.timeout_s)
            if "error" in load_hf:
                load["hf_error"] = load_hf["error"]
            else:
                load["hf_s"] = summarize(load_hf["seconds"])
        if load["parquet_s"] and load["hf_s"]:
            load["ratio_parquet_vs_hf"] = load["parquet_s"]["median"] / load["hf_s"]["median"]
        measured: dict[str, dict] = {}
        if runtimes:
            # both models as the store serves them: an HF original is converted first, so that the original and
            # the candidate load through the same path (and the same libraries count in their memory)
            stored = parquet or _store_copy(source, workdir)
            bandwidth = memory_bandwidth(settings.bandwidth_mb)
            for name in runtimes:
                how = RUNTIMES[name]
                if name == "llama.cpp":
                    result = _measure_llama_cpp(source, common, settings, workdir)
                elif name == "gpu":
                    from llm_workbook.evaluation.perf_gpu import measure_gpu

                    result = measure_gpu(Source.of(stored), _is_gguf(source), common, settings, workdir)
                else:
                    spec = {**common, "dtype": how["dtype"], "kernels": how["kernels"], "activation_quant": False}
                    result = run_child(f"{__name__}:child_run", {"op": "run", "via": "source", "source": stored, **spec},
                                       settings.timeout_s)
                # a GPU run stands against its device's bandwidth, measured in its own child
                limit = against_bandwidth(result, result.get("device_bandwidth") or bandwidth)
                measured[name] = {"runtime": how["label"], **result, **limit}
            run = measured[runtimes[0]]
        else:
            run = run_child(f"{__name__}:child_run", {"op": "run", "via": "source", "source": os.fspath(source), **common},
                            settings.timeout_s)
        if "error" in run:
            raise RuntimeError(f"perf: run failed: {run['error']}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if not (load["parquet_s"] or load["hf_s"]):  # no comparison: the run's first load, from where it loaded
        from_store = bool(runtimes) or source.is_parquet
        load["parquet_s" if from_store else "hf_s"] = summarize([run["first_load_s"]])
    result = {"source": source.name, "settings": common, "load": load, **run, "disk": disk}
    if runtimes:
        result.pop("runtime", None)
        result.update(runtimes=measured, bandwidth=bandwidth)
    return result


# ============================================================================================
# Child side
# ============================================================================================


def _load(spec: dict):
    dtype = getattr(torch, spec["dtype"])
    if spec["via"] == "hf":
        from transformers import AutoConfig

        from llm_workbook.runtime.model import model_class

        config = AutoConfig.from_pretrained(spec["source"])
        return model_class(config, spec["task"]).from_pretrained(spec["source"], dtype=dtype).eval()
    from llm_workbook.runtime.load import load_model

    model, _ = load_model(spec["source"], dtype=dtype, task=spec["task"], activation_quant=spec["activation_quant"],
                          keep_packed=spec["keep_packed"], kernels=spec.get("kernels", False))
    return model


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoded token reads: every module's parameters once (a kernel Linear's codes,
    scales and zeros), except an embedding table, of which a token reads one row. A tied output head reads
    the whole table, as the Linear it is."""
    from llm_workbook.runtime.kernels import WEIGHT_ONLY, kernel_bytes

    total, seen = 0, set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            total += module.embedding_dim * module.weight.element_size()
            continue
        if isinstance(module, WEIGHT_ONLY):
            total += kernel_bytes(module)
            continue
        for tensor in module.parameters(recurse=False):  # buffers such as RoPE's inv_freq are not weights
            if tensor.data_ptr() not in seen and tensor.is_floating_point():
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
    return total


def child_load(spec: dict) -> dict:
    import gc

    settings = spec["settings"]
    for _ in range(settings["warmup"]):
        _load(spec)
        gc.collect()
    seconds = []
    for _ in range(settings["repeats"]):
        seconds.append(timed(lambda: _load(spec)))
        gc.collect()
    return {"seconds": seconds}


def child_run(spec: dict) -> dict:
    import time

    settings = spec["settings"]
    _preimport(spec["source"], spec["task"])  # so the baseline holds the code, and the load delta the weights
    baseline = rss_bytes()
    start = time.perf_counter()
    model = _load(spec)
    load_seconds = time.perf_counter() - start
    release_freed_memory()  # what the load freed goes back to the system: RSS is then the model as it is held
    model_rss = rss_bytes()
    load_peak, peak_source = peak_rss_bytes()  # read second: a peak is never below the RSS read before it
    memory: dict[str, Any] = {"baseline_rss_bytes": baseline, "load_peak_rss_bytes": load_peak,
                              "model_rss_bytes": model_rss, "peak_source": peak_source}
    # from here the peak counts inference only (the loaded model stays resident, so it is included)
    memory["inference_peak_is_since_load"] = reset_peak_rss()
    result: dict[str, Any] = {"pid": os.getpid(), "first_load_s": load_seconds}
    used = getattr(getattr(model, "llmc_info", None), "kernels", None)
    if spec.get("kernels"):  # how many quantized Linears ran on which kernel, or dense
        from collections import Counter

        # a kernel by its name alone, a dense layer with why no kernel fits (e.g. fp8 has no CPU kernel)
        result["kernel_layers"] = dict(Counter(v if v.startswith("dense") else v.split(" (")[0]
                                               for v in (used or {}).values()))
    from llm_workbook.runtime.load import CAUSAL_LM, model_kind

    if model_kind(model) == CAUSAL_LM:
        n_prompt, n_decode = settings["prompt_tokens"], settings["decode_tokens"]
        vocab = model.config.vocab_size
        prompt = torch.randint(0, vocab, (1, n_prompt), generator=torch.Generator().manual_seed(0))

        batch = settings.get("decode_batch", 8)
        prompts = prompt.expand(batch, -1).contiguous()

        def prefill(ids: torch.Tensor = prompt) -> None:
            with torch.inference_mode():
                model(ids, use_cache=False)

        # decode: each cached step timed alone, from a copy of one prefilled cache per batch size; its
        # decode_tokens steps are the samples of the median and IQR (a step is the unit a server repeats)
        single = prefill_for_decode(model, prompt)
        batched = repeated_start(single, batch) or prefill_for_decode(model, prompts)  # the rows repeat one prompt
        for _ in range(settings["warmup"]):
            prefill()
            greedy_decode(model, prompt, settings["warmup_decode_tokens"], single)
            greedy_decode(model, prompts, settings["warmup_decode_tokens"], batched)
        prefill_s = [timed(prefill) for _ in range(settings["repeats"])]
        decode_s = greedy_decode(model, prompt, n_decode, single)
        decode_batch_s = greedy_decode(model, prompts, n_decode, batched)
        del single, batched
        result.update({
            "kind": CAUSAL_LM,
            "prefill_tokens": n_prompt,
            "prefill_ms_per_token": summarize([1000.0 * s / n_prompt for s in prefill_s]),
            "decode_tokens": n_decode,
            "decode_tokens_per_s": summarize([1 / max(t, 1e-9) for t in decode_s]),
            "decode_batch": batch,  # tokens/s over the whole batch
            "decode_batch_tokens_per_s": summarize([batch / max(t, 1e-9) for t in decode_batch_s]),
            "weight_bytes_per_token": weight_bytes_per_token(model),
        })
    else:
        from llm_workbook.runtime.load import load_tokenizer
        from llm_workbook.runtime.embeddings import sentence_embeddings

        tokenizer = load_tokenizer(spec["source"], model)
        sentences = _perf_sentences(settings["sentences"])
        batch = settings["batch_size"]
        for _ in range(settings["warmup"]):
            sentence_embeddings(model, tokenizer, sentences, batch)
        runs = [timed(lambda: sentence_embeddings(model, tokenizer, sentences, batch)) for _ in range(settings["repeats"])]
        result.update({"kind": "encoder", "sentences": len(sentences), "batch_size": batch,
                       "embedding_sentences_per_s": summarize([len(sentences) / t for t in runs])})
    memory["inference_peak_rss_bytes"] = peak_rss_bytes()[0]
    result["memory"] = memory
    return result


def gguf_bytes_per_token(path: str) -> int:
    """Bytes of a GGUF file's tensors one decoded token reads: all of them, except the token embedding table,
    of which it reads one row, unless the file has no separate output head (then the table is the head)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embedding = tensors.get("token_embd.weight")
    if embedding is not None and "output.weight" in tensors:
        rows = int(embedding.shape[-1]) if len(embedding.shape) > 1 else 1  # gguf-py lists dims innermost first
        total -= int(embedding.n_bytes) - int(embedding.n_bytes) // max(rows, 1)
    return total


def child_llama_cpp(spec: dict) -> dict:
    """Prefill and decode of one sequence in llama.cpp (llama-cpp-python), with the same prompt length and
    decode steps as the other runtimes; llama-cpp-python decodes one sequence, so no batch figure."""
    import time

    import numpy as np
    from llama_cpp import Llama

    settings = spec["settings"]
    baseline = rss_bytes()
    n_prompt, n_decode = settings["prompt_tokens"], settings["decode_tokens"]
    threads = settings.get("threads") or torch.get_num_threads()
    start = time.perf_counter()
    llm = Llama(spec["source"], n_ctx=n_prompt + n_decode + 8, n_batch=n_prompt, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    load_seconds = time.perf_counter() - start
    load_peak, peak_source = peak_rss_bytes()
    model_rss = rss_bytes()
    since_load = reset_peak_rss()
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(0, llm.n_vocab(), n_prompt)]
    steps = [int(t) for t in rng.integers(0, llm.n_vocab(), n_decode)]

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)

    def decode(count: int) -> list[float]:  # cached steps after the prompt, each timed alone (as child_run does)
        prefill()
        return [timed(lambda token=token: llm.eval([token])) for token in steps[:count]]

    for _ in range(settings["warmup"]):
        decode(settings["warmup_decode_tokens"])
    prefill_s = [timed(prefill) for _ in range(settings["repeats"])]
    decode_s = decode(n_decode)
    import llama_cpp

    return {
        "pid": os.getpid(), "first_load_s": load_seconds, "kind": "causal-lm", "engine": f"llama-cpp-python {llama_cpp.__version__}",
        "threads": threads, "prefill_tokens": n_prompt,
        "prefill_ms_per_token": summarize([1000.0 * s / n_prompt for s in prefill_s]),
        "decode_tokens": n_decode,
        "decode_tokens_per_s": summarize([1 / max(t, 1e-9) for t in decode_s]),
        "weight_bytes_per_token": gguf_bytes_per_token(spec["source"]),
        "memory": {"baseline_rss_bytes": baseline, "load_peak_rss_bytes": load_peak, "model_rss_bytes": model_rss,
                   "peak_source": peak_source, "inference_peak_is_since_load": since_load,
                   "inference_peak_rss_bytes": peak_rss_bytes()[0]},
    }


def _preimport(source: str, task: str | None) -> None:
    """Import transformers and the model's class module before measuring memory and load time."""
    import copy

    from transformers import AutoConfig

    from llm_workbook.runtime.model import model_class
    from llm_workbook.runtime.load import read_config

    raw = copy.deepcopy(read_config(source))
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    if model_type:
        model_class(AutoConfig.for_model(model_type, **raw), task)


def _perf_sentences(count: int) -> list[str]:
    """Fixed English sentences of varied length from CPython's pydoc topics (no corpus split needed)."""
    from pydoc_data.topics import topics

    from llm_workbook.runtime.embeddings import split_sentences

    sentences = split_sentences([topics[key] for key in sorted(topics)[:40]])
    return [sentences[i % len(sentences)] for i in range(count)]


__all__ = ["RUNTIMES", "PerfSettings", "against_bandwidth", "measure", "memory_bandwidth", "model_size", "summarize",
           "weight_bytes_per_token"]
