"""Add stand-ins for the `angelslim.compressor.qat` modules that the PyPI wheel of angelslim 0.5.0 lacks.

The 0.5.0 wheel ships no `angelslim/compressor/qat/` package, yet four of its modules import from it:

* `compressor/__init__.py`      -> `from .qat.qat import QAT`
* `compressor/qad/qad.py`       -> `from ..qat.plugins import PluginManager` and `..qat.qat import QAT`
* `models/llm/qwen.py`          -> `from ...compressor.qat.modules.quantizer import fp8_cast_ste`
* `utils/zero3_io.py` (lazily)  -> `from ..compressor.qat.modules.quantizer import QuantLinear`

so `from angelslim.engine import Engine` fails with ModuleNotFoundError. PTQ never uses these names. This
script writes small stand-ins: `QAT` and `PluginManager` raise a clear error when used, `QuantLinear` is a
never-instantiated marker class (only used in an `isinstance` check), and `fp8_cast_ste` is a real
straight-through FP8 round trip (the only one PTQ-adjacent code could reach, in an optional attention patch).

It is run by build_env.sh inside the isolated venv (it imports nothing from angelslim), checks first that
the importing lines are exactly the expected ones, and fails loudly otherwise, so a new angelslim version
that changes them (or ships the real package) is noticed instead of silently shadowed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MARKER = "# stand-in written by llm_workbook tools/angelslim/patch_env.py"

# (file under the angelslim package, the exact import text it must contain)
EXPECTED_IMPORTERS: tuple[tuple[str, str], ...] = (
    ("compressor/__init__.py", "from .qat.qat import QAT"),
    ("compressor/qad/qad.py", "from ..qat.plugins import PluginManager"),
    ("compressor/qad/qad.py", "from ..qat.qat import QAT"),
    ("models/llm/qwen.py", "from ...compressor.qat.modules.quantizer import fp8_cast_ste"),
    ("utils/zero3_io.py", "from ..compressor.qat.modules.quantizer import QuantLinear"),
)

UNUSABLE_MESSAGE = (
    "angelslim.compressor.qat is missing from the angelslim 0.5.0 PyPI wheel; this environment only has "
    "stand-ins (tools/angelslim/patch_env.py), so QAT/QAD cannot run here. Use PTQ."
)

STAND_INS: dict[str, str] = {
    "__init__.py": f'{MARKER}\n"""Stand-in package: the angelslim 0.5.0 wheel lacks compressor/qat."""\n',
    "qat.py": f'''{MARKER}
"""Stand-in for angelslim's QAT compressor: registered under the same name, unusable."""

from ..compressor_factory import CompressorFactory

_MESSAGE = {UNUSABLE_MESSAGE!r}


@CompressorFactory.register
class QAT:
    """Placeholder so `QAD(QAT)` can be defined; constructing it raises."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(_MESSAGE)
''',
    "plugins.py": f'''{MARKER}
"""Stand-in for angelslim's QAT plugin manager (used only by QAD)."""

_MESSAGE = {UNUSABLE_MESSAGE!r}


class PluginManager:
    """Placeholder; constructing it raises because QAT/QAD cannot run without the real package."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(_MESSAGE)
''',
    "modules/__init__.py": f'{MARKER}\n"""Stand-in subpackage."""\n',
    "modules/quantizer.py": f'''{MARKER}
"""Stand-ins for the two quantizer names the rest of angelslim imports."""

import torch

_MESSAGE = {UNUSABLE_MESSAGE!r}


def fp8_cast_ste(x: torch.Tensor) -> torch.Tensor:
    """Round-trip x through float8_e4m3fn; the gradient passes straight through (identity)."""
    rounded = x.to(torch.float8_e4m3fn).to(x.dtype)
    return x + (rounded - x).detach()


class QuantLinear(torch.nn.Linear):
    """Marker type for `isinstance` checks; no stand-in model ever holds one, so creating one raises."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(_MESSAGE)
''',
}


class PatchError(RuntimeError):
    """The installed angelslim does not look like the version these stand-ins were written for."""


def angelslim_dir() -> Path:
    """Locate the installed angelslim package without importing it (importing it is what fails)."""
    spec = importlib.util.find_spec("angelslim")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("angelslim is not installed in this interpreter: " + sys.executable)
    return Path(list(spec.submodule_search_locations)[0])


def check_importers(package: Path) -> None:
    """Fail unless every expected import of the missing package is still there, verbatim."""
    for relative, text in EXPECTED_IMPORTERS:
        path = package / relative
        if not path.is_file():
            raise PatchError(f"expected file {path} is missing; angelslim changed, review patch_env.py")
        if text not in path.read_text(encoding="utf-8"):
            raise PatchError(f"{path} no longer contains {text!r}; angelslim changed, review patch_env.py")


def check_qat_dir(qat_dir: Path) -> None:
    """Refuse to overwrite a real qat package (a newer wheel may ship it)."""
    if not qat_dir.exists():
        return
    for path in qat_dir.rglob("*.py"):
        if MARKER not in path.read_text(encoding="utf-8"):
            raise PatchError(
                f"{path} exists and is not a stand-in: this angelslim ships compressor/qat, "
                "so the stand-ins are not needed; review patch_env.py"
            )


def write_stand_ins(qat_dir: Path) -> list[Path]:
    """Write (or rewrite, idempotently) every stand-in file and return their paths."""
    written = []
    for relative, source in STAND_INS.items():
        path = qat_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
        written.append(path)
    return written


def main() -> int:
    """Check the installed angelslim, then write the qat stand-ins into it."""
    package = angelslim_dir()
    check_importers(package)
    qat_dir = package / "compressor" / "qat"
    check_qat_dir(qat_dir)
    for path in write_stand_ins(qat_dir):
        print(f"wrote stand-in {path}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PatchError as error:
        print(f"patch_env.py: {error}", file=sys.stderr)
        sys.exit(1)
