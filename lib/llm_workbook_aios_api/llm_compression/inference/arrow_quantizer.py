"""``llm_compression.inference.arrow_quantizer`` is ``llm_workbook.inference.arrow_quantizer`` (see the package docstring)."""

import sys

from llm_workbook.inference import arrow_quantizer as _module

sys.modules[__name__] = _module
