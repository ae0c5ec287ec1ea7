"""Deferred imports for plugin modules.

Listing plugins (``wsss-bench plugins``) imports every plugin module; it must not pay for
torch.  A plugin module writes ``from wsss_bench.lazy import torch, F`` and the real import
happens on first attribute access, i.e. when the method actually runs.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from wsss_bench._compat import ensure_torchvision


class LazyModule:
    """Stands in for a module until one of its attributes is used."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._module is None:
            if self._name == "timm" or self._name.startswith("timm."):
                ensure_torchvision()
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._load(), attr)

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded"
        return f"<lazy module {self._name!r} ({state})>"


torch = LazyModule("torch")
nn = LazyModule("torch.nn")
F = LazyModule("torch.nn.functional")
np = LazyModule("numpy")
timm = LazyModule("timm")
pd = LazyModule("pandas")
nib = LazyModule("nibabel")
