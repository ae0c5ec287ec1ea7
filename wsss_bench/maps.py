"""Map helpers shared by every CAM source and refiner (docs/methods/conventions.md, docs/protocol.md section 6).

All functions are batched torch code that runs on whatever device the maps live on:

- :func:`minmax` per-image min-max scaling to [0, 1] (zeros for a constant map);
- :func:`upsample` bilinear resize with ``align_corners=False`` ("Up" in the spec);
- :func:`binarize_cam` the CAM rule, ``minmax(m) > 0.5``;
- :func:`otsu_masks` the Otsu rule, equal to ``skimage.filters.threshold_otsu(nbins=256)``
  on ``minmax(m)``, vectorised over the batch.

A constant map gives an empty mask under both rules (docs/protocol.md section 6).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from wsss_bench.lazy import F, torch

if TYPE_CHECKING:  # pragma: no cover
    import torch as _torch

    Tensor = _torch.Tensor

#: below this range (max - min) a map counts as constant and min-max gives zeros
FLAT_RANGE = 1e-8
#: the CAM rule's threshold on min-max scaled maps (profiles.toml common.cam_threshold)
CAM_THRESHOLD = 0.5
#: histogram bins of the Otsu rule (profiles.toml common.otsu_bins)
OTSU_BINS = 256


def minmax(m: "Tensor") -> "Tensor":
    """Scale each image of ``m`` (B, ...) to [0, 1]; images with max - min < 1e-8 become 0.

    The division is ``(m - min) / (max - min)``, so the largest value is exactly 1 and the
    smallest exactly 0 (the Otsu rule relies on this).
    """
    if m.ndim < 2:
        raise ValueError(f"minmax expects a batch (B, ...), got shape {tuple(m.shape)}")
    if not m.is_floating_point():
        m = m.float()
    flat = m.reshape(m.shape[0], -1)  # (B, N)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    rng = hi - lo
    flat_img = rng < FLAT_RANGE  # (B, 1)
    out = (flat - lo) / torch.where(flat_img, torch.ones_like(rng), rng)
    out = out.masked_fill(flat_img, 0.0)
    return out.reshape(m.shape)


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def upsample(maps: "Tensor", size: int | Sequence[int]) -> "Tensor":
    """Bilinear resize (``align_corners=False``) of (B, h, w) or (B, K, h, w) maps to ``size``."""
    size = _size2(size)
    if maps.ndim == 3:
        if tuple(maps.shape[-2:]) == size:
            return maps
        return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if maps.ndim == 4:
        if tuple(maps.shape[-2:]) == size:
            return maps
        return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    raise ValueError(f"upsample expects (B, h, w) or (B, K, h, w) maps, got shape {tuple(maps.shape)}")


def binarize_cam(maps: "Tensor", threshold: float = CAM_THRESHOLD) -> "Tensor":
    """The CAM rule: ``minmax(m) > threshold`` per image; (B, H, W) bool."""
    return minmax(maps) > threshold


def _cumsum(x: "Tensor") -> "Tensor":
    """Cumulative sum over dim 1 that stays deterministic on CUDA.

    torch refuses (or warns about) a floating-point CUDA cumsum in deterministic mode; there
    a triangular matmul gives the same numbers, because every partial sum of the Otsu
    histogram (counts times bin centres k/512) is exact in float64, whatever the order.
    """
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        n = x.shape[1]
        tri = torch.ones(n, n, dtype=x.dtype, device=x.device).triu_()  # tri[i, j] = i <= j
        return x @ tri
    return x.cumsum(1)


def otsu_thresholds(maps: "Tensor", bins: int = OTSU_BINS) -> "Tensor":
    """Otsu threshold (B,) of each image of ``minmax(maps)``, as skimage computes it.

    Mirrors ``skimage.filters.threshold_otsu(image, nbins=bins)`` step for step: numpy's
    uniform-bin histogram over [min, max] (= [0, 1] after min-max), bin centres in the
    map's dtype, class weights and means in float64, first arg-max of the between-class
    variance.  For a constant image skimage returns the pixel value; here that is 0, so
    ``m > th`` is empty either way.
    """
    mm = minmax(maps)
    b = mm.shape[0]
    flat = mm.reshape(b, -1)  # (B, N)
    dtype, device = flat.dtype, flat.device
    # numpy.linspace(0, 1, bins + 1): arange * step + start in float64, last = stop, cast.
    edges = (torch.arange(bins + 1, dtype=torch.float64, device=device) * (1.0 / bins)).to(dtype)
    edges[-1] = 1.0
    # numpy.histogram's fast path: floor((a - first) / (last - first) * bins), then fixed up
    # against the edges so every value lands in the bin whose edges bracket it.
    idx = (flat * bins).to(torch.int64).clamp_(0, bins - 1)  # values are >= 0, so trunc = floor
    idx = idx - (flat < edges[idx]).long()
    idx = idx + ((flat >= edges[idx + 1]) & (idx != bins - 1)).long()
    counts = torch.zeros(b, bins, dtype=torch.float64, device=device)
    counts.scatter_add_(1, idx, torch.ones_like(flat, dtype=torch.float64))  # (B, bins), exact
    centers = ((edges[:-1] + edges[1:]) / 2.0).to(torch.float64)  # (bins,)

    weight1 = _cumsum(counts)
    weight2 = _cumsum(counts.flip(1)).flip(1)
    moment = counts * centers
    mean1 = _cumsum(moment) / weight1
    mean2 = (_cumsum(moment.flip(1)) / weight2.flip(1)).flip(1)
    variance12 = weight1[:, :-1] * weight2[:, 1:] * (mean1[:, :-1] - mean2[:, 1:]) ** 2
    # Leading empty bins give 0/0; numpy's argmax would pick a NaN, but after min-max the
    # first and last bins are never empty, so NaN cannot occur for a non-constant map.
    best = variance12.nan_to_num(nan=-1.0).argmax(dim=1)  # first maximum, like numpy
    th = centers.to(dtype)[best]
    flat_img = flat.amax(dim=1) <= 0  # constant map: minmax gave zeros
    return torch.where(flat_img, torch.zeros_like(th), th)


def otsu_masks(maps: "Tensor", bins: int = OTSU_BINS) -> "Tensor":
    """The Otsu rule: ``minmax(m) > Otsu(minmax(m))`` per image; (B, H, W) bool."""
    mm = minmax(maps)
    th = otsu_thresholds(mm, bins)
    return mm > th.view(-1, *([1] * (mm.ndim - 1)))
