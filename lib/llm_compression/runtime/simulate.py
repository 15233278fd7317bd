"""Running a model from a Parquet weight file (or an HF directory / hub id) the way it would be served.

``load_model(source)`` gives a ready, eval-mode transformers model and a ``ModelInfo``:

* A ``.parquet`` file goes through ``modeling.model_from_parquet`` (every weight dequantized by our
  format modules). A quantized HF directory is first converted to a temporary Parquet file, so every
  format takes the same path; an unquantized HF directory (or hub id) loads with ``from_pretrained``.
* Activation quantization simulation (on by default): where the checkpoint declares quantized inputs
  for a Linear, that Linear fake-quantizes its input before the matmul (FP8 static / dynamic, INT8
  dynamic per token...). What declares it: the layer's stored ``input_scale`` and the
  quantization_config (compressed-tensors ``input_activations``, ``quant_method: fp8``'s
  ``activation_scheme``).
* ``keep_packed=True``: quantized Linears become ``PackedLinear`` modules that keep the stored codes
  and dequantize in ``forward`` on every call, so resident memory tracks the quantized size.

``sentence_embeddings`` gives all-MiniLM-L6-v2 style embeddings (mean pooling + L2 norm).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_compression import formats
from llm_compression.formats._codec import FP8_MAX
from llm_compression.errors import StoreError
from llm_compression.formats.base import QuantizedTensor
from llm_compression.formats.fp8 import CT_METHOD, ct_scheme_for
from llm_compression.store.loader import DENSE, LazyStateDict, WeightLoaderV2
from llm_compression.evaluation.metrics import l2_normalize, mean_pooling

CAUSAL_LM = "causal-lm"
ENCODER = "encoder"
INT8_MIN, INT8_MAX = -128, 127


# ============================================================================================
# Activation fake quantization
# ============================================================================================


@dataclass(frozen=True)
class ActivationScheme:
    """How a Linear's input is quantized at serving time.

    ``kind``: "fp8" (float8_e4m3fn) or "int8"; ``granularity``: "tensor" (one scale per call or a
    stored one), "token" (one scale per row of the last dim) or "group" (per ``group_size`` inputs
    of each token); ``dynamic``: scales computed from each input (else the stored ``input_scale``).
    """

    kind: str
    granularity: str
    dynamic: bool
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("fp8", "int8"):
            raise ValueError(f"activation kind must be 'fp8' or 'int8', got {self.kind!r}")
        if self.granularity not in ("tensor", "token", "group"):
            raise ValueError(f"activation granularity must be tensor/token/group, got {self.granularity!r}")
        if not self.dynamic and self.granularity != "tensor":
            raise ValueError("static activation scales are per tensor only")
        if self.granularity == "group" and not (isinstance(self.group_size, int) and self.group_size > 0):
            raise ValueError(f"group activation quantization needs a positive group_size, got {self.group_size!r}")

    @property
    def name(self) -> str:
        """E.g. ``fp8-static-tensor``, ``fp8-dynamic-tensor``, ``int8-dynamic-token``, ``fp8-dynamic-group128``."""
        mode = "dynamic" if self.dynamic else "static"
        gran = f"group{self.group_size}" if self.granularity == "group" else self.granularity
        return f"{self.kind}-{mode}-{gran}"


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero input has scale 0; any positive scale maps it to 0 and back, so use 1.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x -> float8_e4m3fn(clamp(x / s, +-448)) * s`` in float32, returned in ``x.dtype``."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    scaled = (x.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX)
    return (scaled.to(torch.float8_e4m3fn).to(torch.float32) * s).to(x.dtype)


def int8_fake_quant(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``x -> clamp(round(x / s), -128, 127) * s`` in float32 (round half to even), returned in ``x.dtype``."""
    s = torch.as_tensor(scale, dtype=torch.float32)
    codes = torch.round(x.to(torch.float32) / s).clamp(INT8_MIN, INT8_MAX)
    return (codes * s).to(x.dtype)


def fake_quantize_activation(x: torch.Tensor, scheme: ActivationScheme, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize a Linear input ``[..., in]`` as the serving kernel would.

    Dynamic scales: per tensor ``absmax(x) / qmax``; per token ``absmax(row) / qmax``; per group
    ``absmax(row[g]) / qmax`` (qmax 448 for fp8, 127 for int8; a width that is not a multiple of the group
    size ends in a shorter group). Static: the stored ``scale``.
    """
    qmax = FP8_MAX if scheme.kind == "fp8" else float(INT8_MAX)
    quant = fp8_fake_quant if scheme.kind == "fp8" else int8_fake_quant
    if not scheme.dynamic:
        if scale is None:
            raise ValueError(f"static {scheme.kind} activation quantization needs an input scale")
        return quant(x, scale.to(torch.float32).reshape(()))
    absx = x.detach().to(torch.float32).abs()
    if scheme.granularity == "tensor":
        return quant(x, _safe_scale(absx.amax() / qmax))
    if scheme.granularity == "token":
        return quant(x, _safe_scale(absx.amax(dim=-1, keepdim=True) / qmax))
    size = scheme.group_size
    width = x.shape[-1]
    pad = -width % size  # a width that is not a multiple takes a shorter last group, as ragged weight blocks do
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        absx = torch.nn.functional.pad(absx, (0, pad))  # zeros never raise a group's absmax
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // size, size)
    scales = _safe_scale(absx.reshape(grouped.shape).amax(dim=-1, keepdim=True) / qmax)
    return quant(grouped, scales).reshape(x.shape)[..., :width]


class InputQuantizer(nn.Module):
    """Fake-quantizes a Linear's input. The static scale is a plain float32 attribute (not a buffer),
    so ``model.to(dtype)`` cannot round it."""

    def __init__(self, scheme: ActivationScheme, scale: torch.Tensor | None = None):
        super().__init__()
        if not scheme.dynamic and scale is None:
            raise ValueError(f"{scheme.name} needs an input scale")
        self.scheme = scheme
        self.scale = None if scale is None else scale.detach().to(torch.float32).reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_activation(x, self.scheme, self.scale)

    def extra_repr(self) -> str:
        return self.scheme.name + ("" if self.scale is None else f", scale={float(self.scale):.6g}")


class QuantInputLinear(nn.Linear):
    """An ``nn.Linear`` (sharing the original weight and bias) that fake-quantizes its input first."""

    def __init__(self, linear: nn.Linear, quantizer: InputQuantizer):
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = quantizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.weight, self.bias)


class PackedLinear(nn.Module):
    """A Linear whose weight stays in its stored quantized form; ``forward`` dequantizes it each call.

    The codes live in ``record`` (a ``QuantizedTensor``, a plain attribute: ``Module.to(dtype)``
    must not cast fp8/int codes or scales). ``weight`` is a property that dequantizes on access, for
    code that reads it (dtype checks, weight comparisons); nothing caches the float weight.
    """

    def __init__(self, record: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 input_quantizer: InputQuantizer | None = None):
        super().__init__()
        shape = record.params.get("weight_shape")
        self.record = record
        self._format = formats.get_format(record.format)
        self.compute_dtype = dtype
        probe = None if shape else self._format.dequantize(record, dtype)
        self.out_features, self.in_features = (int(shape[0]), int(shape[1])) if shape else tuple(probe.shape)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.input_quantizer = input_quantizer

    @property
    def weight(self) -> torch.Tensor:
        return self._format.dequantize(self.record, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self._format.dequantize(self.record, self.compute_dtype), self.bias)

    @property
    def packed_bytes(self) -> int:
        return self.record.nbytes

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.record.format}, "
                f"packed_bytes={self.packed_bytes}")


# ============================================================================================
# What the checkpoint declares about activations
# ============================================================================================


def layer_type(name: str) -> str:
    """A module name with its layer indices replaced by ``*`` (``model.layers.*.self_attn.q_proj``)."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _scheme_from_args(args: dict) -> ActivationScheme | str:
    """compressed-tensors ``input_activations`` -> a scheme, or a note saying why it is not simulated."""
    bits, kind = int(args.get("num_bits", 8)), args.get("type", "int")
    if bits != 8 or kind not in ("int", "float"):
        return f"{bits}-bit {kind} input activations are not simulated"
    dynamic = args.get("dynamic") not in (False, None)
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "tensor")
    if not dynamic and strategy != "tensor":
        return f"static {strategy} input activations are not simulated"
    if strategy not in ("tensor", "token", "group"):
        return f"{strategy} input activations are not simulated"
    return ActivationScheme("fp8" if kind == "float" else "int8", strategy, dynamic,
                            int(args["group_size"]) if strategy == "group" else None)


def declared_activation(qconfig: dict | None, layer_name: str, fmt: str, has_input_scale: bool) -> ActivationScheme | str | None:
    """The input quantization a quantized layer's checkpoint declares.

    Returns an ``ActivationScheme``, a note (str) when it is declared but not simulated, or None
    (weight-only). Sources, most specific first: a compressed-tensors config group's
    ``input_activations``; ``quant_method: fp8`` / ``w4a8_awq`` ``activation_scheme`` (block FP8
    weights take per-token groups of the block width, DeepSeek-V3 style); else a stored
    ``input_scale`` alone means static per-tensor input quantization of the format's kind.
    """
    qconfig = qconfig or {}
    method = qconfig.get("quant_method")
    if method == CT_METHOD:
        group = ct_scheme_for(qconfig, layer_name)
        acts = (group or {}).get("input_activations")
        if isinstance(acts, dict):
            return _scheme_from_args(acts)
    elif method == "w4a8_awq" and fmt != "w4a8" and isinstance(qconfig.get("ignored_quantization_config"), dict):
        # DeepSeek-style W4A8: the layers left out of W4A8 follow their own (FP8 block) config
        return declared_activation(qconfig["ignored_quantization_config"], layer_name, fmt, has_input_scale)
    elif method in ("fp8", "w4a8_awq") and qconfig.get("activation_scheme") in ("static", "dynamic"):
        if qconfig["activation_scheme"] == "static":
            return ActivationScheme("fp8", "tensor", False)
        block = qconfig.get("weight_block_size")
        if fmt == "fp8" and isinstance(block, list) and len(block) == 2:
            return ActivationScheme("fp8", "group", True, int(block[1]))
        return ActivationScheme("fp8", "tensor", True)
    if has_input_scale:
        if fmt in ("fp8", "w4a8"):
            return ActivationScheme("fp8", "tensor", False)
        if fmt == "int8":
            return ActivationScheme("int8", "tensor", False)
        return f"{fmt} input activations (input_scale) are not simulated"
    return None


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
    load_seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def is_parquet(source: str | os.PathLike) -> bool:
    """A Parquet weight file: a local one that exists, or an s3:// / hf:// URL ending in .parquet."""
    from llm_compression.store.remote import is_remote

    return str(source).endswith(".parquet") and (is_remote(str(source)) or Path(source).is_file())


def read_config(source: str | os.PathLike) -> dict:
    """config.json of a Parquet file, an HF directory or a cached hub id, without loading weights."""
    if is_parquet(source):
        config = WeightLoaderV2(source).config
        if not config:
            raise StoreError(f"{source}: no config.json inside the file")
        return config
    if str(source).endswith(".parquet"):
        raise StoreError(f"{source}: no such Parquet file")
    from llm_compression.store.sources import resolve_source

    path = resolve_source(source) / "config.json"
    if not path.is_file():
        raise StoreError(f"{path}: missing (every checkpoint needs its config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StoreError(f"{path}: not valid JSON ({exc})") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _kind(model: nn.Module) -> str:
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


def _apply_packed(model: nn.Module, loader: _PackedSkeletonLoader, dtype: torch.dtype) -> None:
    """Swap every placeholder-holding Linear for a PackedLinear; give other placeholders real weights."""
    issued = loader.placeholders.issued
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        layer = issued.get(param.data_ptr())
        if layer is None:
            continue
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) and attr == "weight":
            _set_module(model, module_name, PackedLinear(loader.record(layer), module.bias, dtype))
        else:  # e.g. a quantized embedding or fused expert tensor: keep it dequantized
            real = loader.load_weight(layer, "weight", dtype=dtype)
            setattr(module, attr, nn.Parameter(real, requires_grad=False))
    left = [n for n, p in model.named_parameters() if p.data_ptr() in issued]
    if left:
        raise StoreError(f"{loader.path}: could not place quantized weights {left[:5]} in packed mode")


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
                  keep_packed: bool, converted: bool) -> tuple[nn.Module, ModelInfo]:
    from llm_compression.runtime.model import model_from_parquet

    loader = _PackedSkeletonLoader(path) if keep_packed else WeightLoaderV2(path)
    model = model_from_parquet(loader, dtype=dtype, task=task)
    if keep_packed:
        _apply_packed(model, loader, dtype)
    layers = _quantized_layers(loader)
    modules = dict(model.named_modules())
    modules_by_layer = {layer: _module_name(model, modules, layer) for layer in layers}
    info = ModelInfo(
        source=source, kind=_kind(model), architecture=type(model).__name__, parquet=str(path), converted=converted,
        formats=sorted({i.format for i in loader.rows.values()}),
        quantized_layers={modules_by_layer[layer]: fmt for layer, fmt in sorted(layers.items()) if modules_by_layer[layer]},
        dtype=_dtype_name(dtype), keep_packed=keep_packed, activation_quant=False,
    )
    _apply_activation_quant(model, loader, layers, modules_by_layer, activation_quant, info)
    model.eval()
    return model, info


def load_model(
    source: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    task: str | None = None,
    activation_quant: bool = True,
    keep_packed: bool = False,
) -> tuple[nn.Module, ModelInfo]:
    """A ready, eval-mode model from a ``.parquet`` file, an HF directory or a (cached) hub id.

    Args:
        source: Parquet weight file, HF checkpoint directory or hub id.
        dtype: compute dtype of every floating weight.
        task: None (follow ``architectures``), "causal-lm" or "base" (encoder / bare model).
        activation_quant: simulate the input quantization the checkpoint declares.
        keep_packed: keep quantized Linear weights as stored codes (``PackedLinear``).

    Returns:
        ``(model, info)``; ``model.llmc_info`` is ``info`` too.
    """
    start = time.perf_counter()
    text = str(source)
    if text.endswith(".parquet"):
        if not is_parquet(source):
            raise StoreError(f"{source}: no such Parquet file")
        location = text if text.startswith(("s3://", "hf://")) else Path(source)
        model, info = _load_parquet(location, text, dtype, task, activation_quant, keep_packed, converted=False)
    else:
        from llm_compression.store.sources import resolve_source

        root = resolve_source(source)
        config = read_config(root)
        if config.get("quantization_config"):
            from llm_compression.store.convert import HuggingFaceToParquetConverter

            tmp = Path(tempfile.mkdtemp(prefix="llmc-runtime-"))
            parquet = tmp / "model.parquet"
            try:
                HuggingFaceToParquetConverter(progress=False).convert(root, parquet)
                model, info = _load_parquet(parquet, text, dtype, task, activation_quant, keep_packed, converted=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            weakref.finalize(model, shutil.rmtree, str(tmp), True)
        else:
            model, info = _load_hf(root, text, dtype, task, keep_packed)
    info.load_seconds = time.perf_counter() - start
    model.llmc_info = info
    return model, info


def _load_hf(root: Path, source: str, dtype: torch.dtype, task: str | None, keep_packed: bool) -> tuple[nn.Module, ModelInfo]:
    from transformers import AutoConfig

    from llm_compression.runtime.model import model_class

    config = AutoConfig.from_pretrained(root)
    cls = model_class(config, task)
    model = cls.from_pretrained(root, dtype=dtype).eval()
    info = ModelInfo(
        source=source, kind=_kind(model), architecture=type(model).__name__, parquet=None, converted=False,
        formats=["dense"], quantized_layers={}, dtype=_dtype_name(dtype), keep_packed=keep_packed, activation_quant=False,
    )
    if keep_packed:
        info.activation_notes.append("keep_packed has no effect: the checkpoint is not quantized")
    return model, info


def load_tokenizer(source: str | os.PathLike, model: nn.Module | None = None):
    """The tokenizer of a Parquet file (it travels inside) or of an HF directory / hub id."""
    loader = getattr(model, "llmc_loader", None) if model is not None else None
    if loader is not None:
        return loader.tokenizer()
    if str(source).endswith(".parquet"):
        return WeightLoaderV2(source).tokenizer()
    from transformers import AutoTokenizer

    from llm_compression.store.sources import resolve_source

    root = resolve_source(source)
    try:
        return AutoTokenizer.from_pretrained(root)
    except Exception as exc:
        raise StoreError(f"{root}: no usable tokenizer ({exc})") from None


# ============================================================================================
# Encoders
# ============================================================================================


def sentence_embeddings(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 32,
                        max_length: int = 256) -> torch.Tensor:
    """L2-normalized sentence embeddings ``[N, D]`` (float32) as sentence-transformers computes them for
    all-MiniLM-L6-v2: tokens truncated at ``max_length`` (its ``max_seq_length`` is 256), mask-weighted
    mean of the last hidden state, then L2 normalization."""
    texts = list(texts)
    if not texts:
        raise ValueError("sentence_embeddings: texts is empty")
    if any(not isinstance(t, str) for t in texts):
        raise ValueError("sentence_embeddings: every text must be a string")
    parts = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            parts.append(pool_embeddings(model(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(parts)


def pool_embeddings(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Token states ``[B, T, D]`` -> unit-length sentence embeddings ``[B, D]`` (float32)."""
    return l2_normalize(mean_pooling(last_hidden_state, attention_mask)).to(torch.float32)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_sentences(texts: Sequence[str], min_chars: int = 20, max_chars: int = 300) -> list[str]:
    """Sentences of running text (paragraphs split at ``. `` before a capital), whitespace collapsed,
    keeping those of ``min_chars``..``max_chars`` characters: short, varied encoder inputs."""
    out = []
    for text in texts:
        for paragraph in text.split("\n\n"):
            for sentence in _SENTENCE_END.split(" ".join(paragraph.split())):
                if min_chars <= len(sentence) <= max_chars:
                    out.append(sentence)
    return out


__all__ = [
    "ActivationScheme", "InputQuantizer", "ModelInfo", "PackedLinear", "QuantInputLinear", "declared_activation",
    "fake_quantize_activation", "fp8_fake_quant", "int8_fake_quant", "is_parquet", "layer_type", "load_model",
    "load_tokenizer", "pool_embeddings", "read_config", "sentence_embeddings", "split_sentences",
]
