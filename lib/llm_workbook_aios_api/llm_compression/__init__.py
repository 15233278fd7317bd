"""AI-OS's import paths (``llm_compression.inference.*``, ``llm_compression.errors``, ``llm_compression.logger``)
for the workbook's implementation in ``llm_workbook``.

This directory is put on ``sys.path`` last (by ``llm_workbook_aios_api.pth``), so an installed AI-OS, whose
top-level package is also ``llm_compression``, is found first and used unchanged; this layer only answers
where AI-OS is absent. Each module here *is* the workbook's module (``sys.modules`` aliasing), so classes,
private names and monkeypatching agree between the two import paths.
"""

import llm_workbook as _workbook

PROVIDED_BY = "llm_workbook"  # how to tell this layer from AI-OS's own package
__version__ = _workbook.__version__
__all__ = list(_workbook.__all__)


def __getattr__(name: str):
    # The planning report's top-level names, lazily as the workbook exports them.
    if name in _workbook.__all__:
        return getattr(_workbook, name)
    raise AttributeError(name)
