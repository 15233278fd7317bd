"""``llm_compression.errors`` is ``llm_workbook.errors`` (see the package docstring)."""

import sys

from llm_workbook import errors as _module

sys.modules[__name__] = _module
