"""HF checkpoint -> Parquet (streaming, atomic), and Parquet -> HF directory (export)."""

from __future__ import annotations

import base64
import datetime as _dt
import json
import os
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llm_workbook.paths import __version__
from llm_workbook import formats, schema as S
from llm_workbook.errors import StoreError
from llm_workbook.store.aios import convert_aios
from llm_workbook.store.gguf import convert_gguf
from llm_workbook.store.source import Kind, Source
from llm_workbook.store.checkpoint import Checkpoint
from llm_workbook.store.writer import ConversionReport, StoreWriter, check_finite, staged_directory, write_error


def _group_by_module(names: list[str]) -> "OrderedDict[str, dict[str, str]]":
    modules: OrderedDict[str, dict[str, str]] = OrderedDict()
    for name in names:
        layer, weight = S.split_name(name)
        modules.setdefault(layer, {})[weight] = name
    return modules


def source_metadata(ckpt: Checkpoint, source: str) -> dict[str, str]:
    files = {name: base64.b64encode(data).decode("ascii") for name, data in ckpt.side_files.items()}
    layout = {
        "shards": ckpt.shard_layout,
        "shard_metadata": ckpt.shard_metadata,
        "index_metadata": ckpt.index_metadata,
        "sharded": len(ckpt.shard_layout) > 1 or ckpt.index_metadata is not None,
    }
    meta = {
        S.META_CONFIG: ckpt.config_text,
        S.META_FILES: json.dumps(files),
        S.META_LAYOUT: json.dumps(layout),
        S.META_SOURCE: json.dumps(
            {
                "source": source,
                "resolved": str(ckpt.root),
                "converted_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "llmc_version": __version__,
            }
        ),
    }
    if ckpt.generation_config_text is not None:
        meta[S.META_GENERATION_CONFIG] = ckpt.generation_config_text
    return meta


class HuggingFaceToParquetConverter:
    """Convert an HF checkpoint (directory or hub id) into a self-contained weight file (schema 3: AI-OS's V2, extended).

    Tensors are read one module at a time and written as they go, so peak memory stays near the
    largest module. A failed or interrupted conversion leaves no output file.
    """

    def __init__(
        self,
        allow_pickle: bool = False,
        allow_nonfinite: bool = False,
        revision: str | None = None,
        progress: bool = True,
        detect_grids: bool = True,
        gguf_file: str | None = None,
    ):
        self.allow_pickle = allow_pickle
        self.allow_nonfinite = allow_nonfinite
        self.revision = revision
        self.progress = progress
        self.detect_grids = detect_grids
        self.gguf_file = gguf_file

    def convert(self, hf_model_path: str | os.PathLike | Source, output_parquet: str | os.PathLike) -> ConversionReport:
        source = Source.of(hf_model_path, revision=self.revision, gguf_file=self.gguf_file)
        if source.kind is Kind.AIOS:
            return convert_aios(source.path, output_parquet, progress=self.progress)
        if source.kind is Kind.GGUF:
            return convert_gguf(source.gguf(), output_parquet, progress=self.progress, label=source.name)
        root = source.root()
        ckpt = source.checkpoint(allow_pickle=self.allow_pickle)
        qconfig = ckpt.quantization_config
        fmt = formats.detect(qconfig, ckpt.tensors, source=str(root / "config.json"))
        self._current = "(none)"  # the tensor being written, for the error message
        try:
            with StoreWriter(output_parquet) as writer:  # removed again on any failure or stop signal
                self._write_rows(ckpt, fmt, qconfig, writer, root)
                writer.commit(source_metadata(ckpt, source.name))
        except OSError as exc:
            raise write_error(output_parquet, self._current, exc) from None
        return ConversionReport(writer.url or Path(output_parquet), len(ckpt.tensors), writer.row_groups,
                                writer.bytes_written, writer.formats)

    def _write_rows(self, ckpt: Checkpoint, fmt, qconfig: dict | None, writer: StoreWriter, root: Path) -> None:
        """One module's tensors at a time: the format's quantized groups, then the rest dense."""
        modules = _group_by_module(list(ckpt.tensors))
        bar = tqdm(total=len(ckpt.tensors), desc=f"convert {root.name}", unit="tensor", disable=not self.progress)
        for module, members in modules.items():
            infos = {suffix: ckpt.tensors[name] for suffix, name in members.items()}
            claimed = fmt.claim(qconfig, module, infos)
            for suffix in members:
                if suffix not in claimed and suffix in formats.QUANTIZED_SUFFIXES:
                    self._current = members[suffix]
                    raise formats.UnsupportedFormatError(
                        f"{ckpt.tensor_file[self._current]}: tensor {self._current!r} looks quantized (suffix {suffix!r}) but "
                        f"the checkpoint's quantization_config ({(qconfig or {}).get('quant_method')}) does not "
                        f"describe it; supported formats: {formats.supported_names()}"
                    )
            if claimed:
                self._current = members[sorted(claimed)[0]]
                group = {s: ckpt.read(members[s]) for s in members if s in claimed}
                try:
                    rows = fmt.to_rows(qconfig, module, group)
                except StoreError as exc:
                    raise StoreError(f"{ckpt.tensor_file[self._current]}: module {module!r}: {exc}") from None
                for row in rows:
                    writer.write(row)
                bar.update(len(group))
                del group, rows
            for suffix, name in members.items():
                if suffix in claimed:
                    continue
                self._current = name
                tensor = ckpt.read(name)
                if not self.allow_nonfinite:
                    check_finite(name, tensor, ckpt.tensor_file[name])
                for row in formats.dense_rows(name, tensor, qconfig, detect_grids=self.detect_grids):
                    writer.write(row)
                bar.update(1)
                del tensor
        bar.close()


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def export_to_hf(parquet_path: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True,
                 dtype: torch.dtype | None = None) -> Path:
    """Write an HF directory (safetensors shards, config, tokenizer and side files) from a Parquet file.

    The tensors equal the source checkpoint's bit for bit; shards follow the source layout. GGUF rows
    have no safetensors form and are written dequantized (float32). ``dtype`` casts every floating
    tensor (and config.json's dtype) to it, e.g. to make a bf16 original of a GGUF release.
    """
    from safetensors.torch import save_file

    from llm_workbook.store.loader import WeightLoaderV2

    loader = WeightLoaderV2(parquet_path)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise StoreError(f"{out}: output directory exists and is not empty")
    if not out.parent.is_dir():
        raise StoreError(f"{out}: parent directory {out.parent} does not exist")
    with staged_directory(out) as tmp:
        tensors = loader.source_tensors()
        layout = loader.layout
        shards = layout.get("shards") if layout else None
        if not shards:
            shards = {"model.safetensors": list(tensors)}
        weight_map = {}
        for shard, names in tqdm(shards.items(), desc="export", unit="shard", disable=not progress):
            part = {name: _cast(tensors[name], dtype).contiguous() for name in names}
            metadata = (layout or {}).get("shard_metadata", {}).get(shard) or {"format": "pt"}
            save_file(part, str(tmp / shard), metadata=metadata)
            weight_map.update({name: shard for name in names})
            del part
        if layout and layout.get("sharded"):
            index = {"metadata": layout.get("index_metadata") or {}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if loader.config_text is not None:
            text = loader.config_text
            if dtype is not None:
                config = json.loads(text)
                config["dtype"] = str(dtype).removeprefix("torch.")
                config.pop("torch_dtype", None)
                text = json.dumps(config, indent=2) + "\n"
            (tmp / "config.json").write_text(text, encoding="utf-8")
        if loader.generation_config_text is not None:
            (tmp / "generation_config.json").write_text(loader.generation_config_text, encoding="utf-8")
        for name, data in loader.files.items():
            (tmp / name).write_bytes(data)
    return out
