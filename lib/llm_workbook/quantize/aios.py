"""AI-OS's post-training quantization (its ``ArrowQuantizer``), written here from its documented rules
(github.com/pallasting/ArrowQuant_V2, ``llm_compression/inference/arrow_quantizer.py``), so that our
baseline is exactly what AI-OS's users keep:

* ``int8`` codes in [-128, 127], ``int2`` in [-2, 1];
* symmetric: ``scale = max|w| / qmax`` (1.0 when all zero), zero point 0; asymmetric:
  ``scale = (max - min) / (qmax - qmin)``, ``zero_point = clip(trunc(qmin - min / scale), qmin, qmax)``
  (scale 1, zero point 0 when max == min);
* ``q = clip(round(w / scale) + zero_point, qmin, qmax)``, all in float32, round half to even;
* per group of ``group_size`` consecutive elements of the flattened tensor when ``group_size > 0``,
  else per output row when ``per_channel`` and the tensor has two or more dimensions, else per tensor;
* ``calibration_method="gptq"``: per-row parameters fixed from the weight first, then every input column
  quantized in turn with its error spread over the columns after it through the inverse of
  ``H = 2 XᵀX / n + 0.01·mean(diag)·I`` (no blocks, no act-order); without calibration inputs, or for
  tensors that are not 2-D, it is the PTQ above.
"""

from __future__ import annotations

import numpy as np
import torch

from llm_workbook.schema import AiosQuant

QRANGE = {"int8": (-128, 127), "int2": (-2, 1)}


def _params(low: np.ndarray, high: np.ndarray, absmax: np.ndarray, quant_type: str, symmetric: bool):
    """Per-slice (scale, zero point) as float32 arrays, from each slice's min, max and max |w|."""
    qmin, qmax = QRANGE[quant_type]
    if symmetric:
        scales = np.where(absmax == 0, np.float32(1.0), absmax / np.float32(qmax)).astype(np.float32)
        return scales, np.zeros_like(scales)
    flat = high == low
    spread = np.where(flat, np.float32(1.0), (high - low) / np.float32(qmax - qmin)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.trunc(np.float32(qmin) - low / spread)
    zero = np.where(flat, 0, np.clip(zero, qmin, qmax)).astype(np.float32) + np.float32(0)  # -0.0 -> 0.0, as int() gives
    return spread, zero


def _codes(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray, quant_type: str) -> np.ndarray:
    qmin, qmax = QRANGE[quant_type]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.round(w / scales) + zeros
    q = np.where(scales == 0, 0, q)  # a scale that underflowed to 0 quantizes to zeros
    return np.clip(q, qmin, qmax).astype(np.int8)


def quantize_ptq(weight: np.ndarray, quant_type: str, per_channel: bool, symmetric: bool, group_size: int,
                 original_dtype: str = "F32") -> tuple[np.ndarray, AiosQuant]:
    """Signed codes (the tensor's shape) and their AI-OS parameters for one float32 tensor."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    shape = tuple(w.shape)
    if group_size > 0:
        flat = w.reshape(-1)
        starts = np.arange(0, flat.size, group_size)
        if flat.size == 0:
            return flat.astype(np.int8).reshape(shape), AiosQuant(quant_type, np.zeros(0, np.float32), np.zeros(0, np.float32), 0, group_size, shape, original_dtype)
        scales, zeros = _params(np.minimum.reduceat(flat, starts), np.maximum.reduceat(flat, starts),
                                np.maximum.reduceat(np.abs(flat), starts), quant_type, symmetric)
        index = np.arange(flat.size) // group_size
        codes = _codes(flat, scales[index], zeros[index], quant_type).reshape(shape)
        return codes, AiosQuant(quant_type, scales, zeros, 0, group_size, shape, original_dtype)
    if per_channel and w.ndim > 1:
        rows = w.reshape(shape[0], -1)
        scales, zeros = _params(rows.min(axis=1), rows.max(axis=1), np.abs(rows).max(axis=1), quant_type, symmetric)
        codes = _codes(rows, scales[:, None], zeros[:, None], quant_type).reshape(shape)
        return codes, AiosQuant(quant_type, scales, zeros, 0, 0, shape, original_dtype)
    if w.size == 0:
        scales, zeros = np.ones(1, np.float32), np.zeros(1, np.float32)
    else:
        scales, zeros = _params(w.min(keepdims=True).reshape(1), w.max(keepdims=True).reshape(1),
                                np.abs(w).max(keepdims=True).reshape(1), quant_type, symmetric)
    return _codes(w, scales[0], zeros[0], quant_type), AiosQuant(quant_type, scales, zeros, -1, 0, shape, original_dtype)


def quantize_gptq(weight: np.ndarray, calibration: torch.Tensor, quant_type: str, symmetric: bool,
                  original_dtype: str = "F32") -> tuple[np.ndarray, AiosQuant] | None:
    """AI-OS's GPTQ variant for a 2-D weight ``[out, in]``; None where it falls back to PTQ (no samples,
    a singular Hessian)."""
    out_features, in_features = weight.shape
    x = calibration.reshape(-1, in_features).float()
    if x.shape[0] == 0:
        return None
    hessian = 2 * (x.t() @ x) / x.shape[0]
    hessian += 0.01 * torch.mean(torch.diag(hessian)) * torch.eye(in_features)
    try:
        inverse = torch.linalg.inv(hessian)
    except RuntimeError:
        return None
    w = torch.from_numpy(np.array(weight, dtype=np.float32))
    rows = weight.astype(np.float32)
    scales, zeros = _params(rows.min(axis=1), rows.max(axis=1), np.abs(rows).max(axis=1), quant_type, symmetric)
    s, z = torch.from_numpy(scales), torch.from_numpy(zeros)
    qmin, qmax = QRANGE[quant_type]
    codes = torch.zeros_like(w)
    for i in range(in_features):
        q = torch.clamp(torch.round(w[:, i] / s + z), qmin, qmax)
        codes[:, i] = q
        err = (w[:, i] - (q - z) * s) / inverse[i, i]
        w[:, i:] -= err.unsqueeze(1) @ inverse[i, i:].unsqueeze(0)
    return codes.numpy().astype(np.int8), AiosQuant(quant_type, scales, zeros, 0, 0, (out_features, in_features),
                                                    original_dtype)


# --- a whole file ------------------------------------------------------------------------------------------

DEFAULT_INT2_GROUP = 128  # ArrowQuantizer's group for int2 without per_channel


def aios_options(quant_type: str, per_channel: bool = True, symmetric: bool = True, group_size: int = 0) -> dict:
    """ArrowQuantizer's settings after its own defaulting: int2 without per_channel and without a group
    size gets groups of 128."""
    if quant_type == "int2" and group_size == 0 and not per_channel:
        group_size = DEFAULT_INT2_GROUP
    return {"quant_type": quant_type, "per_channel": per_channel, "symmetric": symmetric, "group_size": group_size}


def tensor_row(loader, name: str, quant_type: str, per_channel: bool, symmetric: bool, group_size: int,
               keep_float: bool = False, calibration=None):
    """One tensor of ``loader`` as AI-OS's ArrowQuantizer stores it: int8/int2 codes (float16 for
    ``quant_type="fp16"`` and kept layers; integer buffers as they are)."""
    from llm_workbook import schema as S
    from llm_workbook.formats import aios as aios_format
    from llm_workbook.formats.base import Row

    layer, weight = S.split_name(name)
    tensor = loader.load_weight(layer, weight)
    if not tensor.is_floating_point():
        return Row(name, tensor, "dense")
    info = loader.rows.get(name)
    original = (info.params.get("original_dtype") or info.dtype) if info is not None else "F32"
    if original not in S.DTYPE_CODES:
        original = "F32"
    if quant_type == "fp16" or keep_float:
        return Row(name, tensor.to(torch.float16), "dense", {"original_dtype": original})
    values = tensor.to(torch.float32).numpy()
    result = None
    if calibration is not None and values.ndim == 2:
        result = quantize_gptq(values, torch.as_tensor(calibration), quant_type, symmetric, original)
    if result is None:
        result = quantize_ptq(values, quant_type, per_channel, symmetric, group_size, original)
    codes, quant = result
    return aios_format.encode(name, codes, quant)


def quantize_file(src, out, quant_type: str = "int8", per_channel: bool = True, symmetric: bool = True,
                  group_size: int = 0, mixed_precision_layers=(), progress: bool = True) -> float:
    """AI-OS's PTQ of every tensor of a weight file (or an HF directory, converted first) into ``out``:
    rows AI-OS's loader reads (int2 packed in its loader's order), with the source's config and tokenizer.
    Returns the bits per weight of the quantized tensors (codes, scales and zero points)."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from tqdm.auto import tqdm

    from llm_workbook.paths import __version__
    from llm_workbook import schema as S
    from llm_workbook.store.convert import HuggingFaceToParquetConverter
    from llm_workbook.store.writer import StoreWriter
    from llm_workbook.store.loader import WeightLoaderV2

    options = aios_options(quant_type, per_channel, symmetric, group_size)
    scratch = None
    source = Path(str(src))
    if not source.is_file():  # an HF directory (or hub id): its Parquet form first
        scratch = Path(tempfile.mkdtemp(prefix="llmc-aios-"))
        source = HuggingFaceToParquetConverter(progress=False, detect_grids=False).convert(src, scratch / "src.parquet").output
    try:
        loader = WeightLoaderV2(source)
        q_bits = q_numel = 0
        with StoreWriter(out) as writer:
            for name in tqdm(loader.keys(), desc=f"AI-OS {quant_type}", unit="tensor", disable=not progress):
                keep = any(pattern in name for pattern in mixed_precision_layers or ())
                row = tensor_row(loader, name, keep_float=keep, **options)
                writer.write(row)
                if row.aios is not None:
                    numel = int(np.prod(row.aios.shape))
                    q_numel += numel
                    q_bits += 8 * (row.data.numel() + 8 * row.aios.scales.size)
            meta = {k: v for k, v in loader.metadata.items()
                    if k in (S.META_CONFIG, S.META_GENERATION_CONFIG, S.META_FILES)}
            meta[S.META_SOURCE] = json.dumps({"source": str(src), "quantizer": "aios-arrowquantizer",
                                              "options": {**options, "mixed_precision_layers": list(mixed_precision_layers or ())},
                                              "llmc_version": __version__})
            writer.commit(meta)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return q_bits / q_numel if q_numel else 0.0


def as_aios_reads(src, out, progress: bool = True) -> int:
    """``src`` as AI-OS's own loader would see it had AI-OS's writer made it: int2 codes packed low bits first
    (its writer) and unpacked high bits first (its loader). The misread codes are stored as int2 rows (in the
    order that reads back as stored), so the file evaluates to what AI-OS computes with today. Returns how
    many tensors change."""
    import json

    from tqdm.auto import tqdm

    from llm_workbook import schema as S
    from llm_workbook.formats import aios as aios_format
    from llm_workbook.store.writer import StoreWriter
    from llm_workbook.store.loader import WeightLoaderV2

    loader = WeightLoaderV2(src)
    changed = 0
    with StoreWriter(out) as writer:
        for name in tqdm(loader.stored_keys(), desc="as AI-OS reads it", unit="tensor", disable=not progress):
            info = loader.rows[name]
            if info.format == aios_format.NAME and info.params.get("quant_type") == "int2":
                record = loader.tensor_record(name)
                codes, quant = aios_format.codes_of(record), aios_format.quant_of(record)
                misread = aios_format.unpack_int2(aios_format.pack_int2(codes, "lsb"), codes.size, "msb")
                changed += int(not np.array_equal(misread, codes))
                writer.write(aios_format.encode(name, misread.reshape(quant.shape), quant))
            else:
                writer.write(loader.stored_row(name))
        meta = {k: v for k, v in loader.metadata.items() if k in (S.META_CONFIG, S.META_GENERATION_CONFIG, S.META_FILES)}
        meta[S.META_SOURCE] = json.dumps({"source": str(src), "view": "as AI-OS's loader reads AI-OS's own int2 files"})
        writer.commit(meta)
    return changed
