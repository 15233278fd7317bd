"""``llmc quantize``: our own PTQ baselines (RTN INT8/INT4/INT2, GPTQ) written as real, packed storage,
and the AngelSlim backend (its PTQ run in its own environment, then converted).

Backends
--------
* ``ptq`` (ours): the source model is loaded in float32 (HF directory / hub id with
  ``from_pretrained``; a Parquet file, or an already quantized HF checkpoint, through
  ``modeling.model_from_parquet``), every ``nn.Linear`` not matched by ``skip`` is quantized by
  ``ptq.quantize_model`` (GPTQ calibrated on ``corpus.calibration_samples``: random windows of the
  offline corpus's *train* split, disjoint from the eval text), and the result is written as

  - ``out_format="parquet"``: a self-contained Parquet V2.1 file (config with a ``quantization_config``
    ``{"quant_method": "llmc-ptq", ...}``, generation config and tokenizer files of the source);
    quantized Linears as ``ptq`` rows (``formats/ptq.py``: codes packed at their bit width, float32
    scales), every other tensor copied from the source untouched (same dtype, same bits);
  - ``out_format="gptq"``: an HF directory in the AutoGPTQ v1 layout (``qweight``/``qzeros``/``scales``/
    ``g_idx``, ``quantization_config`` ``{quant_method: gptq, checkpoint_format: gptq, ...}``), scales in
    the model dtype. ``formats/gptq.py`` reads it back to exactly ``QuantizedLinear.dequantize`` with
    those scales.

* ``angelslim``: ``tools/angelslim/run_ptq.py`` runs in ``.venv-angelslim`` (``make angelslim-env``)
  on the source checkpoint with a calibration JSONL written from the same offline corpus windows; its
  output directory is converted into OUT with ``HuggingFaceToParquetConverter``. A failing AngelSlim
  step raises :class:`AngelSlimError` carrying AngelSlim's own exception text.

Outputs are atomic: a failure leaves no OUT file or directory behind.
"""

from __future__ import annotations

import base64
import ctypes
import datetime as _dt
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import __version__, corpus, ptq, schema as S
from .converter import HuggingFaceToParquetConverter, StoreWriter, all_finite, export_to_hf, source_metadata, staged_directory
from .formats import get_format, ptq as ptq_format
from .errors import StoreError
from .formats.base import Row
from .loader import DENSE, WeightLoaderV2

PTQ_METHODS = ("int8", "int4", "int2", "gptq")
ANGELSLIM_METHODS = ("fp8_static", "fp8_dynamic", "int8_dynamic", "int4_gptq", "int4_awq", "w4a8_fp8")
BACKENDS = ("ptq", "angelslim")
OUT_FORMATS = ("parquet", "gptq")
# Defaults per method: (bits, group_size, symmetric). Symmetric INT2 is ternary ({-1, 0, 1} * scale),
# so INT2 defaults to asymmetric (4 levels).
METHOD_DEFAULTS: dict[str, tuple[int, int, bool]] = {
    "int8": (8, -1, True),
    "int4": (4, 128, True),
    "int2": (2, 128, False),
    "gptq": (4, 128, True),
}
# The same quantization on the other backend (compare_backends). AngelSlim has no plain RTN INT4, so
# int4 pairs with its GPTQ; FP8 has no counterpart of ours.
COUNTERPARTS: dict[str, dict[str, str]] = {
    "ptq": {"int8_dynamic": "int8", "int4_gptq": "gptq", "int4_awq": "int4", "w4a8_fp8": "int4"},
    "angelslim": {"int8": "int8_dynamic", "gptq": "int4_gptq", "int4": "int4_gptq"},
}
GPTQ_V1_BITS = (2, 3, 4, 8)
REPO_ROOT = Path(__file__).resolve().parents[2]
# AngelSlim methods whose YAML takes a group size (128 by default).
ANGELSLIM_GROUP_METHODS = frozenset({"int4_gptq", "int4_awq", "w4a8_fp8"})
ANGELSLIM_PYTHON = REPO_ROOT / ".venv-angelslim" / "bin" / "python"
ANGELSLIM_SCRIPT = REPO_ROOT / "tools" / "angelslim" / "run_ptq.py"
CALIBRATION_CORPUS = corpus.DEFAULT_CORPUS
_TORCH_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class QuantizeError(StoreError):
    """Bad quantize input or a failed quantization; the message names the file, tensor or option."""


class AngelSlimError(QuantizeError):
    """The AngelSlim backend failed; the message carries AngelSlim's own error."""


@dataclass
class QuantizeResult:
    """What one quantization wrote."""

    output: Path
    backend: str
    method: str
    out_format: str
    options: dict[str, Any]
    layers: list[str]  # quantized Linear modules
    quantized_bits_per_weight: float | None  # stored bits per weight of those Linears (codes + scales + zeros)
    seconds: float
    quantized: dict[str, ptq.QuantizedLinear] | None = field(default=None, repr=False)  # ptq backend only


@dataclass
class ComparisonResult:
    """Both backends' outputs, and their evaluations against the source when ``evaluation`` is available."""

    results: dict[str, QuantizeResult]
    evaluations: dict[str, Any] | None
    note: str


# ==================================================================================================
# Options
# ==================================================================================================


@dataclass
class _Options:
    method: str
    bits: int
    group_size: int
    symmetric: bool
    skip: tuple[str, ...]
    act_order: bool
    calib_samples: int
    calib_seq_len: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
            "skip": list(self.skip), "act_order": self.act_order,
            **({"calibration": _calibration_record(self.calib_samples, self.calib_seq_len, self.seed)}
               if self.method == "gptq" else {}),
        }


def _calibration_record(samples: int, seq_len: int, seed: int) -> dict[str, Any]:
    return {"corpus": CALIBRATION_CORPUS, "split": "train", "samples": samples, "seq_len": seq_len, "seed": seed}


def _ptq_options(method: str, bits: int | None, group_size: int | None, symmetric: bool | None,
                 skip: Sequence[str] | None, act_order: bool, calib_samples: int, calib_seq_len: int, seed: int,
                 out_format: str) -> _Options:
    if method not in PTQ_METHODS:
        hint = " (an AngelSlim method: pass backend='angelslim')" if method in ANGELSLIM_METHODS else ""
        raise QuantizeError(f"unknown method {method!r}{hint}; backend 'ptq' supports {list(PTQ_METHODS)}")
    default_bits, default_group, default_sym = METHOD_DEFAULTS[method]
    if bits is None:
        bits = default_bits
    elif method != "gptq" and bits != default_bits:
        raise QuantizeError(f"method {method!r} means {default_bits}-bit codes, but bits={bits} was given "
                            f"(use method 'gptq' for other widths)")
    if not isinstance(bits, int) or not ptq.MIN_BITS <= bits <= ptq.MAX_BITS:
        raise QuantizeError(f"bits must be an int in [{ptq.MIN_BITS}, {ptq.MAX_BITS}], got {bits!r}")
    group_size = default_group if group_size is None else group_size
    if not isinstance(group_size, int) or (group_size != -1 and group_size < 1):
        raise QuantizeError(f"group_size must be -1 (per channel) or a positive int, got {group_size!r}")
    if act_order and method != "gptq":
        raise QuantizeError(f"act_order only applies to method 'gptq', not {method!r}")
    if out_format == "gptq" and bits not in GPTQ_V1_BITS:
        raise QuantizeError(f"the GPTQ v1 layout holds {list(GPTQ_V1_BITS)}-bit codes, not {bits}")
    if method == "gptq" and (calib_samples < 1 or calib_seq_len < 2):
        raise QuantizeError(f"calib_samples must be >= 1 and calib_seq_len >= 2, got {calib_samples}, {calib_seq_len}")
    skip = ptq.DEFAULT_SKIP if skip is None else tuple(skip)
    return _Options(method, bits, group_size, default_sym if symmetric is None else bool(symmetric), skip,
                    bool(act_order), calib_samples, calib_seq_len, seed)


def _check_output(out: Path, out_format: str) -> None:
    """Fail before any work when OUT cannot be written."""
    if not out.parent.is_dir():
        raise QuantizeError(f"{out}: output directory {out.parent} does not exist")
    if out_format == "parquet":
        if out.is_dir():
            raise QuantizeError(f"{out}: is a directory; the Parquet output must be a file path")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizeError(f"{out}: the GPTQ output directory exists and is not empty")


# ==================================================================================================
# Sources
# ==================================================================================================


def _dtype_code_of_config(config: dict) -> str | None:
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = _TORCH_DTYPE_NAMES.get(str(name))
    return S.dtype_code(dtype) if dtype is not None else None


def _check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    if tensor.is_floating_point() and tensor.dtype.itemsize > 1 and not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise QuantizeError(f"{where}: tensor {name!r} holds {bad} NaN/Inf values")


class _Source:
    """A source model: float32 model, tokenizer, stored tensors in order, and metadata to carry over."""

    label: str
    config: dict

    def model(self) -> torch.nn.Module:
        raise NotImplementedError

    def tokenizer(self):
        raise NotImplementedError

    def items(self) -> list[tuple[str, str]]:
        """``(layer, tensor name)`` of every stored array, in source order."""
        raise NotImplementedError

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    @functools.cached_property
    def stored(self) -> frozenset[str]:
        """The names of every stored array."""
        return frozenset(name for _, name in self.items())

    def dtype_of(self, name: str) -> str | None:
        """Safetensors dtype code of a float weight before quantization."""
        raise NotImplementedError

    def groups(self) -> dict[str, list[str]]:
        """Layers the source stores quantized: layer -> its stored arrays."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _HFSource(_Source):
    """An unquantized HF directory: tensors straight from its safetensors."""

    def __init__(self, label: str, root: Path, progress: bool = True):
        from .sources import open_checkpoint

        self.label = label
        self.progress = progress
        self.root = root
        self.ckpt = open_checkpoint(root)
        self.config = self.ckpt.config

    def model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        if not self.progress:
            hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(str(self.root), dtype=torch.float32)
        except Exception as exc:
            raise QuantizeError(f"{self.label}: transformers cannot load the model ({exc})") from None
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        return model.eval()

    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(self.root))
        except Exception as exc:
            raise QuantizeError(f"{self.label}: no usable tokenizer for GPTQ calibration ({exc})") from None

    def items(self) -> list[tuple[str, str]]:
        return [(S.split_name(name)[0], name) for name in self.ckpt.tensors]

    def dtype_of(self, name: str) -> str | None:
        info = self.ckpt.tensors.get(name)
        return info.dtype if info else None

    def read(self, name: str) -> torch.Tensor:
        tensor = self.ckpt.read(name)
        _check_finite(name, tensor, str(self.ckpt.tensor_file[name]))
        return tensor

    def groups(self) -> dict[str, list[str]]:
        return {}

    def metadata(self) -> dict[str, str]:
        return source_metadata(self.ckpt, self.label)


class _ParquetSource(_Source):
    """A Parquet weight file (ours, or a quantized HF checkpoint converted to a temporary one)."""

    def __init__(self, label: str, path: Path, temp_dir: Path | None = None):
        self.label = label
        self.loader = WeightLoaderV2(path)
        self.config = self.loader.config
        self.temp_dir = temp_dir
        # Non-dense rows grouped by layer (a quantized weight stored as several arrays).
        self._groups: dict[str, list[str]] = {}
        for name, info in self.loader.rows.items():
            if info.format != DENSE:
                self._groups.setdefault(info.layer_name, []).append(name)

    def model(self) -> torch.nn.Module:
        from .modeling import model_from_parquet

        return model_from_parquet(self.loader, dtype=torch.float32)

    def tokenizer(self):
        try:
            return self.loader.tokenizer()
        except StoreError as exc:
            raise QuantizeError(f"{self.label}: no usable tokenizer for GPTQ calibration ({exc})") from None

    def items(self) -> list[tuple[str, str]]:
        return [(info.layer_name, name) for name, info in self.loader.rows.items()]

    def dtype_of(self, name: str) -> str | None:
        info = self.loader.rows.get(name)
        if info is not None and info.format == DENSE:
            return info.dtype
        return _dtype_code_of_config(self.config)

    def read(self, name: str) -> torch.Tensor:
        tensor = self.loader.load_tensor(name)
        _check_finite(name, tensor, str(self.loader.path))
        return tensor

    def groups(self) -> dict[str, list[str]]:
        return self._groups

    def metadata(self) -> dict[str, str]:
        meta = {k: v for k, v in self.loader.metadata.items() if k not in (S.META_INDEX, S.META_SCHEMA_VERSION)}
        if self.temp_dir is not None:  # a converted HF checkpoint: name the real source
            source = json.loads(meta.get(S.META_SOURCE, "{}"))
            source["source"] = self.label
            meta[S.META_SOURCE] = json.dumps(source)
        return meta

    def close(self) -> None:
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _open_source(src: str | os.PathLike, scratch_parent: Path, progress: bool) -> _Source:
    from .sources import open_checkpoint, resolve_source

    text = str(src)
    path = Path(src)
    if path.is_file():
        if path.suffix != ".parquet":
            raise QuantizeError(f"{src}: expected an HF checkpoint directory, a hub id or a .parquet weight file")
        return _ParquetSource(text, path)
    root = resolve_source(src)
    if not open_checkpoint(root).quantization_config:
        return _HFSource(text, root, progress)
    # Already quantized: read it through our own formats (dequantized to float32 for the model).
    temp_dir = Path(tempfile.mkdtemp(prefix=".llmc-quantize-src-", dir=scratch_parent))
    try:
        HuggingFaceToParquetConverter(progress=progress).convert(root, temp_dir / "source.parquet")
        return _ParquetSource(text, temp_dir / "source.parquet", temp_dir=temp_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


# ==================================================================================================
# Our PTQ backend
# ==================================================================================================


def _calibration_ids(source: _Source, options: _Options) -> torch.Tensor:
    tokenizer = source.tokenizer()
    try:
        return corpus.calibration_samples(tokenizer, options.calib_samples, options.calib_seq_len, options.seed,
                                          name=CALIBRATION_CORPUS)
    except ValueError as exc:
        raise QuantizeError(f"{source.label}: calibration data: {exc}") from None


def _quantizable_linears(source: _Source, model: torch.nn.Module, options: _Options) -> dict:
    """The Linears to quantize (not skipped), refusing one that shares its weight with the input embeddings."""
    targets = ptq.find_quantizable_linears(model, options.skip)
    if not targets:
        raise QuantizeError(f"{source.label}: no nn.Linear left to quantize after skip={list(options.skip)}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in targets.items():
        if embeddings is not None and module.weight is getattr(embeddings, "weight", None):
            raise QuantizeError(f"{source.label}: {name!r} shares its weight with the input embeddings "
                                f"(tie_word_embeddings); keep it in skip (e.g. 'lm_head')")
    return targets


def _run_ptq(source: _Source, options: _Options, out_format: str, progress: bool) -> dict[str, ptq.QuantizedLinear]:
    if options.method == "gptq":  # one decoder layer resident at a time (see _SourceLayers)
        model, layer_weights = _skeleton_model(source), _SourceLayers(source)
    else:
        model, layer_weights = source.model(), None
    targets = _quantizable_linears(source, model, options)
    for name, module in targets.items():
        if out_format == "gptq":
            out_f, in_f = module.weight.shape
            if (in_f * options.bits) % 32 or (out_f * options.bits) % 32:
                raise QuantizeError(f"{source.label}: layer {name!r} has shape {[out_f, in_f]}; the GPTQ v1 layout "
                                    f"needs in and out features times {options.bits} bits to be multiples of 32")
    ids = _calibration_ids(source, options) if options.method == "gptq" else None
    try:
        return ptq.quantize_model(
            model, options.method, ids, bits=options.bits, group_size=options.group_size,
            symmetric=options.symmetric, skip=options.skip, act_order=options.act_order, progress=progress,
            layer_weights=layer_weights,
        )
    except (ValueError, ptq.GPTQError) as exc:
        raise QuantizeError(f"{source.label}: {exc}") from None
    finally:
        del model


def _quantization_config(options: _Options, source_qconfig: dict | None) -> dict[str, Any]:
    """config.json's description of a ``ptq`` file (no HF loader reads it; see formats/ptq.py)."""
    qconfig: dict[str, Any] = {
        "quant_method": ptq_format.HF_QUANT_METHOD,
        "format": ptq_format.NAME,
        "method": "gptq" if options.method == "gptq" else "rtn",
        "bits": options.bits,
        "group_size": options.group_size,
        "sym": options.symmetric,
        "desc_act": options.act_order,
        "scale_dtype": "float32",
        "ignore": list(options.skip),
        "llmc_version": __version__,
    }
    if source_qconfig:
        qconfig["source_quantization_config"] = source_qconfig
    return qconfig


def _config_text_with(config: dict, qconfig: dict[str, Any] | None) -> str:
    raw = dict(config)
    raw.pop("quantization_config", None)
    if qconfig is not None:
        raw["quantization_config"] = qconfig
    return json.dumps(raw, indent=2, sort_keys=False) + "\n"


def _source_record(source: _Source, backend: str, options: dict[str, Any]) -> str:
    return json.dumps({
        "source": source.label,
        "quantized_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llmc_version": __version__,
        "quantize": {"backend": backend, **options},
    })


def _write_parquet(source: _Source, results: dict[str, ptq.QuantizedLinear], options: _Options, out: Path,
                   progress: bool) -> float:
    """Write OUT; return the stored bits per weight of the quantized Linears."""
    from tqdm.auto import tqdm

    groups = source.groups()
    items = source.items()
    names: list[str] = []  # export names, in order (one safetensors shard)
    written: set[str] = set()
    q_bytes = q_numel = 0
    with StoreWriter(out) as writer:  # removed again if anything below fails or is interrupted
        for layer, name in tqdm(items, desc=f"write {out.name}", unit="tensor", disable=not progress):
            if layer in results:
                is_weight = name == f"{layer}.weight" or name in groups.get(layer, ())
                if is_weight:
                    if layer not in written:
                        quantized = results[layer]
                        rows = ptq_format.encode(layer, quantized, source.dtype_of(f"{layer}.weight"))
                        for row in rows:
                            writer.write(row)
                            names.append(row.tensor_name)
                            q_bytes += row.data.numel() * row.data.element_size()
                        q_numel += quantized.codes.numel()
                        written.add(layer)
                    continue
            if layer in groups and name in groups[layer]:
                if layer in written:
                    continue
                names.extend(_copy_group(source, layer, groups[layer], writer))
                written.add(layer)
                continue
            writer.write(Row(name, source.read(name), DENSE))
            names.append(name)
        missing = sorted(set(results) - written)
        if missing:
            raise QuantizeError(f"{source.label}: no stored weight for quantized layers {missing[:5]}")
        metadata = source.metadata()
        metadata[S.META_CONFIG] = _config_text_with(source.config, _quantization_config(options, source.config.get("quantization_config")))
        metadata[S.META_LAYOUT] = json.dumps({
            "shards": {"model.safetensors": names}, "shard_metadata": {"model.safetensors": {"format": "pt"}},
            "index_metadata": None, "sharded": False,
        })
        metadata[S.META_SOURCE] = _source_record(source, "ptq", options.as_dict())
        writer.commit(metadata)
    return 8.0 * q_bytes / q_numel if q_numel else 0.0


def _copy_group(source: _Source, layer: str, rows: list[str], writer: StoreWriter) -> list[str]:
    """A skipped layer that the source stores quantized: its rows copied verbatim (V2.1), or, from an old
    V1/V2 file, its weight dequantized to float16 (the old files' float dtype). Returns the export names."""
    assert isinstance(source, _ParquetSource)
    loader = source.loader
    if loader.version is not S.SchemaVersion.V2_1:
        weight = loader.load_weight(layer, "weight", dtype=torch.float16)
        writer.write(Row(f"{layer}.weight", weight, DENSE))
        return [f"{layer}.weight"]
    params: dict = {}
    for name in rows:
        info = loader.rows[name]
        params.update(info.params)
        # Legacy V2 columns are not carried over, so neither is a legacy quant_type that would promise them.
        writer.write(Row(name, loader.load_tensor(name), info.format, dict(info.params)))
    fmt = get_format(loader.rows[rows[0]].format)
    stored = [loader.rows[n].weight_name for n in rows]
    suffixes = fmt.hf_names(params, stored) if hasattr(fmt, "hf_names") else stored
    return [f"{layer}.{s}" if layer else s for s in suffixes]


def _write_gptq_dir(source: _Source, results: dict[str, ptq.QuantizedLinear], options: _Options, out: Path,
                    progress: bool) -> float:
    """Write OUT as an AutoGPTQ v1 directory; return the stored bits per weight of the quantized Linears."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .formats.gptq import pack_gptq

    scale_dtype = _TORCH_DTYPE_NAMES.get(str(source.config.get("torch_dtype") or source.config.get("dtype")), torch.float16)
    tensors: OrderedDict[str, torch.Tensor] = OrderedDict()
    groups = source.groups()
    q_bytes = q_numel = 0
    for layer, name in tqdm(source.items(), desc=f"pack {out.name}", unit="tensor", disable=not progress):
        if layer in results and (name == f"{layer}.weight" or name in groups.get(layer, ())):
            if f"{layer}.qweight" in tensors:
                continue
            q = results[layer]
            if int(q.zeros.min()) < 1:
                group = int((q.zeros < 1).nonzero()[0, 1])
                raise QuantizeError(f"layer {layer!r}: group {group} has zero point 0, which the GPTQ v1 layout "
                                    f"cannot store (it keeps zero - 1); use symmetric quantization or the parquet format")
            packed = pack_gptq(q.codes, q.zeros.t().contiguous(), q.scales.t().to(scale_dtype).contiguous(), q.g_idx, q.bits)
            for suffix, tensor in packed.items():
                tensors[f"{layer}.{suffix}"] = tensor
                q_bytes += tensor.numel() * tensor.element_size()
            q_numel += q.codes.numel()
        elif layer in groups and name in groups[layer]:
            # An HF loader expects one format: a skipped layer the source stores quantized goes dense.
            if f"{layer}.weight" not in tensors:
                tensors[f"{layer}.weight"] = source.loader.load_weight(layer, "weight", dtype=scale_dtype)
        else:
            tensors[name] = source.read(name)
    qconfig = {
        "quant_method": "gptq", "checkpoint_format": "gptq", "bits": options.bits, "group_size": options.group_size,
        "desc_act": options.act_order, "sym": options.symmetric, "static_groups": False, "true_sequential": True,
        "damp_percent": 0.01,
    }
    meta = source.metadata()
    with staged_directory(out) as tmp:  # out checked missing or empty before any work
        save_file(dict(tensors), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(_config_text_with(source.config, qconfig), encoding="utf-8")
        if meta.get(S.META_GENERATION_CONFIG) is not None:
            (tmp / "generation_config.json").write_text(meta[S.META_GENERATION_CONFIG], encoding="utf-8")
        for file_name, data in json.loads(meta.get(S.META_FILES, "{}")).items():
            (tmp / file_name).write_bytes(base64.b64decode(data))
    return 8.0 * q_bytes / q_numel if q_numel else 0.0


def _quantize_ptq(src, out: Path, options: _Options, out_format: str, progress: bool) -> QuantizeResult:
    start = time.perf_counter()
    source = _open_source(src, out.parent, progress)
    streamed = options.method != "gptq" and out_format == "parquet"
    try:
        # RTN needs no calibration: one weight at a time is read, quantized, written and dropped, so memory
        # stays near the largest tensor. GPTQ needs the model's activations and loads it.
        results = _StreamedRTN(source, options) if streamed else _run_ptq(source, options, out_format, progress)
        writer = _write_parquet if out_format == "parquet" else _write_gptq_dir
        bpw = writer(source, results, options, out, progress)
    finally:
        source.close()
    return QuantizeResult(out, "ptq", options.method, out_format, options.as_dict(), sorted(results), bpw,
                          time.perf_counter() - start, None if streamed else results)


class _StreamedRTN(Mapping):
    """Layer -> its RTN ``QuantizedLinear``, computed when asked for and not kept (see ``_quantize_ptq``).

    Which Linears to quantize comes from the architecture built on the meta device (no weights), with
    the same skip list and tied-embedding check as the in-memory path."""

    def __init__(self, source: _Source, options: _Options):
        self.source, self.options = source, options
        self.names = list(_quantizable_linears(source, _meta_model(source), options))

    def __getitem__(self, layer: str) -> ptq.QuantizedLinear:
        if layer not in self.names:
            raise KeyError(layer)
        groups = self.source.groups()
        if layer in groups:  # stored quantized in the source: its dequantized weight
            weight = self.source.loader.load_weight(layer, "weight", dtype=torch.float32)
        else:
            weight = self.source.read(f"{layer}.weight").to(torch.float32)
        try:
            return ptq.quantize_rtn(weight, self.options.bits, self.options.group_size, self.options.symmetric,
                                    name=layer)
        except ValueError as exc:
            raise QuantizeError(f"{self.source.label}: {exc}") from None

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _meta_model(source: _Source, buffers: bool = False) -> torch.nn.Module:
    """The source's architecture with no weights (the meta device): the class its ``architectures``
    name, as ``source.model()`` builds it (an HF directory loads as a causal LM). ``buffers``: keep the
    buffers real (rotary frequencies, computed at construction), so the model can run once its
    parameters are given."""
    import transformers
    from accelerate import init_empty_weights

    raw = json.loads(json.dumps(source.config))
    raw.pop("quantization_config", None)
    model_type = raw.pop("model_type", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **raw)
        if isinstance(source, _ParquetSource):
            from .modeling import model_class

            cls = model_class(config, None)
        else:
            cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
        with init_empty_weights(include_buffers=not buffers):
            return cls._from_config(config, dtype=torch.float32).eval()
    except Exception as exc:
        raise QuantizeError(f"{source.label}: transformers cannot build the architecture ({exc})") from None


def _source_weight(source: _Source, name: str) -> torch.Tensor:
    """Parameter NAME in float32, as ``source.model()`` would hold it (a layer the source stores
    quantized arrives dequantized)."""
    layer, _, leaf = name.rpartition(".")
    if leaf == "weight" and layer in source.groups():
        return source.loader.load_weight(layer, "weight", dtype=torch.float32)
    if name not in source.stored:
        raise QuantizeError(f"{source.label}: no stored tensor {name!r} for the model's parameter of that name")
    return source.read(name).to(torch.float32)


def _set_parameters(module: torch.nn.Module, values) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for name, _ in list(module.named_parameters()):
        value = values(name)
        set_module_tensor_to_device(module, name, "cpu" if value is not None else "meta", value=value)


def _skeleton_model(source: _Source) -> torch.nn.Module:
    """The float32 model for GPTQ with its decoder layers left on the meta device (``_SourceLayers``
    loads one at a time) and the output embeddings too (GPTQ's forwards stop inside the last layer)."""
    model = _meta_model(source, buffers=True)
    try:
        prefix, _ = ptq.find_decoder_layers(model)
    except ValueError as exc:
        raise QuantizeError(f"{source.label}: {exc}") from None
    head = model.get_output_embeddings()
    skipped = {f"{prefix}."} | ({n + "." for n, m in model.named_modules() if m is head} if head is not None else set())
    _set_parameters(model, lambda name: None if any(name.startswith(s) for s in skipped) else _source_weight(source, name))
    return model


class _SourceLayers:
    """``ptq.LayerWeights`` reading a decoder layer's parameters from the source, in float32."""

    def __init__(self, source: _Source):
        self.source = source

    def load(self, prefix: str, layer: torch.nn.Module) -> None:
        _set_parameters(layer, lambda name: _source_weight(self.source, f"{prefix}.{name}"))

    def release(self, layer: torch.nn.Module) -> None:
        _set_parameters(layer, lambda name: None)
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the allocator's free pages back to the OS. Without it glibc keeps each layer's freed
    temporaries, and peak RSS grows by ~100 MB per layer of a 1 B model; elsewhere a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ==================================================================================================
# AngelSlim backend
# ==================================================================================================


def write_calibration_jsonl(tokenizer, path: Path, n_samples: int, seq_len: int, seed: int) -> int:
    """AngelSlim calibration lines from the same corpus windows our GPTQ uses; returns the line count.

    Each line is ``{"applied_message": text}``: AngelSlim's TextDataset tokenizes that text as it is
    (no chat template, which base models and our tiny tokenizers do not have).
    """
    ids = corpus.calibration_samples(tokenizer, n_samples, seq_len, seed, name=CALIBRATION_CORPUS)
    with path.open("w", encoding="utf-8") as handle:
        for row in ids:
            handle.write(json.dumps({"applied_message": tokenizer.decode(row.tolist())}, ensure_ascii=False) + "\n")
    return int(ids.shape[0])


ANGELSLIM_MODULES = ("angelslim", "torch", "transformers", "yaml")


def angelslim_missing(python: str | os.PathLike | None = None) -> str | None:
    """Why the AngelSlim backend cannot run here (None: its env looks complete). Fast: nothing is imported."""
    python = Path(python) if python else ANGELSLIM_PYTHON
    if not python.exists():
        return (f"{python} does not exist; build the isolated AngelSlim environment with `make angelslim-env`")
    if not ANGELSLIM_SCRIPT.is_file():
        return f"{ANGELSLIM_SCRIPT} is missing"
    probe = ("import importlib.util as u, sys; "
             f"print(','.join(m for m in {ANGELSLIM_MODULES!r} if u.find_spec(m) is None))")
    try:
        completed = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run ({exc}); rebuild it with `make angelslim-env`"
    missing = completed.stdout.strip()
    if completed.returncode != 0 or missing:
        detail = f"missing modules: {missing}" if missing else completed.stderr.strip()[-300:]
        return f"the AngelSlim environment of {python} is incomplete ({detail}); rebuild it with `make angelslim-env`"
    return None


def _angelslim_failure(method: str, out_dir: Path, completed: subprocess.CompletedProcess) -> AngelSlimError:
    report_path = out_dir / "run_ptq_report.json"
    detail = None
    if report_path.is_file():
        try:
            error = json.loads(report_path.read_text()).get("error") or {}
            if error:
                detail = f"step {error.get('step')!r}: {error.get('type')}: {error.get('message')}"
        except json.JSONDecodeError:
            pass
    tail = "\n".join([line for line in (completed.stderr or "").splitlines() if line.strip()][-15:])
    return AngelSlimError(
        f"AngelSlim {method} failed (exit {completed.returncode})"
        + (f" at {detail}" if detail else "") + (f"\n--- AngelSlim stderr (last lines) ---\n{tail}" if tail else "")
    )


ANGELSLIM_TIMEOUT_S = 3600  # the slowest method on a 1-2 B model on this CPU takes well under this


def run_angelslim(src, out_dir: str | os.PathLike, method: str, calib_samples: int = 32, calib_seq_len: int = 256,
                  seed: int = 0, progress: bool = True, python: str | os.PathLike | None = None,
                  group_size: int | None = None, timeout_s: float = ANGELSLIM_TIMEOUT_S) -> Path:
    """Run AngelSlim's PTQ on SRC in ``.venv-angelslim`` and keep its own output directory at ``out_dir``
    (atomically: after an error nothing is there). Returns ``out_dir``. A run that is killed, takes longer
    than ``timeout_s`` or leaves an incomplete output fails with that reason (``AngelSlimError``)."""
    from transformers import AutoTokenizer

    from .sources import open_checkpoint, resolve_source

    python = Path(python) if python else ANGELSLIM_PYTHON
    out_dir = Path(out_dir)
    if method not in ANGELSLIM_METHODS:
        hint = " (one of ours: pass backend='ptq')" if method in PTQ_METHODS else ""
        raise QuantizeError(f"unknown AngelSlim method {method!r}{hint}; supported: {list(ANGELSLIM_METHODS)}")
    if group_size is not None and method not in ANGELSLIM_GROUP_METHODS:
        raise QuantizeError(f"AngelSlim {method} takes no group size (only {sorted(ANGELSLIM_GROUP_METHODS)})")
    problem = angelslim_missing(python)
    if problem:
        raise QuantizeError(f"AngelSlim backend: {problem}")
    if calib_samples < 1 or calib_seq_len < 2:
        raise QuantizeError(f"calib_samples must be >= 1 and calib_seq_len >= 2, got {calib_samples}, {calib_seq_len}")
    _check_output(out_dir, "gptq")  # a new or empty directory
    work = Path(tempfile.mkdtemp(prefix=".llmc-angelslim-", dir=out_dir.parent)).resolve()  # absolute: cwd differs
    try:
        if Path(src).is_file():
            model_dir = export_to_hf(src, work / "model", progress=progress)
        else:
            model_dir = resolve_source(src).resolve()  # the subprocess runs in the repo root
        if open_checkpoint(model_dir).quantization_config:
            raise QuantizeError(f"{src}: AngelSlim quantizes an unquantized checkpoint; this one already has a "
                                f"quantization_config")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:
            raise QuantizeError(f"{src}: no usable tokenizer for AngelSlim's calibration data ({exc})") from None
        calib = work / "calib.jsonl"
        write_calibration_jsonl(tokenizer, calib, calib_samples, calib_seq_len, seed)
        result_dir = work / "angelslim"
        command = [str(python), str(ANGELSLIM_SCRIPT), "--model", str(model_dir), "--method", method,
                   "--out", str(result_dir), "--calib", str(calib), "--num-samples", str(calib_samples),
                   "--seq-len", str(calib_seq_len)] + (["--group-size", str(group_size)] if group_size else [])
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env.pop("PYTHONPATH", None)  # the isolated env must not see this project's packages
        if progress:
            print(f"AngelSlim {method}: {' '.join(command)}", file=sys.stderr)
        try:
            completed = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT),
                                       timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AngelSlimError(f"AngelSlim {method} did not finish within {timeout_s:g} s: stopped, its partial "
                                 f"output removed") from None
        if completed.returncode < 0:
            raise AngelSlimError(f"AngelSlim {method} was killed by {signal.Signals(-completed.returncode).name}; "
                                 f"its partial output removed")
        if completed.returncode != 0:
            raise _angelslim_failure(method, result_dir, completed)
        missing = [what for what, present in (("config.json", (result_dir / "config.json").is_file()),
                                              ("*.safetensors", any(result_dir.glob("*.safetensors")))) if not present]
        if missing:
            raise AngelSlimError(f"AngelSlim {method} exited 0 but its output is incomplete (no {', '.join(missing)} "
                                 f"in {result_dir.name}); removed")
        # Provenance travels with the output (and, converted, inside the Parquet file as a side file).
        (result_dir / "llmc_quantize.json").write_text(json.dumps(
            {"source": str(src), "backend": "angelslim", "method": method, "group_size": group_size,
             "calibration": _calibration_record(calib_samples, calib_seq_len, seed), "llmc_version": __version__},
            indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(result_dir, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _quantize_angelslim(src, out: Path, method: str, calib_samples: int, calib_seq_len: int, seed: int,
                        progress: bool, python: Path, group_size: int | None = None) -> QuantizeResult:
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".llmc-angelslim-out-", dir=out.parent)).resolve()
    try:
        result_dir = run_angelslim(src, work / "angelslim", method, calib_samples, calib_seq_len, seed, progress,
                                   python, group_size)
        HuggingFaceToParquetConverter(progress=progress).convert(result_dir, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    options = {"method": method, "calibration": _calibration_record(calib_samples, calib_seq_len, seed)}
    if group_size:
        options["group_size"] = group_size
    loader = WeightLoaderV2(out)
    layers = sorted({info.layer_name for info in loader.rows.values() if info.format != DENSE})
    from .catalog import summary

    return QuantizeResult(out, "angelslim", method, "parquet", options, layers,
                          summary(loader)["quantized_bits_per_weight"], time.perf_counter() - start)


# ==================================================================================================
# Public API
# ==================================================================================================


def quantize(
    src: str | os.PathLike,
    out: str | os.PathLike,
    method: str = "int8",
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    skip: Sequence[str] | None = None,
    act_order: bool = False,
    calib_samples: int = 128,
    calib_seq_len: int = 256,
    seed: int = 0,
    out_format: str = "parquet",
    backend: str = "ptq",
    progress: bool = True,
    compare_backends: Sequence[str] | None = None,
    angelslim_python: str | os.PathLike | None = None,
    evaluate_kwargs: dict[str, Any] | None = None,
) -> QuantizeResult | ComparisonResult:
    """Quantize SRC (HF directory, hub id or Parquet file) into OUT.

    Args:
        method: backend ``ptq``: ``int8`` (RTN, per channel, symmetric), ``int4`` (RTN, group 128,
            symmetric), ``int2`` (RTN, group 128, asymmetric) or ``gptq`` (4 bits, group 128, symmetric);
            backend ``angelslim``: one of ``ANGELSLIM_METHODS``.
        bits: only for ``gptq`` (2..8); for the RTN methods it must match the name.
        group_size: -1 per channel, else the input columns per group (default per method, above).
        symmetric: None takes the method's default.
        skip: module-name patterns (substring or regex) left dense; default ``("lm_head", "embed")``.
        act_order: GPTQ's activation order (columns by descending Hessian diagonal).
        calib_samples, calib_seq_len, seed: GPTQ / AngelSlim calibration windows from the train split of
            the offline corpus (``corpus.calibration_samples``).
        out_format: ``parquet`` (a ``ptq``-format weight file) or ``gptq`` (an AutoGPTQ v1 HF directory).
        backend: ``ptq`` (ours) or ``angelslim`` (needs ``.venv-angelslim``, ``make angelslim-env``).
        compare_backends: e.g. ``("ptq", "angelslim")``: quantize with each (the method is mapped to its
            counterpart, e.g. int8 <-> int8_dynamic, gptq <-> int4_gptq) into ``OUT`` with the backend
            name inserted before the suffix, then evaluate each against SRC with
            ``evaluation.evaluate`` (``evaluate_kwargs`` passed on; ``perf`` defaults to False there);
            returns a ``ComparisonResult``.
        angelslim_python: the AngelSlim env's python (default ``.venv-angelslim/bin/python``).

    Returns a ``QuantizeResult`` (or a ``ComparisonResult`` with ``compare_backends``).
    Raises ``QuantizeError`` (a ``StoreError``/``ValueError``) naming the file, layer or option on bad
    input, and ``AngelSlimError`` with AngelSlim's own message when its run fails. OUT is written
    atomically: after an error it does not exist.
    """
    out = Path(out)
    if compare_backends:
        return _compare(src, out, method, tuple(compare_backends), bits=bits, group_size=group_size,
                        symmetric=symmetric, skip=skip, act_order=act_order, calib_samples=calib_samples,
                        calib_seq_len=calib_seq_len, seed=seed, progress=progress, angelslim_python=angelslim_python,
                        evaluate_kwargs=evaluate_kwargs)
    if backend not in BACKENDS:
        raise QuantizeError(f"unknown backend {backend!r}; supported: {list(BACKENDS)}")
    if out_format not in OUT_FORMATS:
        raise QuantizeError(f"unknown output format {out_format!r}; supported: {list(OUT_FORMATS)}")
    if backend == "angelslim":
        given = {k: v for k, v in (("bits", bits), ("symmetric", symmetric), ("skip", skip)) if v is not None}
        if group_size is not None and method not in ANGELSLIM_GROUP_METHODS:
            given["group_size"] = group_size
        if act_order:
            given["act_order"] = True
        if given:
            raise QuantizeError(f"AngelSlim's methods fix their own settings; {sorted(given)} apply to backend 'ptq' only "
                                f"(group_size also to AngelSlim's {sorted(ANGELSLIM_GROUP_METHODS)})")
        if out_format != "parquet":
            raise QuantizeError("backend 'angelslim' writes Parquet only (AngelSlim's own directory is converted)")
        _check_output(out, out_format)
        python = Path(angelslim_python) if angelslim_python else ANGELSLIM_PYTHON
        return _quantize_angelslim(src, out, method, calib_samples, calib_seq_len, seed, progress, python, group_size)
    options = _ptq_options(method, bits, group_size, symmetric, skip, act_order, calib_samples, calib_seq_len, seed,
                           out_format)
    _check_output(out, out_format)
    return _quantize_ptq(src, out, options, out_format, progress)


def backend_output(out: Path, backend: str) -> Path:
    """Where ``compare_backends`` writes one backend's output: ``x.parquet`` -> ``x.<backend>.parquet``."""
    return out.with_name(f"{out.stem}.{backend}{out.suffix}")


def _compare(src, out: Path, method: str, backends: tuple[str, ...], evaluate_kwargs: dict[str, Any] | None,
             angelslim_python, **options: Any) -> ComparisonResult:
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or len(set(backends)) != len(backends) or len(backends) < 2:
        raise QuantizeError(f"compare_backends takes two or more distinct backends of {list(BACKENDS)}, got {list(backends)}")
    methods: dict[str, str] = {}
    for backend in backends:
        own = PTQ_METHODS if backend == "ptq" else ANGELSLIM_METHODS
        counterpart = method if method in own else COUNTERPARTS[backend].get(method)
        if counterpart is None:
            raise QuantizeError(f"method {method!r} has no {backend} counterpart; pairs: "
                                f"{COUNTERPARTS['angelslim']} (ptq -> angelslim)")
        methods[backend] = counterpart
    # Validate every run's options before the first (possibly long) one starts.
    for backend in backends:
        if backend == "ptq":
            _ptq_options(methods["ptq"], options["bits"], options["group_size"], options["symmetric"], options["skip"],
                         options["act_order"], options["calib_samples"], options["calib_seq_len"], options["seed"], "parquet")
        elif (problem := angelslim_missing(angelslim_python)):
            raise QuantizeError(f"AngelSlim backend: {problem}")
        _check_output(backend_output(out, backend), "parquet")
    results: dict[str, QuantizeResult] = {}
    for backend in backends:
        kwargs = dict(options)
        if backend == "angelslim":  # AngelSlim fixes its own bits / groups / skip list
            kwargs.update(bits=None, group_size=None, symmetric=None, skip=None, act_order=False)
        results[backend] = quantize(src, backend_output(out, backend), methods[backend], backend=backend,
                                    angelslim_python=angelslim_python, **kwargs)
    try:
        from .evaluation import evaluate
    except ImportError:
        return ComparisonResult(results, None, "llm_compression.evaluation is not available: evaluate the outputs yourself")
    kwargs = {"perf": False, **(evaluate_kwargs or {})}  # accuracy comparison; perf subprocesses only on request
    evaluations = {b: evaluate(src, r.output, **kwargs) for b, r in results.items()}
    return ComparisonResult(results, evaluations, f"evaluated against {src} with evaluation.evaluate")


__all__ = [
    "ANGELSLIM_METHODS", "AngelSlimError", "BACKENDS", "ComparisonResult", "OUT_FORMATS", "PTQ_METHODS",
    "QuantizeError", "QuantizeResult", "angelslim_missing", "backend_output", "quantize", "run_angelslim",
    "write_calibration_jsonl",
]
