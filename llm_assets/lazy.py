"""Package exports imported on first use (PEP 562): a package whose modules load torch can be
imported for its light modules (the definitions, log readers) without loading torch."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """The package's module-level `__getattr__`: each name of `modules` (name → submodule) is
    imported from `package.submodule` when first read."""

    def __getattr__(name: str) -> Any:
        if name not in modules:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{modules[name]}"), name)

    return __getattr__
