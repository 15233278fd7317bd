"""What a weight file holds: one entry per model parameter (quantized groups aggregated), and totals."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from llm_workbook.store.loader import AIOS, DENSE, WeightLoaderV2


@dataclass
class Entry:
    name: str  # parameter name in the dequantized model
    format: str
    dtype: str  # stored dtype(s), e.g. "I32+BF16"
    shape: tuple[int, ...]  # the parameter's shape (dequantized weight for quantized layers)
    bytes: int  # bytes stored for it (codes, scales, zeros, activation scales...)
    numel: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.numel if self.numel else 0.0


def entries(loader: WeightLoaderV2) -> list[Entry]:
    out = []
    groups: dict[str, list] = {}
    for info in loader.rows.values():
        if info.format == DENSE:
            out.append(Entry(info.tensor_name, DENSE, info.dtype, info.shape, info.nbytes, info.numel))
        elif info.format == AIOS:  # AI-OS codes: one parameter per row
            shape = tuple(info.params["weight_shape"])
            parameters = 4 * (len(info.params["scales"]) + len(info.params["zero_points"]))  # float32 each
            out.append(Entry(info.tensor_name, info.format, info.params["quant_type"], shape, info.nbytes + parameters,
                             math.prod(shape)))
        elif "gguf_shape" in info.params:  # GGML blocks: one parameter per row, its type is the "dtype"
            shape = tuple(reversed(info.params["gguf_shape"]))
            out.append(Entry(info.tensor_name, info.format, info.params["ggml_type_name"], shape, info.nbytes,
                             math.prod(shape)))
        else:
            groups.setdefault(info.layer_name, []).append(info)
    for layer, infos in groups.items():
        params: dict = {}
        for info in infos:
            params.update(info.params)
        shape = tuple(params.get("weight_shape") or max(infos, key=lambda i: i.numel).shape)
        numel = 1
        for d in shape:
            numel *= d
        dtypes = "+".join(dict.fromkeys(i.dtype for i in infos))
        name = f"{layer}.weight" if layer else "weight"
        out.append(Entry(name, infos[0].format, dtypes, shape, sum(i.nbytes for i in infos), numel))
    order = {n: i for i, n in enumerate(loader.keys())}
    out.sort(key=lambda e: order.get(e.name, len(order)))
    return out


def summary(loader: WeightLoaderV2) -> dict:
    items = entries(loader)
    total_bytes = sum(e.bytes for e in items)
    total_numel = sum(e.numel for e in items)
    # GGUF rows name their GGML type as dtype: plain float types are not quantized.
    quantized = [e for e in items if e.format != DENSE and e.dtype not in ("F32", "F16", "BF16", "F64")]
    q_bytes = sum(e.bytes for e in quantized)
    q_numel = sum(e.numel for e in quantized)
    bpw = 8.0 * total_bytes / total_numel if total_numel else 0.0
    return {
        "file": str(loader.path),
        "schema_version": loader.version.value,
        "tensors": len(items),
        "stored_arrays": len(loader.rows),
        "parameters": total_numel,
        "stored_bytes": total_bytes,
        "file_bytes": loader.file_bytes,
        "bits_per_weight": bpw,
        "compression_vs_bf16": 16.0 / bpw if bpw else 0.0,
        "quantized_tensors": len(quantized),
        "quantized_bits_per_weight": 8.0 * q_bytes / q_numel if q_numel else None,
        "formats": sorted({e.format for e in items}),
        "seq": seq_survey(loader),
    }


def seq_survey(loader: WeightLoaderV2) -> dict | None:
    """Which AngelSlim SEQ case the file is (``formats.seq.Survey``), from the exact source tensors; None when no
    weight has a ``weight_clip_val`` (only SEQ files pay for the pass over their projections)."""
    from llm_workbook.formats import seq

    pairs = seq.companions(loader.keys())
    if not pairs:
        return None
    tensors = loader.source_tensors()
    survey = seq.Survey()
    for weight, clip in sorted(pairs.items()):
        survey.add(weight, tensors[weight], tensors[clip])
    return survey.as_dict()


def as_dicts(items: list[Entry]) -> list[dict]:
    return [{**asdict(e), "bits_per_weight": e.bits_per_weight} for e in items]
