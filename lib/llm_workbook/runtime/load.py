"""Running a model from a Parquet weight file (or an HF directory / hub id) the way it would be served.

``load_model(source)`` gives a ready, eval-mode transformers model and a ``ModelInfo``:

* A ``.parquet`` file goes through ``runtime.model.model_from_parquet`` (every weight dequantized by our
  format modules). A quantized HF directory is first converted to a temporary Parquet file, so every
  format takes the same path; an unquantized HF directory (or hub id) loads with ``from_pretrained``.
* Activation quantization simulation (on by default, ``runtime.activations``): where the checkpoint
  declares quantized inputs for a Linear, that Linear fake-quantizes its input before the matmul.
* ``keep_packed=True``: quantized Linears become ``runtime.packed.PackedLinear`` modules.
* ``kernels=True``: quantized Linears run on PyTorch's weight-only int8/int4 kernels where their grid maps
  onto one (``runtime.kernels``), dense otherwise; ``ModelInfo.kernels`` says which ran where.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from llm_workbook.errors import StoreError
from llm_workbook.runtime.activations import (
    InputQuantizer,
    QuantInputLinear,
    declared_activation,
    layer_type,
)
from llm_workbook.runtime.packed import PackedLinear
from llm_workbook.store.loader import DENSE, LazyStateDict, WeightLoaderV2
from llm_workbook.store.source import Source

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"


# ============================================================================================
# Loading
# ============================================================================================


@dataclass
class ModelInfo:
    """What ``load_model`` did, in JSON-ready fields."""

    source: str
    kind: str  # "causal-lm" or "encoder" (anything that does not generate)
    architecture: str  # the transformers class, e.g. Qwen3ForCausalLM
    parquet: str | None  # the Parquet file the weights came from (None: plain from_pretrained)
    converted: bool  # a quantized HF directory was converted to a temporary Parquet file first
    formats: list[str]  # storage formats of the weights
    quantized_layers: dict[str, str]  # module name -> storage format, for weights stored quantized
    dtype: str
    keep_packed: bool
    activation_quant: bool  # simulation requested and applied to at least one layer
    activation_schemes: dict[str, str] = field(default_factory=dict)  # layer type -> scheme name (declared)
    activation_notes: list[str] = field(default_factory=list)  # declared but not simulated, or switched off
    kernels: dict[str, str] = field(default_factory=dict)  # module -> weight-only kernel, or why it runs dense
    seq: dict | None = None  # AngelSlim SEQ applied to the projections with a weight_clip_val (formats.seq)
    load_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def read_config(source: Source | str | os.PathLike) -> dict:
    """config.json of a Parquet file, an HF directory or a cached hub id, without loading weights."""
    return Source.of(source).config()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def model_kind(model: nn.Module) -> str:
    can_generate = getattr(model, "can_generate", None)
    return CAUSAL_LM if callable(can_generate) and can_generate() else ENCODER


def _module_name(model: nn.Module, modules: dict[str, nn.Module], layer: str) -> str | None:
    """The model's module for a checkpoint layer name (with or without the base-model prefix)."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [layer]
    if prefix:
        candidates += [f"{prefix}.{layer}", layer[len(prefix) + 1 :] if layer.startswith(prefix + ".") else None]
    return next((c for c in candidates if c and c in modules), None)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


class _Placeholders(LazyStateDict):
    """The loader's state dict, except that quantized weights are zero-stride placeholders of the
    right shape (no memory): ``PackedLinear`` takes their place right after loading."""

    def __init__(self, loader: WeightLoaderV2, dtype: torch.dtype | None, quantized: set[str]):
        super().__init__(loader, dtype)
        self.quantized = quantized
        self.shapes = {i.layer_name: tuple(int(d) for d in i.params["weight_shape"]) for i in loader.rows.values()
                       if i.format != DENSE and i.params.get("weight_shape")}
        self.issued: dict[int, str] = {}  # data_ptr -> layer name
        self._alive: list[torch.Tensor] = []  # keeps each placeholder's address from being reused

    def __getitem__(self, key: str) -> torch.Tensor:
        layer, _, weight = key.rpartition(".")
        if weight == "weight" and layer in self.quantized:
            shape = self.shapes.get(layer) or tuple(self._loader.load_weight(layer, "weight").shape)  # no weight_shape
            placeholder = torch.zeros((), dtype=self._dtype or torch.float32).expand(shape)
            self.issued[placeholder.data_ptr()] = layer
            self._alive.append(placeholder)
            return placeholder
        return super().__getitem__(key)


class _PackedSkeletonLoader(WeightLoaderV2):
    """A WeightLoaderV2 whose ``state_dict`` hands out placeholders for quantized weights."""

    def state_dict(self, dtype: torch.dtype | None = None) -> LazyStateDict:
        quantized = {info.layer_name for info in self.rows.values() if info.format != DENSE}
        self.placeholders = _Placeholders(self, dtype, quantized)
        return self.placeholders


def _quantized_layers(loader: WeightLoaderV2) -> dict[str, str]:
    """Checkpoint layer name -> storage format, for every quantized layer."""
    out: dict[str, str] = {}
    for info in loader.rows.values():
        if info.format != DENSE:
            out.setdefault(info.layer_name, info.format)
    return out


def _input_scale(loader: WeightLoaderV2, layer: str) -> torch.Tensor | None:
    name = f"{layer}.input_scale"
    return loader.load_tensor(name) if name in loader.rows else None


def _apply_packed(model: nn.Module, loader: _PackedSkeletonLoader, dtype: torch.dtype, kernels: bool = False) -> dict[str, str]:
    """Swap every placeholder-holding Linear for a PackedLinear (``kernels``: a weight-only kernel Linear, or a
    dense one where none fits); give other placeholders real weights. Returns module -> kernel used."""
    from llm_workbook.runtime.kernels import weight_only_linear

    used: dict[str, str] = {}
    issued = loader.placeholders.issued
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        layer = issued.get(param.data_ptr())
        if layer is None:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) and attr == "weight" and kernels:
            kernel, name = weight_only_linear(loader.record(layer), module.bias, dtype)
            if kernel is None:  # ``name`` says why no kernel fits
                used[module_name] = f"dense ({name})"
                module.weight = nn.Parameter(loader.load_weight(layer, "weight", dtype=dtype), requires_grad=False)
            else:
                used[module_name] = name
                _set_module(model, module_name, kernel)
        elif isinstance(module, nn.Linear) and attr == "weight":
            _set_module(model, module_name, PackedLinear(loader.record(layer), module.bias, dtype))
        else:  # e.g. a quantized embedding or fused expert tensor: keep it dequantized
            real = loader.load_weight(layer, "weight", dtype=dtype)
            setattr(module, attr, nn.Parameter(real, requires_grad=False))
    left = [n for n, p in model.named_parameters() if p.data_ptr() in issued]
    if left:
        raise StoreError(f"{loader.path}: could not place quantized weights {left[:5]} in packed mode")
    return used


def _apply_activation_quant(model: nn.Module, loader: WeightLoaderV2, layers: dict[str, str], modules_by_layer: dict[str, str],
                            enabled: bool, info: ModelInfo) -> None:
    """Find the declared input quantization of every quantized layer; wrap the Linear when enabled."""
    qconfig = loader.quantization_config
    modules = dict(model.named_modules())
    notes: set[str] = set()
    applied = 0
    for layer, fmt in layers.items():
        scale = _input_scale(loader, layer)
        scheme = declared_activation(qconfig, layer, fmt, scale is not None)
        module_name = modules_by_layer.get(layer)
        if scheme is None or module_name is None:
            continue
        label = layer_type(module_name)
        if isinstance(scheme, str):
            notes.add(f"{label}: {scheme}")
            info.activation_schemes[label] = "not simulated"
            continue
        if not scheme.dynamic and scale is None:
            raise StoreError(f"{loader.path}: layer {layer!r} declares static {scheme.kind} input activations "
                             f"but the file has no tensor {layer + '.input_scale'!r}")
        info.activation_schemes[label] = scheme.name
        if not enabled:
            continue
        quantizer = InputQuantizer(scheme, scale if not scheme.dynamic else None)
        module = modules[module_name]
        if isinstance(module, PackedLinear):
            module.input_quantizer = quantizer
        elif isinstance(module, nn.Linear):
            _set_module(model, module_name, QuantInputLinear(module, quantizer))
        else:
            notes.add(f"{label}: {type(module).__name__} is not a Linear; input quantization not simulated")
            continue
        applied += 1
    if info.activation_schemes and not enabled:
        notes.add("activation quantization declared but switched off (weight-only simulation)")
    info.activation_quant = applied > 0
    info.activation_notes = sorted(notes)


def _load_parquet(path: Path, source: str, dtype: torch.dtype, task: str | None, activation_quant: bool,
                  keep_packed: bool, converted: bool, kernels: bool = False) -> tuple[nn.Module, ModelInfo]:
    from llm_workbook.runtime.model import model_from_parquet

    loader = _PackedSkeletonLoader(path) if keep_packed or kernels else WeightLoaderV2(path)
    model = model_from_parquet(loader, dtype=dtype, task=task)
    used = _apply_packed(model, loader, dtype, kernels) if keep_packed or kernels else {}
    layers = _quantized_layers(loader)
    modules = dict(model.named_modules())
    modules_by_layer = {layer: _module_name(model, modules, layer) for layer in layers}
    info = ModelInfo(
        source=source, kind=model_kind(model), architecture=type(model).__name__, parquet=str(path), converted=converted,
        formats=sorted({i.format for i in loader.rows.values()}),
        quantized_layers={modules_by_layer[layer]: fmt for layer, fmt in sorted(layers.items()) if modules_by_layer[layer]},
        dtype=_dtype_name(dtype), keep_packed=keep_packed, activation_quant=False,
    )
    info.kernels = used
    # weight-only kernels take float activations: a declared input quantization is not simulated there
    _apply_activation_quant(model, loader, layers, modules_by_layer, activation_quant and not kernels, info)
    model.eval()
    return model, info


def load_model(
    source: Source | str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    task: str | None = None,
    activation_quant: bool = True,
    keep_packed: bool = False,
    kernels: bool = False,
) -> tuple[nn.Module, ModelInfo]:
    """A ready, eval-mode model from a ``.parquet`` file, an HF directory or a (cached) hub id.

    Args:
        source: Parquet weight file, HF checkpoint directory or hub id.
        dtype: compute dtype of every floating weight.
        task: None (follow ``architectures``), "causal-lm" or "base" (encoder / bare model).
        activation_quant: simulate the input quantization the checkpoint declares.
        keep_packed: keep quantized Linear weights as stored codes (``PackedLinear``).
        kernels: run quantized Linears on weight-only int8/int4 kernels where they map (``runtime.kernels``);
            use with ``dtype=torch.bfloat16``, the kernels' fast path.

    Returns:
        ``(model, info)``; ``model.llmc_info`` is ``info`` too.
    """
    start = time.perf_counter()
    source = Source.of(source)
    if source.is_parquet:
        model, info = _load_parquet(source.location, source.name, dtype, task, activation_quant, keep_packed,
                                    converted=False, kernels=kernels)
    else:
        root = source.root()
        if source.config().get("quantization_config"):
            from llm_workbook.store.convert import HuggingFaceToParquetConverter

            tmp = Path(tempfile.mkdtemp(prefix="llmc-runtime-"))
            parquet = tmp / "model.parquet"
            try:
                HuggingFaceToParquetConverter(progress=False).convert(source, parquet)
                model, info = _load_parquet(parquet, source.name, dtype, task, activation_quant, keep_packed,
                                            converted=True, kernels=kernels)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            weakref.finalize(model, shutil.rmtree, str(tmp), True)
        else:
            model, info = _load_hf(root, source.name, dtype, task, keep_packed)
    info.load_seconds = time.perf_counter() - start
    info.seq = getattr(model, "llmc_seq", None)
    model.llmc_info = info
    return model, info


def _load_hf(root: Path, source: str, dtype: torch.dtype, task: str | None, keep_packed: bool) -> tuple[nn.Module, ModelInfo]:
    from transformers import AutoConfig

    from llm_workbook.runtime.model import model_class, model_from_checkpoint

    try:  # one tensor at a time: the file's pages and the dtype copy are never both resident
        model, notes = model_from_checkpoint(root, dtype, task), []
    except StoreError as exc:  # names the model does not use as they are: transformers' own loader maps them
        model = model_class(AutoConfig.from_pretrained(root), task).from_pretrained(root, dtype=dtype).eval()
        notes = [f"loaded with from_pretrained ({exc})"]
    info = ModelInfo(
        source=source, kind=model_kind(model), architecture=type(model).__name__, parquet=None, converted=False,
        formats=["dense"], quantized_layers={}, dtype=_dtype_name(dtype), keep_packed=keep_packed, activation_quant=False,
    )
    info.activation_notes.extend(notes)
    if keep_packed:
        info.activation_notes.append("keep_packed has no effect: the checkpoint is not quantized")
    return model, info


def load_tokenizer(source: Source | str | os.PathLike, model: nn.Module | None = None):
    """The tokenizer of a Parquet file (it travels inside) or of an HF directory / hub id."""
    loader = getattr(model, "llmc_loader", None) if model is not None else None
    if loader is not None:
        return loader.tokenizer()
    source = Source.of(source)
    if source.is_parquet:
        return source.loader().tokenizer()
    from transformers import AutoTokenizer

    root = source.root()
    try:
        return AutoTokenizer.from_pretrained(root)
    except Exception as exc:
        raise StoreError(f"{root}: no usable tokenizer ({exc})") from None
