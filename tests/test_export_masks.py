"""Predicted masks back in the source volume's space (docs/protocol.md section 4 inverted), as NIfTI."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from report_fixtures import build_run
from wsss_bench.data import phantom_abdomen, phantom_brain
from wsss_bench.data.preprocess import preprocess_volume, resize_masks
from wsss_bench.data.readers import BratsDataset, Flare21Dataset, read_ras
from wsss_bench.errors import UserError
from wsss_bench.running.rundir import load_predictions, read_predictions, save_predictions
from wsss_bench.reporting.export_masks import (
    export_masks,
    label_file,
    save_nifti,
    to_source_space,
    unresize_slices,
)
from wsss_bench.profiles import load_profile


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    prof = load_profile("smoke")
    phantom_brain.write_brain_phantom(root / "brats", prof, 0, 2)
    phantom_abdomen.write_abdomen_phantom(root / "flare", prof, 0, 2, layout="official")  # RAS and LPS cases
    return root


def _round_trip(root, ds, case, size, fg):
    """The ground truth through the pipeline (reader, RAS, resize, crop) and back out."""
    image, labels = ds.load(root, case)
    _, labs = preprocess_volume(image, labels, size)
    ref_path = label_file(ds.name, root, case)
    ref = nib.load(str(ref_path))
    disk = np.asanyarray(ref.dataobj)
    truth = disk > 0 if fg is None else np.isin(disk, fg)
    slices = labs > 0 if fg is None else np.isin(labs, fg)
    return to_source_space(slices, ref_path), truth, ref


@pytest.mark.parametrize("kind", ["brats", "flare"])
def test_ground_truth_round_trip_on_smoke_phantoms(phantoms, tmp_path, kind):
    ds, fgs = (BratsDataset(), [None]) if kind == "brats" else (Flare21Dataset(), [(1,), (2,), (3,)])
    root = phantoms / kind
    affines = set()
    for case in ds.cases(root):
        ref = nib.load(str(label_file(ds.name, root, case)))
        affines.add(tuple(np.sign(np.diag(ref.affine)[:2])))
        for fg in fgs:
            # S = 64 >= the smoke volumes' in-plane size (48 / 64): nothing is lost on the way in,
            # so the bound (0.95) is met with room: measured 1.000; a one-voxel shift of
            # the export (a wrong flip or offset) gives 0.79-0.92 and fails the 0.99 asserted here
            out, truth, ref = _round_trip(root, ds, case, 64, fg)
            assert out.shape == truth.shape and out.dtype == np.uint8
            assert dice(out, truth) >= 0.99
            # the smoke profile's own S = 32 downsamples (48 -> 32, 64 -> 32): rows and columns the
            # resize never sampled cannot come back; measured 0.895-0.948 (docs/metrics.md)
            out32, _, _ = _round_trip(root, ds, case, 32, fg)
            assert dice(out32, truth) >= 0.88
            path = save_nifti(out, ref, tmp_path / f"{case}.nii.gz")
            back = nib.load(str(path))
            assert back.shape == ref.shape and np.array_equal(back.affine, ref.affine)
            assert np.array_equal(np.asanyarray(back.dataobj), out)
            assert int(back.header["sform_code"]) == int(ref.header["sform_code"])
    if kind == "flare":
        assert len(affines) == 2  # an RAS and an LPS case: the reorientation was undone both ways


def test_non_square_volume_with_a_permuted_affine(tmp_path):
    """A 60 x 48 x 7 volume stored with axes permuted and flipped: the crop removes 6 rows each
    side; a blob inside the crop comes back voxel for voxel, the part of a blob outside is gone."""
    ras = np.zeros((60, 48, 7), dtype=np.uint8)  # RAS layout
    ras[20:30, 10:22, 2:5] = 1  # inside the central 48 rows
    ras[1:10, 30:34, 3] = 1  # crosses the crop border: rows 1..5 are cut away, 6..9 kept
    # store it as disk axes (z, x, y) with x and z flipped (an oblique-free, permuted affine)
    disk = np.flip(np.transpose(ras, (2, 0, 1)), axis=(0, 1))
    affine = np.array([[0, -2.0, 0, 10], [0, 0, 1.5, -4], [-3.0, 0, 0, 7], [0, 0, 0, 1]])
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(disk, affine), str(path))
    back_ras, disk_shape = read_ras(path)
    assert np.array_equal(back_ras, ras) and disk_shape == disk.shape  # the reader's RAS view
    slices = resize_masks(back_ras, 48)  # (Z, S, S): no resize (short side 48), crop rows 6..53
    out = to_source_space(slices > 0, path)
    assert out.shape == disk.shape
    inside = disk.copy()
    inside[np.flip(np.transpose(np.pad(np.ones((48, 48, 7)), ((6, 6), (0, 0), (0, 0))) == 0, (2, 0, 1)), (0, 1))] = 0
    assert np.array_equal(out, inside)  # exact inside the crop, empty outside it
    assert out.sum() == 10 * 12 * 3 + 4 * 4  # the kept part of the border blob, nothing beyond the crop


def test_unresize_inverts_nearest_exact_upsampling_exactly():
    rng = np.random.default_rng(0)
    vol = rng.random((20, 13, 3)) < 0.5  # (X, Y, Z), upsampled 13 -> 40 on the short side
    slices = resize_masks(vol.astype(np.uint8), 40)
    back = unresize_slices(slices > 0, 20, 13)
    assert back.shape == vol.shape
    # the long side is cropped: 20 * 40/13 = 62 rows, crop offset 11; rows fully inside are exact
    from wsss_bench.data.preprocess import nearest_exact_index

    src = nearest_exact_index(20, 62)[11:51]
    rows = np.unique(src)[1:-1]
    assert np.array_equal(back[rows], vol[rows])


def test_predictions_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    masks = rng.random((5, 7, 7)) < 0.4  # 245 bits: packbits pads the last byte
    path = save_predictions(tmp_path, "abc", ["c1", "c1", "c2", "c2", "c2"], [0, 3, 1, 2, 5], masks,
                            task="brats", method="gradcam+threshold", seed=3)
    assert path == tmp_path / "predictions" / "abc.npz"
    p = read_predictions(path)
    assert (p.task, p.method, p.seed) == ("brats", "gradcam+threshold", 3)
    assert np.array_equal(p.masks, masks) and list(p.case_ids) == ["c1", "c1", "c2", "c2", "c2"]
    assert np.array_equal(p.lookup("c2", 2), masks[3]) and p.lookup("c3", 0) is None
    assert set(load_predictions(tmp_path)) == {("brats", "gradcam+threshold", 3)}
    with pytest.raises(ValueError, match="case ids"):
        save_predictions(tmp_path, "x", ["a"], [0, 1], masks[:2], task="t", method="m", seed=0)
    (tmp_path / "predictions" / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="bad.npz"):
        load_predictions(tmp_path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("exportrun"), tasks=("flare21-kidney",))


def test_cli_export_masks_writes_source_space_nifti(run_dir, tmp_path):
    from typer.testing import CliRunner

    from wsss_bench.cli import app

    cli = CliRunner()
    res = cli.invoke(app, ["export-masks", str(run_dir), "--method", "fsl", "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    folder = tmp_path / "x" / "flare21-kidney" / "fsl"
    info = json.loads((folder / "export.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    root = manifest["data"]["flare21-kidney/seed0"]["data_root"]
    assert len(info["cases"]) == 8
    for case, rec in info["cases"].items():
        img = nib.load(str(folder / rec["file"]))
        ref = nib.load(str(label_file("flare21", root, case)))
        assert img.shape == ref.shape and np.array_equal(img.affine, ref.affine)
        out = np.asanyarray(img.dataobj).astype(bool)
        truth = np.isin(np.asanyarray(ref.dataobj), (2,))
        # fsl predicted the ground truth on the test slices; other slices are background
        gt_out = to_source_space(_slices_of(truth, ref, rec["predicted_z"]), ref)
        assert np.array_equal(out, gt_out.astype(bool))
        assert dice(out, truth) > 0.6 and out.sum() <= truth.sum() * 1.2
    gt = cli.invoke(app, ["export-masks", str(run_dir), "--method", "fsl", "--out", str(tmp_path / "g"),
                          "--ground-truth"])
    assert gt.exit_code == 0, gt.output
    for case in info["cases"]:
        img = nib.load(str(tmp_path / "g" / "flare21-kidney" / "ground-truth" / f"{case}.nii.gz"))
        ref = nib.load(str(label_file("flare21", root, case)))
        assert dice(np.asanyarray(img.dataobj), np.isin(np.asanyarray(ref.dataobj), (2,))) >= 0.88  # S = 32
    missing = cli.invoke(app, ["export-masks", str(run_dir), "--method", "nope", "--out", str(tmp_path / "n")])
    assert missing.exit_code == 2 and "--method nope" in missing.output and "the results hold: fsl" in missing.output
    # another spelling of a stored cell resolves to it (one canonical label)
    other = cli.invoke(app, ["export-masks", str(run_dir), "--method", "layercam[layers=layer2+layer3+layer4]+cldf",
                             "--out", str(tmp_path / "o2"), "--task", "flare21-kidney"])
    assert other.exit_code == 0, other.output


def _slices_of(truth_disk, ref, zs):
    """The run's (Z, S, S) ground truth of a case, kept only on the slices in ``zs``."""
    ras = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(truth_disk.astype(np.uint8), ref.affine)).dataobj)
    slices = resize_masks(ras, 32) > 0
    keep = np.zeros(len(slices), bool)
    keep[list(zs)] = True
    return slices & keep[:, None, None]


def test_export_of_gated_masks_blanks_negatives(run_dir, tmp_path):
    raw = export_masks(run_dir, "gradcam+threshold", tmp_path / "raw", gate="none")
    lab = export_masks(run_dir, "gradcam+threshold", tmp_path / "lab", gate="label")
    n_raw = sum(int(np.asanyarray(nib.load(str(p)).dataobj).sum()) for p in raw)
    n_lab = sum(int(np.asanyarray(nib.load(str(p)).dataobj).sum()) for p in lab)
    assert n_lab < n_raw  # the false positives on negative slices are gone
