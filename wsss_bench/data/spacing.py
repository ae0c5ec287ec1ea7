"""Pixel spacing in mm of the slice store's S x S slices (for the boundary metrics).

A store records, per case, the spacing of its slices on the S x S grid (row, column, slice),
derived from the RAS voxel size in the NIfTI header and the in-plane resize of
``wsss_bench.data.preprocess``.  Stores built before this field existed get it from the headers
when they are opened (``wsss_bench.data.taskdata.case_spacing``); their key and files are not changed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from wsss_bench.data.preprocess import resized_shape

def slice_grid_spacing(voxel_mm: Any, ras_shape: Any, size: int) -> list[float]:
    """(row, column, slice) spacing in mm of a case's S x S slices.

    The in-plane resize maps n_in source pixels onto n_out (:func:`resized_shape`), so one
    slice pixel spans n_in / n_out source voxels along each in-plane axis; the crop keeps that
    spacing and slices are not resampled along the third axis.
    """
    h, w = int(ras_shape[0]), int(ras_shape[1])
    h2, w2 = resized_shape(h, w, int(size))
    return [float(voxel_mm[0]) * h / h2, float(voxel_mm[1]) * w / w2, float(voxel_mm[2])]


def spacing_record(source: Any, root: Path, cases: list[str], shapes: list[Any], size: int) -> dict:
    """The store's ``spacing`` field: per case the slice-grid spacing, from the headers.

    A reader without ``voxel_size(root, case)`` (third-party) gets 1 mm voxels, said in ``from``.
    """
    reader = getattr(source, "voxel_size", None)
    out = {}
    for case, shape in zip(cases, shapes):
        voxel = reader(root, case) if reader is not None else (1.0, 1.0, 1.0)
        out[case] = slice_grid_spacing(voxel, shape, size)
    return {"unit": "mm", "axes": "row, column, slice of the S x S slices",
            "from": "NIfTI header" if reader is not None else "assumed 1 mm voxels (the reader has no voxel_size)",
            "cases": out}
