"""Figures of a run: the Fig. 3 grid and its slice rule, the Fig. 4 ablation curves, boxplots."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from report_fixtures import build_run
from wsss_bench.reporting import figures as figs
from wsss_bench.reporting.export_masks import gated
from wsss_bench.reporting.load import load_manifests, load_results
from wsss_bench.running.rundir import load_predictions


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("figrun"))


def _png_ok(path):
    from matplotlib.image import imread

    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    gray = img[..., :3].mean(-1)
    assert gray.std() > 0.05  # not a blank canvas
    return img


def test_every_figure_is_written_as_png_and_pdf(run_dir, tmp_path):
    paths, skipped = figs.write_figures(run_dir, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == sorted(f"{n}.{e}" for n in ("fig3_qualitative", "fig4_ablation", "dice_boxplots")
                           for e in ("png", "pdf"))
    assert skipped == []
    for p in paths:
        data = p.read_bytes()
        assert len(data) > 5000
        if p.suffix == ".pdf":
            assert data.startswith(b"%PDF") and b"%%EOF" in data[-64:]
        else:
            assert data.startswith(b"\x89PNG")
            _png_ok(p)


def test_pick_slices_takes_the_median_dice_slice_of_each_case():
    rows = []
    dice = {("a", 0): 0.10, ("a", 1): 0.52, ("a", 2): 0.95, ("b", 0): 0.49, ("b", 1): 0.70,
            ("c", 0): 0.50, ("c", 1): 0.51}
    for (case, z), d in dice.items():
        rows.append({"task": "brats", "method": "m", "gate": "label", "case_id": case, "z": z, "label": 1,
                     "dice": d, "seed": 0})
    rows.append({"task": "brats", "method": "m", "gate": "label", "case_id": "d", "z": 0, "label": 0,
                 "dice": 0.5, "seed": 0})  # a negative slice never counts
    df = pd.DataFrame(rows)
    med = np.median(list(dice.values()))  # 0.51
    assert med == 0.51
    # nearest to 0.51: c/1 (0), then a/1 and c/0 (0.01; case c already taken), b/0 (0.02)
    assert figs.pick_slices(df, "brats", "m", "label", rows=3) == [("c", 1), ("a", 1), ("b", 0)]
    assert figs.pick_slices(df, "brats", "m", "label", rows=5)[3:] == [("c", 0), ("b", 1)]


def test_best_method_excludes_fsl(run_dir):
    df = load_results(run_dir)
    methods = list(df.loc[df.task == "flare21-kidney", "method"].unique())
    assert figs.best_method(df, "flare21-kidney", "label", methods) == "layercam+mg+cldf"  # fsl scores 1.0


def test_grid_columns_prefer_paper_rows(run_dir):
    df = load_results(run_dir)
    methods = list(dict.fromkeys(df.loc[df.task == "brats", "method"]))
    cols = figs.grid_methods(df, "brats", methods, limit=4)
    assert cols == ["gradcam+threshold", "layercam+threshold", "amecam+mg+cldf", "fsl"]


def test_radiological_view():
    ras = np.zeros((4, 5))  # rows = x (towards patient right), cols = y (towards anterior)
    ras[3, 4] = 1  # most right, most anterior
    shown = figs.radiological(ras)
    assert shown.shape == (5, 4) and shown[0, 0] == 1  # top (anterior), left (patient right)


def test_grid_shows_the_gated_stored_masks(run_dir):
    df = load_results(run_dir)
    manifests = load_manifests(run_dir)
    preds = load_predictions(run_dir)
    fig = figs.qualitative_grid(df, manifests, "label", rows=1, predictions=preds)
    axes = fig.figure.axes
    ncol = 2 + 8
    # row 0 is BraTS; its gradcam panel (column 2) overlays the stored, gated mask
    p = preds[("brats", "gradcam+threshold", 0)]
    best = figs.best_method(df, "brats", "label", figs.grid_methods(df, "brats", list(df.method.unique())))
    (case, z), = figs.pick_slices(df, "brats", best, "label", 1)
    want = figs.radiological(gated(p, df, "label")[(p.case_ids == case) & (p.z == z)][0])
    overlay = [im for im in axes[2].get_images() if im.get_array().ndim == 3][0].get_array()
    np.testing.assert_array_equal(overlay[..., 3] > 0, want)
    assert axes[2].get_title().startswith("gradcam+")
    assert axes[ncol + 0].get_ylabel().startswith("Kidney")
    fig.close()


def test_gate_blanks_stored_masks(run_dir):
    df = load_results(run_dir)
    p = load_predictions(run_dir)[("brats", "gradcam+threshold", 0)]
    lab = df[(df.method == "gradcam+threshold") & (df.gate == "label") & (df.task == "brats")]
    raw = df[(df.method == "gradcam+threshold") & (df.gate == "none") & (df.task == "brats")]
    neg = raw[(raw.label == 0) & (raw.pred_area > 0)].iloc[0]  # a false positive the label gate blanks
    k = np.flatnonzero((p.case_ids == neg.case_id) & (p.z == neg.z))[0]
    assert gated(p, df, "none")[k].any() and not gated(p, df, "label")[k].any()
    # the gated masks reproduce the stored pred_area of every row
    areas = gated(p, df, "label").reshape(len(p.z), -1).sum(1)
    got = dict(zip(zip(p.case_ids, p.z), areas))
    assert all(got[(c, z)] == a for c, z, a in zip(lab.case_id, lab.z, lab.pred_area))


def test_ablation_points_and_curves(run_dir):
    df = load_results(run_dir)
    pts = figs.ablation_points(df, "label", resamples=20)
    brats = pts[pts.task == "brats"]
    assert sorted(brats[brats.param == "out_dim"].value) == [4, 8, 16, 32]
    assert sorted(brats[brats.param == "decoder_depth"].value) == [2, 4, 6]
    row = brats[(brats.param == "out_dim") & (brats.value == 8)].iloc[0]
    assert row.method == "amecam+mg+cldf[out_dim=8]"
    assert row.dice_mean == pytest.approx(df[(df.method == row.method) & (df.gate == "label")].dice.mean())
    assert (brats.dice_ci_lo <= brats.dice_mean).all() and (brats.dice_mean <= brats.dice_ci_hi).all()
    fig = figs.ablation_curves(df, "label", 20)
    ax_dim, ax_depth = fig.figure.axes[:2]
    assert ax_dim.get_xscale() == "log" and ax_dim.get_xlabel() == "decoder output dimension"
    line = ax_dim.get_lines()[0]
    assert list(line.get_xdata()) == [4, 8, 16, 32]
    fig.close()
    assert figs.ablation_curves(df[~df.refiner.str.startswith("cldf[")], "label") is None


def test_boxplots_hold_every_method_of_each_task(run_dir):
    df = load_results(run_dir)
    fig = figs.dice_boxplots(df, "label")
    ax = fig.figure.axes[0]
    labels = [t.get_text().replace("\n", "") for t in ax.get_xticklabels()]
    methods = list(dict.fromkeys(df.loc[df.task == "brats", "method"]))
    assert labels == methods
    medians = [ln.get_ydata()[0] for ln in ax.get_lines() if ln.get_color() == "k"][: len(methods)]
    pos = df[(df.task == "brats") & (df.gate == "label") & (df.label == 1)]
    want = [pos[pos.method == m].dice.median() for m in methods]
    np.testing.assert_allclose(medians, want)
    fig.close()


def test_figures_without_predictions_say_why(run_dir, tmp_path):
    df = load_results(run_dir)
    made, skipped = figs.build_figures(df, [], "label")  # no manifest: no masks to read
    assert [f.name for f in made] == ["fig4_ablation", "dice_boxplots"]
    assert any("stored no predicted masks" in s for s in skipped)


def test_cli_figures(run_dir, tmp_path):
    from typer.testing import CliRunner

    from wsss_bench.cli import app

    res = CliRunner().invoke(app, ["figures", str(run_dir), "--out", str(tmp_path / "f"), "--format", "png",
                                   "--gate", "none"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["dice_boxplots.png", "fig3_qualitative.png",
                                                                   "fig4_ablation.png"]
    bad = CliRunner().invoke(app, ["figures", str(run_dir), "--gate", "sometimes"])
    assert bad.exit_code == 2 and "gate=sometimes" in bad.output
