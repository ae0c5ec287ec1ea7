"""Built-in dataset plugins: BraTS21 and FLARE21 (docs/protocol.md sections 2-3, 11).

The readers live in the core (``wsss_bench.data.readers``) because the data layer and its tests
use them directly; this module only registers them.
"""
from __future__ import annotations

from wsss_bench.data.readers import BratsDataset, Flare21Dataset
from wsss_bench.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    register(BratsDataset)
    register(Flare21Dataset)
