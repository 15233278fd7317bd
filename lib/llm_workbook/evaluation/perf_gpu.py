"""The GPU runtime of the speed protocol: the checkpoint as it is published, on a CUDA device.

On a machine with a CUDA device the same protocol as the CPU runtimes (``perf.measure``: warm-up, repeats,
prefill ms/token at the fixed prompt length, decode tokens/s at batch 1 and at ``decode_batch``, median and
IQR) runs the candidate's HF directory, exported byte for byte from the store, in

* **vLLM** when it is installed: its own kernels for the checkpoint's ``quantization_config`` (FP8 and INT8
  compressed-tensors, INT4 GPTQ/AWQ and pack-quantized through Marlin, NVFP4 on GPUs that have it);
* **transformers** otherwise: ``from_pretrained`` on the device, where compressed-tensors, GPTQ and AWQ
  bring their own CUDA kernels.

Memory is the device's: transformers' peak allocated bytes, or for vLLM the device memory its engine took
(which includes the KV cache it reserves up front, ``gpu_memory_utilization``). The bandwidth limit uses the
device's own copy bandwidth, measured in the same child. Without a CUDA device the row says so and how to
measure it; GGUF candidates run on a GPU through llama.cpp's CUDA build, not here.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from llm_workbook.store.source import Source
from llm_workbook.evaluation.measure import greedy_decode, peak_rss_bytes, run_child, summarize

NO_CUDA = ("no CUDA device on this machine: on one, install a CUDA build of torch (and vLLM for its kernels) "
           "and the same run measures this row (README, 'Speed and memory on a GPU')")
GGUF_ON_GPU = "a GGUF checkpoint runs on a GPU in llama.cpp's CUDA build, not measured here"
VLLM_MEMORY_SHARE = 0.5  # of the device vLLM may take (weights, activations and its up-front KV cache)


def gpu_device() -> str | None:
    """The device the GPU runtime measures on, or None when there is none (tests replace this check)."""
    return "cuda" if torch.cuda.is_available() else None


def measure_gpu(source: Source | str, is_gguf: bool, common: dict, settings, workdir: Path) -> dict:
    """The GPU runtime's figures for one checkpoint (a Parquet file or an HF directory), or why there are none."""
    device = gpu_device()
    if device is None:
        return {"unavailable": NO_CUDA}
    if is_gguf:
        return {"unavailable": GGUF_ON_GPU}
    source = Source.of(source)
    hf_dir = os.fspath(source)
    if source.is_parquet:  # the checkpoint as it was published: the store gives its tensors back exactly
        from llm_workbook.store.convert import export_to_hf

        hf_dir = str(export_to_hf(source.location, workdir / "gpu-hf", progress=False))
    engine = "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"
    return run_child(f"{__name__}:child_gpu", {**common, "op": "gpu", "via": engine, "device": device, "source": hf_dir},
                      settings.timeout_s)


def device_bandwidth(device: str, buffer_mb: int, repeats: int = 5) -> dict:
    """Copy bandwidth of the device's memory (read + write bytes per second, as ``perf.memory_bandwidth``)."""
    count = buffer_mb * 2**20 // 4
    src = torch.ones(count, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = []
    for _ in range(repeats):
        seconds.append(_timed_on(device, lambda: dst.copy_(src)))
    return {"copy_gb_per_s": summarize([2 * count * 4 / s / 1e9 for s in seconds]), "buffer_mb": buffer_mb,
            "device": device, "method": f"torch copy of a float32 buffer on {device}, read + write bytes"}


def checkpoint_bytes_per_token(hf_dir: str) -> int:
    """Bytes of a checkpoint's tensors one decoded token reads: all of them once, except the token embedding
    table of which it reads one row (unless no separate output head is stored, then the table is the head)."""
    from llm_workbook.schema import torch_dtype
    from llm_workbook.store.checkpoint import open_checkpoint

    ckpt = open_checkpoint(Path(hf_dir))
    total, embedding = 0, None
    for name, info in ckpt.tensors.items():
        size = torch.empty((), dtype=torch_dtype(info.dtype)).element_size()
        count = 1
        for d in info.shape:
            count *= d
        total += count * size
        if name.endswith("embed_tokens.weight") and len(info.shape) == 2:
            embedding = (count * size, info.shape[1] * size)
    if embedding and any(n.endswith("lm_head.weight") for n in ckpt.tensors):
        total -= embedding[0] - embedding[1]
    return total


def _timed_on(device: str, fn) -> float:
    """Wall time of ``fn`` with the device's queued work finished on both sides."""
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _protocol(settings: dict, device: str, prefill, decode) -> dict:
    """Warm-up, then repeats of prefill (batch 1) and of prefill plus decode at batch 1 and at the larger batch;
    decode time is the total minus the prefill's median (vLLM's generate cannot be timed step by step, so both
    GPU engines subtract; the CPU runtimes time their cached steps alone)."""
    n_prompt, n_decode, batch = settings["prompt_tokens"], settings["decode_tokens"], settings.get("decode_batch", 8)
    for _ in range(settings["warmup"]):
        prefill(1)
        decode(1)
        decode(batch)
    prefill_s = [_timed_on(device, lambda: prefill(1)) for _ in range(settings["repeats"])]
    prefill_batch = statistics.median(_timed_on(device, lambda: prefill(batch)) for _ in range(settings["repeats"]))
    decode_s = [_timed_on(device, lambda: decode(1)) for _ in range(settings["repeats"])]
    decode_batch_s = [_timed_on(device, lambda: decode(batch)) for _ in range(settings["repeats"])]
    prefill_median = statistics.median(prefill_s)
    return {
        "kind": "causal-lm", "prefill_tokens": n_prompt,
        "prefill_ms_per_token": summarize([1000.0 * s / n_prompt for s in prefill_s]),
        "decode_tokens": n_decode,
        "decode_tokens_per_s": summarize([n_decode / max(t - prefill_median, 1e-9) for t in decode_s]),
        "decode_batch": batch,
        "decode_batch_tokens_per_s": summarize([batch * n_decode / max(t - prefill_batch, 1e-9) for t in decode_batch_s]),
    }


def _prompt_ids(vocab: int, n_prompt: int) -> list[int]:
    return torch.randint(0, vocab, (n_prompt,), generator=torch.Generator().manual_seed(0)).tolist()


def _quantization(hf_dir: str) -> str:
    """How the checkpoint's layers run on the GPU: its quantization method, or dense."""
    from llm_workbook.store.checkpoint import open_checkpoint

    config = open_checkpoint(Path(hf_dir)).quantization_config or {}
    method = config.get("quant_method") or config.get("format")
    return f"{method} kernels" if method else "dense (no quantization_config)"


def _child_transformers(spec: dict) -> dict:
    from transformers import AutoModelForCausalLM

    settings, device = spec["settings"], spec["device"]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["source"], dtype="auto", device_map=device).eval()
    _synchronize(device)
    load_seconds = time.perf_counter() - start
    ids = torch.tensor([_prompt_ids(model.config.vocab_size, settings["prompt_tokens"])], device=device)

    def prefill(batch: int) -> None:
        with torch.inference_mode():
            model(ids.expand(batch, -1), use_cache=False)

    def decode(batch: int) -> None:
        greedy_decode(model, ids.expand(batch, -1).contiguous(), settings["decode_tokens"])

    result = {"first_load_s": load_seconds, "engine": "transformers", **_protocol(settings, device, prefill, decode)}
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()[0]
    result["memory"] = {"device_peak_bytes": int(peak), "device_memory": "peak allocated on the device"}
    return result


def _child_vllm(spec: dict) -> dict:
    import vllm
    from vllm import LLM, SamplingParams

    settings, device = spec["settings"], spec["device"]
    n_prompt, n_decode = settings["prompt_tokens"], settings["decode_tokens"]
    free_before = torch.cuda.mem_get_info()[0] if device.startswith("cuda") else None
    start = time.perf_counter()
    llm = LLM(model=spec["source"], dtype="auto", seed=0, max_model_len=n_prompt + n_decode + 8,
              gpu_memory_utilization=VLLM_MEMORY_SHARE, enforce_eager=False)
    load_seconds = time.perf_counter() - start
    ids = _prompt_ids(llm.get_tokenizer().vocab_size, n_prompt)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    steps = SamplingParams(max_tokens=1 + n_decode, temperature=0.0, ignore_eos=True)  # the prefill's token, then n

    def run(batch: int, params) -> None:
        outputs = llm.generate([{"prompt_token_ids": ids}] * batch, params, use_tqdm=False)
        if len(outputs) != batch or any(len(o.outputs[0].token_ids) != params.max_tokens for o in outputs):
            raise RuntimeError(f"vLLM returned {len(outputs)} sequences for {batch}, not all of {params.max_tokens} tokens")

    result = {"first_load_s": load_seconds, "engine": f"vLLM {getattr(vllm, '__version__', '?')}",
              **_protocol(settings, device, lambda b: run(b, one), lambda b: run(b, steps))}
    used = free_before - torch.cuda.mem_get_info()[0] if free_before is not None else None
    result["memory"] = {"device_peak_bytes": used,
                        "device_memory": "device memory the engine took, its up-front KV cache included"}
    return result


def child_gpu(spec: dict) -> dict:
    """The GPU child (run by ``measure.run_child``): the protocol in vLLM or transformers
    on ``spec['device']``, with the device's bandwidth and the checkpoint's bytes per token."""
    measure = _child_vllm if spec["via"] == "vllm" else _child_transformers
    result = measure(spec)
    result.update({"pid": os.getpid(), "device": spec["device"], "quantization": _quantization(spec["source"]),
                   "weight_bytes_per_token": checkpoint_bytes_per_token(spec["source"]),
                   "device_bandwidth": device_bandwidth(spec["device"], spec["settings"]["bandwidth_mb"])})
    return result


__all__ = ["GGUF_ON_GPU", "NO_CUDA", "checkpoint_bytes_per_token", "child_gpu", "device_bandwidth", "gpu_device",
           "measure_gpu"]
