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
    assert axes[2].get_title() == "GradCAM"  # the paper's name, not the spec string
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
    np.testing.assert_allclose(np.round(np.log2(line.get_xdata())), [2, 3, 4, 5])
    fig.close()
    assert figs.ablation_curves(df[~df.refiner.str.startswith("cldf[")], "label") is None


def test_boxplots_hold_every_method_of_each_task(run_dir):
    df = load_results(run_dir)
    fig = figs.dice_boxplots(df, "label")
    ax = fig.figure.axes[0]
    labels = [t.get_text().replace("\n", "") for t in ax.get_xticklabels()]
    methods = figs.method_order(df, "brats", list(dict.fromkeys(df.loc[df.task == "brats", "method"])))
    assert labels[:4] == ["GradCAM", "LayerCAM", "CLDF", "FSL (UNet)"]  # paper names, paper order
    assert labels == [figs.paper_name(df, "brats", m) for m in methods]
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


# --------------------------------------------------------------------------- for a paper
def _simulate_deuteranopia(rgb):
    """Machado et al. (2009) deuteranopia (severity 1) on linear RGB: an independent check."""
    lin = np.asarray(rgb, np.float64) ** 2.2
    m = np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]])
    return m @ lin


def test_overlay_colours_stay_apart_for_a_deuteranope():
    gap = np.linalg.norm(_simulate_deuteranopia(figs.GT_COLOR) - _simulate_deuteranopia(figs.PRED_COLOR))
    red_green = np.linalg.norm(_simulate_deuteranopia((0.10, 0.85, 0.25)) - _simulate_deuteranopia((0.95, 0.15, 0.10)))
    assert red_green < 0.6 < gap


def test_pdf_fonts_are_truetype_and_widths_fit_a_column(run_dir, tmp_path):
    for size, width in (("single", 3.5), ("double", 7.16)):
        paths, _ = figs.write_figures(run_dir, tmp_path / size, formats=("pdf",), size=size)
        assert len(paths) == 3
        for path in paths:
            data = path.read_bytes()
            assert b"/Type3" not in data and b"/FontFile2" in data, path.name  # Type 42, embedded
            box = [float(v) for v in data.split(b"/MediaBox [")[1].split(b"]")[0].split()]
            assert box[2] - box[0] == pytest.approx(width * 72, abs=0.5), (path.name, size)
    with pytest.raises(figs.UserError, match="single"):
        figs.figure_width("a4")


def _texts_inside(fig):
    """Texts drawn outside the canvas (cut off): the figure's tight box must lie inside it, and
    so must the title."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    tight = fig.get_tightbbox(renderer)  # inches, over every drawn artist
    w, h = fig.get_size_inches()
    if tight.x0 < -0.01 or tight.y0 < -0.01 or tight.x1 > w + 0.01 or tight.y1 > h + 0.01:
        out.append(f"tight box {tight} outside {w}x{h}")
    if fig._suptitle is not None:
        bb = fig._suptitle.get_window_extent(renderer)
        if bb.x0 < -1 or bb.x1 > fig.bbox.width + 1:
            out.append(fig._suptitle.get_text())
    return out


@pytest.mark.parametrize("size", ["single", "double"])
def test_every_title_fits_even_with_one_method(run_dir, size):
    df = load_results(run_dir)
    manifests = load_manifests(run_dir)
    preds = load_predictions(run_dir)
    one = {k: v for k, v in preds.items() if k[0] == "brats" and k[1] == "gradcam+threshold"}
    sub = df[(df.task == "brats") & (df.method == "gradcam+threshold")]
    for fig in (figs.qualitative_grid(sub, manifests, "label", rows=1, predictions=one, size=size),
                figs.qualitative_grid(df, manifests, "label", rows=1, predictions=preds, size=size),
                figs.ablation_curves(df, "label", 20, size=size), figs.dice_boxplots(df, "label", size=size),
                figs.dice_boxplots(sub, "label", size=size)):
        assert _texts_inside(fig.figure) == [], fig.name
        fig.close()


def test_one_method_order_and_no_legend_over_data(run_dir):
    df = load_results(run_dir)
    preds = load_predictions(run_dir)
    grid = figs.qualitative_grid(df, load_manifests(run_dir), "label", rows=1, predictions=preds)
    titles = [ax.get_title() for ax in grid.figure.axes if ax.get_title()]
    box = figs.dice_boxplots(df, "label")
    for ax in box.figure.axes:
        assert ax.get_legend() is None
    ticks = [[t.get_text().replace("\n", "") for t in ax.get_xticklabels()] for ax in box.figure.axes if ax.get_xticklabels()]
    # every panel lists the methods the grid shows in the grid's order
    grid_brats = [t.replace("\n", "") for t in titles[2:grid.figure.axes[0].get_gridspec().ncols]]
    assert [t for t in ticks[0] if t in grid_brats] == grid_brats
    first = {}
    for labels in ticks:  # shared names keep one relative order in every task's panel
        common = [x for x in labels if x in ticks[0]]
        assert common == [x for x in ticks[0] if x in common]
    curves = figs.ablation_curves(df, "label", 20)
    assert all(ax.get_legend() is None for ax in curves.figure.axes) and curves.figure.legends
    grid.close(), box.close(), curves.close()


def test_ablation_series_never_share_an_x_position(run_dir):
    df = load_results(run_dir)
    ablation = df[(df.task == "brats") & df.method.str.contains("cldf")].copy()
    ablation["task"] = "flare21-kidney"  # a second task with the same curves: the worst case, equal values
    fig = figs.ablation_curves(pd.concat([df, ablation]), "label", 20)
    for ax in fig.figure.axes[:2]:
        xs = [tuple(np.round(line.get_xdata(), 6)) for line in ax.get_lines() if line.get_marker() in ("o", "s", "^", "D")]
        assert len(xs) >= 2
        flat = [x for series in xs for x in series]
        assert len(flat) == len(set(flat))  # dodged: no two series at one x
        styles = {(line.get_color(), line.get_marker()) for line in ax.get_lines()
                  if line.get_marker() in ("o", "s", "^", "D")}
        assert len(styles) == len(xs)  # each series its own colour and marker
    fig.close()
