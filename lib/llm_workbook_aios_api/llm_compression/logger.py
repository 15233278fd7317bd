"""``llm_compression.logger`` is ``llm_workbook.logger`` (see the package docstring)."""

import sys

from llm_workbook import logger as _module

sys.modules[__name__] = _module
