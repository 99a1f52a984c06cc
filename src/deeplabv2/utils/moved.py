"""Old module paths kept importable after the package was arranged into folders.

``import deeplabv2.fast`` (the README once said so) still works: a finder on ``sys.meta_path``
answers for each old name with the module at its new home, after a ``DeprecationWarning`` that
names it. The same module object is returned, so ``deeplabv2.fast.X is
deeplabv2.deploy.fast.X`` and monkeypatching either name patches both.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass  # the target module is already executed


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds ``package.OLD`` as ``package.NEW`` for each pair of ``moves``."""

    def __init__(self, package: str, moves: dict[str, str]):
        self.names = {f"{package}.{old}": f"{package}.{new}" for old, new in moves.items()}

    def find_spec(self, fullname, path=None, target=None):
        new = self.names.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; import it from there", DeprecationWarning,
                      stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install(package: str, moves: dict[str, str]) -> None:
    """Put the finder for ``moves`` on ``sys.meta_path`` once."""
    if not any(isinstance(f, MovedModules) and f.names.keys() >= {f"{package}.{o}" for o in moves}
               for f in sys.meta_path):
        sys.meta_path.append(MovedModules(package, moves))
