"""Scale section of `make bench`: memory and time of quantization and evaluation on a model of real size.

Generates a random bf16 Llama-shaped checkpoint (sharded safetensors, SmolLM2's tokenizer, >= 1.2 GB by
default) and measures, each in a fresh process (peak RSS is the child's VmHWM):

* ``quantize_rtn_peak_rss_mb``: ``llmc quantize --method int4`` (streams one tensor at a time);
* ``quantize_gptq_peak_rss_mb``: ``llmc quantize --method gptq`` (small calibration: memory, not quality);
* ``eval_peak_rss_mb``: the larger of two evaluations against the original: the RTN candidate (the
  original's side computed and stored first, then only the candidate loaded) and an INT8 one (the stored
  side reused);
* ``eval_second_candidate_ratio``: the time of a second candidate of the same original over the first's
  (the second reuses the stored original side);
* ``model_load_ratio_vs_safetensors``: ``from_pretrained`` + one forward pass over ``model_from_parquet`` +
  one forward pass, on the same checkpoint (>= 1: Parquet is at least as fast to the first output).

Goals (printed as PASS/MISS, never asserted): RTN <= 0.35 x model + 700 MB; GPTQ <= 0.5 x model + 1.5 GB;
eval <= 1.3 x one model's fp32 size + 600 MB; second candidate <= 0.6 x the first; load ratio >= 1.0.
Ends with one ``name: value`` line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_store import MIB, _shard_plan  # noqa: E402

FIGURES = (
    "scale_model_mb",
    "quantize_rtn_peak_rss_mb",
    "quantize_gptq_peak_rss_mb",
    "eval_peak_rss_mb",
    "eval_second_candidate_ratio",
    "model_load_ratio_vs_safetensors",
)


def llama_config(size_mb: float) -> dict:
    """A Llama shape (hidden 2048, intermediate 5632, 16 heads / 4 KV heads, vocab 49152) near ``size_mb``."""
    hidden, inter, vocab = 2048, 5632, 49152
    while True:
        per_layer = 2 * (2 * hidden * hidden + 2 * hidden * hidden // 4 + 3 * hidden * inter + 2 * hidden)
        fixed = 2 * (2 * vocab * hidden + hidden)
        if fixed + per_layer <= size_mb * MIB or hidden <= 64:
            break
        hidden, inter = hidden // 2, inter // 2
    layers = max(1, round((size_mb * MIB - fixed) / per_layer))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": hidden // 16,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
        "eos_token_id": 2,
    }


def generate(directory: Path, size_mb: float) -> Path:
    """The checkpoint, with the tokenizer of builtin:smollm2 (a real one, so calibration and evaluation run)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llm_workbook.workbook import builtins

    config = llama_config(size_mb)
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(LlamaConfig(**config)).state_dict().items()}
    directory.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    plan = _shard_plan(shapes)
    for k, names in enumerate(plan, 1):
        shard = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name in names:
            values = torch.randn(shapes[name], generator=gen).mul_(0.02)
            tensors[name] = (values.add_(1.0) if len(shapes[name]) == 1 else values).to(torch.bfloat16)
            weight_map[name] = shard
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_dir = Path(builtins.resolve("builtin:smollm2"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def _child_peak(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``command`` in a fresh process; its wall seconds and peak RSS (MiB, the child's ``ru_maxrss``)."""
    started = time.perf_counter()
    code = ("import resource, runpy, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
            "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(p.returncode)")
    proc = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    peak_kib = int(next(l for l in proc.stderr.splitlines() if l.startswith("PEAK")).split()[1])
    return time.perf_counter() - started, peak_kib / 1024


EVAL = ("import sys, torch; from llm_workbook.evaluation.compare import evaluate; "
        "evaluate(sys.argv[1], sys.argv[2], context_length=256, max_eval_tokens=1024, gen_tokens=4, perf=False, "
        "reference_cache=sys.argv[3])")

LOAD = """
import json, sys, time, torch
from llm_workbook.runtime.model import model_from_parquet
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
ids = torch.randint(0, 1000, (1, 32))
start = time.perf_counter()
model = model_from_parquet(sys.argv[2]) if sys.argv[1] == "parquet" else AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=torch.float32)
with torch.no_grad():
    model(ids)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _load_seconds(via: str, source: Path) -> float:
    proc = subprocess.run([sys.executable, "-c", LOAD, via, str(source)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def target(label: str, value: float, limit: float, higher_is_better: bool = False) -> str:
    ok = value >= limit if higher_is_better else value <= limit
    return f"  {label:<34} {value:10.2f}  goal {'>=' if higher_is_better else '<='} {limit:.2f}  {'PASS' if ok else 'MISS'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=1250)
    parser.add_argument("--work-dir", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--repeats", type=int, default=3, help="load-to-first-forward repeats (median)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    root = args.work_dir / f"llama-{args.size_mb:g}mb"
    shutil.rmtree(root, ignore_errors=True)
    llmc = [sys.executable, "-m", "llm_workbook"]
    try:
        model = generate(root / "hf", args.size_mb)
        model_mb = sum(p.stat().st_size for p in model.glob("*.safetensors")) / MIB
        _, rtn_peak = _child_peak([*llmc, "quantize", str(model), str(root / "int4.parquet"), "--method", "int4", "-q"])
        _, gptq_peak = _child_peak([*llmc, "quantize", str(model), str(root / "gptq.parquet"), "--method", "gptq",
                                    "--calib-samples", "8", "--calib-seq-len", "128", "-q"])
        _child_peak([*llmc, "quantize", str(model), str(root / "int8.parquet"), "--method", "int8", "-q"])
        cache = root / "reference"
        first_s, eval_peak = _child_peak([sys.executable, "-c", EVAL, str(model), str(root / "int4.parquet"), str(cache)])
        second_s, second_peak = _child_peak([sys.executable, "-c", EVAL, str(model), str(root / "int8.parquet"), str(cache)])
        eval_peak = max(eval_peak, second_peak)  # the goal holds for every run, first or later
        subprocess.run([*llmc, "convert", str(model), str(root / "model.parquet"), "-q"], check=True)
        pairs = []
        for _ in range(args.repeats):
            hf = _load_seconds("hf", model)
            pq = _load_seconds("parquet", root / "model.parquet")
            pairs.append(hf / pq)
        pairs.sort()
        load_ratio = pairs[len(pairs) // 2]
        fp32_mb = 2 * model_mb
        figures = {
            "scale_model_mb": model_mb, "quantize_rtn_peak_rss_mb": rtn_peak, "quantize_gptq_peak_rss_mb": gptq_peak,
            "eval_peak_rss_mb": eval_peak, "eval_second_candidate_ratio": second_s / first_s,
            "model_load_ratio_vs_safetensors": load_ratio,
        }
        print(f"\nscale model {model_mb:.0f} MiB bf16 (fp32 in memory {fp32_mb:.0f} MiB); eval first {first_s:.1f} s, "
              f"second {second_s:.1f} s; load-to-first-forward ratios {', '.join(f'{r:.2f}' for r in pairs)}")
        print(target("quantize RTN peak RSS (MiB)", rtn_peak, 0.35 * model_mb + 700))
        print(target("quantize GPTQ peak RSS (MiB)", gptq_peak, 0.5 * model_mb + 1500))
        print(target("eval peak RSS (MiB)", eval_peak, 1.3 * fp32_mb + 600))
        print(target("second candidate / first", second_s / first_s, 0.6))
        print(target("load to first forward, HF / Parquet", load_ratio, 1.0, higher_is_better=True))
        print()
        for name in FIGURES:
            print(f"{name}: {figures[name]:.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
