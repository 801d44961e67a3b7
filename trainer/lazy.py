"""A package's names imported on first use (PEP 562): `import trainer` stays cheap (the app builds its page without
torch), and importing one submodule runs no other (an eager package __init__ runs whenever any of its submodules is
imported, and closed an import circle through formats.check and models.meta)."""
from __future__ import annotations

import importlib


def lazy_getattr(package: str, exports: dict[str, str]):
    """The module-level __getattr__ of `package`: exports maps a name to the submodule that defines it, or to
    "module:attribute" where the name differs there."""
    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = exports[name].partition(":")
        return getattr(importlib.import_module(f".{module}", package), attr or name)
    return __getattr__
