"""Make a module callable, so `dfineseg.train(cfg)` works although `dfineseg/train/` is a package."""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


def make_module_callable(module_name: str, api_function: str) -> None:
    """Calling the module calls `dfineseg.api.<api_function>` (imported on the call, not before)."""

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module("dfineseg.api"), api_function)(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule
