"""AI-OS's import paths (``llm_compression.inference.*``, ``llm_compression.errors``, ``llm_compression.logger``)
for the workbook's implementation in ``llm_workbook``, used only where AI-OS itself is not installed.

This directory is put on ``sys.path`` last (by ``llm_workbook_aios_api.pth``), so an AI-OS found through
``sys.path`` (a regular install, its checkout on ``PYTHONPATH``) is imported first. An AI-OS installed
editable by a current setuptools is found by a finder that runs after ``sys.path``: this package is then
imported first, finds AI-OS, and hands the name over to it (``_defer_to_aios``). Each module here *is* the
workbook's module (``sys.modules`` aliasing), so classes and monkeypatching agree between the two paths.
"""

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

PROVIDED_BY = "llm_workbook"  # how to tell this layer from AI-OS's own package


def _aios_spec():
    """AI-OS's ``llm_compression``, if any other entry of sys.path or finder provides one."""
    ours = Path(__file__).resolve().parent.parent
    others = [p for p in sys.path if Path(p or ".").resolve() != ours]
    spec = importlib.machinery.PathFinder.find_spec(__name__, others)
    for finder in sys.meta_path:
        if spec is not None:
            break
        if finder is not importlib.machinery.PathFinder and hasattr(finder, "find_spec"):
            spec = finder.find_spec(__name__, None)
    return spec


def _defer_to_aios(spec) -> None:
    # The import system returns whatever sys.modules holds for the name once this module has run.
    module = importlib.util.module_from_spec(spec)
    sys.modules[__name__] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[__name__]
        raise


_spec = _aios_spec()
if _spec is not None:
    _defer_to_aios(_spec)
else:
    import llm_workbook as _workbook

    __version__ = _workbook.__version__
    __all__ = list(_workbook.__all__)

    def __getattr__(name: str):
        # The planning report's top-level names, lazily as the workbook exports them.
        if name in _workbook.__all__:
            return getattr(_workbook, name)
        raise AttributeError(name)
