"""What ``llmc quantize`` reads: an HF directory, or a Parquet file (ours, or a quantized checkpoint
converted to one), with its model built whole, without weights, or one decoder layer at a time."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from llm_workbook import quantize as ptq
from llm_workbook import schema as S
from llm_workbook.errors import QuantizeError, StoreError
from llm_workbook.memory import return_freed_memory
from llm_workbook.quantize.options import TORCH_DTYPE_NAMES
from llm_workbook.store.convert import HuggingFaceToParquetConverter, source_metadata
from llm_workbook.store.writer import all_finite
from llm_workbook.store.loader import DENSE, WeightLoaderV2
from llm_workbook.store.source import Source


def dtype_code_of_config(config: dict) -> str | None:
    name = config.get("torch_dtype") or config.get("dtype")
    dtype = TORCH_DTYPE_NAMES.get(str(name))
    return S.dtype_code(dtype) if dtype is not None else None


def check_finite(name: str, tensor: torch.Tensor, where: str) -> None:
    if tensor.is_floating_point() and tensor.dtype.itemsize > 1 and not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise QuantizeError(f"{where}: tensor {name!r} holds {bad} NaN/Inf values")


class QuantizeSource:
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


class HFSource(QuantizeSource):
    """An unquantized HF directory: tensors straight from its safetensors."""

    def __init__(self, label: str, root: Path, progress: bool = True):
        from llm_workbook.store.checkpoint import open_checkpoint

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
        check_finite(name, tensor, str(self.ckpt.tensor_file[name]))
        return tensor

    def groups(self) -> dict[str, list[str]]:
        return {}

    def metadata(self) -> dict[str, str]:
        return source_metadata(self.ckpt, self.label)


class ParquetSource(QuantizeSource):
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
        from llm_workbook.runtime.model import model_from_parquet

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
        return dtype_code_of_config(self.config)

    def read(self, name: str) -> torch.Tensor:
        tensor = self.loader.load_tensor(name)
        check_finite(name, tensor, str(self.loader.path))
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


def open_source(src: Source | str | os.PathLike, scratch_parent: Path, progress: bool) -> QuantizeSource:
    source = Source.of(src)
    if source.is_parquet:
        return ParquetSource(source.name, source.location)
    if not source.is_checkpoint:
        raise QuantizeError(f"{source}: expected an HF checkpoint directory, a hub id or a .parquet weight file")
    root = source.root()
    if not source.checkpoint().quantization_config:
        return HFSource(source.name, root, progress)
    # Already quantized: read it through our own formats (dequantized to float32 for the model).
    temp_dir = Path(tempfile.mkdtemp(prefix=".llmc-quantize-src-", dir=scratch_parent))
    try:
        HuggingFaceToParquetConverter(progress=progress).convert(source, temp_dir / "source.parquet")
        return ParquetSource(source.name, temp_dir / "source.parquet", temp_dir=temp_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


def meta_model(source: QuantizeSource, buffers: bool = False) -> torch.nn.Module:
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
        if isinstance(source, ParquetSource):
            from llm_workbook.runtime.model import model_class

            cls = model_class(config, None)
        else:
            cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
        with init_empty_weights(include_buffers=not buffers):
            return cls._from_config(config, dtype=torch.float32).eval()
    except Exception as exc:
        raise QuantizeError(f"{source.label}: transformers cannot build the architecture ({exc})") from None


def source_weight(source: QuantizeSource, name: str) -> torch.Tensor:
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


def skeleton_model(source: QuantizeSource) -> torch.nn.Module:
    """The float32 model for GPTQ with its decoder layers left on the meta device (``SourceLayers``
    loads one at a time) and the output embeddings too (GPTQ's forwards stop inside the last layer)."""
    model = meta_model(source, buffers=True)
    try:
        prefix, _ = ptq.find_decoder_layers(model)
    except ValueError as exc:
        raise QuantizeError(f"{source.label}: {exc}") from None
    head = model.get_output_embeddings()
    skipped = {f"{prefix}."} | ({n + "." for n, m in model.named_modules() if m is head} if head is not None else set())
    _set_parameters(model, lambda name: None if any(name.startswith(s) for s in skipped) else source_weight(source, name))
    return model


class SourceLayers:
    """``ptq.LayerWeights`` reading a decoder layer's parameters from the source, in float32."""

    def __init__(self, source: QuantizeSource):
        self.source = source

    def load(self, prefix: str, layer: torch.nn.Module) -> None:
        _set_parameters(layer, lambda name: source_weight(self.source, f"{prefix}.{name}"))

    def release(self, layer: torch.nn.Module) -> None:
        _set_parameters(layer, lambda name: None)
        return_freed_memory()

