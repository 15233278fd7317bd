"""What ``llmc quantize`` writes: a Parquet file of ``ptq`` rows, or an AutoGPTQ v1 directory."""

from __future__ import annotations

import base64
import datetime as _dt
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from llm_workbook.paths import __version__
from llm_workbook import quantize as ptq
from llm_workbook import names, schema as S
from llm_workbook.errors import QuantizeError
from llm_workbook.formats import get_format
from llm_workbook.formats import ptq as ptq_format
from llm_workbook.formats.base import Row
from llm_workbook.quantize.options import TORCH_DTYPE_NAMES, Options
from llm_workbook.quantize.sources import ParquetSource, QuantizeSource
from llm_workbook.store.writer import StoreWriter, staged_directory
from llm_workbook.store.loader import DENSE


def quantization_config(options: Options, source_qconfig: dict | None) -> dict[str, Any]:
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


def config_text_with(config: dict, qconfig: dict[str, Any] | None) -> str:
    raw = dict(config)
    raw.pop("quantization_config", None)
    if qconfig is not None:
        raw["quantization_config"] = qconfig
    return json.dumps(raw, indent=2, sort_keys=False) + "\n"


def source_record(source: QuantizeSource, backend: str, options: dict[str, Any]) -> str:
    return json.dumps({
        "source": source.label,
        "quantized_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "llmc_version": __version__,
        "quantize": {"backend": backend, **options},
    })


def write_parquet(source: QuantizeSource, results: dict[str, ptq.QuantizedLinear], options: Options, out: Path,
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
        metadata[S.META_CONFIG] = config_text_with(source.config, quantization_config(options, source.config.get("quantization_config")))
        metadata[S.META_LAYOUT] = json.dumps({
            "shards": {"model.safetensors": names}, "shard_metadata": {"model.safetensors": {"format": "pt"}},
            "index_metadata": None, "sharded": False,
        })
        metadata[S.META_SOURCE] = source_record(source, "ptq", options.as_dict())
        writer.commit(metadata)
    return 8.0 * q_bytes / q_numel if q_numel else 0.0


def _copy_group(source: QuantizeSource, layer: str, rows: list[str], writer: StoreWriter) -> list[str]:
    """A skipped layer that the source stores quantized: its rows copied verbatim. Returns the export names."""
    assert isinstance(source, ParquetSource)
    loader = source.loader
    params: dict = {}
    for name in rows:
        params.update(loader.rows[name].params)
        writer.write(loader.stored_row(name))
    fmt = get_format(loader.rows[rows[0]].format)
    stored = [loader.rows[n].weight_name for n in rows]
    suffixes = fmt.hf_names(params, stored)
    return [f"{layer}.{s}" if layer else s for s in suffixes]


def write_gptq_dir(source: QuantizeSource, results: dict[str, ptq.QuantizedLinear], options: Options, out: Path,
                    progress: bool) -> float:
    """Write OUT as an AutoGPTQ v1 directory; return the stored bits per weight of the quantized Linears."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from llm_workbook.formats.gptq import pack_gptq

    scale_dtype = TORCH_DTYPE_NAMES.get(str(source.config.get("torch_dtype") or source.config.get("dtype")), torch.float16)
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
        (tmp / "config.json").write_text(config_text_with(source.config, qconfig), encoding="utf-8")
        if meta.get(S.META_GENERATION_CONFIG) is not None:
            (tmp / "generation_config.json").write_text(meta[S.META_GENERATION_CONFIG], encoding="utf-8")
        for file_name, data in json.loads(meta.get(S.META_FILES, "{}")).items():
            name = names.file_name(file_name, source=source.label, entry="side file")
            (tmp / name).write_bytes(base64.b64decode(data))
    return 8.0 * q_bytes / q_numel if q_numel else 0.0
