"""Loading results, laying out tables and exporting them (docs/protocol.md section 9)."""
from __future__ import annotations

import importlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsss_bench.errors import UserError
from wsss_bench.interfaces import ReportTable
from wsss_bench.reporting.format import fmt_mean_std
from wsss_bench.reporting.load import load_results
from wsss_bench.reporting.tables import paper_table, render, significance_table, summary_table, write_report

PLUGIN_FILE = Path(__file__).resolve().parents[1] / "plugins" / "exporters.py"


def load_exporters():
    """The built-in exporter module, installed (wsss_bench_plugins) or from the source tree."""
    try:
        return importlib.import_module("wsss_bench_plugins.exporters")
    except ImportError:
        spec = importlib.util.spec_from_file_location("_wsss_exporters_under_test", PLUGIN_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


ex = load_exporters()


def results(method_scores, task="brats", gate="label", seed=0, cases=("a", "b")):
    """A per-slice table: method -> list of dice per slice (slices spread over ``cases``)."""
    rows = []
    for method, scores in method_scores.items():
        for k, d in enumerate(scores):
            rows.append({"task": task, "method": method, "cam": "gradcam", "refiner": "threshold",
                         "gate": gate, "case_id": cases[k % len(cases)], "z": k, "split": "test",
                         "label": int(k != 0), "fg_fraction": 0.1, "gt_area": 10, "pred_area": 10,
                         "gate_pass": True, "classifier_p1": 0.7, "dice": float(d), "iou": float(d) / 2,
                         "seed": seed, "profile": "smoke", "params": "{}"})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- loading
def test_load_results_single_many_and_errors(tmp_path):
    (tmp_path / "runs" / "r1").mkdir(parents=True)
    (tmp_path / "runs" / "r2").mkdir(parents=True)
    results({"x": [1, 0.5]}).to_parquet(tmp_path / "runs" / "r1" / "results.parquet")
    results({"y": [1, 0.2]}).to_parquet(tmp_path / "runs" / "r2" / "results.parquet")
    one = load_results(tmp_path / "runs" / "r1")
    assert list(one.method.unique()) == ["x"] and "run_dir" in one
    many = load_results(tmp_path / "runs")
    assert sorted(many.method.unique()) == ["x", "y"]
    both = load_results([str(tmp_path / "runs" / "r1"), tmp_path / "runs" / "r2"])
    assert len(both) == 4
    with pytest.raises(UserError, match="nowhere"):
        load_results(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*results.parquet"):
        load_results(tmp_path / "empty")
    with pytest.raises(UserError, match="twice"):  # the same run loaded under two names
        (tmp_path / "copy").mkdir()
        results({"x": [1, 0.5]}).to_parquet(tmp_path / "copy" / "results.parquet")
        load_results([tmp_path / "runs" / "r1", tmp_path / "copy"])
    (tmp_path / "bad").mkdir()
    pd.DataFrame({"task": ["t"]}).to_parquet(tmp_path / "bad" / "results.parquet")
    with pytest.raises(UserError, match=r"bad.*lack column"):
        load_results(tmp_path / "bad")


# --------------------------------------------------------------------------- tables
def test_fmt():
    assert fmt_mean_std(0.39249, 0.2871) == "0.392±0.29"
    assert fmt_mean_std(float("nan"), 0.1) == "—"


def test_summary_table_layout():
    df = pd.concat([results({"gradcam": [1.0, 0.5, 0.0], "CLDF": [1.0, 0.8, 0.6]}),
                    results({"gradcam": [1.0, 0.9, 0.9]}, gate="none")])
    df["data"] = "phantom"
    t = summary_table(df)  # gate=label by default
    assert t.header[0] == "Method" and t.header[1] == "BraTS21 Dice ↑"
    assert "BraTS21 Dice (pos) ↑" in t.header
    assert [r[0] for r in t.rows] == ["gradcam", "CLDF"]
    d = np.array([1.0, 0.5, 0.0])
    assert t.rows[0][1] == f"{d.mean():.3f}±{d.std():.2f}"
    assert (1, 1) in t.bold and (0, 1) not in t.bold
    assert "gate=label" in t.footer and "profile=smoke" in t.footer
    assert "seed=0" in t.footer and "data=phantom" in t.footer
    assert set(t.raw.method) == {"gradcam", "CLDF"}
    t2 = summary_table(df, gate="none", data="real")
    assert len(t2.rows) == 1 and "data=phantom" in t2.footer  # the column wins over the argument
    assert "data=real" in summary_table(df.drop(columns="data"), data="real").footer
    with pytest.raises(UserError, match="classifier"):
        summary_table(df, gate="classifier")


def test_summary_table_ties_and_not_bold():
    df = results({"a": [1.0, 0.5], "b": [0.5, 1.0], "fsl": [1.0, 1.0]})
    t = summary_table(df, not_bold=["fsl"], blocks=["all"])
    assert {(0, 1), (1, 1)} <= t.bold and (2, 1) not in t.bold


def test_paper_table_rows_missing_and_supplementary():
    df = pd.concat([results({"gc": [1.0, 0.2], "cldf": [1.0, 0.9], "gcpp": [1.0, 1.0]}),
                    results({"cldf": [1.0, 0.7]}, task="flare21-kidney")])
    t = paper_table(df, [("GradCAM", "gc"), ("CLDF", "cldf"), ("FSL (UNet)", "fsl")],
                    ["brats", "flare21-kidney"], supplementary_rows=[("GradCAM++", "gcpp")],
                    title="Table 1", not_bold=["FSL (UNet)"])
    assert [r[0] for r in t.rows] == ["GradCAM", "CLDF", "FSL (UNet)", "GradCAM++"]
    assert t.header == ["Method", "BraTS21 Dice ↑", "BraTS21 IoU ↑", "Kidney Dice ↑", "Kidney IoU ↑"]
    assert t.rows[0][3] == "—" and t.rows[2][1:] == ["—"] * 4
    assert t.rules_after == [2]
    assert (1, 1) in t.bold and (3, 1) not in t.bold  # supplementary 1.000 does not take the bold
    assert set(zip(t.raw.row, t.raw.task)) == {("GradCAM", "brats"), ("CLDF", "brats"),
                                               ("CLDF", "flare21-kidney"), ("GradCAM++", "brats")}
    assert t.raw.loc[t.raw.row == "GradCAM++", "supplementary"].all()


def test_significance_table():
    cases = tuple(f"c{i}" for i in range(8))
    df = results({"cldf": [0.9] * 16, "gc": [0.2] * 16, "few": [0.5] * 4}, cases=cases)
    t = significance_table(df, "cldf", [("GradCAM", "gc"), ("Few", "few"), ("CLDF", "cldf")], ["brats"])
    assert t.rows == [["GradCAM", "0.008"], ["Few", "n/a"], ["CLDF", "ref"]]


# --------------------------------------------------------------------------- exporters
def small_table():
    raw = pd.DataFrame({"method": ["a_b", "c"], "dice_mean": [0.123456789, 0.5], "dice_std": [0.1, 0.0]})
    return ReportTable(title="Results 100% a_b & c", header=["Method", "Dice ↑"],
                       rows=[["a_b & co", "0.392±0.29"], ["c|d", "0.500±0.00"], ["supp", "—"]],
                       bold={(1, 1)}, rules_after=[1], footer="gate=label; data=phantom.", raw=raw)


def test_markdown_exporter():
    text = render(small_table(), ex.MarkdownExporter())
    lines = text.splitlines()
    assert "| Method" in text and "Dice ↑" in text
    assert "**0.500±0.00**" in text and "**0.392±0.29**" not in text
    assert "c\\|d" in text  # pipes in cells are escaped
    body = [ln for ln in lines if ln.startswith("|")]
    assert len(body) == 2 + 3 + 1  # header, separator, 3 rows, 1 break row
    assert body[4].replace("|", "").strip() == ""
    assert lines[-1] == "gate=label; data=phantom."


def test_latex_exporter():
    text = ex.LatexExporter().export(small_table())
    for needle in ["\\toprule", "\\bottomrule", "\\begin{tabular}{lc}", "\\textbf{0.500$\\pm$0.00}",
                   "Dice $\\uparrow$", "a\\_b \\& co", "100\\%", "---", "c|d"]:
        assert needle in text, needle
    assert text.count("\\midrule") == 2  # below the header and after row 1
    assert text.index("supp") > text.rindex("\\midrule")
    assert "gate=label; data=phantom." in text


def test_csv_exporter_roundtrips_numbers():
    text = ex.CsvExporter().export(small_table())
    back = pd.read_csv(io.StringIO(text))
    assert list(back.columns) == ["method", "dice_mean", "dice_std"]
    assert back.dice_mean.dtype == np.float64 and back.dice_mean[0] == 0.123456789
    with pytest.raises(UserError, match="raw"):
        ex.CsvExporter().export(ReportTable(title="t", header=["a"], rows=[]))


def test_exporter_registration_and_metadata():
    got = []
    ex.register_exporters(register=got.append)
    assert [c.name for c in got] == ["markdown", "latex", "csv", "html"]
    assert [c.suffix for c in got] == [".md", ".tex", ".csv", ".html"]
    assert all(c.description for c in got)


def test_exporter_module_is_light():
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('m', {str(PLUGIN_FILE)!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "heavy = [m for m in ('torch', 'pandas', 'numpy', 'tabulate') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PLUGIN_FILE.parents[1])


def test_write_report_atomic(tmp_path):
    table = small_table()
    out = write_report(table, ex.MarkdownExporter, tmp_path / "sub" / "t.md")
    assert out.read_text(encoding="utf-8") == render(table, ex.MarkdownExporter())
    assert [p.name for p in out.parent.iterdir()] == ["t.md"]  # no temp file left behind
    named = write_report(table, ex.LatexExporter(), tmp_path)
    assert named.name == "results-100-a-b-c.tex"


# =========================================================================== issue 13
# A fixed results frame with planted effects: per case c (8 cases, 3 slices each, one negative),
# CLDF scores base[c]; gradcam scores base[c] - 0.3 (a planted difference on every case);
# layercam scores exactly what CLDF scores (an equal pair); fsl scores 1.0 (best, never bold).
import re  # noqa: E402
import shutil  # noqa: E402

from wsss_bench.reporting import paper  # noqa: E402
from wsss_bench.metrics import dice_iou  # noqa: E402
from wsss_bench.reporting.stats import aggregate_volumes, bootstrap_ci, volume_scores  # noqa: E402
from wsss_bench.reporting.layout import cldf_references  # noqa: E402
from wsss_bench.reporting.tables import build_tables, per_case_table, reference_table, render_many  # noqa: E402
from wsss_bench.running.rundir import FailedCell, failed_cells  # noqa: E402
from wsss_bench.seeding import derive_seed  # noqa: E402

BASE = [0.62, 0.71, 0.80, 0.55, 0.90, 0.67, 0.75, 0.83]
STAT_METHODS = {"amecam+mg+cldf": ("amecam+mg", "cldf", 0.0), "gradcam+threshold": ("gradcam", "threshold", -0.3),
                "layercam+threshold": ("layercam", "threshold", 0.0), "fsl": ("", "fsl", None)}


def stat_frame(n_cases=8, task="brats", methods=STAT_METHODS, seed=0):
    rows = []
    for c in range(n_cases):
        for zi in range(3):
            lab = int(zi != 0)
            for m, (cam, ref, delta) in methods.items():
                d = 1.0 if delta is None else (1.0 if lab == 0 else BASE[c % len(BASE)] + delta + 0.01 * zi)
                gt, pred = (0, 0) if lab == 0 else (100, 100)
                rows.append({"task": task, "method": m, "cam": cam, "refiner": ref, "gate": "label",
                             "case_id": f"case{c}", "z": zi, "split": "test", "label": lab, "fg_fraction": 0.1,
                             "gt_area": gt, "pred_area": pred, "gate_pass": bool(lab), "classifier_p1": 0.6,
                             "dice": d, "iou": d / (2 - d), "seed": seed, "profile": "smoke", "params": "{}",
                             "data": "phantom"})
    return pd.DataFrame(rows)


def _cell(table, row_label, col_label):
    j = table.header.index(col_label)
    i = [r[0] for r in table.rows].index(row_label)
    return i, j, table.rows[i][j]


def test_planted_difference_is_marked_and_equal_pair_is_not():
    t = summary_table(stat_frame(), ci_resamples=200, blocks=["all"])
    _, _, gc = _cell(t, "gradcam+threshold", "BraTS21 Dice ↑")
    _, _, lc = _cell(t, "layercam+threshold", "BraTS21 Dice ↑")
    _, _, ref = _cell(t, "amecam+mg+cldf", "BraTS21 Dice ↑")
    assert gc.split("\n")[0].endswith("†")  # 8/8 cases lower: p = 2/256, Holm x3 = 0.023
    assert "†" not in lc and "†" not in ref
    assert "Wilcoxon signed-rank" in t.footer and "Holm" in t.footer and "CLDF (amecam+mg+cldf)" in t.footer
    raw = t.raw.set_index("row")
    assert raw.loc["gradcam+threshold", "p_holm"] == pytest.approx(min(1.0, 3 * 2 / 256))
    assert raw.loc["layercam+threshold", "p_holm"] == 1.0
    assert (raw.loc["gradcam+threshold", "reference"]) == "amecam+mg+cldf"
    # bold: the best WSSS mean (CLDF and its equal twin), not the fully supervised 1.000
    i_fsl, j, _ = _cell(t, "fsl", "BraTS21 Dice ↑")
    i_ref, _, _ = _cell(t, "amecam+mg+cldf", "BraTS21 Dice ↑")
    assert (i_ref, j) in t.bold and (i_fsl, j) not in t.bold


def test_holm_family_is_the_column():
    """Seven methods each lower than CLDF on all 8 cases: raw p = 2/256 = 0.0078 each, but Holm
    over the column's 7 comparisons gives 7 x 0.0078 = 0.055 > 0.05, so nothing is marked."""
    methods = {"amecam+mg+cldf": ("amecam+mg", "cldf", 0.0),
               **{f"m{k}+threshold": (f"m{k}", "threshold", -0.1 - 0.01 * k) for k in range(7)}}
    t = summary_table(stat_frame(methods=methods), ci_resamples=20, blocks=["all"])
    assert not any("†" in r[1] for r in t.rows)
    assert t.raw.p.dropna().max() == pytest.approx(2 / 256) and t.raw.p_holm.dropna().min() == pytest.approx(7 * 2 / 256)
    few = summary_table(stat_frame(methods=dict(list(methods.items())[:4])), ci_resamples=20, blocks=["all"])
    assert all("†" in r[1] for r in few.rows[1:])  # 3 comparisons: 3 x 0.0078 < 0.05


def test_fewer_than_six_cases_reads_na_and_marks_nothing():
    t = summary_table(stat_frame(n_cases=5), ci_resamples=50, blocks=["all"])
    _, _, gc = _cell(t, "gradcam+threshold", "BraTS21 Dice ↑")
    assert gc.split("\n")[1].endswith("n/a") and "†" not in gc
    assert "n/a: fewer than 6" in t.footer


def test_ci_is_the_case_bootstrap_of_the_all_slice_mean():
    df = stat_frame()
    t = summary_table(df, ci_resamples=300, blocks=["all"])
    _, _, cell = _cell(t, "gradcam+threshold", "BraTS21 Dice ↑")
    lo, hi = map(float, re.findall(r"[0-9.]+", cell.split("\n")[1]))
    # independent reference: a plain loop over draws of whole cases
    g = df[(df.method == "gradcam+threshold")]
    cases = sorted(g.case_id.unique())
    rng = np.random.default_rng(derive_seed(0, "brats", "bootstrap"))
    draws = rng.integers(0, len(cases), size=(300, len(cases)))
    means = []
    for row in draws:
        vals = []
        for k in row:
            vals += list(g[g.case_id == cases[k]].dice)
        means.append(sum(vals) / len(vals))
    raw = t.raw.set_index("row").loc["gradcam+threshold"]
    assert raw["dice_ci_lo"] == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
    assert raw["dice_ci_hi"] == pytest.approx(np.percentile(means, 97.5), abs=1e-12)
    assert (lo, hi) == (float(f"{raw['dice_ci_lo']:.3f}"), float(f"{raw['dice_ci_hi']:.3f}"))
    mean = g.dice.mean()
    assert lo < mean < hi
    assert "[lo, hi]: case-level cluster bootstrap 95% CI" in t.footer and "300 resamples" in t.footer


def test_per_volume_dice_matches_a_hand_computation():
    # case a: slices (inter, pred, gt) = (3, 4, 5), (0, 2, 0), (6, 6, 8); case b: both empty
    rows = []
    for case, slices in {"a": [(3, 4, 5), (0, 2, 0), (6, 6, 8)], "b": [(0, 0, 0), (0, 0, 0)]}.items():
        for zi, (i, p, g) in enumerate(slices):
            d = 2 * i / (p + g) if g else float(p == 0)
            rows.append({"task": "brats", "method": "m", "gate": "none", "case_id": case, "z": zi,
                         "label": int(g > 0), "dice": d, "iou": 0.0, "pred_area": p, "gt_area": g, "seed": 0})
    vol = volume_scores(pd.DataFrame(rows)).set_index("case_id")
    assert vol.loc["a", "dice3d"] == 2 * (3 + 0 + 6) / ((4 + 2 + 6) + (5 + 0 + 8))  # = 18/25
    assert vol.loc["a", "iou3d"] == 9 / (12 + 13 - 9)
    assert vol.loc["b", "dice3d"] == 1.0  # empty volume predicted empty
    agg = aggregate_volumes(pd.DataFrame(rows)).iloc[0]
    assert agg["dice3d_mean"] == pytest.approx((18 / 25 + 1.0) / 2)
    assert agg["dice3d_std"] == pytest.approx(np.std([18 / 25, 1.0]))


def test_per_volume_dice_equals_dice_of_the_stacked_masks():
    rng = np.random.default_rng(3)
    pred = rng.random((12, 9, 9)) < 0.3
    gt = rng.random((12, 9, 9)) < 0.25
    gt[4] = False  # one empty slice
    d, i = dice_iou(pred, gt)
    case = np.array(["x"] * 7 + ["y"] * 5)
    df = pd.DataFrame({"task": "t", "method": "m", "gate": "none", "case_id": case, "z": np.arange(12),
                       "label": 1, "dice": d, "iou": i, "seed": 0,
                       "pred_area": pred.reshape(12, -1).sum(1), "gt_area": gt.reshape(12, -1).sum(1)})
    vol = volume_scores(df).set_index("case_id")
    for c in ("x", "y"):
        p, g = pred[case == c], gt[case == c]
        want = 2.0 * (p & g).sum() / (p.sum() + g.sum())
        assert vol.loc[c, "dice3d"] == pytest.approx(want, abs=1e-15)
    bad = df.copy()
    bad.loc[0, "dice"] = 0.123456  # the columns no longer agree: refuse
    with pytest.raises(UserError, match="disagree"):
        volume_scores(bad)


def test_per_volume_column_in_the_table():
    df = stat_frame()
    t = summary_table(df, blocks=["all"], per_volume=True)
    assert "BraTS21 Dice (3D) ↑" in t.header
    _, _, cell = _cell(t, "gradcam+threshold", "BraTS21 Dice (3D) ↑")
    vol = volume_scores(df[df.method == "gradcam+threshold"])
    assert cell == f"{vol.dice3d.mean():.3f}±{vol.dice3d.std(ddof=0):.2f}"
    assert "per-volume Dice" in t.footer


LATEX_ENVS = re.compile(r"\\(begin|end)\{([a-z*]+)\}")


def check_latex(text: str, tmp_path) -> None:
    """The table parses (pylatexenc, strict), its environments balance, and it compiles with
    pdflatex where installed."""
    from pylatexenc.latexwalker import LatexWalker

    LatexWalker(text, tolerant_parsing=False).get_latex_nodes()  # raises on unbalanced input
    stack = []
    for kind, name in LATEX_ENVS.findall(text):
        if kind == "begin":
            stack.append(name)
        else:
            assert stack and stack.pop() == name, name
    assert not stack
    if shutil.which("pdflatex"):
        tmp_path.mkdir(parents=True, exist_ok=True)
        (tmp_path / "t.tex").write_text(text, encoding="utf-8")
        (tmp_path / "doc.tex").write_text("\\documentclass{article}\\usepackage{booktabs}\\usepackage{graphicx}"
                                          "\\begin{document}\\input{t.tex}\\end{document}\n", encoding="utf-8")
        res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout[-2000:]
        assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_latex_paper_layout_rules_bold_footer(tmp_path):
    df = pd.concat([stat_frame(), stat_frame(task="flare21-kidney", methods={
        "layercam+mg+cldf": ("layercam+mg", "cldf", 0.0), "gradcam+threshold": ("gradcam", "threshold", -0.3)})])
    t = reference_table(df, "table1", "label", with_paper=True, ci_resamples=100, per_volume=True)
    text = ex.LatexExporter().export(t)
    for needle in ["\\toprule", "\\midrule", "\\bottomrule", "\\multicolumn{5}{c}{BraTS21}",
                   "\\multicolumn{5}{c}{Kidney}", "\\cmidrule(lr){2-6}", "\\cmidrule(lr){7-11}",
                   "Dice $\\uparrow$ & Dice (paper) & IoU $\\uparrow$ & IoU (paper) & Dice (3D) $\\uparrow$",
                   "\\caption{WSSS methods on BraTS21 and FLARE21 (gate=label)}", "\\resizebox{\\linewidth}"]:
        assert needle in text, needle
    lines = {ln.split(" & ")[0]: ln for ln in text.splitlines() if " & " in ln}
    # methods as rows, paper order; paper numbers beside ours
    assert [k for k in lines if k in paper.ROWS["table1"]] == paper.ROWS["table1"]
    assert "0.392$\\pm$0.29" in lines["GradCAM"] and "0.335$\\pm$0.31" in lines["GradCAM"]
    assert "0.880$\\pm$0.11" in lines["CLDF"] and "0.740$\\pm$0.20" in lines["CLDF"]
    # bold: the best WSSS value (CLDF), not FSL's 1.000; paper columns are never bold
    cl = df[(df.method == "amecam+mg+cldf")].dice
    assert f"\\textbf{{{cl.mean():.3f}$\\pm${cl.std(ddof=0):.2f}}}" in lines["CLDF"]
    assert "\\textbf" not in lines["FSL (UNet)"] and "\\textbf" not in lines["GradCAM"]
    assert lines["GradCAM"].count("$^{\\dagger}$") == 2  # both tasks' Dice columns
    assert "{\\scriptsize [" in lines["GradCAM"]  # the CI line
    assert "ScoreCAM & --- & 0.318$\\pm$0.11" in text  # not run: dash beside the paper value
    foot = t.footer
    for needle in ["gate=label", "profile=smoke", "seed=0", "data=phantom", "Wilcoxon", "bootstrap",
                   "CLDF = amecam+mg+cldf (BraTS21), layercam+mg+cldf (Kidney)", "docs/protocol.md §13"]:
        assert needle in foot, needle
    check_latex(text, tmp_path)


def test_latex_compiles_for_every_table_and_gate(tmp_path):
    df = stat_frame()
    df = pd.concat([df, df.assign(gate="none")])
    for name in ("summary", "table1", "table2", "table3"):
        tables = build_tables(df, name, "all", with_paper=True, per_volume=True, resamples=20,
                              failed=[FailedCell(task="brats", method="seam+threshold", seed=0,
                                                  error="PluginError: out of memory_ & 100%")])
        assert [t.title.split("gate=")[1][:-1] for t in tables] == ["label", "none"]
        text = render_many(tables, ex.LatexExporter())
        assert text.count("\\begin{table}") == 2
        check_latex(text, tmp_path / name)


def test_latex_check_catches_broken_tables(tmp_path):
    from pylatexenc.latexwalker import LatexWalkerParseError

    text = ex.LatexExporter().export(summary_table(stat_frame(), ci_resamples=10, blocks=["all"]))
    with pytest.raises((LatexWalkerParseError, AssertionError)):
        check_latex(text.replace("\\end{tabular}\\\\", "\\\\", 1).replace("\\end{tabular} &", " &", 1), tmp_path)


def test_paper_numbers_are_protocol_13():
    text = Path("/work/shared/docs/protocol.md")
    if not text.is_file():
        pytest.skip("docs/protocol.md is not beside the checkout")
    proto = text.read_text()
    for table, section in (("table1", "### 13.1"), ("table2", "### 13.2"), ("table3", "### 13.3")):
        block = proto.split(section, 1)[1].split("###", 1)[0]
        for line in block.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) < 5 or cells[0] in ("Method", "Pre-trained model") or set(cells[0]) <= set("-"):
                continue
            row = cells[0]
            assert row in paper.NUMBERS[table], (table, row)
            for k, cell in enumerate(cells[1:]):
                task, metric = paper.TASKS[k // 2], ("dice", "iou")[k % 2]
                got = paper.value(table, row, task, metric)
                if cell == "—":
                    assert got is None
                else:
                    m, sd = map(float, cell.split("±"))
                    assert got == (m, sd), (table, row, task, metric)


def test_paper_row_mapping():
    avail = {m: paper.parse_method(m) for m in ["gradcam+threshold", "amecam+cldf", "amecam+mg+cldf",
                                                "amecam+cldf[use_mg=false]", "mg+cldf",
                                                "layercam[fusion=library]+threshold", "scorecam[chunk=64]+threshold",
                                                "layercam[layers=layer2+layer4]+threshold", "fsl",
                                                "amecam+mg+cldf[backbone=resnet18]", "amecam+mg+cldf[out_dim=8]"]}
    assert paper.resolve("table1", "CLDF", "brats", avail) == "amecam+mg+cldf"
    # cldf adds MG itself while use_mg is true (its default): amecam+cldf is CLDF as well
    assert paper.resolve("table1", "CLDF", "brats", {k: v for k, v in avail.items() if k != "amecam+mg+cldf"}) == "amecam+cldf"
    assert paper.resolve("table1", "CLDF", "flare21-kidney", avail) is None  # LayerCAM seeds on FLARE
    assert paper.resolve("table3", "AME-CAM+CL", "brats", avail) == "amecam+cldf[use_mg=false]"
    assert paper.resolve("table3", "MG+CL", "brats", avail) == "mg+cldf"
    assert paper.resolve("table1", "ScoreCAM", "brats", avail) == "scorecam[chunk=64]+threshold"  # speed-only param
    assert paper.resolve("table1", "LayerCAM (library)", "brats", avail) == "layercam[fusion=library]+threshold"
    assert paper.resolve("table1", "LayerCAM", "brats", avail) is None  # other layers: another method
    assert paper.resolve("table1", "FSL (UNet)", "brats", avail) == "fsl"
    assert paper.resolve("table2", "ResNet18", "brats", avail) == "amecam+mg+cldf[backbone=resnet18]"
    assert paper.resolve("table2", "CDM", "brats", avail) == "amecam+mg+cldf"
    # summary rows: Table 3 names the seeds exactly
    assert paper.paper_row_of(avail["amecam+cldf[use_mg=false]"], "brats") == ("table3", "AME-CAM+CL")
    assert paper.paper_row_of(avail["amecam+mg+cldf[out_dim=8]"], "brats") is None  # an ablation cell
    assert paper.value(*paper.paper_row_of(avail["amecam+mg+cldf"], "brats"), "brats", "dice") == (0.880, 0.11)
    assert paper.paper_row_of(avail["gradcam+threshold"], "flare21-liver") == ("table1", "GradCAM")
    assert paper.split_top("layercam[layers=a+b]+mg+cldf") == ["layercam[layers=a+b]", "mg", "cldf"]


def test_benchmark_table_files_fill_their_paper_rows():
    """Every row of benchmarks/table{1,2,3}.toml, planned into the runner's method label, fills
    the paper row of the same name (so --table tableN reads what `wsss-bench bench` wrote)."""
    from wsss_bench.running.bench import load_table
    from wsss_bench.spec import format_spec

    root = Path(__file__).resolve().parents[1] / "benchmarks"
    for name in ("table1", "table2", "table3"):
        table = load_table(root / f"{name}.toml")
        for task in table.tasks:
            for row in table.rows:
                ref, params = paper.parse_spec(row.method)
                if row.backbone and row.backbone != "cdm":  # cdm is cldf's default backbone
                    params["backbone"] = row.backbone
                cam = row.cam_for(task)
                label = "+".join([*([cam] if cam else []), format_spec(ref, params)])
                parsed = paper.parse_method(label, cam or "", format_spec(ref, params))
                assert paper.resolve(name, row.name, task, {label: parsed}) == label, (name, row.name, task, label)


def test_failed_cells_show_as_rows():
    manifests = [{"cells": [{"cell": {"task": "brats", "seed": 0}, "method": "seam+threshold", "status": "failed",
                             "error": "PluginError: seam: out of memory (traceback in x)"},
                            {"cell": {"task": "brats", "seed": 0}, "method": "fsl", "status": "done"}]}]
    failed = failed_cells(manifests)
    assert failed == [FailedCell(task="brats", method="seam+threshold", seed=0,
                                 error="PluginError: seam: out of memory (traceback in x)")]
    t = summary_table(stat_frame(), failed=failed, blocks=["all"])
    row = t.rows[[r[0] for r in t.rows].index("seam+threshold")]
    assert row[1:] == ["failed: PluginError"] * 2
    assert "seam+threshold seed 0: PluginError: seam: out of memory" in t.footer
    t1 = reference_table(stat_frame(), "table1", failed=failed)
    assert t1.rows[[r[0] for r in t1.rows].index("SEAM")][1] == "failed: PluginError"


def test_references_and_per_case_table():
    df = stat_frame()
    assert cldf_references(df, ["brats"]) == {"brats": "amecam+mg+cldf"}
    assert cldf_references(df, ["brats"], "fsl") == {"brats": "fsl"}
    t = per_case_table(df, "label")
    assert t.header[:3] == ["Case", "Task", "Slices"] and len(t.rows) == 8
    i = [r[0] for r in t.rows].index("case0")
    j = t.header.index("gradcam+threshold")
    want = df[(df.method == "gradcam+threshold") & (df.case_id == "case0")].dice.mean()
    assert t.rows[i][j] == f"{want:.3f}"
    assert (i, t.header.index("fsl")) not in t.bold and (i, t.header.index("amecam+mg+cldf")) in t.bold


def test_cli_report_gates_paper_per_volume_and_help(tmp_path):
    from typer.testing import CliRunner

    from wsss_bench.cli import app

    df = stat_frame()
    df = pd.concat([df, df.assign(gate="none"), df.assign(gate="classifier")])
    run = tmp_path / "run"
    run.mkdir()
    df.to_parquet(run / "results.parquet")
    (run / "manifest.json").write_text('{"profile": {"bootstrap": {"resamples": 40}}, "cells": []}')
    cli = CliRunner()
    helptext = cli.invoke(app, ["report", "--help"], env={"COLUMNS": "200"}).output
    assert "label | classifier | none | all" in helptext and "default: all" in helptext
    out = cli.invoke(app, ["report", str(run), "--format", "markdown"])
    assert out.exit_code == 0, out.output
    assert [g for g in ("gate=label)", "gate=classifier)", "gate=none)") if g in out.output] == \
        ["gate=label)", "gate=classifier)", "gate=none)"]
    assert "40 resamples" in out.output  # the profile's bootstrap.resamples
    one = cli.invoke(app, ["report", str(run), "--gate", "label", "--table", "table1", "--with-paper",
                           "--per-volume", "--format", "latex[preset=full]", "--output", str(tmp_path / "t1.tex")])
    assert one.exit_code == 0, one.output
    tex = (tmp_path / "t1.tex").read_text()
    assert tex.count("\\begin{table}") == 1 and "Dice (paper)" in tex and "Dice (3D)" in tex
    csv = cli.invoke(app, ["report", str(run), "--format", "csv", "--resamples", "0"])
    back = pd.read_csv(io.StringIO(csv.output))
    assert set(back.gate) == {"label", "classifier", "none"} and "dice_ci_lo" not in back
    bad = cli.invoke(app, ["report", str(run), "--gate", "sometimes"])
    assert bad.exit_code == 2 and "--gate sometimes" in bad.output
