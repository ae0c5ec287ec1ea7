"""Data layer: NIfTI readers, preprocessing, slice store, splits and synthetic phantoms.

Public entry points (imported lazily, so ``import wsss_bench.data`` stays cheap):

- :func:`load_task_data` -> :class:`TaskData` (``wsss_bench.data.taskdata``)
- :class:`BratsDataset`, :class:`Flare21Dataset` (``wsss_bench.data.readers``)
- :func:`prepare_slices`, :func:`data_fingerprint` (``wsss_bench.data.store``)
- :func:`write_brain_phantom`, :func:`write_abdomen_phantom` (phantom modules)

See docs/data.md.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_task_data": "wsss_bench.data.taskdata",
    "TaskData": "wsss_bench.data.taskdata",
    "DataView": "wsss_bench.data.view",
    "ensure_phantom": "wsss_bench.data.taskdata",
    "BratsDataset": "wsss_bench.data.readers",
    "Flare21Dataset": "wsss_bench.data.readers",
    "BUILTIN_DATASETS": "wsss_bench.data.readers",
    "prepare_slices": "wsss_bench.data.store",
    "data_fingerprint": "wsss_bench.data.store",
    "SliceStore": "wsss_bench.data.store",
    "write_brain_phantom": "wsss_bench.data.phantom_brain",
    "write_abdomen_phantom": "wsss_bench.data.phantom_abdomen",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'wsss_bench.data' has no attribute {name!r}")
