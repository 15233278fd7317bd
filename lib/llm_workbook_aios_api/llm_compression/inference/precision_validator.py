"""``llm_compression.inference.precision_validator`` is ``llm_workbook.inference.precision_validator`` (see the package docstring)."""

import sys

from llm_workbook.inference import precision_validator as _module

sys.modules[__name__] = _module
