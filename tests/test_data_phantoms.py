"""Synthetic phantoms: determinism, exact on-disk layouts, RAS handling, slice classes."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from data_fixtures import SMOKE_TASKS

from wsss_bench.data import phantom_abdomen, phantom_brain
from wsss_bench.data.phantom_common import grid_from
from wsss_bench.data.readers import BratsDataset, Flare21Dataset, minmax
from wsss_bench.data.splits import slice_labels


# --------------------------------------------------------------------------- determinism
def test_brain_case_is_a_pure_function_of_seed_and_index(smoke_profile):
    a_img, a_seg, _ = phantom_brain.brain_case(smoke_profile, 3, 2)
    b_img, b_seg, _ = phantom_brain.brain_case(smoke_profile, 3, 2)
    assert np.array_equal(a_seg, b_seg)
    for m in phantom_brain.MODALITIES:
        assert np.array_equal(a_img[m], b_img[m])
    c_img, _, _ = phantom_brain.brain_case(smoke_profile, 4, 2)
    assert not np.array_equal(a_img["flair"], c_img["flair"])


def test_abdomen_case_is_a_pure_function_of_seed_and_index(smoke_profile):
    a_hu, a_lab, _ = phantom_abdomen.abdomen_case(smoke_profile, 3, 1)
    b_hu, b_lab, _ = phantom_abdomen.abdomen_case(smoke_profile, 3, 1)
    assert np.array_equal(a_hu, b_hu) and np.array_equal(a_lab, b_lab)
    c_hu, _, _ = phantom_abdomen.abdomen_case(smoke_profile, 3, 2)
    assert not np.array_equal(a_hu, c_hu)


def test_written_files_match_a_fresh_write(tmp_path, smoke_profile, brats_phantom):
    """Writing case 0 again gives identical arrays (the cached phantom is reproducible)."""
    phantom_brain.write_brain_phantom(tmp_path, smoke_profile, 0, n_cases=1)
    for m in (*phantom_brain.MODALITIES, "seg"):
        name = f"BraTS2021_00000/BraTS2021_00000_{m}.nii.gz"
        a = np.asanyarray(nib.load(str(brats_phantom / name)).dataobj)
        b = np.asanyarray(nib.load(str(tmp_path / name)).dataobj)
        assert np.array_equal(a, b)


# --------------------------------------------------------------------------- layouts
def test_brain_layout_is_the_brats_layout(brats_phantom, smoke_profile):
    n = smoke_profile.brain_phantom.cases
    cases = sorted(p.name for p in brats_phantom.iterdir() if not p.name.startswith("."))
    assert cases == [f"BraTS2021_{i:05d}" for i in range(n)]
    s = smoke_profile.brain_phantom.voxel_mm
    for case in cases:
        files = sorted(p.name for p in (brats_phantom / case).iterdir())
        assert files == sorted(f"{case}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2", "seg"))
    img = nib.load(str(brats_phantom / cases[0] / f"{cases[0]}_flair.nii.gz"))
    seg = nib.load(str(brats_phantom / cases[0] / f"{cases[0]}_seg.nii.gz"))
    assert img.get_data_dtype() == np.float32 and seg.get_data_dtype() == np.uint8
    assert img.shape == tuple(smoke_profile.brain_phantom.volume)
    assert np.allclose(np.diag(img.affine)[:3], [-s[0], -s[1], s[2]])
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    values = set(np.unique(np.asanyarray(seg.dataobj)).tolist())
    assert values <= {0, 1, 2, 4} and 2 in values
    flair = np.asanyarray(img.dataobj)
    assert flair.min() == 0.0  # skull-stripped: outside the brain exactly 0


def test_abdomen_layout_is_the_official_flare_layout(flare_phantom, smoke_profile):
    n = smoke_profile.abdomen_phantom.cases
    visible = sorted(p.name for p in flare_phantom.iterdir() if not p.name.startswith("."))
    assert visible == ["TrainingImg", "TrainingMask"]
    assert sorted(p.name for p in (flare_phantom / "TrainingImg").iterdir()) == [
        f"train_{i:03d}_0000.nii.gz" for i in range(n)
    ]
    assert sorted(p.name for p in (flare_phantom / "TrainingMask").iterdir()) == [
        f"train_{i:03d}.nii.gz" for i in range(n)
    ]
    for i in range(2):
        img = nib.load(str(flare_phantom / "TrainingImg" / f"train_{i:03d}_0000.nii.gz"))
        lab = nib.load(str(flare_phantom / "TrainingMask" / f"train_{i:03d}.nii.gz"))
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert nib.aff2axcodes(img.affine) == (("R", "A", "S") if i % 2 == 0 else ("L", "P", "S"))
        assert set(np.unique(np.asanyarray(lab.dataobj)).tolist()) == {0, 1, 2, 3, 4}
        hu = np.asanyarray(img.dataobj)
        assert hu.min() <= -950 and hu.max() >= 240  # air and bone present


def test_nnunet_layout_is_written_on_request(tmp_path, smoke_profile):
    phantom_abdomen.write_abdomen_phantom(tmp_path, smoke_profile, 0, n_cases=1, layout="nnunet")
    assert (tmp_path / "imagesTr" / "train_000_0000.nii.gz").is_file()
    assert (tmp_path / "labelsTr" / "train_000.nii.gz").is_file()
    with pytest.raises(ValueError):
        phantom_abdomen.write_abdomen_phantom(tmp_path, smoke_profile, 0, n_cases=1, layout="msd")


# --------------------------------------------------------------------------- orientation
def _centroid_x(mask: np.ndarray) -> float:
    return float(np.argwhere(mask)[:, 0].mean())


@pytest.mark.parametrize("case", ["train_000", "train_001"])  # RAS and LPS-style affine
def test_liver_is_right_of_spleen_after_reorientation(flare_phantom, case):
    _, lab = Flare21Dataset().load(flare_phantom, case)
    assert _centroid_x(lab == 1) > _centroid_x(lab == 3)


def test_lps_case_really_needs_reorientation(flare_phantom):
    raw = np.asanyarray(nib.load(str(flare_phantom / "TrainingMask" / "train_001.nii.gz")).dataobj)
    assert _centroid_x(raw == 1) < _centroid_x(raw == 3)  # on disk the x axis points left


def test_readers_return_the_generators_ras_arrays(flare_phantom, brats_phantom, smoke_profile):
    for i in (0, 1):
        hu, lab, _ = phantom_abdomen.abdomen_case(smoke_profile, 0, i)
        image, labels = Flare21Dataset().load(flare_phantom, f"train_{i:03d}")
        assert np.array_equal(labels, lab)
        assert np.allclose(image[0], (np.clip(hu, -160, 240) + 160) / 400.0, atol=1e-6)
    images, seg, _ = phantom_brain.brain_case(smoke_profile, 0, 1)
    image, labels = BratsDataset().load(brats_phantom, "BraTS2021_00001")
    assert np.array_equal(labels, seg)
    assert np.allclose(image[2], minmax(images["t1ce"]))


# --------------------------------------------------------------------------- slice classes
def test_every_task_has_positive_negative_and_ambiguous_slices(smoke_task_data):
    for task in SMOKE_TASKS:
        td = smoke_task_data[task]
        raw = slice_labels(td.fg_fraction)
        assert (raw == 1).any() and (raw == 0).any() and (raw == -1).any(), task


@pytest.mark.parametrize("name, lo", [("smoke", 15.0), ("cpu", 7.5), ("paper", 2.0)])
def test_core_radius_lower_bound_follows_image_size(name, lo):
    from wsss_bench.profiles import load_profile

    profile = load_profile(name)
    grid = grid_from(profile.brain_phantom)
    assert phantom_brain.core_radius_range(grid, profile.image_size) == (pytest.approx(lo), 20.0)
