"""Speed and memory in the runtimes that would serve a checkpoint (`make bench`, after the store benchmarks).

The original and each candidate are measured by ``evaluation.perf.measure`` (fresh processes, warm-up,
median of repeats) in both runtimes: AI-OS as it is (float32 weights, dequantized at load) and weight-only
kernels (bfloat16; int8/int4 codes run by PyTorch's CPU kernels). Every figure is printed as a ratio to
the original measured in the same run and runtime, beside this machine's memory-bandwidth limit, and ends
as ``name: value`` lines. Default: SmolLM2-135M, our PTQ INT8 and INT4 of it, and its GGUF (Q4_1 from PyPI), which
also runs in llama.cpp where ``make llama-cpp`` installed it (builtins, offline).
"""

from __future__ import annotations

import argparse
import sys
import time

FIELDS = ("decode_tps", "batch_tps", "peak_rss_mb", "weight_mb_per_token", "fraction_of_limit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", default="builtin:smollm2")
    parser.add_argument("--candidates", default="builtin:smollm2/ptq-int8,builtin:smollm2/ptq-int4,builtin:smollm2/gguf",
                        help="comma-separated sources")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    from llm_workbook.evaluation.perf import PerfSettings, measure
    from llm_workbook.workbook import builtins
    from llm_workbook.workbook.tables import runtime_figures

    started = time.perf_counter()
    settings = PerfSettings(repeats=args.repeats, decode_tokens=args.decode_tokens, compare_hf_load=False)
    sources = {"original": args.original,
               **{c.rsplit("/", 1)[-1].removesuffix(".parquet"): c for c in args.candidates.split(",") if c}}
    figures = {}
    for name, source in sources.items():
        result = measure(builtins.resolve(source), settings=settings)
        figures[name] = runtime_figures(result)
        bandwidth = result["bandwidth"]["copy_gb_per_s"]
        print(f"{name} ({source}): memory bandwidth {bandwidth['median']:.1f} GB/s [IQR {bandwidth['q1']:.1f}, "
              f"{bandwidth['q3']:.1f}]")
        for runtime, f in figures[name].items():
            if "error" in f or "unavailable" in f:
                print(f"  {runtime:8s} {f.get('unavailable') or 'failed: ' + f['error']}")
                continue
            low, high = f["decode_iqr"]
            batch = f"batch {f['batch']} {f['batch_tps']:6.1f}" if f["batch_tps"] else "no batch figure"
            print(f"  {runtime:9s} decode {f['decode_tps']:6.1f} tokens/s [IQR {low:.1f}, {high:.1f}], {batch}; "
                  f"{f['weight_mb_per_token']:5.0f} MB/token, {f['fraction_of_limit']:4.0%} of "
                  f"the bandwidth limit; peak RSS {f['peak_rss_mb']:5.0f} MB; {f['kernels'] or 'float32'}")
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)\n")
    base = figures["original"]
    lines = []
    for name, by_runtime in figures.items():
        for runtime, f in by_runtime.items():
            if "error" in f or "unavailable" in f:
                continue
            lines.append(f"runtime_{name}_{runtime}_decode_tokens_per_s: {f['decode_tps']:.2f}")
            lines.append(f"runtime_{name}_{runtime}_fraction_of_bandwidth_limit: {f['fraction_of_limit']:.3f}")
            original = base.get(runtime) or {}
            if name != "original" and original.get("decode_tps"):
                lines.append(f"runtime_{name}_{runtime}_decode_ratio_vs_original: {f['decode_tps'] / original['decode_tps']:.3f}")
                lines.append(f"runtime_{name}_{runtime}_peak_rss_ratio_vs_original: {f['peak_rss_mb'] / original['peak_rss_mb']:.3f}")
    print("\n".join(line.replace("-", "_").replace("llama.cpp", "llama_cpp") for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
