"""Metadata lives in pyproject.toml; this only ships ``llm_workbook_aios_api.pth`` at the top of the wheel.

The .pth appends ``llm_workbook_aios_api/`` (AI-OS's ``llm_compression`` import paths for our code) to the
end of ``sys.path``: an installed AI-OS is found first and keeps its own package.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "llm_workbook_aios_api.pth"


class BuildWithAiosPaths(build_py):
    def run(self):
        super().run()
        self.copy_file(str(Path("lib") / PTH), str(Path(self.build_lib) / PTH))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH)]


setup(cmdclass={"build_py": BuildWithAiosPaths})
