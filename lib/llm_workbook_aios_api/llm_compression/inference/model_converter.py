"""``llm_compression.inference.model_converter`` is ``llm_workbook.inference.model_converter`` (see the package docstring)."""

import sys

from llm_workbook.inference import model_converter as _module

sys.modules[__name__] = _module
