"""Test doubles shared by the method tests: a small in-memory stand-in for TaskData.

One class instead of a copy per test module.  The images are drawn exactly as the copies drew
them (one ``torch.rand`` for all images, then one ``torch.randint`` per positive, in row
order, from one generator), so the same arguments give the same pixels: the method tests
compare trainings against recorded numbers and would silently check something else if the
fake changed.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from wsss_bench.interfaces import SliceBatch


def split_3_to_1(n: int) -> dict[str, np.ndarray]:
    """train = the first three quarters of the rows; val = test = the last quarter."""
    n_tr = (3 * n) // 4
    return {"train": np.arange(n_tr), "val": np.arange(n_tr, n), "test": np.arange(n_tr, n)}


class FakeTaskData:
    """TaskData's interface (``labels``, ``split``, ``images``, ``masks``, ``batches``) on random
    images: every pixel is ``noise * U(0, 1)``; positives (odd rows unless ``labels`` says
    otherwise) carry a ``blob x blob`` square brightened by ``bright`` at a random place, which
    is also their foreground mask.

    ``splits`` maps split names to rows (default: :func:`split_3_to_1`).  ``labels`` maps a split
    name to the labels of its rows (an int sets them all), applied before the squares are drawn.
    ``refuse_shuffle`` makes ``batches(shuffle=True)`` fail, for code that must shuffle itself.
    """

    is_phantom = True

    def __init__(self, n: int = 48, size: int = 32, channels: int = 4, seed: int = 0, *, noise: float = 0.4,
                 blob: int = 12, bright: float = 0.6, labels: dict[str, Any] | None = None,
                 splits: dict[str, np.ndarray] | None = None, fingerprint: str | None = None,
                 refuse_shuffle: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        lab = (torch.arange(n) % 2).long()
        self._splits = split_3_to_1(n) if splits is None else {k: np.asarray(v) for k, v in splits.items()}
        for name, value in (labels or {}).items():
            lab[torch.as_tensor(self._splits[name])] = torch.as_tensor(value).long()
        self.labels = lab.numpy().astype(np.int8)
        self._images = torch.rand(n, channels, size, size, generator=g) * noise
        self._masks = torch.zeros(n, size, size, dtype=torch.bool)
        for i in torch.nonzero(lab).flatten().tolist():
            r, c = torch.randint(0, size - blob, (2,), generator=g).tolist()
            self._images[i, :, r:r + blob, c:c + blob] += bright
            self._masks[i, r:r + blob, c:c + blob] = True
        self.image_size, self.channels = size, channels
        self.fingerprint = f"fake-{seed}-{n}" if fingerprint is None else fingerprint
        self.refuse_shuffle = refuse_shuffle

    def __len__(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> np.ndarray:
        return self._splits[name].copy()

    def images(self, idx: Any) -> np.ndarray:
        """(n, C, S, S) float32, like TaskData.images."""
        return self._images[torch.as_tensor(np.asarray(idx, dtype=np.int64))].numpy()

    def masks(self, idx: Any) -> np.ndarray:
        """(n, S, S) bool: the bright square of each positive row, nothing on negatives."""
        return self._masks[torch.as_tensor(np.asarray(idx, dtype=np.int64))].numpy()

    def batches(self, idx_or_split: Any, batch_size: int, shuffle: bool = False, seed: int | None = None,
                device: str = "cpu", with_masks: bool = False) -> Iterator[SliceBatch]:
        """Rows in order (shuffled by ``np.random.default_rng(seed or 0)`` on request), as SliceBatch."""
        idx = self.split(idx_or_split) if isinstance(idx_or_split, str) else np.asarray(idx_or_split)
        if shuffle:
            assert not self.refuse_shuffle, "the code under test must shuffle itself"
            idx = idx[np.random.default_rng(0 if seed is None else seed).permutation(len(idx))]
        for s in range(0, len(idx), batch_size):
            part = idx[s:s + batch_size]
            t = torch.as_tensor(part)
            yield SliceBatch(images=self._images[t].to(device), labels=torch.from_numpy(self.labels[part]).long().to(device),
                             index=part, case_ids=[f"c{i}" for i in part], z=[0] * len(part),
                             masks=self._masks[t].to(device) if with_masks else None)
