"""Packaging that pyproject.toml cannot express: livepatch-autostart.pth
goes to the root of site-packages, for a wheel (`pip install .`, `python -m
build`) and for an editable install (`pip install -e .`) alike, so that any
interpreter of the environment starts the agent when LIVEPATCH_AUTOSTART=1
(`livepatch run`, and every child it spawns)."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "livepatch-autostart.pth"
HERE = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithPth(build_py):
    """The wheel's root is site-packages: put the .pth next to the packages."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):
    """An editable wheel holds only the finder and its .pth; whatever is in
    the unpacked directory is added to it, so the .pth is put there too."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copyfile(os.path.join(HERE, PTH), os.path.join(installation_dir, PTH))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
