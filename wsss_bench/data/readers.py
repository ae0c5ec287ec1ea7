"""NIfTI readers of the built-in datasets (PROTOCOL sections 2-3).

Every volume is reoriented to RAS with ``nibabel.as_closest_canonical`` (a pure axis
permutation/flip, no resampling) before anything else.  Bad input raises :class:`UserError`
with one line naming the root, case or file at fault and what was expected.

nibabel is imported inside functions so that listing plugins stays cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from wsss_bench.data import phantom_abdomen, phantom_brain
from wsss_bench.errors import UserError
from wsss_bench.interfaces import DatasetSource, TaskDef

BRATS_LAYOUT = "<root>/BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz"
FLARE_LAYOUTS = (
    "<root>/TrainingImg/train_XXX_0000.nii.gz + <root>/TrainingMask/train_XXX.nii.gz (official FLARE21)"
    " or <root>/imagesTr/<case>_0000.nii.gz + <root>/labelsTr/<case>.nii.gz (nnU-Net)"
)
FLARE_LABELS = {0, 1, 2, 3, 4}


def read_ras(path: Path) -> tuple[np.ndarray, tuple[int, ...]]:
    """(data reoriented to RAS, on-disk shape); UserError if the file cannot be read."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        disk_shape = tuple(int(s) for s in img.shape)
        data = np.asanyarray(nib.as_closest_canonical(img).dataobj)
    except UserError:
        raise
    except Exception as err:  # nibabel raises many types for broken files
        raise UserError(f"cannot read NIfTI file {path}: {err}") from None
    if data.ndim != 3:
        raise UserError(f"{path} has shape {disk_shape}; expected a 3D volume")
    return data, disk_shape


def minmax(volume: np.ndarray) -> np.ndarray:
    """Per-volume min-max to [0, 1] (float32); a constant volume becomes zeros."""
    v = volume.astype(np.float32, copy=False)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 0:
        return np.zeros_like(v, dtype=np.float32)
    return ((v - lo) / (hi - lo)).astype(np.float32)


def _as_labels(data: np.ndarray, path: Path, allowed: set[int] | None) -> np.ndarray:
    """Integer label volume as uint8; UserError naming the file for bad values."""
    values = np.unique(data)
    if not np.all(np.equal(np.mod(values, 1), 0)) or values.min() < 0 or values.max() > 255:
        raise UserError(f"label file {path} holds non-integer or out-of-range values {values[:8].tolist()}")
    if allowed is not None and not set(values.astype(int).tolist()) <= allowed:
        bad = sorted(set(values.astype(int).tolist()) - allowed)
        raise UserError(f"label file {path} holds values {bad}; allowed label values are {sorted(allowed)}")
    return data.astype(np.uint8)


def _check_root(root: Path | None, dataset: str, layout: str) -> Path:
    if root is None or not Path(root).is_dir():
        raise UserError(f"{dataset} data root {root} does not exist or is not a folder; expected {layout}")
    return Path(root)


def _shape_error(case: str, a: Path, sa: tuple, b: Path, sb: tuple) -> UserError:
    return UserError(f"case {case}: image {a} has shape {sa} but {b} has shape {sb}; they must match")


def _orientation_error(case: str, a: Path, b: Path) -> UserError:
    return UserError(f"case {case}: {a} and {b} have different orientations (affines); they must match")


# --------------------------------------------------------------------------- BraTS
class BratsDataset(DatasetSource):
    """BraTS21 Task 1 layout: four MR modalities + seg per case folder (PROTOCOL section 2)."""

    name: ClassVar[str] = "brats"
    version: ClassVar[str] = "1"
    description: ClassVar[str] = "BraTS 2021 (flair, t1, t1ce, t2; whole tumour = seg > 0)"
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
                    f"expected {files[missing[0]]}"
                )
            found.append(d.name)
        if not found:
            subdirs = [p.name for p in root.iterdir() if p.is_dir()][:3]
            hint = f" (sub-folders found: {', '.join(subdirs)})" if subdirs else ""
            raise UserError(f"no BraTS cases under {root}{hint}; expected {BRATS_LAYOUT}")
        return found

    def load(self, root: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
        files = phantom_brain.case_files(Path(root), case)
        for m, f in files.items():
            if not f.is_file():
                raise UserError(f"BraTS case {case} is missing its {m} file: expected {f}")
        seg_raw, seg_shape = read_ras(files["seg"])
        chans = []
        for m in self.modalities:
            data, shape = read_ras(files[m])
            if shape != seg_shape:
                raise _shape_error(case, files[m], shape, files["seg"], seg_shape)
            if data.shape != seg_raw.shape:
                raise _orientation_error(case, files[m], files["seg"])
            chans.append(minmax(data))
        return np.stack(chans), _as_labels(seg_raw, files["seg"], None)

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
    """FLARE21 abdominal CT, official or nnU-Net layout (PROTOCOL section 3)."""

    name: ClassVar[str] = "flare21"
    version: ClassVar[str] = "1"
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
                raise UserError(f"FLARE21 case {case} has image {f} but no label file: expected {lab}")
            found.append(case)
        if not found:
            raise UserError(f"no FLARE21 images (*_0000.nii.gz) in {img_dir}; expected {FLARE_LAYOUTS}")
        return found

    def load(self, root: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
        layout = flare_layout(root)
        img_path, lab_path = phantom_abdomen.case_paths(Path(root), case, layout)
        for f in (img_path, lab_path):
            if not f.is_file():
                raise UserError(f"FLARE21 case {case}: file {f} does not exist")
        hu, img_shape = read_ras(img_path)
        lab, lab_shape = read_ras(lab_path)
        if img_shape != lab_shape:
            raise _shape_error(case, img_path, img_shape, lab_path, lab_shape)
        if hu.shape != lab.shape:
            raise _orientation_error(case, img_path, lab_path)
        lo, hi = self.hu_window
        image = ((np.clip(hu.astype(np.float32), lo, hi) - lo) / (hi - lo)).astype(np.float32)
        return image[None], _as_labels(lab, lab_path, FLARE_LABELS)

    def synthesize(self, out: Path, profile: Any, seed: int, n_cases: int | None = None) -> None:
        phantom_abdomen.write_abdomen_phantom(out, profile, seed, n_cases, layout="official")

    @property
    def phantom_version(self) -> str:
        return phantom_abdomen.GENERATOR_VERSION


BUILTIN_DATASETS: tuple[type[DatasetSource], ...] = (BratsDataset, Flare21Dataset)
