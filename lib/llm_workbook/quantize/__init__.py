"""Our quantization: the RTN / GPTQ algorithm, and ``llmc quantize`` (sources, writers, the AngelSlim
backend)."""

from llm_workbook.quantize.gptq import GPTQError, GPTQResult, HessianAccumulator, gptq_quantize, run_gptq
from llm_workbook.quantize.model import (
    LayerWeights, fake_quantize_model, find_decoder_layers, find_quantizable_linears, quantize_model,
)
from llm_workbook.quantize.rtn import DEFAULT_SKIP, MAX_BITS, MIN_BITS, RTN_METHODS, QuantizedLinear, quantize_rtn

__all__ = [
    "DEFAULT_SKIP", "MAX_BITS", "MIN_BITS", "GPTQError", "GPTQResult", "HessianAccumulator", "LayerWeights", "QuantizedLinear",
    "RTN_METHODS", "fake_quantize_model", "find_decoder_layers", "find_quantizable_linears", "gptq_quantize",
    "quantize_model", "quantize_rtn", "run_gptq",
]
