"""AI-OS's store, both ways: what AI-OS's own ``WeightLoader`` makes of a file, files AI-OS runs, and
AI-OS's files (or model directories) converted into ours.

AI-OS (github.com/pallasting/ArrowQuant_V2, ``llm_compression/inference/weight_loader.py``) reads a row
as follows; :func:`aios_reads` restates those rules so we can tell, per tensor, whether AI-OS gets our
value, raises, or silently gets another one:

* V1 file (no ``quant_type`` column), or a V2 row with ``quant_type`` fp16/fp32: the bytes as the dtype
  its ``dtype`` tag names (float32, float16, int64, int32, int8, uint8, bool; **any other tag as
  float32**), reshaped to ``shape``; float16 upcast to float32.
* Any other V2 row is read as codes: ``int2`` unpacked **high bits first**, everything else (including a
  quant_type it does not know) as int8, reshaped to ``shape``, then ``(q - zp) * scale`` from the
  float32 ``scales``/``zero_points`` bytes: per group of the flattened tensor when ``group_size > 0``,
  per tensor for ``quant_axis -1``, per index of axis 0 or 1, and per tensor for any other axis.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from llm_workbook import schema as S
from llm_workbook.errors import StoreError
from llm_workbook.formats import aios as aios_format
from llm_workbook.formats.base import Row

# AI-OS's dtype map; any other tag is read as float32.
AIOS_NUMPY = {"torch.float32": np.float32, "torch.float16": np.float16, "torch.int64": np.int64,
              "torch.int32": np.int32, "torch.int8": np.int8, "torch.uint8": np.uint8, "torch.bool": np.bool_}
MODEL_DIR_FILES = ("weights.parquet", "metadata.json", "tokenizer.json")


class AiosReadError(Exception):
    """What AI-OS's loader would raise on a row (its exception type and message)."""


def aios_reads(row: dict, has_quant_type: bool) -> np.ndarray:
    """The float array AI-OS's ``WeightLoader`` returns for one file row, or AiosReadError where it raises."""
    try:
        shape = row["shape"]
        data = row["data"]
        quant_type = row.get("quant_type") if has_quant_type else None
        if not has_quant_type or quant_type in ("fp16", "fp32"):
            array = np.frombuffer(data, dtype=AIOS_NUMPY.get(row["dtype"], np.float32)).reshape(shape)
            return array.astype(np.float32) if array.dtype == np.float16 else array
        if quant_type == "int2":
            codes = aios_format.unpack_int2(np.frombuffer(data, dtype=np.uint8), math.prod(shape), "msb").reshape(shape)
        else:
            codes = np.frombuffer(data, dtype=np.int8).reshape(shape)
        scales = np.frombuffer(row["scales"], dtype=np.float32)
        zero_points = np.frombuffer(row["zero_points"], dtype=np.float32)
        group = row.get("group_size") or 0
        axis = row["quant_axis"]
        q = codes.astype(np.float32)
        if group > 0:
            flat = q.reshape(-1)
            out = np.zeros_like(flat)
            for i in range(len(scales)):
                part = slice(i * group, min((i + 1) * group, flat.size))
                out[part] = (flat[part] - zero_points[i]) * scales[i]
            return out.reshape(q.shape)
        if axis in (0, 1):
            view = [1] * q.ndim
            view[axis] = -1
            return (q - zero_points[: q.shape[axis]].reshape(view)) * scales[: q.shape[axis]].reshape(view)
        return (q - zero_points[0]) * scales[0]
    except Exception as exc:  # whatever numpy raises there is what AI-OS raises
        raise AiosReadError(f"{type(exc).__name__}: {exc}") from None


@dataclass
class AiosFinding:
    tensor: str
    outcome: str  # "reads right" | "raises" | "reads wrong"
    detail: str = ""


def aios_findings(path: str | os.PathLike, loader=None) -> list[AiosFinding]:
    """Per tensor: does AI-OS's loader get the value we read (``loader``: our WeightLoaderV2 of ``path``)?"""
    from llm_workbook.store.loader import WeightLoaderV2

    loader = loader or WeightLoaderV2(path)
    try:
        table = pq.read_table(path)  # what AI-OS does: the whole table
    except (pa.ArrowException, OSError) as exc:  # what AI-OS's loader would meet too: a page ours never reads
        raise StoreError(f"{path}: AI-OS's loader cannot read the file ({exc})") from None
    has_quant_type = S.QUANT_TYPE in table.schema.names
    findings = []
    for row in table.to_pylist():
        name = row[S.LAYER_NAME]
        if row.get(S.CHUNK):
            continue  # later chunks: the first one decides
        try:
            got = aios_reads(row, has_quant_type)
        except AiosReadError as exc:
            findings.append(AiosFinding(name, "raises", str(exc)))
            continue
        ours = _our_value(loader, name)
        if ours is None:
            findings.append(AiosFinding(name, "reads wrong", "AI-OS returns a tensor we do not store under this name"))
        elif tuple(got.shape) != tuple(ours.shape) or not np.array_equal(got.astype(np.float64), ours.astype(np.float64)):
            diff = (float(np.abs(got.astype(np.float64) - ours.astype(np.float64)).max())
                    if got.shape == ours.shape else f"shape {list(got.shape)}")
            findings.append(AiosFinding(name, "reads wrong", f"differs from the stored value (max |diff| {diff})"))
        else:
            findings.append(AiosFinding(name, "reads right"))
    return findings


def _our_value(loader, name: str) -> np.ndarray | None:
    if name not in loader.rows:
        return None
    info = loader.rows[name]
    if info.format == aios_format.NAME:
        return loader.tensor_record(name).dequantize(torch.float32).numpy()
    if info.format == "ptq" and info.quant_type == "int8":
        layer, _ = S.split_name(name)
        return loader.load_weight(layer, "weight").numpy()
    tensor = loader.load_tensor(name)
    if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
        return tensor.float().numpy()
    return tensor.numpy()


def summarize_findings(findings: list[AiosFinding]) -> dict:
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.outcome] = counts.get(f.outcome, 0) + 1
    wrong = [f"{f.tensor}: {f.detail}" for f in findings if f.outcome == "reads wrong"]
    raises = sorted({f.detail.split(":")[0] for f in findings if f.outcome == "raises"})
    return {"tensors": len(findings), **counts, "reads_wrong": wrong, "raises_with": raises}


# --- our files -> AI-OS ----------------------------------------------------------------------------------


@dataclass
class AiosExport:
    output: Path
    rows: dict[str, int]  # how each tensor was written -> count
    widened: list[str]  # tensors written as float32 because AI-OS has no exact form for them


def export_aios(parquet_path: str | os.PathLike, output: str | os.PathLike, progress: bool = True) -> AiosExport:
    """Write ``output`` as AI-OS's V2 (only its ten columns): every tensor equal to what our loader gives.

    * float32 / float16 arrays: fp32 / fp16 rows (tag and bytes agree);
    * AI-OS int8/int2 rows: kept (int2 packed in the order AI-OS's loader reads);
    * our int8 per-channel rows: int8 rows with the same codes and scales;
    * everything else (bf16, FP8, GPTQ, AWQ, NVFP4, GGUF blocks, packed low-bit codes): the dequantized
      weight as float32 rows, listed in ``widened``: exact in value, but as large as float32.
    ``output`` may also be a directory: AI-OS's model directory (``weights.parquet``, ``metadata.json``,
    ``tokenizer.json``).
    """
    from tqdm.auto import tqdm

    from llm_workbook.store.atomic import temp_path
    from llm_workbook.store.writer import staged_directory
    from llm_workbook.store.loader import WeightLoaderV2

    loader = WeightLoaderV2(parquet_path)
    out = Path(output)
    as_directory = out.suffix != ".parquet"
    if as_directory and out.exists() and any(out.iterdir()):
        raise StoreError(f"{out}: output directory exists and is not empty")
    if not out.parent.is_dir():
        raise StoreError(f"{out}: parent directory {out.parent} does not exist")
    counts: dict[str, int] = {}
    widened: list[str] = []

    def write(target: Path) -> None:
        tmp = temp_path(target)
        writer = pq.ParquetWriter(tmp, S.WEIGHT_SCHEMA_V2)
        try:
            for name in tqdm(loader.keys(), desc="export aios-v2", unit="tensor", disable=not progress):
                row, how = _aios_row(loader, name)
                counts[how] = counts.get(how, 0) + 1
                if how.startswith(("fp32 (dequantized", "fp32 (bf16")):
                    widened.append(name)
                writer.write_table(pa.Table.from_pylist([row], schema=S.WEIGHT_SCHEMA_V2))
            writer.add_key_value_metadata({S.META_INT2_ORDER: "msb"})
            writer.close()
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            try:
                writer.close()
            except BaseException:
                pass
            tmp.unlink(missing_ok=True)
            raise

    if as_directory:
        with staged_directory(out) as tmp_dir:
            write(tmp_dir / "weights.parquet")
            (tmp_dir / "metadata.json").write_text(json.dumps(model_metadata(loader), indent=2) + "\n")
            if "tokenizer.json" in loader.files:
                (tmp_dir / "tokenizer.json").write_bytes(loader.files["tokenizer.json"])
    else:
        write(out)
    return AiosExport(out, counts, widened)


def _aios_row(loader, name: str) -> tuple[dict, str]:
    layer, weight = S.split_name(name)
    info = loader.rows.get(name)
    if info is not None and info.format == aios_format.NAME:
        row = loader.stored_row(name)  # int2 comes back msb first
        return _v2_row(name, row.data, row.aios), f"{row.aios.quant_type} (kept)"
    if info is not None and info.format == "dense" and info.dtype in ("F32", "F16"):
        tensor = loader.load_tensor(name)
        return _v2_row(name, tensor, None), "fp32" if info.dtype == "F32" else "fp16"
    if info is not None and info.format == "ptq" and name in loader._aios:
        quant = loader._aios[name]
        return _v2_row(name, loader.load_tensor(name), quant), "int8 (our per-channel codes)"
    tensor = loader.load_weight(layer, weight, dtype=torch.float32) if weight == "weight" else loader.load_weight(layer, weight)
    if not tensor.is_floating_point():
        raise StoreError(f"{loader.path}: tensor {name!r} ({tensor.dtype}) has no AI-OS form")
    kind = "fp32 (bf16 widened)" if info is not None and info.dtype == "BF16" else f"fp32 (dequantized {loader.format_of(layer) if weight == 'weight' else info.format})"
    return _v2_row(name, tensor.to(torch.float32), None), kind


def _v2_row(name: str, tensor: torch.Tensor, quant) -> dict:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if quant is None:
        code = S.dtype_code(tensor.dtype)
        return {S.LAYER_NAME: name, S.SHAPE: list(tensor.shape), S.DTYPE: S.dtype_name(code), S.DATA: data,
                S.NUM_PARAMS: tensor.numel(), S.QUANT_TYPE: "fp32" if code == "F32" else "fp16", S.SCALES: b"",
                S.ZERO_POINTS: b"", S.QUANT_AXIS: -1, S.GROUP_SIZE: 0}
    return {S.LAYER_NAME: name, S.SHAPE: list(quant.shape), S.DTYPE: S.dtype_name(quant.original_dtype), S.DATA: data,
            S.NUM_PARAMS: math.prod(quant.shape), S.QUANT_TYPE: quant.quant_type,
            S.SCALES: np.asarray(quant.scales, dtype="<f4").tobytes(),
            S.ZERO_POINTS: np.asarray(quant.zero_points, dtype="<f4").tobytes(),
            S.QUANT_AXIS: quant.quant_axis, S.GROUP_SIZE: quant.group_size}


def model_metadata(loader) -> dict:
    """AI-OS's ``metadata.json`` for a model directory (keys as AI-OS's ``tools/model_converter.py`` writes
    them; its engine reads ``model_info``), from the file's config."""
    import datetime as _dt

    config = loader.config
    text = config.get("text_config") or config
    architecture = (config.get("architectures") or ["Unknown"])[0]
    info = {
        "architecture": architecture,
        "embedding_dimension": text.get("hidden_size"),
        "max_seq_length": text.get("max_position_embeddings") or 512,
        "hidden_size": text.get("hidden_size"),
        "num_attention_heads": text.get("num_attention_heads"),
        "intermediate_size": text.get("intermediate_size"),
        "num_hidden_layers": text.get("num_hidden_layers"),
        "vocab_size": text.get("vocab_size"),
        "max_position_embeddings": text.get("max_position_embeddings"),
        "layer_norm_eps": text.get("layer_norm_eps", 1e-12),
    }
    for key in ("num_key_value_heads", "rms_norm_eps", "rope_theta"):
        if text.get(key) is not None:
            info[key] = text[key]
    entries = {name: loader.rows.get(name) for name in loader.keys()}
    return {
        "model_name": config.get("_name_or_path") or Path(str(loader.path)).stem,
        "model_type": "causallm" if architecture.endswith("CausalLM") else "transformers",
        "model_info": info,
        "total_parameters": sum(math.prod(i.params.get("weight_shape") or i.shape) for i in entries.values() if i),
        "num_layers": len(entries),
        "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "converter_version": "llmc export --format aios-v2",
    }


# --- AI-OS -> our store ----------------------------------------------------------------------------------


def convert_aios(source: str | os.PathLike, output: str | os.PathLike, progress: bool = True,
                 config_source: str | os.PathLike | None = None):
    """AI-OS's V1/V2 file (or model directory) -> our store, every tensor as its writer meant it.

    Float rows keep their bytes under an honest tag (fp16 rows tagged float32 become float16; bf16-tagged
    float32 bytes stay float32); int8/int2 rows keep codes and scales, int2 repacked in the order AI-OS's
    loader reads, so the result also reads right in AI-OS. A model directory's ``metadata.json`` and
    ``tokenizer.json`` travel in the file. AI-OS keeps no HF config: ``config_source`` (the model the file
    was quantized from: HF directory or weight file) lends its config.json and tokenizer files, so the result
    loads and runs on its own.
    """
    import base64
    import datetime as _dt

    from tqdm.auto import tqdm

    from llm_workbook.paths import __version__
    from llm_workbook.store.writer import ConversionReport, StoreWriter, write_error
    from llm_workbook.store.loader import WeightLoaderV2

    src = Path(source)
    weights = src / "weights.parquet" if src.is_dir() else src
    loader = WeightLoaderV2(weights)
    if not loader.version.is_aios:
        raise StoreError(f"{weights}: not an AI-OS V1/V2 file (schema {loader.version.value})")
    files = {}
    config_text = None
    if src.is_dir():
        for name in ("metadata.json", "tokenizer.json", "tokenizer_config.json", "config.json"):
            if (src / name).is_file():
                files[name] = base64.b64encode((src / name).read_bytes()).decode("ascii")
        if (src / "config.json").is_file():
            config_text = (src / "config.json").read_text(encoding="utf-8")
    if config_text is None and config_source is not None:
        config_text, lent = _config_and_tokenizer(config_source)
        files = {**{k: base64.b64encode(v).decode("ascii") for k, v in lent.items()}, **files}
    current = "(none)"
    try:
        with StoreWriter(output) as writer:
            for name in tqdm(loader.stored_keys(), desc=f"convert {src.name}", unit="tensor", disable=not progress):
                current = name
                writer.write(loader.stored_row(name))
            meta = {
                S.META_FILES: json.dumps(files),
                S.META_SOURCE: json.dumps({"source": str(source), "resolved": str(weights),
                                           "aios_schema": loader.version.value,
                                           "config_from": None if config_source is None else str(config_source),
                                           "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                           "llmc_version": __version__}),
            }
            if config_text is not None:
                meta[S.META_CONFIG] = config_text
            writer.commit(meta)
    except OSError as exc:
        raise write_error(output, current, exc) from None
    return ConversionReport(writer.url or Path(output), len(loader.rows), writer.row_groups, writer.bytes_written,
                            writer.formats)


def _config_and_tokenizer(source: str | os.PathLike) -> tuple[str, dict[str, bytes]]:
    """config.json and the side files (tokenizer and the rest) of a weight file, HF directory or hub id, as the
    store keeps them for any checkpoint."""
    from llm_workbook.store.source import Source

    source = Source.of(source)
    if source.is_parquet:
        lender = source.loader()
        if not lender.config_text:
            raise StoreError(f"{source}: no config.json inside the file to lend the AI-OS file")
        return lender.config_text, lender.files
    checkpoint = source.checkpoint()  # a clear error when config.json is missing
    return checkpoint.config_text, checkpoint.side_files


# --- what AI-OS's engine computes with ------------------------------------------------------------------


@dataclass
class AiosView:
    """An AI-OS file as AI-OS's own loader reads it: which tensors it reads wrong or fails on, and (when it
    loads at all) a weight file holding exactly what AI-OS computes with."""

    reads_wrong: list[str]
    raises: list[str]  # "tensor: error"
    parquet: Path | None  # None when AI-OS reads everything right, or cannot load the file

    @property
    def differs(self) -> bool:
        return bool(self.reads_wrong or self.raises)

    def as_dict(self) -> dict:
        return {"reads_wrong": len(self.reads_wrong), "raises": len(self.raises),
                "first_wrong": self.reads_wrong[:3], "first_raising": self.raises[:3],
                "loads_in_aios": not self.raises}


def aios_view(source: str | os.PathLike, converted: str | os.PathLike, output: str | os.PathLike) -> AiosView:
    """``source`` (an AI-OS file or model directory) as AI-OS's loader reads it. ``converted`` is the same file in
    our store (as its writer meant it); where AI-OS reads a tensor wrong, ``output`` gets AI-OS's value instead
    (float32), every other row is copied. Nothing is written when AI-OS reads everything right or raises."""
    from llm_workbook.store.writer import StoreWriter
    from llm_workbook.store.loader import WeightLoaderV2

    src = Path(source)
    weights = src / "weights.parquet" if src.is_dir() else src
    ours = WeightLoaderV2(converted)
    findings = aios_findings(weights, WeightLoaderV2(weights))
    wrong = [f.tensor for f in findings if f.outcome == "reads wrong"]
    raises = [f"{f.tensor}: {f.detail}" for f in findings if f.outcome == "raises"]
    if not wrong or raises:
        return AiosView(wrong, raises, None)
    table = pq.read_table(weights)
    has_quant_type = S.QUANT_TYPE in table.schema.names
    misread = set(wrong)
    with StoreWriter(output) as writer:
        for row in table.to_pylist():
            name = row[S.LAYER_NAME]
            if name in misread:
                writer.write(Row(name, torch.from_numpy(np.ascontiguousarray(aios_reads(row, has_quant_type))), "dense"))
            else:
                writer.write(ours.stored_row(name))
        meta = {k: v for k, v in ours.metadata.items() if k in (S.META_CONFIG, S.META_GENERATION_CONFIG, S.META_FILES)}
        meta[S.META_SOURCE] = json.dumps({"source": str(source), "view": "as AI-OS's own loader reads it"})
        writer.commit(meta)
    return AiosView(wrong, raises, Path(output))
