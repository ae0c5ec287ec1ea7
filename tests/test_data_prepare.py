"""`wsss-bench data prepare` as a user meets it: --jobs, and one clear line (exit 2, no
traceback, nothing partial in the cache) for data that must not be used (issue 14)."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from wsss_bench import cli
from wsss_bench.data import store as st
from wsss_bench.data.readers import BratsDataset, Flare21Dataset
from wsss_bench.errors import PluginError, UserError


@pytest.fixture
def brats_root(tmp_path, brats_phantom) -> Path:
    root = tmp_path / "brats"
    shutil.copytree(brats_phantom, root)
    return root


@pytest.fixture
def flare_root(tmp_path, flare_phantom) -> Path:
    root = tmp_path / "flare"
    shutil.copytree(flare_phantom, root)
    return root


def _prepare(run_cli, task, root, cache, *extra):
    return run_cli("data", "prepare", "--task", task, "--data-root", root, "--profile", "smoke",
                   "--cache-dir", cache, *extra)


def _edit(path: Path, fn, dtype=None) -> None:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj).copy()
    if dtype is not None:
        data = data.astype(dtype)
    fn(data)
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def _fails_cleanly(result, cache: Path, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, (needle, text)
    slices = cache / "slices"
    left = sorted(p.name for p in slices.iterdir()) if slices.exists() else []
    assert left in ([], [".locks"]), left  # no store, no half-built folder
    return text


# --------------------------------------------------------------------------- jobs
def test_prepare_with_jobs_builds_once(run_cli, tmp_path, brats_root, monkeypatch):
    monkeypatch.setattr(st, "PARALLEL_MIN_VOXELS", 0)
    cache = tmp_path / "cache"
    first = _prepare(run_cli, "brats", brats_root, cache, "--jobs", "2")
    assert first.exit_code == 0, first.output
    assert "prepared brats" in first.output and '"data": "real"' in first.output
    (store,) = [p for p in (cache / "slices").iterdir() if not p.name.startswith(".")]
    assert json.loads((store / "build.json").read_text())["workers"] == 2
    done = (store / "done").stat().st_mtime_ns
    again = _prepare(run_cli, "brats", brats_root, cache)
    assert again.exit_code == 0 and (store / "done").stat().st_mtime_ns == done


def test_prepare_rejects_zero_jobs(run_cli, tmp_path, brats_root):
    _fails_cleanly(_prepare(run_cli, "brats", brats_root, tmp_path / "cache", "--jobs", "0"),
                   tmp_path / "cache", "--jobs 0", "at least 1")


# --------------------------------------------------------------------------- non-finite voxels
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_nan_voxels_name_the_file_and_the_count(run_cli, tmp_path, brats_root, monkeypatch, jobs):
    monkeypatch.setattr(st, "PARALLEL_MIN_VOXELS", 0)
    flair = brats_root / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz"

    def poison(d):
        d.reshape(-1)[100:117] = np.nan

    _edit(flair, poison)
    cache = tmp_path / "cache"
    _fails_cleanly(_prepare(run_cli, "brats", brats_root, cache, "--jobs", jobs), cache,
                   str(flair), "17 non-finite voxel(s)", "nonfinite=zero")


def test_inf_voxels_in_ct_are_refused(run_cli, tmp_path, flare_root):
    ct = flare_root / "TrainingImg" / "train_003_0000.nii.gz"
    _edit(ct, lambda d: d.reshape(-1).__setitem__(slice(0, 5), np.inf), dtype=np.float32)
    cache = tmp_path / "cache"
    _fails_cleanly(_prepare(run_cli, "flare21-liver", flare_root, cache), cache, str(ct), "5 non-finite")


def test_nonfinite_zero_reads_them_as_background_and_records_them(tmp_path, brats_root):
    case = "BraTS2021_00001"
    t1 = brats_root / case / f"{case}_t1.nii.gz"

    def poison(d):
        d += 100  # a minimum that is not 0, so "background" has to mean the volume minimum
        d[10:12, 20, 5:9] = np.nan

    _edit(t1, poison)
    raw = nib.as_closest_canonical(nib.load(str(t1))).get_fdata()  # float64, RAS, with the NaNs
    bad = ~np.isfinite(raw)
    assert bad.sum() == 8
    with pytest.raises(UserError, match="8 non-finite"):
        BratsDataset().load(brats_root, case)
    image, _, notes = BratsDataset(nonfinite="zero").load_case(brats_root, case)
    assert notes == {"nonfinite_t1": 8}
    finite = raw[~bad]
    ref = (raw - finite.min()) / (finite.max() - finite.min())  # min-max over the finite voxels
    assert np.all(image[1][bad] == 0)
    assert np.abs(image[1][~bad] - ref[~bad]).max() < 1e-6
    s = st.prepare_slices(BratsDataset(nonfinite="zero"), brats_root, 32, tmp_path / "cache", jobs=1)
    assert s.meta["case_notes"] == {case: {"nonfinite_t1": 8}} and s.meta["reader_params"] == {"nonfinite": "zero"}


def test_prepare_with_nonfinite_zero_builds_the_store_run_would_use(run_cli, tmp_path, brats_root):
    flair = brats_root / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz"
    _edit(flair, lambda d: d.reshape(-1).__setitem__(slice(0, 3), np.nan))
    cache = tmp_path / "cache"
    result = _prepare(run_cli, "brats", brats_root, cache, "--nonfinite", "zero")
    assert result.exit_code == 0, result.output
    (store,) = [p for p in (cache / "slices").iterdir() if not p.name.startswith(".")]
    meta = json.loads((store / "meta.json").read_text())
    assert meta["case_notes"] == {"BraTS2021_00002": {"nonfinite_flair": 3}}
    again = st.prepare_slices(BratsDataset(nonfinite="zero"), brats_root, 32, cache, case_cap=5, jobs=1)  # smoke cap
    assert again.path == store and not again.built
    _fails_cleanly(_prepare(run_cli, "brats", brats_root, tmp_path / "c2", "--nonfinite", "nan"), tmp_path / "c2",
                   "--nonfinite nan")


def test_an_all_nan_volume_fails_even_under_zero(tmp_path, brats_root):
    t2 = brats_root / "BraTS2021_00000" / "BraTS2021_00000_t2.nii.gz"
    _edit(t2, lambda d: d.fill(np.nan))
    with pytest.raises(UserError, match="non-finite") as err:
        BratsDataset(nonfinite="zero").load(brats_root, "BraTS2021_00000")
    assert str(t2) in str(err.value) and "nonfinite=zero" not in str(err.value)


def test_nonfinite_parameter_is_checked():
    with pytest.raises(PluginError, match="nonfinite"):
        Flare21Dataset(nonfinite="mean")


# --------------------------------------------------------------------------- label values
def test_brats_label_3_is_refused(run_cli, tmp_path, brats_root):
    seg = brats_root / "BraTS2021_00004" / "BraTS2021_00004_seg.nii.gz"
    _edit(seg, lambda d: d.__setitem__(d == 4, 3))
    cache = tmp_path / "cache"
    _fails_cleanly(_prepare(run_cli, "brats", brats_root, cache), cache, str(seg), "values [3]", "[0, 1, 2, 4]")


def test_flare_label_outside_0_to_4_is_refused(run_cli, tmp_path, flare_root):
    lab = flare_root / "TrainingMask" / "train_005.nii.gz"
    _edit(lab, lambda d: d.reshape(-1).__setitem__(0, 9))
    cache = tmp_path / "cache"
    _fails_cleanly(_prepare(run_cli, "flare21-kidney", flare_root, cache), cache, str(lab), "values [9]")


# --------------------------------------------------------------------------- broken files
def test_truncated_nifti_is_refused(run_cli, tmp_path, brats_root):
    t1ce = brats_root / "BraTS2021_00003" / "BraTS2021_00003_t1ce.nii.gz"
    data = t1ce.read_bytes()
    t1ce.write_bytes(data[: len(data) // 2])  # the header survives, the voxels do not
    assert nib.load(str(t1ce)).shape == (48, 48, 20)
    cache = tmp_path / "cache"
    _fails_cleanly(_prepare(run_cli, "brats", brats_root, cache), cache, "cannot read NIfTI file", str(t1ce))


@pytest.mark.parametrize("content", [b"not a nifti at all", gzip.compress(b"\x00" * 400)])
def test_non_nifti_file_is_refused(run_cli, tmp_path, flare_root, content):
    ct = flare_root / "TrainingImg" / "train_001_0000.nii.gz"
    ct.write_bytes(content)
    cache = tmp_path / "cache"
    _fails_cleanly(_prepare(run_cli, "flare21-spleen", flare_root, cache), cache, "cannot read NIfTI file", str(ct))
