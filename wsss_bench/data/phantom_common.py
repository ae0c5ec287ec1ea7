"""Building blocks shared by the brain and abdomen phantoms (docs/protocol.md section 11).

Everything is vectorised numpy on a millimetre grid centred on the field of view.  Volumes are
built in RAS voxel order (index increases towards patient right / anterior / superior) and
flipped on writing when a case uses an LPS-style affine, so the readers' reorientation has real
work to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wsss_bench.data.preprocess import slice_index
from wsss_bench.lazy import nib


@dataclass(frozen=True)
class Grid:
    """Voxel grid of one phantom volume; coordinates in mm, RAS, centred on the FOV."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def fov(self) -> np.ndarray:
        return np.asarray(self.shape, dtype=np.float64) * np.asarray(self.spacing)

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Open (broadcastable) x, y, z coordinate arrays, float32."""
        out = []
        for ax, (n, s) in enumerate(zip(self.shape, self.spacing)):
            c = ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32)
            shape = [1, 1, 1]
            shape[ax] = n
            out.append(c.reshape(shape))
        return out[0], out[1], out[2]

    def affine(self, lps: bool) -> np.ndarray:
        """diag(s) (RAS) or diag(-sx, -sy, sz) (LPS-style), origin at the FOV centre."""
        aff = np.eye(4)
        for ax in range(3):
            half = (self.shape[ax] - 1) / 2.0 * self.spacing[ax]
            sign = -1.0 if (lps and ax < 2) else 1.0
            aff[ax, ax] = sign * self.spacing[ax]
            aff[ax, 3] = -sign * half
        return aff


def grid_from(section) -> Grid:
    """Grid of a profile's ``brain_phantom`` / ``abdomen_phantom`` section."""
    return Grid(tuple(int(v) for v in section.volume), tuple(float(v) for v in section.voxel_mm))


def smooth_field(rng: np.random.Generator, grid: Grid, corr_mm: float) -> np.ndarray:
    """Unit-variance random field with correlation length ~corr_mm (low-res noise, blur, zoom)."""
    from scipy.ndimage import gaussian_filter, zoom

    cell = corr_mm / 2.0
    low_shape = [max(3, int(np.ceil(f / cell)) + 1) for f in grid.fov]
    low = gaussian_filter(rng.standard_normal(low_shape), 1.0, mode="reflect")
    low = (low - low.mean()) / (low.std() + 1e-12)
    field = zoom(low.astype(np.float32), [n / m for n, m in zip(grid.shape, low_shape)], order=1)
    return field[: grid.shape[0], : grid.shape[1], : grid.shape[2]]


def voxel_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float = 1.0) -> np.ndarray:
    """Unit-variance white noise smoothed over ``sigma_vox`` voxels (fine texture)."""
    from scipy.ndimage import gaussian_filter

    n = gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox)
    return n / (n.std() + 1e-12)


def ellipsoid_q(x, y, z, centre, semi) -> np.ndarray:
    """Squared normalised radius of an axis-aligned ellipsoid (< 1 inside)."""
    return (
        ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    )


def tube(x, y, z, points, radii) -> np.ndarray:
    """Mask of a tube along a polyline ``points`` (K, 3) mm, radius interpolated from ``radii`` (K,).

    Per segment: project onto the segment, clip to its ends, compare the distance with the radius
    at the projection.  Vectorised over the whole grid, K - 1 passes.
    """
    pts = np.asarray(points, dtype=np.float32)
    rad = np.asarray(radii, dtype=np.float32)
    inside = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=bool)
    for k in range(len(pts) - 1):
        p0, d = pts[k], pts[k + 1] - pts[k]
        length2 = float(d @ d) or 1e-6
        t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2
        t = np.clip(t, 0.0, 1.0)
        dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
        r = rad[k] + t * (rad[k + 1] - rad[k])
        inside |= dist2 < r * r
    return inside


def log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def slice_stats(fg: np.ndarray, tissue: np.ndarray, size: int, min_tissue: float = 0.12) -> dict[str, int]:
    """Slice classes the loader will see at image size ``size`` (nearest-exact + crop).

    ``fg`` and ``tissue`` are (X, Y, Z) bool in RAS order.  Counts positive (f > 1%), negative
    with tissue fraction >= ``min_tissue`` and ambiguous (0 < f <= 1%) slices.
    """
    rows, cols = slice_index(fg.shape[0], fg.shape[1], size)
    f = fg[rows][:, cols].mean(axis=(0, 1))
    t = tissue[rows][:, cols].mean(axis=(0, 1))
    return {
        "pos": int((f > 0.01).sum()),
        "neg": int(((f == 0) & (t >= min_tissue)).sum()),
        "amb": int(((f > 0) & (f <= 0.01)).sum()),
    }


def stats_ok(stats: dict[str, int], need_amb: bool, min_neg: int = 1, min_pos: int = 3) -> bool:
    """Enough slices of each class.  Three positives make round(3 * 1073 / 5802) = 1 test
    negative even when a whole test split is one case."""
    return stats["pos"] >= min_pos and stats["neg"] >= min_neg and (stats["amb"] >= 1 or not need_amb)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, lps: bool) -> None:
    """Save a RAS-ordered array with ``affine``; LPS-style cases are stored flipped in x and y."""
    arr = np.ascontiguousarray(data[::-1, ::-1, :]) if lps else np.ascontiguousarray(data)
    img = nib.Nifti1Image(arr, affine)
    img.header.set_data_dtype(arr.dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
