"""HD95 and ASSD in mm (wsss_bench.boundary) against an independent float64 reference.

The reference is written here with scipy: boundary = mask minus its erosion (a pixel outside the
image counts as background), distance transform of the other mask's boundary with the voxel
spacing, HD95 = the larger of the two directed 95th percentiles (linear interpolation), ASSD =
the mean of both directions' distances.  MONAI is never used as its own reference.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from wsss_bench.boundary import (
    apply_empty_rule,
    image_diagonal,
    parse_metrics,
    rule_line,
    score_cell,
    surface_distances,
)
from wsss_bench.errors import UserError


def reference(p: np.ndarray, g: np.ndarray, spacing) -> tuple[float, float]:
    """(HD95, ASSD) of one pair of non-empty masks, float64, scipy only."""
    p, g = p.astype(bool), g.astype(bool)
    ep = p & ~ndi.binary_erosion(p, border_value=0)
    eg = g & ~ndi.binary_erosion(g, border_value=0)
    to_g = ndi.distance_transform_edt(~eg, sampling=spacing)[ep]
    to_p = ndi.distance_transform_edt(~ep, sampling=spacing)[eg]
    hd95 = max(np.percentile(to_g, 95), np.percentile(to_p, 95))
    return float(hd95), float(np.concatenate([to_g, to_p]).mean())


def disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def analytic_shifted_circle(radius: float, shift: float) -> tuple[float, float]:
    """Continuous circles of radius R, centres ``shift`` apart: the distance from the point at
    angle t of one to the other circle is |sqrt(R^2 - 2 R d cos t + d^2) - R| (the same both
    ways by symmetry); HD95 = its 95th percentile over t, ASSD its mean."""
    t = np.linspace(0, 2 * np.pi, 2_000_001)[:-1]
    f = np.abs(np.sqrt(radius ** 2 - 2 * radius * shift * np.cos(t) + shift ** 2) - radius)
    return float(np.percentile(f, 95)), float(f.mean())


# --------------------------------------------------------------------------- 2D against the reference
def test_disc_against_shifted_disc_matches_the_analytic_value_and_the_reference():
    R, d = 60.0, 6
    a = disc((160, 160), (80, 80), R)[None]
    b = disc((160, 160), (80, 80 + d), R)[None]
    hd, asd = surface_distances(b, a, (1.0, 1.0))
    ref_hd, ref_asd = reference(b[0], a[0], (1.0, 1.0))
    assert hd[0] == pytest.approx(ref_hd, rel=1e-6) and asd[0] == pytest.approx(ref_asd, rel=1e-6)
    an_hd, an_asd = analytic_shifted_circle(R, d)  # 5.98 and 3.82 px
    assert an_hd == pytest.approx(0.997 * d, abs=0.02)  # ~ d * cos(0.025 pi) for d << R
    # pixel boundaries are within half a pixel of the circle: the distances within one pixel
    assert abs(hd[0] - an_hd) <= 1.0 and abs(asd[0] - an_asd) <= 0.5


def test_random_shapes_and_anisotropic_spacing_match_the_reference():
    rng = np.random.default_rng(3)
    pred = np.zeros((6, 40, 48), bool)
    gt = np.zeros((6, 40, 48), bool)
    for i in range(6):
        gt[i] = ndi.binary_opening(rng.random((40, 48)) > 0.55, iterations=1)
        pred[i] = ndi.binary_dilation(gt[i], iterations=i % 3) ^ (rng.random((40, 48)) > 0.97)
    spacing = [(1.0, 3.0), (0.7, 0.7), (2.5, 0.5), (1.0, 1.0), (4.0, 1.5), (0.3, 0.9)]
    hd, asd = surface_distances(pred, gt, spacing)
    for i in range(6):
        r_hd, r_asd = reference(pred[i], gt[i], spacing[i])
        assert hd[i] == pytest.approx(r_hd, rel=1e-5) and asd[i] == pytest.approx(r_asd, rel=1e-5), i


def test_anisotropic_single_pixels_give_the_exact_distance():
    p = np.zeros((1, 8, 8), bool)
    g = np.zeros((1, 8, 8), bool)
    p[0, 2, 2], g[0, 3, 4] = True, True  # one row and two columns apart
    hd, asd = surface_distances(p, g, (2.5, 0.5))
    expected = np.hypot(1 * 2.5, 2 * 0.5)  # sqrt(7.25) mm
    assert hd[0] == pytest.approx(expected, rel=1e-6) and asd[0] == pytest.approx(expected, rel=1e-6)
    swapped = surface_distances(p, g, (0.5, 2.5))
    assert swapped[0][0] == pytest.approx(np.hypot(0.5, 5.0), rel=1e-6)  # the axes are not mixed up


def test_single_pixel_against_a_disc_matches_the_reference():
    g = disc((30, 30), (15, 15), 6)[None]
    p = np.zeros_like(g)
    p[0, 15, 15] = True  # the centre: 6 px from the circle one way, up to 6 the other
    hd, asd = surface_distances(p, g, (1.5, 1.5))
    r_hd, r_asd = reference(p[0], g[0], (1.5, 1.5))
    assert hd[0] == pytest.approx(r_hd, rel=1e-6) and asd[0] == pytest.approx(r_asd, rel=1e-6)
    assert 5.0 * 1.5 <= hd[0] <= 6.0 * 1.5


def test_grids_of_1mm_and_2mm_give_a_1_to_2_ratio():
    g = np.stack([disc((40, 40), (20, 20), r) for r in (5, 9, 13)])
    p = np.stack([disc((40, 40), (20 + k, 22), r + k) for k, r in zip((1, 2, 3), (5, 9, 13))])
    p[1, 2, 2] = True  # an outlier pixel
    one = surface_distances(p, g, (1.0, 1.0))
    two = surface_distances(p, g, (2.0, 2.0))
    np.testing.assert_allclose(two[0], 2 * one[0], rtol=1e-6)
    np.testing.assert_allclose(two[1], 2 * one[1], rtol=1e-6)
    assert (one[0] > 1).all() and (one[1] > 1).all()


def test_3d_volumes_match_the_reference_with_anisotropic_voxels():
    zz, yy, xx = np.mgrid[:14, :30, :30]
    g = ((zz - 7) / 5.0) ** 2 + ((yy - 15) / 9.0) ** 2 + ((xx - 14) / 7.0) ** 2 <= 1
    p = ((zz - 6) / 4.0) ** 2 + ((yy - 16) / 10.0) ** 2 + ((xx - 15) / 7.0) ** 2 <= 1
    spacing = (5.0, 0.8, 1.2)
    hd, asd = surface_distances(p[None], g[None], spacing)
    r_hd, r_asd = reference(p, g, spacing)
    assert hd[0] == pytest.approx(r_hd, rel=1e-5) and asd[0] == pytest.approx(r_asd, rel=1e-5)


# --------------------------------------------------------------------------- empty masks
def test_both_empty_is_zero_and_one_empty_is_undefined():
    p = np.zeros((3, 6, 6), bool)
    g = np.zeros((3, 6, 6), bool)
    p[1, 2, 2] = True  # prediction, empty truth
    g[2, 3, 3] = True  # truth, empty prediction
    hd, asd = surface_distances(p, g, (1.0, 1.0))
    assert hd[0] == 0.0 and asd[0] == 0.0
    assert np.isnan(hd[1:]).all() and np.isnan(asd[1:]).all()


def test_empty_rules_undefined_and_diagonal():
    raw = np.array([0.0, np.nan, np.nan, 3.0])
    pred_empty = np.array([True, False, True, False])
    gt_empty = np.array([True, True, False, False])
    diag = np.array([10.0, 11.0, 12.0, 13.0])
    und = apply_empty_rule(raw, pred_empty, gt_empty, diag, "undefined")
    np.testing.assert_array_equal(und, [0.0, np.nan, np.nan, 3.0])
    assert np.nanmean(und) == 1.5 and int(np.isfinite(und).sum()) == 2  # "over 2 of 4"
    dia = apply_empty_rule(raw, pred_empty, gt_empty, diag, "diagonal")
    np.testing.assert_array_equal(dia, [0.0, 11.0, 12.0, 3.0])
    assert image_diagonal((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=0.01)  # BraTS' 373.13
    with pytest.raises(UserError, match="disagree"):
        apply_empty_rule(np.array([np.nan]), np.array([True]), np.array([True]), np.array([1.0]), "undefined")
    with pytest.raises(UserError, match="--empty-distance"):
        apply_empty_rule(raw, pred_empty, gt_empty, diag, "max")
    assert "undefined" in rule_line("undefined") and "diagonal" in rule_line("diagonal")


def test_parse_metrics():
    assert parse_metrics("dice,hd95") == ("dice", "hd95")
    assert parse_metrics(None) == ("dice", "iou", "hd95", "assd")
    with pytest.raises(UserError, match="hd100"):
        parse_metrics("dice,hd100")


# --------------------------------------------------------------------------- a cell's columns
def test_score_cell_gates_blank_slices_and_restacks_volumes():
    size = 16
    gt = np.zeros((4, size, size), bool)
    pred = np.zeros_like(gt)
    gt[0, 4:8, 4:8] = gt[1, 5:9, 4:8] = True  # case a: z 3 and 4 positive
    pred[0, 4:8, 5:9] = pred[1, 5:9, 5:9] = True
    pred[2, 1:3, 1:3] = True  # case a, z 6: a negative slice with a false positive
    gt[3, 2:6, 2:6] = True  # case b: missed
    case_ids = np.array(["a", "a", "a", "b"])
    z = np.array([3, 4, 6, 0])
    spacing = np.array([[2.0, 1.0, 5.0]] * 3 + [[1.0, 1.0, 3.0]])
    passed = {"none": np.ones(4, bool), "label": np.array([True, True, False, True])}
    out = score_cell(pred, gt, passed, case_ids, z, spacing, {"a": 10, "b": 1})
    for gate in passed:
        r = reference(pred[0], gt[0], (2.0, 1.0))
        assert out[gate]["hd95"][0] == pytest.approx(r[0], rel=1e-6)
        assert np.isnan(out[gate]["hd95"][3])  # a missed positive: one empty
    assert np.isnan(out["none"]["hd95"][2]) and out["label"]["hd95"][2] == 0.0  # blanked negative: both empty
    for gate, kept in (("none", [0, 1, 2]), ("label", [0, 1])):
        vp = np.zeros((4, size, size), bool)
        vg = np.zeros_like(vp)
        vp[z[kept] - 3] = pred[kept]
        vg[z[:3] - 3] = gt[:3]
        r = reference(vp, vg, (5.0, 2.0, 1.0))  # (slice, row, column) spacing
        np.testing.assert_allclose(out[gate]["hd95_3d"][:3], r[0], rtol=1e-5)
        np.testing.assert_allclose(out[gate]["assd_3d"][:3], r[1], rtol=1e-5)
    assert out["none"]["hd95_3d"][0] > out["label"]["hd95_3d"][0]  # the false positive is far away
    assert np.isnan(out["none"]["hd95_3d"][3])
    assert out["none"]["diag_mm"][0] == pytest.approx(np.hypot(32, 16))
    assert out["none"]["diag3d_mm"][0] == pytest.approx(np.sqrt(50 ** 2 + 32 ** 2 + 16 ** 2))


# --------------------------------------------------------------------------- spacing from the header
def _write_flare_case(root: Path, case: str, labels_ras: np.ndarray, voxel_ras, swap_xy: bool) -> None:
    """One FLARE21 case in the official layout; with ``swap_xy`` the on-disk axes are (y, x, z)
    in an LPS-style affine, so the reader must permute the voxel sizes back to RAS."""
    img_dir, lab_dir = root / "TrainingImg", root / "TrainingMask"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    sx, sy, sz = voxel_ras
    data = labels_ras
    aff = np.diag([sx, sy, sz, 1.0])
    if swap_xy:
        data = np.ascontiguousarray(np.transpose(labels_ras, (1, 0, 2))[::-1, ::-1])  # disk (y, x, z), flipped
        aff = np.zeros((4, 4))
        aff[0, 1], aff[1, 0], aff[2, 2], aff[3, 3] = -sx, -sy, sz, 1.0  # disk axis 0 -> -A, axis 1 -> -R
    hu = np.where(data > 0, 50.0, -100.0).astype(np.float32)
    nib.save(nib.Nifti1Image(hu, aff), str(img_dir / f"{case}_0000.nii.gz"))
    nib.save(nib.Nifti1Image(data.astype(np.uint8), aff), str(lab_dir / f"{case}.nii.gz"))


def test_real_layout_flare_case_with_anisotropic_voxels(tmp_path):
    from wsss_bench.data.readers import Flare21Dataset
    from wsss_bench.data.taskdata import case_spacing
    from wsss_bench.data.store import prepare_slices

    zz, xx, yy = np.mgrid[:12, :40, :56]  # RAS (x=40, y=56, z=12) after the transposes below
    kidney = (((xx - 20) / 8.0) ** 2 + ((yy - 28) / 14.0) ** 2 + ((zz - 6) / 4.0) ** 2 <= 1)
    lab = np.transpose(kidney, (1, 2, 0)).astype(np.uint8) * 2  # (x, y, z), kidney = 2
    voxel = (0.8, 1.6, 2.5)
    _write_flare_case(tmp_path / "flare", "train_000", lab, voxel, swap_xy=True)
    source = Flare21Dataset()
    assert source.voxel_size(tmp_path / "flare", "train_000") == pytest.approx(voxel)
    store = prepare_slices(source, tmp_path / "flare", 32, tmp_path / "cache", jobs=1)
    # in-plane 40 x 56 -> 32 x 45 (shorter side to 32), cropped to 32 x 32: 40/32 and 56/45 voxels a pixel
    expected = [0.8 * 40 / 32, 1.6 * 56 / 45, 2.5]
    assert store.meta["spacing"]["cases"]["train_000"] == pytest.approx(expected)
    legacy = type(store)(path=store.path, meta={k: v for k, v in store.meta.items() if k != "spacing"},
                         index=store.index)
    assert case_spacing(legacy, source, tmp_path / "flare")["train_000"] == pytest.approx(expected)

    gt = np.asarray(store.labels[:]) == 2  # (Z, 32, 32)
    pred = np.roll(gt, 1, axis=0) | np.roll(gt, 2, axis=2)  # one slice up, two columns right
    rows = np.flatnonzero(gt.reshape(len(gt), -1).any(1) | pred.reshape(len(gt), -1).any(1))
    z = store.index["z"].to_numpy()[rows]
    out = score_cell(pred[rows], gt[rows], {"none": np.ones(len(rows), bool)}, np.array(["train_000"] * len(rows)),
                     z, np.array([expected] * len(rows)), {"train_000": 12})
    vg = np.zeros((z.max() - z.min() + 1, 32, 32), bool)
    vp = np.zeros_like(vg)
    vg[z - z.min()], vp[z - z.min()] = gt[rows], pred[rows]
    r_hd, r_asd = reference(vp, vg, (2.5, expected[0], expected[1]))
    assert out["none"]["hd95_3d"][0] == pytest.approx(r_hd, rel=1e-5)
    assert out["none"]["assd_3d"][0] == pytest.approx(r_asd, rel=1e-5)
    # a one-slice shift alone is 2.5 mm: the z spacing is used, not the in-plane one
    up = score_cell(np.roll(gt, 1, axis=0)[rows], gt[rows], {"none": np.ones(len(rows), bool)},
                    np.array(["train_000"] * len(rows)), z, np.array([expected] * len(rows)), {"train_000": 12})
    assert up["none"]["hd95_3d"][0] == pytest.approx(2.5, rel=1e-5)


def test_smoke_phantom_task_data_carries_the_header_spacing(smoke_task_data, flare_phantom):
    data = smoke_task_data["flare21-kidney"]
    case = str(data.case_ids[0])
    lab = nib.load(str(flare_phantom / "TrainingMask" / f"{case}.nii.gz"))
    zooms = np.abs(np.diag(lab.affine)[:3])  # the phantom affines are diagonal
    shape = lab.shape
    expected = [zooms[0] * shape[0] / 32, zooms[1] * shape[1] / 32, zooms[2]]  # smoke: 64 -> S = 32
    np.testing.assert_allclose(data.spacing[data.case_ids == case], [expected] * int((data.case_ids == case).sum()))


def test_one_pass_equals_monais_public_functions():
    """Not the reference (that is scipy, above): the one-pass use of MONAI's edge and distance
    functions gives what its compute_hausdorff_distance / compute_average_surface_distance give."""
    import warnings

    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    rng = np.random.default_rng(5)
    g = np.stack([disc((36, 40), rng.uniform(10, 26, 2), rng.uniform(3, 9)) for _ in range(5)])
    p = np.stack([ndi.binary_dilation(m, iterations=k) ^ (rng.random(m.shape) > 0.98) for k, m in enumerate(g)])
    spacing = (1.3, 0.6)
    hd, asd = surface_distances(p, g, spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m_hd = compute_hausdorff_distance(p[:, None], g[:, None], include_background=True, percentile=95,
                                          spacing=spacing).numpy()[:, 0]
        m_asd = compute_average_surface_distance(p[:, None], g[:, None], include_background=True, symmetric=True,
                                                 spacing=spacing).numpy()[:, 0]
    np.testing.assert_allclose(hd, m_hd, rtol=1e-5)
    np.testing.assert_allclose(asd, m_asd, rtol=1e-5)


def test_stored_rows_under_both_rules():
    import pandas as pd

    from wsss_bench.boundary import apply_rule_to_rows, volume_boundary

    rows = pd.DataFrame({
        "task": "t", "method": "m", "gate": "label", "seed": 0, "case_id": ["a", "a", "b", "b"],
        "pred_area": [3, 0, 0, 0], "gt_area": [4, 5, 0, 0],
        "hd95": [2.0, np.nan, 0.0, 0.0], "assd": [1.0, np.nan, 0.0, 0.0], "diag_mm": [10.0, 10.0, 20.0, 20.0],
        "hd95_3d": [7.0, 7.0, 0.0, 0.0], "assd_3d": [3.0, 3.0, 0.0, 0.0], "diag3d_mm": [50.0] * 4})
    und = apply_rule_to_rows(rows, "undefined")
    np.testing.assert_array_equal(und["hd95"], [2.0, np.nan, 0.0, 0.0])
    dia = apply_rule_to_rows(rows, "diagonal")
    np.testing.assert_array_equal(dia["hd95"], [2.0, 10.0, 0.0, 0.0])
    assert rows["hd95"].isna().sum() == 1  # the input is not changed
    vol = volume_boundary(rows, ["task", "method", "gate", "seed", "case_id"], "diagonal")
    assert vol["hd95_3d"].tolist() == [7.0, 0.0]
    missed = rows.assign(pred_area=0, hd95_3d=[np.nan, np.nan, 0.0, 0.0],
                          assd_3d=[np.nan, np.nan, 0.0, 0.0])  # case a: nothing predicted
    vol = volume_boundary(missed, ["task", "method", "gate", "seed", "case_id"], "diagonal")
    assert vol["hd95_3d"].tolist() == [50.0, 0.0]
    assert np.isnan(volume_boundary(missed, ["case_id"], "undefined")["hd95_3d"][0])
    with pytest.raises(UserError, match="different hd95_3d"):
        volume_boundary(rows.assign(hd95_3d=[7.0, 8.0, 0.0, 0.0]), ["case_id"], "undefined")
