"""Readers, layout detection, clear errors and preprocessing."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from wsss_bench.data import phantom_abdomen
from wsss_bench.data.preprocess import (
    crop_offsets,
    nearest_exact_index,
    preprocess_volume,
    resize_masks,
    resized_shape,
    tissue_fraction,
)
from wsss_bench.data.readers import BratsDataset, Flare21Dataset, flare_layout
from wsss_bench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _copy_case(src_root: Path, dst_root: Path, case: str) -> Path:
    shutil.copytree(src_root / case, dst_root / case)
    return dst_root / case


def _write(path: Path, data: np.ndarray, affine=None) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))


# --------------------------------------------------------------------------- datasets
def test_task_definitions():
    brats = BratsDataset.tasks["brats"]
    assert (brats.foreground, brats.channels, brats.flips, brats.cldf_cam) == (None, 4, True, "amecam")
    flare = Flare21Dataset.tasks
    assert {t: d.foreground for t, d in flare.items()} == {
        "flare21-kidney": (2,),
        "flare21-spleen": (3,),
        "flare21-liver": (1,),
    }
    assert all(d.channels == 1 and not d.flips and d.cldf_cam == "layercam" for d in flare.values())
    assert (BratsDataset.cap_key, Flare21Dataset.cap_key) == ("brats", "flare")


def test_plugin_module_registers_both_datasets():
    spec = importlib.util.spec_from_file_location("builtin_datasets", ROOT / "plugins" / "datasets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen = []
    module.register_datasets(seen.append)
    assert seen == [BratsDataset, Flare21Dataset]


def test_brats_channels_are_min_max_normalised_per_volume(brats_phantom):
    image, labels = BratsDataset().load(brats_phantom, "BraTS2021_00000")
    assert image.dtype == np.float32 and image.shape[0] == 4 and labels.dtype == np.uint8
    assert np.allclose(image.reshape(4, -1).min(1), 0) and np.allclose(image.reshape(4, -1).max(1), 1)


def test_nnunet_layout_is_detected_and_read_alike(tmp_path, smoke_profile, flare_phantom):
    phantom_abdomen.write_abdomen_phantom(tmp_path, smoke_profile, 0, n_cases=2, layout="nnunet")
    src = Flare21Dataset()
    assert flare_layout(tmp_path) == "nnunet" and flare_layout(flare_phantom) == "official"
    assert src.cases(tmp_path) == ["train_000", "train_001"]
    for case in ("train_000", "train_001"):
        a_img, a_lab = src.load(tmp_path, case)
        b_img, b_lab = src.load(flare_phantom, case)
        assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)


# --------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize("cls, expected", [(BratsDataset, "BraTS2021_XXXXX"), (Flare21Dataset, "TrainingImg")])
def test_missing_root_names_the_expected_layout(tmp_path, cls, expected):
    with pytest.raises(UserError, match=expected) as err:
        cls().cases(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)


def test_unknown_flare_layout(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(UserError, match="unknown FLARE21 layout") as err:
        Flare21Dataset().cases(tmp_path)
    assert "imagesTr" in str(err.value) and "TrainingImg" in str(err.value)


def test_empty_brats_root(tmp_path):
    (tmp_path / "wrapper").mkdir()
    with pytest.raises(UserError, match="no BraTS cases") as err:
        BratsDataset().cases(tmp_path)
    assert "wrapper" in str(err.value)


def test_missing_modality_names_case_and_file(tmp_path, brats_phantom):
    case = "BraTS2021_00002"
    folder = _copy_case(brats_phantom, tmp_path, case)
    missing = folder / f"{case}_t1ce.nii.gz"
    missing.unlink()
    with pytest.raises(UserError) as err:
        BratsDataset().cases(tmp_path)
    assert case in str(err.value) and str(missing) in str(err.value)
    with pytest.raises(UserError, match=case):
        BratsDataset().load(tmp_path, case)


def test_shape_mismatch_names_both_files_and_shapes(tmp_path, brats_phantom):
    case = "BraTS2021_00001"
    folder = _copy_case(brats_phantom, tmp_path, case)
    seg = folder / f"{case}_seg.nii.gz"
    _write(seg, np.zeros((10, 11, 12), dtype=np.uint8))
    with pytest.raises(UserError) as err:
        BratsDataset().load(tmp_path, case)
    msg = str(err.value)
    assert f"{case}_flair.nii.gz" in msg and str(seg) in msg and "(10, 11, 12)" in msg and "(48, 48, 20)" in msg


def test_flare_shape_mismatch(tmp_path, flare_phantom):
    shutil.copytree(flare_phantom, tmp_path / "d")
    lab = tmp_path / "d" / "TrainingMask" / "train_000.nii.gz"
    _write(lab, np.zeros((8, 8, 8), dtype=np.uint8))
    with pytest.raises(UserError, match="train_000") as err:
        Flare21Dataset().load(tmp_path / "d", "train_000")
    assert str(lab) in str(err.value)


def test_label_out_of_range_names_the_file(tmp_path, flare_phantom):
    shutil.copytree(flare_phantom, tmp_path / "d")
    path = tmp_path / "d" / "TrainingMask" / "train_002.nii.gz"
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    with pytest.raises(UserError, match=r"\[7\]") as err:
        Flare21Dataset().load(tmp_path / "d", "train_002")
    assert str(path) in str(err.value)


def test_missing_flare_label_names_the_case(tmp_path, flare_phantom):
    shutil.copytree(flare_phantom, tmp_path / "d")
    gone = tmp_path / "d" / "TrainingMask" / "train_004.nii.gz"
    gone.unlink()
    with pytest.raises(UserError, match="train_004") as err:
        Flare21Dataset().cases(tmp_path / "d")
    assert str(gone) in str(err.value)


def test_unreadable_file(tmp_path, brats_phantom):
    case = "BraTS2021_00003"
    folder = _copy_case(brats_phantom, tmp_path, case)
    (folder / f"{case}_t2.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(UserError, match=f"{case}_t2.nii.gz"):
        BratsDataset().load(tmp_path, case)


# --------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("n_in, n_out", [(48, 32), (96, 64), (240, 256), (512, 256), (155, 64), (7, 3)])
def test_nearest_exact_matches_torch(n_in, n_out):
    import torch
    import torch.nn.functional as F

    x = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in, 1)
    ref = F.interpolate(x, size=(n_out, 1), mode="nearest-exact")[0, 0, :, 0].long().numpy()
    assert np.array_equal(nearest_exact_index(n_in, n_out), ref)


def test_resize_shorter_side_and_centre_crop():
    assert resized_shape(100, 80, 32) == (40, 32)
    assert resized_shape(80, 100, 32) == (32, 40)
    assert resized_shape(240, 240, 256) == (256, 256)
    assert crop_offsets(40, 32, 32) == (4, 0)
    assert crop_offsets(33, 32, 32) == (0, 0)
    labels = np.zeros((100, 80, 2), dtype=np.uint8)
    labels[50, 40, 1] = 3
    out = resize_masks(labels, 32)
    assert out.shape == (2, 32, 32) and out.dtype == np.uint8
    image = np.random.default_rng(0).random((2, 100, 80, 3)).astype(np.float32)
    imgs, labs = preprocess_volume(image, np.zeros((100, 80, 3), np.uint8), 32)
    assert imgs.shape == (3, 2, 32, 32) and imgs.dtype == np.float32 and labs.shape == (3, 32, 32)


def test_tissue_fraction_is_max_over_channels():
    s = np.zeros((1, 2, 4, 4), dtype=np.float32)
    s[0, 0, 0, :2] = 0.5
    s[0, 1, 1, :2] = 0.5
    assert tissue_fraction(s)[0] == pytest.approx(4 / 16)


def test_a_degenerate_affine_is_one_sentence(tmp_path):
    """An affine with a zero column leaves a voxel axis without a direction (nibabel's
    io_orientation gives NaN there); found by the header fuzzer."""
    import nibabel as nib_

    from wsss_bench.data.readers import read_header
    from wsss_bench.errors import UserError

    affine = np.array([[0., 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]])
    path = tmp_path / "bad.nii.gz"
    nib_.save(nib_.Nifti1Image(np.zeros((2, 2, 4), np.uint8), affine), str(path))
    with pytest.raises(UserError, match="bad.nii.gz.*affine"):
        read_header(path)
