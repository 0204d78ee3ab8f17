"""Ship the study's notebooks and book sources inside the wheel.

They live at the repository root (where Colab badges and JupyterLab users find them) and are
copied into ``covidlib/project/`` at build time, so ``pip install covidlib[study,book]`` can run
``covidlib study`` without a clone. An editable install reads them from the root instead.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROJECT_FILES = ["_config.yml", "_toc.yml", "notebooks/*.ipynb", "book/*.md"]


class BuildWithProjectFiles(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "covidlib" / "project"
        for pattern in PROJECT_FILES:
            for src in ROOT.glob(pattern):
                dst = target / src.relative_to(ROOT)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildWithProjectFiles})
