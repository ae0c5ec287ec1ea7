"""Plain records shared by the data layer, the context and the plugins.

No imports of the rest of wsss_bench: the data layer, the context and the interfaces all use
these without importing one another.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch


@dataclass(frozen=True)
class TaskDef:
    """One binary segmentation task of a dataset (docs/protocol.md section 1)."""

    task_id: str
    dataset: str
    foreground: tuple[int, ...] | None  # label ids that are foreground; None = any label > 0
    channels: int
    flips: bool  # flip augmentation / TTA allowed (BraTS only, docs/methods/conventions.md)
    cldf_cam: str  # the CAM source CLDF uses for this task


@dataclass
class SliceBatch:
    """A batch of preprocessed slices.  ``masks`` is None for every WSSS method."""

    images: "torch.Tensor"  # (B, C, S, S) float32 in [0, 1]
    labels: "torch.Tensor"  # (B,) long, image-level label
    index: "np.ndarray"  # (B,) row indices into the task's slice table
    case_ids: list[str]
    z: list[int]
    masks: "torch.Tensor | None" = None  # (B, S, S) bool, only for FSL and evaluation

    def __len__(self) -> int:
        return len(self.case_ids)


@dataclass
class CellLog:
    """What one cell produced for the manifest: facts, timed stages, artifacts, seeds.

    The context keeps one per cell (``RunContext.begin_cell``), so nothing leaks from one
    cell's manifest into the next one's.
    """

    records: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)
    used: list[str] = field(default_factory=list)  # artifact keys touched, in order
    seeds: dict[str, int] = field(default_factory=dict)  # component -> derived seed
