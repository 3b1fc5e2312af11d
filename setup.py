"""Packaging that pyproject.toml cannot express.

- livepatch-autostart.pth goes to the root of site-packages, for a wheel
  (`pip install .`, `python -m build`) and for an editable install (`pip
  install -e .`) alike, so that any interpreter of the environment starts
  the agent when LIVEPATCH_AUTOSTART=1 (`livepatch run`, and every child it
  spawns).
- The 1 KB attach shim (livepatch/attach_shim.c) is compiled when the
  package is built, so a production host needs no C compiler to attach.
  It is a plain shared library loaded with dlopen, never imported; built
  as an optional extension, an install without a compiler still succeeds
  and `livepatch attach` compiles it on first use instead."""

import os
import shutil

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
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


class BuildShim(build_ext):
    """The shim calls no Python API at link time (it looks the few functions
    up in the running process), so one file serves every Python version:
    no ABI tag in its name."""

    def get_ext_filename(self, fullname):
        return os.path.join(*fullname.split(".")) + ".so"


class PlatformWheel(bdist_wheel):
    """py3-none-<platform>: the wheel holds a native library but no
    extension module of one Python version."""

    def get_tag(self):
        _, _, platform = super().get_tag()
        return "py3", "none", platform


SHIM = Extension("livepatch._attach_shim", ["livepatch/attach_shim.c"], libraries=["pthread", "dl"],
                 extra_compile_args=["-O2"], optional=True)

setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth, "build_ext": BuildShim,
                "bdist_wheel": PlatformWheel},
      ext_modules=[SHIM])
