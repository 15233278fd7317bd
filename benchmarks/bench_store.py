"""Benchmark of the Parquet weight store against plain safetensors (`make bench`).

Generates a random bf16 Qwen3-like checkpoint (sharded safetensors + config.json), converts it
once, then measures in fresh subprocesses (one per measurement, so memory and allocator state
start clean), with warm-up rounds and repeats:

* load: every tensor from Parquet (``WeightLoaderV2.state_dict()``, checksums verified) versus
  safetensors ``load_file`` of every shard plus one read of every byte (``load_file`` returns
  lazily mmap-backed tensors, so without the read nothing would have been loaded yet);
* conversion versus ``shutil.copyfile`` of the shards (both fsync their output, as the
  converter does);
* the converter's peak RSS;
* opening the file and loading one mid-model tensor (in this process: memory plays no part).

Every timed child reads files already in the page cache (the parent reads them first), and the
order of the compared methods alternates between rounds. Wall time is what is compared; CPU time
and the load average are printed too, because on a shared machine wall time mostly measures the
neighbours. The run ends with one ``name: value`` line per figure (see ``FIGURES``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
GENERATOR_VERSION = 1  # bump when the generated model changes, so cached copies are rebuilt
FIGURES = (
    "load_ratio_vs_safetensors",
    "convert_ratio_vs_copy",
    "lazy_single_tensor_ms",
    "convert_peak_rss_mb",
    "largest_tensor_mb",
    "model_mb",
)


# --- the synthetic checkpoint -------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """Dimensions of a Qwen3-like decoder (untied embeddings, q/k norms, GQA)."""

    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    seed: int = 0

    def layer_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        p = f"model.layers.{i}."
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            p + "input_layernorm.weight": (self.hidden,),
            p + "self_attn.q_proj.weight": (q, self.hidden),
            p + "self_attn.k_proj.weight": (kv, self.hidden),
            p + "self_attn.v_proj.weight": (kv, self.hidden),
            p + "self_attn.o_proj.weight": (self.hidden, q),
            p + "self_attn.q_norm.weight": (self.head_dim,),
            p + "self_attn.k_norm.weight": (self.head_dim,),
            p + "post_attention_layernorm.weight": (self.hidden,),
            p + "mlp.gate_proj.weight": (self.intermediate, self.hidden),
            p + "mlp.up_proj.weight": (self.intermediate, self.hidden),
            p + "mlp.down_proj.weight": (self.hidden, self.intermediate),
        }

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name -> shape, in checkpoint order."""
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            out.update(self.layer_shapes(i))
        out["model.norm.weight"] = (self.hidden,)
        out["lm_head.weight"] = (self.vocab, self.hidden)
        return out

    def config(self) -> dict:
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": self.layers,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def spec_for_size(size_mb: float, seed: int = 0) -> ModelSpec:
    """A Qwen3-like spec (hidden 2048, intermediate 6144, vocab 32000 at full scale) near ``size_mb`` MiB of bf16.

    Dimensions are halved until embeddings plus one layer fit, then layers are added.
    """
    if size_mb <= 0:
        raise ValueError(f"--size-mb must be positive, got {size_mb}")
    target = size_mb * MIB
    scale = 1
    while True:
        base = ModelSpec(2048 // scale, 6144 // scale, 32000 // scale, max(1, 16 // scale), max(1, 8 // scale), 128, 1, seed)
        fixed = sum(2 * _numel(s) for n, s in base.shapes().items() if not n.startswith("model.layers."))
        per_layer = sum(2 * _numel(s) for s in base.layer_shapes(0).values())
        if fixed + per_layer <= target or scale >= 64:
            layers = max(1, round((target - fixed) / per_layer))
            return ModelSpec(base.hidden, base.intermediate, base.vocab, base.heads, base.kv_heads, base.head_dim, layers, seed)
        scale *= 2


def _shard_plan(shapes: dict[str, tuple[int, ...]], shards_wanted: int = 3) -> list[list[str]]:
    """Split tensors, in order, into about ``shards_wanted`` shards (a tensor never spans two)."""
    sizes = {n: 2 * _numel(s) for n, s in shapes.items()}
    budget = max(max(sizes.values()), -(-sum(sizes.values()) // shards_wanted))
    plan: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if plan[-1] and used + size > budget:
            plan.append([])
            used = 0
        plan[-1].append(name)
        used += size
    return plan


def generate_checkpoint(directory: Path, spec: ModelSpec) -> None:
    """Write a sharded bf16 safetensors checkpoint with config.json and an index (random N(0, 0.02) weights)."""
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(spec.seed)
    shapes = spec.shapes()
    plan = _shard_plan(shapes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(plan, 1):
        shard = f"model-{k:05d}-of-{len(plan):05d}.safetensors"
        tensors = {}
        for name in names:
            values = torch.randn(shapes[name], generator=gen).mul_(0.02)
            if len(shapes[name]) == 1:  # norms sit near 1 in a trained model
                values.add_(1.0)
            tensors[name] = values.to(torch.bfloat16)
            del values
            weight_map[name] = shard
            total += tensors[name].nbytes
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")


def shard_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def read_through(paths: list[Path]) -> None:
    """Read files once so that every timed run starts from the same (warm) page cache."""
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(64 * MIB):
                pass


# --- measurements, each run in its own process (`--child MODE`) -------------------------------
def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MIB


def child_load_parquet(parquet: str) -> dict:
    """Every tensor as a materialized torch tensor, the way users get them (checksums verified)."""
    from llm_workbook import WeightLoaderV2

    base = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    loader = WeightLoaderV2(parquet)
    state = dict(loader.state_dict().items())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu": cpu, "bytes": sum(t.nbytes for t in state.values()), "tensors": len(state),
            "base_rss_mb": base, "peak_rss_mb": _peak_rss_mb()}


def child_load_safetensors(directory: str) -> dict:
    """``load_file`` every shard, then read every byte (its tensors are lazily mmap-backed).

    The read is one streaming pass (xxh3 over the bytes, memory-bandwidth speed): the cheapest way
    to touch every byte. torch's uint8 ``.sum()`` runs at a few tens of MB/s and would make
    safetensors look far slower than it is.
    """
    import torch
    import xxhash
    from safetensors.torch import load_file

    base = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    state: dict[str, torch.Tensor] = {}
    for shard in shard_files(Path(directory)):
        state.update(load_file(shard))
    for tensor in state.values():
        xxhash.xxh3_64_intdigest(tensor.contiguous().view(torch.uint8).numpy())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu": cpu, "bytes": sum(t.nbytes for t in state.values()), "tensors": len(state),
            "base_rss_mb": base, "peak_rss_mb": _peak_rss_mb()}


def child_convert(src: str, out: str) -> dict:
    from llm_workbook import HuggingFaceToParquetConverter

    base = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    report = HuggingFaceToParquetConverter(progress=False).convert(src, out)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu": cpu, "bytes": report.bytes_written, "base_rss_mb": base, "peak_rss_mb": _peak_rss_mb()}


def child_copy(src: str, out: str) -> dict:
    """shutil.copyfile of every shard, fsynced like the converter's output."""
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    total = 0
    for shard in shard_files(Path(src)):
        dest = target / shard.name
        shutil.copyfile(shard, dest)
        with open(dest, "rb+") as handle:
            os.fsync(handle.fileno())
        total += dest.stat().st_size
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "bytes": total, "peak_rss_mb": _peak_rss_mb()}


def measure_lazy(parquet: str, name: str, repeats: int, warmup: int) -> dict:
    """Open the file and load one tensor, ``warmup + repeats`` times (in this process: memory plays no part)."""
    from llm_workbook import WeightLoaderV2

    opened, loaded = [], []
    for _ in range(warmup + repeats):
        t0 = time.perf_counter()
        loader = WeightLoaderV2(parquet)
        t1 = time.perf_counter()
        tensor = loader.load_tensor(name)
        t2 = time.perf_counter()
        opened.append(t1 - t0)
        loaded.append(t2 - t1)
        del loader, tensor
    return {"open_s": opened[warmup:], "load_s": loaded[warmup:]}


CHILDREN = {
    "load-parquet": child_load_parquet,
    "load-safetensors": child_load_safetensors,
    "convert": child_convert,
    "copy": child_copy,
}


def run_child(mode: str, *args: str) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is a JSON result."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--child", mode, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {mode!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- orchestration ------------------------------------------------------------------------------
@dataclass
class Series:
    """Samples of one measurement (seconds unless said otherwise)."""

    name: str
    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def describe(self, unit: str = "s", scale: float = 1.0) -> str:
        v = [x * scale for x in self.values]
        return (f"{self.name:<26} median {statistics.median(v):9.3f} {unit:<2}  "
                f"min {min(v):9.3f}  max {max(v):9.3f}  n={len(v)}")


def prepare(work: Path, size_mb: float) -> tuple[Path, Path, ModelSpec, bool]:
    """The checkpoint and its reference conversion, reused from ``work`` when already complete."""
    spec = spec_for_size(size_mb)
    root = work / f"qwen3like-{size_mb:g}mb"
    model_dir, parquet, marker = root / "hf", root / "model.parquet", root / "complete.json"
    wanted = {"spec": asdict(spec), "generator_version": GENERATOR_VERSION}
    if marker.is_file() and json.loads(marker.read_text()) == wanted and parquet.is_file():
        return model_dir, parquet, spec, True
    shutil.rmtree(root, ignore_errors=True)
    generate_checkpoint(model_dir, spec)
    from llm_workbook import HuggingFaceToParquetConverter  # torch is already loaded here

    HuggingFaceToParquetConverter(progress=False).convert(model_dir, parquet)
    marker.write_text(json.dumps(wanted))
    return model_dir, parquet, spec, False


def mid_model_tensor(spec: ModelSpec) -> str:
    return f"model.layers.{spec.layers // 2}.mlp.gate_proj.weight"


def run_rounds(model_dir: Path, parquet: Path, scratch: Path, model_bytes: int,
               warmup: int, repeats: int) -> dict[str, list[dict]]:
    """Child results per measurement for the timed rounds; the order of compared methods alternates."""
    results: dict[str, list[dict]] = {"load-safetensors": [], "load-parquet": [], "copy": [], "convert": []}
    for rnd in range(warmup + repeats):
        flip = rnd % 2 == 1
        got = {}
        for mode in ("load-parquet", "load-safetensors")[:: -1 if flip else 1]:
            got[mode] = run_child(mode, str(parquet if mode == "load-parquet" else model_dir))
            if got[mode]["bytes"] != model_bytes:
                raise RuntimeError(f"{mode}: loaded {got[mode]['bytes']} bytes, expected {model_bytes}")
        for mode in ("convert", "copy")[:: -1 if flip else 1]:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir()
            got[mode] = run_child(mode, str(model_dir), str(scratch / ("copy" if mode == "copy" else "out.parquet")))
            shutil.rmtree(scratch, ignore_errors=True)
        if rnd >= warmup:
            for mode, result in got.items():
                results[mode].append(result)
    return results


def target_line(label: str, value: float, limit: float, higher_is_better: bool, unit: str) -> str:
    ok = value >= limit if higher_is_better else value <= limit
    op = ">=" if higher_is_better else "<="
    return f"  {label:<28} {value:9.2f} {unit:<4} target {op} {limit:.2f} {unit:<4} {'PASS' if ok else 'MISS'}"


def report(results: dict[str, list[dict]], lazy: dict, model_bytes: int, largest: int,
           repeats: int, warmup: int) -> dict[str, float]:
    """Print the details and the targets; return the figures."""
    def series(mode: str, label: str, key: str = "seconds") -> Series:
        return Series(label, [r[key] for r in results[mode]])

    st, pq, cp, cv = (series("load-safetensors", "safetensors load+touch"), series("load-parquet", "parquet load (verified)"),
                      series("copy", "copy shards (fsync)"), series("convert", "convert"))
    cpu = [series(m, "  cpu", "cpu") for m in ("load-safetensors", "load-parquet", "copy", "convert")]
    mb = model_bytes / MIB
    print(f"\nmodel {mb:.1f} MiB; {repeats} timed round(s) after {warmup} warm-up round(s); "
          f"load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for wall, used in zip((st, pq, cp, cv), cpu):
        print("  " + wall.describe() + f"  {mb / wall.median:7.0f} MiB/s")
        print("  " + used.describe("s cpu"))
    total = Series("open + load one tensor", [a + b for a, b in zip(lazy["open_s"], lazy["load_s"])])
    for s in (Series("open", lazy["open_s"]), Series("load one tensor", lazy["load_s"]), total):
        print("  " + s.describe("ms", 1000.0))
    load_pairs = [a / b for a, b in zip(st.values, pq.values)]
    conv_pairs = [a / b for a, b in zip(cp.values, cv.values)]
    print(f"  paired load ratios (safetensors/parquet): {', '.join(f'{r:.2f}' for r in load_pairs)}")
    print(f"  paired convert ratios (copy/convert):     {', '.join(f'{r:.2f}' for r in conv_pairs)}")
    for mode, label in (("load-parquet", "parquet"), ("load-safetensors", "safetensors")):
        peak_load = statistics.median(r["peak_rss_mb"] for r in results[mode])
        base_load = statistics.median(r["base_rss_mb"] for r in results[mode])
        print(f"  {label} load peak RSS {peak_load:.0f} MiB (after imports {base_load:.0f} MiB; mapped file pages count)")
    peak = statistics.median(r["peak_rss_mb"] for r in results["convert"])
    base = statistics.median(r["base_rss_mb"] for r in results["convert"])
    print(f"  convert peak RSS {peak:.0f} MiB, of which {base:.0f} MiB interpreter + imports before converting")

    figures = {
        "load_ratio_vs_safetensors": st.median / pq.median,
        "convert_ratio_vs_copy": cp.median / cv.median,
        "lazy_single_tensor_ms": total.median * 1000.0,
        "convert_peak_rss_mb": peak,
        "largest_tensor_mb": largest / MIB,
        "model_mb": mb,
    }
    print("\ntargets:")
    print(target_line("load ratio vs safetensors", figures["load_ratio_vs_safetensors"], 1.0, True, "x"))
    print(target_line("conversion ratio vs copy", figures["convert_ratio_vs_copy"], 0.5, True, "x"))
    print(target_line("conversion peak RSS", peak, 3 * figures["largest_tensor_mb"] + 300, False, "MiB"))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=600, help="size of the generated bf16 model in MiB (default 600)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the generated model in --work-dir for the next run")
    parser.add_argument("--work-dir", type=Path, default=REPO / ".cache" / "bench", help="where the model is generated")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        mode, *rest = args.child
        print(json.dumps(CHILDREN[mode](*rest)))
        return 0
    if args.repeats < 1 or args.warmup < 0 or args.size_mb <= 0:
        parser.error("--repeats must be >= 1, --warmup >= 0 and --size-mb > 0")

    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    model_dir, parquet, spec, reused = prepare(args.work_dir, args.size_mb)
    root = model_dir.parent
    try:
        shapes = spec.shapes()
        model_bytes = sum(2 * _numel(s) for s in shapes.values())
        largest = max(2 * _numel(s) for s in shapes.values())
        print(f"model: {'reused' if reused else 'generated'} {model_dir} ({len(shapes)} tensors, "
              f"{len(shard_files(model_dir))} shards, {spec.layers} layers, hidden {spec.hidden}, "
              f"intermediate {spec.intermediate}, vocab {spec.vocab})")
        read_through(shard_files(model_dir) + [parquet])
        results = run_rounds(model_dir, parquet, root / "scratch", model_bytes, args.warmup, args.repeats)
        lazy = measure_lazy(str(parquet), mid_model_tensor(spec), args.repeats, max(1, args.warmup))
        figures = report(results, lazy, model_bytes, largest, args.repeats, args.warmup)
        print(f"(benchmark took {time.perf_counter() - started:.0f} s)\n")
        for name in FIGURES:
            print(f"{name}: {figures[name]:.3f}")
    finally:
        shutil.rmtree(root / "scratch", ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
