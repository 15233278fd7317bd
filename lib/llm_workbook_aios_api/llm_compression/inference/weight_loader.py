"""``llm_compression.inference.weight_loader`` is ``llm_workbook.inference.weight_loader`` (see the package docstring)."""

import sys

from llm_workbook.inference import weight_loader as _module

sys.modules[__name__] = _module
