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

from llm_compression.schema import AiosQuant

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
