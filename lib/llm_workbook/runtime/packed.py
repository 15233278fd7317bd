"""``PackedLinear``: a Linear that keeps its stored codes and dequantizes them on every call, so
resident memory tracks the quantized size."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_workbook import formats
from llm_workbook.formats.base import QuantizedTensor
from llm_workbook.runtime.activations import InputQuantizer


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
