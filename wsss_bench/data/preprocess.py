"""Volume -> slices (docs/protocol.md section 4.2): resize the shorter in-plane side to S, centre-crop.

A volume is ``(C, X, Y, Z)`` in RAS order; slices are taken along the third axis, so a slice is
``(C, X, Y)`` (row = x towards patient right, column = y towards anterior).

- images: bilinear, ``align_corners=False``, ``antialias=True`` (torch), kept float32;
- masks: ``nearest-exact`` (pixel centre rule ``src = floor((dst + 0.5) * n_in / n_out)``),
  implemented in numpy so that label maps never pass through floating point;
- resized size: shorter side = S, longer side = round(long * S / short) with round = floor(x + .5);
- crop offset: floor((n - S) / 2) on each axis.

torch is imported inside :func:`resize_images` only.
"""
from __future__ import annotations

import numpy as np

from wsss_bench.lazy import F, torch

#: bump when the output of this module changes (part of the slice-store key)
PREPROCESS_VERSION = "1"


def round_half_up(x: float) -> int:
    """round() as the protocol defines it: floor(x + 0.5)."""
    return int(np.floor(x + 0.5))


def resized_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """In-plane size after scaling the shorter side of (h, w) to ``size``."""
    if h <= w:
        return size, round_half_up(w * size / h)
    return round_half_up(h * size / w), size


def crop_offsets(h: int, w: int, size: int) -> tuple[int, int]:
    """Top-left corner of the centred size x size crop of an (h, w) image."""
    return (h - size) // 2, (w - size) // 2


def nearest_exact_index(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for torch's ``nearest-exact`` resize."""
    idx = np.floor((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def slice_index(h: int, w: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column source indices that resize (nearest-exact) and crop in one gather."""
    h2, w2 = resized_shape(h, w, size)
    oh, ow = crop_offsets(h2, w2, size)
    rows = nearest_exact_index(h, h2)[oh : oh + size]
    cols = nearest_exact_index(w, w2)[ow : ow + size]
    return rows, cols


def resize_masks(labels: np.ndarray, size: int) -> np.ndarray:
    """Label volume (X, Y, Z) -> label slices (Z, S, S), same dtype, nearest-exact + crop."""
    rows, cols = slice_index(labels.shape[0], labels.shape[1], size)
    out = labels[rows][:, cols]  # (S, S, Z)
    return np.ascontiguousarray(np.moveaxis(out, 2, 0))


def resize_images(image: np.ndarray, size: int) -> np.ndarray:
    """Image volume (C, X, Y, Z) -> slices (Z, C, S, S) float32, bilinear with antialias + crop."""
    c, h, w, z = image.shape
    h2, w2 = resized_shape(h, w, size)
    oh, ow = crop_offsets(h2, w2, size)
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image.astype(np.float32, copy=False), 3, 0)))
    if (h2, w2) != (h, w):
        x = F.interpolate(x, size=(h2, w2), mode="bilinear", align_corners=False, antialias=True)
    x = x[:, :, oh : oh + size, ow : ow + size]
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def preprocess_volume(image: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One RAS case -> (images (Z, C, S, S) float32, labels (Z, S, S) uint8)."""
    if image.shape[1:] != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} disagree")
    return resize_images(image, size), resize_masks(labels.astype(np.uint8, copy=False), size)


def tissue_fraction(slices: np.ndarray) -> np.ndarray:
    """Share of pixels where the max over channels is > 0 (section 4.5); (N, C, S, S) -> (N,)."""
    return (slices.max(axis=1) > 0).mean(axis=(1, 2))
