"""NIfTI readers of the built-in datasets (docs/protocol.md sections 2-3).

Every volume is reoriented to RAS with ``nibabel.as_closest_canonical`` (a pure axis
permutation/flip, no resampling) before anything else.  Bad input raises :class:`UserError`
with one line naming the root, case or file at fault and what was expected.

Two ways in:

- :meth:`geometry` reads only the NIfTI headers of a case (no voxel is decoded) and returns
  its channel count and RAS shape, so the slice store can lay out its arrays before any case
  is read, and shape/orientation mismatches fail before anything is written;
- :meth:`load_case` decodes the voxels, validates them (non-finite voxels, label values) and
  normalises them; :meth:`load` is the same without the notes.

Validation at load (a bad file fails the preparation before the store is published):

- a modality with NaN/inf voxels: UserError naming the file and the count, unless the dataset
  parameter ``nonfinite="zero"`` is set, which reads them as background (0 after normalisation)
  and records the count per case in the store's meta; a volume with no finite voxel always
  fails;
- BraTS21 segmentation values outside {0, 1, 2, 4}, FLARE21 labels outside {0..4}.

nibabel is imported inside functions so that listing plugins stays cheap.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from wsss_bench.data import phantom_abdomen, phantom_brain
from wsss_bench.errors import UserError
from wsss_bench.interfaces import DatasetSource, TaskDef
from wsss_bench.lazy import nib

BRATS_LAYOUT = "<root>/BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz"
FLARE_LAYOUTS = (
    "<root>/TrainingImg/train_XXX_0000.nii.gz + <root>/TrainingMask/train_XXX.nii.gz (official FLARE21)"
    " or <root>/imagesTr/<case>_0000.nii.gz + <root>/labelsTr/<case>.nii.gz (nnU-Net)"
)
FLARE_LABELS = {0, 1, 2, 3, 4}
#: BraTS21 Task 1: 1 necrotic core, 2 oedema, 4 enhancing tumour (3 is unused in this release)
BRATS_LABELS = {0, 1, 2, 4}
NONFINITE_POLICIES = ("error", "zero")


def read_header(path: Path) -> tuple[Any, tuple[int, ...], tuple[int, int, int]]:
    """(nibabel image with undecoded voxels, on-disk shape, shape after RAS reorientation).

    Only the header is read.  The RAS shape is what ``as_closest_canonical`` would give: input
    axis i goes to output axis ``io_orientation(affine)[i, 0]``.
    """
    try:
        img = nib.load(str(path))
        disk_shape = tuple(int(s) for s in img.shape)
        ornt = nib.io_orientation(img.affine) if len(disk_shape) == 3 else None
    except Exception as err:  # nibabel raises many types for broken files
        raise UserError(f"cannot read NIfTI file {path}: {err}") from None
    if len(disk_shape) != 3:
        raise UserError(f"{path} has shape {disk_shape}; expected a 3D volume")
    if not np.isfinite(np.asarray(ornt, dtype=float)).all():
        raise UserError(f"{path}: its header's affine gives no direction to at least one voxel axis (a zero or "
                        f"degenerate column); fix the file's sform/qform")
    ras = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        ras[int(target)] = disk_shape[axis]
    return img, disk_shape, (ras[0], ras[1], ras[2])


def ras_voxel_size(img: Any) -> tuple[float, float, float]:
    """Voxel size in mm along the RAS axes of ``img`` (from its affine; no voxel is decoded).

    The affine's column norms are the on-disk axes' voxel sizes; ``as_closest_canonical``
    permutes those axes, so they are permuted the same way.
    """
    import nibabel as nib

    sizes = nib.affines.voxel_sizes(img.affine)
    ornt = nib.io_orientation(img.affine)
    ras = [1.0, 1.0, 1.0]
    for axis, (target, _flip) in enumerate(ornt):
        ras[int(target)] = float(sizes[axis])
    return ras[0], ras[1], ras[2]


def read_ras(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """(data reoriented to RAS, on-disk shape); UserError if the file cannot be read."""
    img, disk_shape, _ = read_header(path)
    try:
        data = np.asanyarray(nib.as_closest_canonical(img).dataobj)
    except Exception as err:  # truncated gzip, short file, bad scaling ...
        raise UserError(f"cannot read NIfTI file {path}: {err}") from None
    if data.ndim != 3:
        raise UserError(f"{path} has shape {disk_shape}; expected a 3D volume")
    if data.dtype.kind not in "biuf":  # complex or RGB voxels: neither an intensity nor a label
        raise UserError(f"{path} holds {data.dtype} voxels; expected real-valued (integer or float) voxels")
    return data, disk_shape


def nonfinite_fix(data: np.ndarray, path: Path, policy: str, fill: float | None = None) -> tuple[np.ndarray, int]:
    """(data, number of non-finite voxels); they raise UserError, or become ``fill`` under "zero".

    ``fill`` None means the minimum of the finite voxels (0 after min-max normalisation).
    """
    if not np.issubdtype(data.dtype, np.floating):
        return data, 0  # integer voxels are always finite
    bad = ~np.isfinite(data)
    n = int(np.count_nonzero(bad))
    if n == 0:
        return data, 0
    if policy != "zero" or n == data.size:
        fix = "" if n == data.size else "; fix the file, or pass --nonfinite zero (dataset parameter nonfinite=zero) to read them as background"
        raise UserError(f"{path} holds {n} non-finite voxel(s) (NaN or inf) of {data.size}{fix}")
    data = np.array(data, copy=True)
    data[bad] = data[~bad].min() if fill is None else fill
    return data, n


def minmax(volume: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Per-volume min-max to [0, 1] (float32); a constant volume becomes zeros.

    ``out`` (float32, same shape) receives the result without a temporary copy.
    """
    v = volume.astype(np.float32, copy=False)
    lo, hi = float(v.min()), float(v.max())
    if out is None:
        out = np.empty(v.shape, dtype=np.float32)
    if hi - lo <= 0:
        out[...] = 0
        return out
    np.subtract(v, np.float32(lo), out=out)
    np.divide(out, np.float32(hi - lo), out=out)
    return out


def label_values(data: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a label volume (one comparison per value for small integer ranges,
    several times faster than ``np.unique``'s sort on a 512 x 512 x 100 volume)."""
    if np.issubdtype(data.dtype, np.integer) and data.size:
        lo, hi = int(data.min()), int(data.max())
        if hi - lo < 32:
            return np.array([v for v in range(lo, hi + 1) if v in (lo, hi) or (data == v).any()], dtype=np.int64)
    return np.unique(data)


def _as_labels(data: np.ndarray, path: Path, allowed: set[int] | None, hint: str = "") -> np.ndarray:
    """Integer label volume as uint8; UserError naming the file for bad values."""
    values = label_values(data)
    if not np.all(np.isfinite(values)):
        raise UserError(f"label file {path} holds non-finite values (NaN or inf); labels must be integers")
    if not np.all(np.equal(np.mod(values, 1), 0)) or values.min() < 0 or values.max() > 255:
        raise UserError(f"label file {path} holds non-integer or out-of-range values {values[:8].tolist()}")
    if allowed is not None and not set(values.astype(int).tolist()) <= allowed:
        bad = sorted(set(values.astype(int).tolist()) - allowed)
        raise UserError(f"label file {path} holds values {bad}; allowed label values are {sorted(allowed)}{hint}")
    return data.astype(np.uint8, copy=False)


def _validate_nonfinite(plugin: Any) -> None:
    if plugin.p["nonfinite"] not in NONFINITE_POLICIES:
        raise plugin.bad_param("nonfinite", f"is not one of {', '.join(NONFINITE_POLICIES)}")


def _check_root(root: Path | None, dataset: str, layout: str) -> Path:
    if root is None or not Path(root).is_dir():
        raise UserError(f"{dataset} data root {root} does not exist or is not a folder; expected {layout}")
    return Path(root)


def _why_missing(f: Path) -> str:
    """Why an expected case file is not a readable file, when there is more to say than 'missing'."""
    if f.is_symlink() and not f.exists():
        try:
            target = os.readlink(f)
        except OSError:
            target = "?"
        return f" ({f} is a symbolic link to {target}, which points nowhere or loops; fix or remove the link)"
    if f.exists() and not f.is_file():
        return f" ({f} is not a regular file: a folder, FIFO, socket or device; replace it by the NIfTI file)"
    return ""


def _shape_error(case: str, a: Path, sa: tuple, b: Path, sb: tuple) -> UserError:
    return UserError(f"case {case}: image {a} has shape {sa} but {b} has shape {sb}; they must match")


def _orientation_error(case: str, a: Path, b: Path) -> UserError:
    return UserError(f"case {case}: {a} and {b} have different orientations (affines); they must match")


# --------------------------------------------------------------------------- BraTS
class BratsDataset(DatasetSource):
    """BraTS21 Task 1 layout: four MR modalities + seg per case folder (docs/protocol.md section 2)."""

    name: ClassVar[str] = "brats"
    version: ClassVar[str] = "2"
    description: ClassVar[str] = "BraTS 2021 (flair, t1, t1ce, t2; whole tumour = seg > 0)"
    #: nonfinite: "error" (default) or "zero" (NaN/inf voxels read as background, counted)
    params: ClassVar[dict[str, Any]] = {"nonfinite": "error"}
    #: largest label value load() can return (it validates them): the store packs labels in 4 bits
    label_max: ClassVar[int] = max(BRATS_LABELS)
    cap_key: ClassVar[str] = "brats"
    split_rule: ClassVar[str] = "tenths"
    modalities: ClassVar[tuple[str, ...]] = phantom_brain.MODALITIES
    tasks: ClassVar[dict[str, TaskDef]] = {
        "brats": TaskDef("brats", "brats", None, 4, True, "amecam"),
    }

    def cases(self, root: Path) -> list[str]:
        root = _check_root(root, "BraTS", BRATS_LAYOUT)
        found = []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            files = phantom_brain.case_files(root, d.name)
            present = {m: f.is_file() for m, f in files.items()}
            if not any(present.values()):
                continue  # not a case folder
            missing = [m for m, ok in present.items() if not ok]
            if missing:
                raise UserError(
                    f"BraTS case {d.name} is missing its {', '.join(missing)} file(s): "
                    f"expected {files[missing[0]]}{_why_missing(files[missing[0]])}"
                )
            found.append(d.name)
        if not found:
            subdirs = [p.name for p in root.iterdir() if p.is_dir()][:3]
            hint = f" (sub-folders found: {', '.join(subdirs)})" if subdirs else ""
            raise UserError(f"no BraTS cases under {root}{hint}; expected {BRATS_LAYOUT}")
        return found

    def validate(self) -> None:
        _validate_nonfinite(self)

    def _files(self, root: Path, case: str) -> dict[str, Path]:
        files = phantom_brain.case_files(Path(root), case)
        for m, f in files.items():
            if not f.is_file():
                raise UserError(f"BraTS case {case} is missing its {m} file: expected {f}{_why_missing(f)}")
        return files

    def geometry(self, root: Path, case: str) -> tuple[int, tuple[int, int, int]]:
        """(channels, RAS shape) from the headers alone; shape/orientation mismatches fail here."""
        files = self._files(root, case)
        _, seg_shape, seg_ras = read_header(files["seg"])
        for m in self.modalities:
            _, shape, ras = read_header(files[m])
            if shape != seg_shape:
                raise _shape_error(case, files[m], shape, files["seg"], seg_shape)
            if ras != seg_ras:
                raise _orientation_error(case, files[m], files["seg"])
        return len(self.modalities), seg_ras

    def voxel_size(self, root: Path, case: str) -> tuple[float, float, float]:
        """RAS voxel size in mm of the case's segmentation file (header only)."""
        return ras_voxel_size(read_header(self._files(root, case)["seg"])[0])

    def load(self, root: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
        image, labels, _ = self.load_case(root, case)
        return image, labels

    def load_case(self, root: Path, case: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """(image (4, X, Y, Z) float32 in [0, 1], seg (X, Y, Z) uint8, notes), RAS."""
        files = self._files(root, case)
        seg_raw, seg_shape = read_ras(files["seg"])
        labels = _as_labels(
            seg_raw, files["seg"], BRATS_LABELS,
            " (BraTS21: 1 necrotic core, 2 oedema, 4 enhancing tumour; label 3 belongs to another "
            "release's numbering or to a corrupt file)",
        )
        del seg_raw
        image = np.empty((len(self.modalities), *labels.shape), dtype=np.float32)
        notes: dict = {}
        for c, m in enumerate(self.modalities):
            data, shape = read_ras(files[m])
            if shape != seg_shape:
                raise _shape_error(case, files[m], shape, files["seg"], seg_shape)
            if data.shape != labels.shape:
                raise _orientation_error(case, files[m], files["seg"])
            data, n_bad = nonfinite_fix(data, files[m], self.p["nonfinite"])  # -> the volume minimum
            if n_bad:
                notes[f"nonfinite_{m}"] = n_bad
            minmax(data, out=image[c])
            del data
        return image, labels, notes

    def synthesize(self, out: Path, profile: Any, seed: int, n_cases: int | None = None) -> None:
        phantom_brain.write_brain_phantom(out, profile, seed, n_cases)

    @property
    def phantom_version(self) -> str:
        return phantom_brain.GENERATOR_VERSION


# --------------------------------------------------------------------------- FLARE21
def flare_layout(root: Path) -> str:
    """'official' or 'nnunet'; UserError naming the root when neither layout is there."""
    root = _check_root(root, "FLARE21", FLARE_LAYOUTS)
    for layout, (img_dir, lab_dir) in phantom_abdomen.LAYOUTS.items():
        if (root / img_dir).is_dir() and (root / lab_dir).is_dir():
            return layout
    raise UserError(f"unknown FLARE21 layout under {root}: expected {FLARE_LAYOUTS}")


class Flare21Dataset(DatasetSource):
    """FLARE21 abdominal CT, official or nnU-Net layout (docs/protocol.md section 3)."""

    name: ClassVar[str] = "flare21"
    version: ClassVar[str] = "2"
    #: nonfinite: "error" (default) or "zero" (NaN/inf voxels read as air, 0 after windowing)
    params: ClassVar[dict[str, Any]] = {"nonfinite": "error"}
    label_max: ClassVar[int] = max(FLARE_LABELS)
    description: ClassVar[str] = "FLARE 2021 CT (liver 1, kidney 2, spleen 3, pancreas 4)"
    cap_key: ClassVar[str] = "flare"
    split_rule: ClassVar[str] = "flare21"
    hu_window: ClassVar[tuple[float, float]] = (-160.0, 240.0)
    tasks: ClassVar[dict[str, TaskDef]] = {
        "flare21-kidney": TaskDef("flare21-kidney", "flare21", (2,), 1, False, "layercam"),
        "flare21-spleen": TaskDef("flare21-spleen", "flare21", (3,), 1, False, "layercam"),
        "flare21-liver": TaskDef("flare21-liver", "flare21", (1,), 1, False, "layercam"),
    }

    def cases(self, root: Path) -> list[str]:
        layout = flare_layout(root)
        root = Path(root)
        img_dir = root / phantom_abdomen.LAYOUTS[layout][0]
        found = []
        for f in sorted(img_dir.glob("*_0000.nii.gz")):
            case = f.name[: -len("_0000.nii.gz")]
            _, lab = phantom_abdomen.case_paths(root, case, layout)
            if not lab.is_file():
                raise UserError(f"FLARE21 case {case} has image {f} but no label file: expected {lab}{_why_missing(lab)}")
            found.append(case)
        if not found:
            raise UserError(f"no FLARE21 images (*_0000.nii.gz) in {img_dir}; expected {FLARE_LAYOUTS}")
        return found

    def validate(self) -> None:
        _validate_nonfinite(self)

    def _files(self, root: Path, case: str) -> tuple[Path, Path]:
        layout = flare_layout(root)
        img_path, lab_path = phantom_abdomen.case_paths(Path(root), case, layout)
        for f in (img_path, lab_path):
            if not f.is_file():
                raise UserError(f"FLARE21 case {case}: file {f} does not exist{_why_missing(f)}")
        return img_path, lab_path

    def geometry(self, root: Path, case: str) -> tuple[int, tuple[int, int, int]]:
        """(1, RAS shape) from the headers alone; shape/orientation mismatches fail here."""
        img_path, lab_path = self._files(root, case)
        _, img_shape, img_ras = read_header(img_path)
        _, lab_shape, lab_ras = read_header(lab_path)
        if img_shape != lab_shape:
            raise _shape_error(case, img_path, img_shape, lab_path, lab_shape)
        if img_ras != lab_ras:
            raise _orientation_error(case, img_path, lab_path)
        return 1, lab_ras

    def voxel_size(self, root: Path, case: str) -> tuple[float, float, float]:
        """RAS voxel size in mm of the case's label file (header only)."""
        return ras_voxel_size(read_header(self._files(root, case)[1])[0])

    def load(self, root: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
        image, labels, _ = self.load_case(root, case)
        return image, labels

    def load_case(self, root: Path, case: str) -> tuple[np.ndarray, np.ndarray, dict]:
        """(image (1, X, Y, Z) float32 in [0, 1] after the HU window, labels uint8, notes), RAS."""
        img_path, lab_path = self._files(root, case)
        lab, lab_shape = read_ras(lab_path)
        labels = _as_labels(lab, lab_path, FLARE_LABELS, " (liver 1, kidney 2, spleen 3, pancreas 4)")
        del lab
        hu, img_shape = read_ras(img_path)
        if img_shape != lab_shape:
            raise _shape_error(case, img_path, img_shape, lab_path, lab_shape)
        if hu.shape != labels.shape:
            raise _orientation_error(case, img_path, lab_path)
        lo, hi = self.hu_window
        hu, n_bad = nonfinite_fix(hu, img_path, self.p["nonfinite"], lo)
        image = np.empty((1, *labels.shape), dtype=np.float32)
        np.clip(hu, lo, hi, out=image[0], casting="unsafe")
        del hu
        np.subtract(image, np.float32(lo), out=image)
        np.divide(image, np.float32(hi - lo), out=image)
        return image, labels, ({"nonfinite_image": n_bad} if n_bad else {})

    def synthesize(self, out: Path, profile: Any, seed: int, n_cases: int | None = None) -> None:
        phantom_abdomen.write_abdomen_phantom(out, profile, seed, n_cases, layout="official")

    @property
    def phantom_version(self) -> str:
        return phantom_abdomen.GENERATOR_VERSION


BUILTIN_DATASETS: tuple[type[DatasetSource], ...] = (BratsDataset, Flare21Dataset)
