"""``llm_compression.inference.quantization_schema`` is ``llm_workbook.inference.quantization_schema`` (see the package docstring)."""

import sys

from llm_workbook.inference import quantization_schema as _module

sys.modules[__name__] = _module
