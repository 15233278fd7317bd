"""Exact low-bit grids inside dense weights (fake-quantized QAT exports such as HY-1.8B-2Bit, Sherry, ternary).

A dense encoder: for checkpoints without a quantization_config the converter offers every tensor no format
claimed to ``encode_dense``. A tensor is a candidate when it is a 2-D floating ``<module>.weight`` whose module
is not an embedding (last name segment containing ``embed``, or ``wte``/``wpe``/``shared``); norms and
biases are 1-D and never candidates. It is encoded when its values, compared as raw bit patterns (so ``-0.0``,
``+0.0`` and NaN payloads stay distinct), fit one of these 2-bit schemes, tried in order:

* ``row_levels``: at most 4 distinct values per output row (per-channel SEQ 2-bit, per-row ternary). Levels
  table ``[out, 4]``.
* ``group_ternary``: per group of ``g`` inputs (g = 128, 64 or 32, dividing ``in``) every magnitude is 0 or the
  group's ``d`` (ternary ``{-d, 0, +d}``, Sherry 3:4). Code bit 0 = magnitude is ``d``, bit 1 = sign bit;
  table ``[out, in/g]`` holds ``d``.
* ``group_levels``: at most 4 distinct values per group of ``g`` inputs (per-group 2-bit). Table ``[out, in/g, 4]``.

Stored rows (codes and tables replace the source tensor): ``<module>.grid_codes`` uint8 ``[out, ceil(in/4)]``
(4 codes per byte, LSB first, along ``in``) and ``<module>.grid_levels`` in the weight's own dtype. The params
record the scheme, original dtype, shape and xxh3 checksum. ``encode_dense`` decodes its own output and returns
None (store dense) unless the bytes are identical, and also when the encoding would not be at least 2x smaller:
the store never loses a bit. ``to_hf`` rebuilds the exact original ``weight`` and checks its checksum.
"""

from __future__ import annotations

import torch
import xxhash

from llm_workbook.formats import _bitpack
from llm_workbook.formats.base import QuantizedTensor, Row, StoreError, TensorInfo
from llm_workbook.schema import dtype_code, torch_dtype

NAME = "grid"
CODES = "grid_codes"
LEVELS = "grid_levels"
SOURCE_SUFFIX = "weight"
BITS = 2
MAX_LEVELS = 1 << BITS
GROUP_SIZES = (128, 64, 32)
SAMPLE_ROWS = 8
MIN_SAVING = 2.0  # encode only if the rows take at most half the dense bytes
INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}
EMBEDDING_NAMES = ("wte", "wpe", "shared")


# --------------------------------------------------------------------------------------------------
# Checkpoint-level verbs: an encoder never owns a whole checkpoint
# --------------------------------------------------------------------------------------------------


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    return False


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    return set()


def to_rows(qconfig: dict | None, module: str, tensors: dict[str, torch.Tensor]) -> list[Row]:
    raise StoreError(f"module {module}: grid rows come from encode_dense, never from a quantization_config")


# --------------------------------------------------------------------------------------------------
# Bit helpers
# --------------------------------------------------------------------------------------------------


def _int_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(INT_VIEW[tensor.element_size()])


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int codes ``[out, in]`` in [0, 3] -> uint8 ``[out, ceil(in/4)]``, 4 per byte, LSB first."""
    return _bitpack.pack(codes, 2)


def _unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 ``[out, ceil(in/4)]`` -> uint8 codes ``[out, in]``."""
    return _bitpack.unpack(packed, 2, in_features).to(torch.uint8)


def _checksum(tensor: torch.Tensor) -> str:
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(tensor.contiguous().view(torch.uint8).numpy())


# --------------------------------------------------------------------------------------------------
# Schemes: each works on the integer bit patterns ``bits`` [out, in]
# --------------------------------------------------------------------------------------------------


def _levels_of_rows(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows of ``bits`` [R, L] with <= 4 distinct patterns: (uint8 codes [R, L], levels [R, 4]), else None.

    Levels are found by repeated row minima (4 cheap passes instead of a sort); a row with fewer than 4
    distinct patterns repeats its largest one, so every code decodes to a value of the row.
    """
    top = torch.iinfo(bits.dtype).max
    levels = [bits.amin(dim=1, keepdim=True)]
    for _ in range(MAX_LEVELS - 1):
        nxt = bits.masked_fill(bits <= levels[-1], top).amin(dim=1, keepdim=True)
        # Nothing above the last level: repeat it. (A row really holding ``top``, a NaN pattern, is then
        # rejected by the final check below, so the sentinel never hides a value.)
        levels.append(torch.where(nxt == top, levels[-1], nxt))
    if bool((bits > levels[-1]).any()):
        return None
    codes = (bits > levels[0]).to(torch.uint8)
    codes += (bits > levels[1]).to(torch.uint8)
    codes += (bits > levels[2]).to(torch.uint8)
    return codes, torch.cat(levels, dim=1)


def _row_levels(bits: torch.Tensor):
    found = _levels_of_rows(bits)
    if found is None:
        return None
    codes, levels = found
    return {"scheme": "row_levels"}, codes, levels


def _group_levels(bits: torch.Tensor, group_size: int):
    out_features, in_features = bits.shape
    found = _levels_of_rows(bits.reshape(-1, group_size))
    if found is None:
        return None
    codes, levels = found
    return ({"scheme": "group_levels", "group_size": group_size}, codes.reshape(out_features, in_features),
            levels.reshape(out_features, in_features // group_size, MAX_LEVELS))


def _group_ternary(bits: torch.Tensor, group_size: int):
    out_features, in_features = bits.shape
    iinfo = torch.iinfo(bits.dtype)
    grouped = bits.reshape(out_features, -1, group_size)
    magnitude = grouped & iinfo.max
    d = magnitude.amax(dim=-1)
    nonzero = magnitude != 0
    if not bool((~nonzero | (magnitude == d.unsqueeze(-1))).all()):
        return None
    codes = nonzero.to(torch.uint8) | ((grouped < 0).to(torch.uint8) << 1)
    return {"scheme": "group_ternary", "group_size": group_size}, codes.reshape(out_features, in_features), d


def _select_levels(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``levels[r, codes[r, i]]`` for uint8 codes [R, L] and levels [R, 4] (3 selects, no int64 index)."""
    out = levels[:, :1].expand_as(codes)
    for k in range(1, MAX_LEVELS):
        out = torch.where(codes == k, levels[:, k : k + 1], out)
    return out


def _decode_bits(scheme: dict, codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Bit patterns [out, in] from uint8 codes [out, in] and the levels table (integer view)."""
    out_features, in_features = codes.shape
    name = scheme["scheme"]
    if name == "row_levels":
        return _select_levels(codes, levels)
    size = int(scheme["group_size"])
    if name == "group_levels":
        flat = _select_levels(codes.reshape(-1, size), levels.reshape(-1, MAX_LEVELS))
        return flat.reshape(out_features, in_features)
    if name == "group_ternary":
        iinfo = torch.iinfo(levels.dtype)
        grouped = codes.reshape(out_features, -1, size)
        d = levels.unsqueeze(-1)
        magnitude = torch.where((grouped & 1).bool(), d, torch.zeros((), dtype=levels.dtype))
        sign = torch.where((grouped & 2).bool(), torch.tensor(iinfo.min, dtype=levels.dtype),
                           torch.zeros((), dtype=levels.dtype))
        return (magnitude | sign).reshape(out_features, in_features)
    raise StoreError(f"unknown grid scheme {name!r}")


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------


def is_candidate(name: str, tensor: torch.Tensor) -> bool:
    """A 2-D float ``<module>.weight`` of a non-embedding module (the rule in the module docstring)."""
    module, _, suffix = name.rpartition(".")
    if suffix != SOURCE_SUFFIX or not module or tensor.dim() != 2 or tensor.numel() == 0:
        return False
    if not tensor.is_floating_point() or tensor.element_size() not in INT_VIEW:
        return False
    leaf = module.rpartition(".")[2].lower()
    return "embed" not in leaf and leaf not in EMBEDDING_NAMES


def _schemes(bits: torch.Tensor):
    """Candidate encoders in preference order (cheapest tables first)."""
    in_features = bits.shape[1]
    yield _row_levels
    sizes = [g for g in GROUP_SIZES if in_features % g == 0 and g < in_features]
    for g in sizes:
        yield lambda b, g=g: _group_ternary(b, g)
    for g in sizes:
        yield lambda b, g=g: _group_levels(b, g)


def encode_dense(name: str, tensor: torch.Tensor) -> list[Row] | None:
    """Rows that restore ``tensor`` bit-exactly from 2-bit codes and level tables, or None to store it dense."""
    if not is_candidate(name, tensor):
        return None
    tensor = tensor.contiguous()
    bits = _int_view(tensor)
    out_features, in_features = bits.shape
    dense_bytes = tensor.numel() * tensor.element_size()
    sample = bits[: min(out_features, SAMPLE_ROWS)]
    for scheme_fn in _schemes(bits):
        if scheme_fn(sample) is None:  # cheap rejection on a few rows before touching the whole tensor
            continue
        found = scheme_fn(bits)
        if found is None:
            continue
        scheme, codes, levels = found
        packed = _pack_codes(codes)
        table = levels.contiguous().view(tensor.dtype)
        if (packed.numel() + table.numel() * table.element_size()) * MIN_SAVING > dense_bytes:
            return None
        if not torch.equal(_decode_bits(scheme, _unpack_codes(packed, in_features), levels), bits):
            return None  # never lossy
        module = name.rpartition(".")[0]
        params = {
            **scheme,
            "bits": BITS,
            "dtype": dtype_code(tensor.dtype),
            "weight_shape": [out_features, in_features],
            "checksum": _checksum(tensor),
            "source_suffix": SOURCE_SUFFIX,
        }
        return [Row(f"{module}.{CODES}", packed, NAME, dict(params)),
                Row(f"{module}.{LEVELS}", table, NAME, dict(params))]
    return None


# --------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------


def _table_shape(params: dict, out_features: int, in_features: int) -> tuple[int, ...]:
    scheme = params.get("scheme")
    if scheme == "row_levels":
        return (out_features, MAX_LEVELS)
    size = int(params.get("group_size") or 0)
    if scheme not in ("group_levels", "group_ternary") or size <= 0 or in_features % size:
        raise StoreError(f"unknown grid scheme {scheme!r} / group size {params.get('group_size')!r}")
    groups = in_features // size
    return (out_features, groups, MAX_LEVELS) if scheme == "group_levels" else (out_features, groups)


def _restore(record: QuantizedTensor) -> torch.Tensor:
    params = record.params
    missing = [s for s in (CODES, LEVELS) if s not in record.tensors]
    if missing:
        raise StoreError(f"layer {record.layer_name}: grid rows {missing} are missing")
    out_features, in_features = (int(v) for v in params["weight_shape"])
    dtype = torch_dtype(params["dtype"])
    packed, table = record.tensors[CODES], record.tensors[LEVELS]
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (out_features, -(-in_features // 4)):
        raise StoreError(f"tensor {record.layer_name}.{CODES}: expected uint8 {[out_features, -(-in_features // 4)]}, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if table.dtype != dtype or tuple(table.shape) != _table_shape(params, out_features, in_features):
        raise StoreError(f"tensor {record.layer_name}.{LEVELS}: expected {params['dtype']} "
                         f"{list(_table_shape(params, out_features, in_features))}, got {table.dtype} {list(table.shape)}")
    bits = _decode_bits(params, _unpack_codes(packed, in_features), _int_view(table.contiguous()))
    return bits.view(dtype).reshape(out_features, in_features)


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The original weight (exact), cast to ``dtype``."""
    return _restore(record).to(dtype)


def hf_names(params: dict, stored_names: list[str]) -> list[str]:
    return [params.get("source_suffix", SOURCE_SUFFIX)]


def to_hf(record: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The exact source ``weight``, checked against the checksum taken at encode time."""
    weight = _restore(record)
    expected = record.params.get("checksum")
    if expected and _checksum(weight) != expected:
        raise StoreError(f"layer {record.layer_name}: rebuilt weight does not match its checksum {expected}")
    return {record.params.get("source_suffix", SOURCE_SUFFIX): weight}
