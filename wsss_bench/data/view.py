"""The task's data as a plugin sees it: images and image-level labels, never segmentation.

The mask guard of the benchmark: a weakly supervised method must not read the ground truth.
The view asks its context which plugin is acting now (``ctx.acting_plugin``) and lets only a
plugin that declares ``reads_train_masks = True`` (the fully supervised upper bound) read
training and validation masks.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from wsss_bench.errors import PluginError

_HIDDEN = frozenset({"store", "fg_fraction", "_rows_with_masks"})


class DataView:
    """The task's data as plugins see it: images and image-level labels, no segmentation.

    ``masks`` (and ``batches(with_masks=True)``) work only while a plugin that declares
    ``reads_train_masks = True`` is acting (the FSL upper bound), and only on train/val
    rows.  Test masks are read by the runner alone, for scoring.  Everything else is
    forwarded to the underlying TaskData.
    """

    def __init__(self, data: Any, ctx: Any) -> None:
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "_ctx", ctx)

    def __getattr__(self, name: str) -> Any:
        if name in _HIDDEN:
            raise PluginError(self._refusal(f"'{name}'"))
        return getattr(self._data, name)

    def __len__(self) -> int:
        return len(self._data)

    def _refusal(self, what: str) -> str:
        who = self._ctx.acting_plugin
        name = f"{who.kind} plugin '{who.name}'" if who is not None else "code outside a plugin"
        return (f"{name} tried to read {what} of the segmentation ground truth; WSSS methods see image-level "
                f"labels only. A fully supervised plugin must declare "
                f"`reads_train_masks = True`, and then reads training/validation masks only")

    def _check(self, idx: Any) -> None:
        who = self._ctx.acting_plugin
        if who is None or not getattr(who, "reads_train_masks", False):
            raise PluginError(self._refusal("masks"))
        rows = np.asarray(idx, dtype=np.int64).reshape(-1)
        allowed = np.concatenate([self._data.split("train"), self._data.split("val")])
        if not np.isin(rows, allowed).all():
            raise PluginError(f"{who.kind} plugin '{who.name}' tried to read masks of test slices; "
                              f"only training and validation masks may be read")

    def masks(self, idx: Any):
        self._check(idx)
        return self._data.masks(idx)

    def batches(self, split_or_idx: Any, batch_size: int, shuffle: bool = False, seed: int | None = None,
                with_masks: bool = False, device: str = "cpu"):
        if with_masks:
            rows = self._data.split(split_or_idx) if isinstance(split_or_idx, str) else split_or_idx
            self._check(rows)
        extra = {"with_masks": True} if with_masks else {}
        return self._data.batches(split_or_idx, batch_size, shuffle=shuffle, seed=seed, device=device, **extra)
