"""GGUF tensors, stored as their GGML blocks: one row per tensor, dequantized by gguf-py.

A row holds the tensor's bytes exactly as they sit in the GGUF file (``dtype`` U8), under its
transformers name; ``params`` carry what it takes to read them back:

* ``gguf_name``, ``ggml_type`` (the type id), ``ggml_type_name``, ``gguf_shape`` (GGUF order, fastest
  dimension first), ``data_offset`` (relative to the data section);
* ``arch`` and ``processor_config``: transformers' tensor processor for that architecture (for llama,
  the reversal of llama.cpp's Q/K permutation) and the config keys it reads.

``dequantize`` is gguf-py's ``gguf.quants.dequantize`` followed by that processor, the two steps
transformers' own GGUF loading takes, so a weight equals what ``from_pretrained(gguf_file=...)`` puts
in the parameter (float32). Unlike the other formats, every GGUF tensor dequantizes on its own
(``PER_TENSOR``): a norm's F32 weight and a layer's bias are rows of this format too.
"""

from __future__ import annotations

import numpy as np
import torch

from llm_workbook.formats.base import QuantizedTensor, Row, StoreError, TensorInfo

NAME = "gguf"
PER_TENSOR = True

# transformers' tensor processors that map one GGUF tensor to one HF parameter (MoE processors split
# or merge tensors, which one row per tensor cannot express).
ONE_TO_ONE_PROCESSORS = {"TensorProcessor", "LlamaTensorProcessor", "BloomTensorProcessor", "T5TensorProcessor",
                         "GPT2TensorProcessor", "MambaTensorProcessor", "NemotronTensorProcessor",
                         "Gemma2TensorProcessor", "Lfm2TensorProcessor"}
# Config keys those processors read.
PROCESSOR_KEYS = ("num_attention_heads", "num_key_value_heads", "n_head", "hidden_size")
# Types whose GGUFReader view is a plain numpy array (not uint8 blocks).
_PLAIN = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
          "I32": np.int32, "I64": np.int64}


def detect(qconfig: dict | None, tensors: dict[str, TensorInfo]) -> bool:
    return False  # GGUF files are read by store.gguf_source, never detected among safetensors


def claim(qconfig: dict | None, module: str, members: dict[str, TensorInfo]) -> set[str]:
    return set()


def to_rows(qconfig, module, tensors):  # pragma: no cover - rows come from gguf_store
    raise StoreError("gguf rows are written by llm_workbook.store.gguf")


def ggml_type(type_id: int):
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id)
    except ValueError:
        raise StoreError(f"unknown GGML type id {type_id}") from None


def reader_view(raw: np.ndarray, type_id: int, gguf_shape: list[int]) -> np.ndarray:
    """The array ``GGUFReader`` hands out for these bytes: typed for plain types, uint8 blocks otherwise."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import quant_shape_to_byte_shape

    qtype = ggml_type(type_id)
    np_shape = tuple(reversed(gguf_shape))
    if qtype.name in _PLAIN:
        return raw.view(_PLAIN[qtype.name]).reshape(np_shape)
    block, size = GGML_QUANT_SIZES[qtype]
    return raw.reshape(quant_shape_to_byte_shape(np_shape, qtype))


def processor(arch: str, processor_config: dict):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=dict(processor_config))


def dequantize_params(raw: torch.Tensor, params: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """gguf-py's dequantization of the row's blocks, then transformers' tensor processor."""
    from gguf.quants import dequantize as gguf_dequantize

    view = reader_view(raw.numpy(), params["ggml_type"], params["gguf_shape"])
    try:
        weights = gguf_dequantize(view, ggml_type(params["ggml_type"]))
    except NotImplementedError as exc:
        raise StoreError(f"tensor {params['gguf_name']!r}: {exc} (gguf-py cannot dequantize it)") from None
    result = processor(params["arch"], params.get("processor_config") or {}).process(
        weights=weights, name=params["gguf_name"], tensor_key_mapping={params["gguf_name"]: params["gguf_name"]},
        parsed_parameters={"tensors": {}, "config": params.get("processor_config") or {}})
    return torch.from_numpy(np.copy(result.weights)).to(dtype)


def dequantize(record: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    (suffix, raw), = record.tensors.items()
    return dequantize_params(raw, record.params, dtype)


def to_hf(record: QuantizedTensor) -> dict[str, torch.Tensor]:
    """Dense float32 weights, as transformers loads the GGUF (GGML blocks have no safetensors form)."""
    (suffix, _raw), = record.tensors.items()
    return {suffix: dequantize(record, torch.float32)}


def bits_per_weight(type_id: int) -> float:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[ggml_type(type_id)]
    return 8.0 * size / block


def make_row(hf_name: str, raw: np.ndarray, params: dict) -> Row:
    return Row(hf_name, torch.from_numpy(raw.reshape(-1)), NAME, params)
