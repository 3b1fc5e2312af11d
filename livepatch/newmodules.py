"""Modules a release adds, carried in the bundle: importable while the
patch is applied (so that patched code can import them), gone again after
its rollback.

A finder at the front of sys.meta_path serves exactly the bundle's module
names, from the code the bundle carries for this Python (its digest
verified with the bundle). It is installed when an apply starts, before
the imports the patch's own import statements run, and removed if the
apply fails or when the patch is rolled back; the modules it created are
then dropped from sys.modules and from their parent package."""

from __future__ import annotations

import sys


class BundleModules:
    """name -> (code object, filename, source, is_package) of one patch."""

    def __init__(self, modules: dict):
        self.modules = dict(modules)
        self._installed = False

    # importlib's finder and loader protocol
    def find_spec(self, name, path=None, target=None):
        if name not in self.modules:
            return None
        from importlib.util import spec_from_loader
        code, filename, _, is_package = self.modules[name]
        spec = spec_from_loader(name, self, origin=filename, is_package=is_package)
        spec.has_location = False  # not on disk: linecache has the source
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        code, filename, _, _ = self.modules[module.__name__]
        module.__file__ = filename
        exec(code, module.__dict__)

    def install(self) -> bool:
        """Whether this call installed the finder (False: it already was)."""
        if self._installed or not self.modules:
            return False
        import linecache
        for _, filename, source, _ in self.modules.values():
            linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
        sys.meta_path.insert(0, self)
        self._installed = True
        return True

    def remove(self) -> None:
        """Uninstall the finder and drop the modules it created."""
        if not self._installed:
            return
        import linecache
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for name, (_, filename, _, _) in sorted(self.modules.items(), reverse=True):  # submodules first
            module = sys.modules.get(name)
            if module is not None and getattr(module.__spec__, "loader", None) is self:
                del sys.modules[name]
                parent, _, child = name.rpartition(".")
                if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
                    delattr(sys.modules[parent], child)
            linecache.cache.pop(filename, None)
        self._installed = False
