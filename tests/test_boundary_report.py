"""HD95/ASSD in every output: report formats, bench and run tables, per-case export, the rule line,
--metrics, lower-is-better bold, Wilcoxon marks on the boundary columns; old results unchanged."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from report_fixtures import build_run
from wsss_bench import cli
from wsss_bench.boundary import apply_rule_to_rows, rule_line
from wsss_bench.errors import UserError
from wsss_bench.reporting.stats import aggregate, bootstrap_ci, bootstrap_seed, compare_to
from wsss_bench.reporting.summary import run_summary, summary_markdown
from wsss_bench.reporting.tables import build_tables, summary_table

RULE_UNDEFINED = rule_line("undefined")
RULE_DIAGONAL = rule_line("diagonal")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("boundary-report"), boundary=True)


@pytest.fixture(scope="module")
def frame(run_dir):
    return pd.read_parquet(run_dir / "results.parquet")


def _report(run_dir, *args):
    res = CliRunner().invoke(cli.app, ["report", str(run_dir), *map(str, args)])
    return res


def test_every_format_shows_the_columns_and_the_rule(run_dir):
    for fmt in ("markdown", "latex", "html"):
        res = _report(run_dir, "--format", fmt, "--gate", "label", "--resamples", "50")
        assert res.exit_code == 0, res.output
        text = res.output
        assert "HD95" in text and "ASSD" in text, fmt
        assert "exactly one mask empty: undefined" in text, fmt
    res = _report(run_dir, "--format", "csv", "--gate", "label", "--resamples", "50")
    assert res.exit_code == 0, res.output
    csv = pd.read_csv(io.StringIO(res.output))
    for col in ("hd95_mean", "hd95_std", "hd95_n", "hd95_ci_lo", "assd_mean", "assd_ci_hi", "hd95_p_holm"):
        assert col in csv.columns, col
    assert set(csv["empty_distance"]) == {"undefined"}  # CSV has no footer: the rule is a column
    res = _report(run_dir, "--format", "markdown", "--gate", "label", "--empty-distance", "diagonal")
    assert res.exit_code == 0 and "the image diagonal in mm (--empty-distance diagonal" in res.output


def test_table_means_are_the_defined_slices_and_the_counts(frame):
    sel = frame[frame.gate == "none"]
    t = summary_table(frame, "none", ci_resamples=40)
    raw = t.raw.set_index(["method", "task"])
    for (method, task), g in sel.groupby(["method", "task"]):
        v = g["hd95"].to_numpy()
        ok = v[~np.isnan(v)]
        assert raw.loc[(method, task), "hd95_mean"] == pytest.approx(ok.mean())
        assert raw.loc[(method, task), "hd95_std"] == pytest.approx(ok.std())
        assert raw.loc[(method, task), "hd95_n"] == len(ok)
    # a method that misses slices shows "n=.. of .." under its HD95
    shift = raw.loc[("gradcam+threshold", "brats")]
    assert shift["hd95_n"] < shift["n_slices"]
    assert f"n={int(shift['hd95_n'])} of {int(shift['n_slices'])}" in "".join(sum(t.rows, []))


def test_diagonal_rule_fills_one_empty_slices_with_the_diagonal(frame):
    sel = frame[(frame.gate == "none") & (frame.method == "gradcam+threshold") & (frame.task == "brats")]
    one = (sel.pred_area == 0) != (sel.gt_area == 0)  # false positives on negative slices
    assert one.any()
    ruled = apply_rule_to_rows(sel, "diagonal")
    np.testing.assert_allclose(ruled.loc[one, "hd95"], sel.loc[one, "diag_mm"])
    agg = aggregate(ruled)
    assert agg["hd95_n"].iloc[0] == len(sel)
    assert agg["hd95_mean"].iloc[0] > aggregate(apply_rule_to_rows(sel, "undefined"))["hd95_mean"].iloc[0]


def test_lower_is_better_takes_the_bold_and_marks_are_tested_on_hd95(frame):
    t = summary_table(frame, "label", tasks=["brats"], metrics=["dice", "hd95"], blocks=["all"], ci_resamples=40)
    assert t.header[1:] == ["BraTS21 Dice ↑", "BraTS21 HD95 ↓"]
    raw = t.raw.set_index("method")
    wsss = [m for m in raw.index if m != "fsl"]
    best = min(round(raw.loc[m, "hd95_mean"], 3) for m in wsss)
    bold_rows = {i for (i, j) in t.bold if j == 2}
    # a printed label may spell out a grid's parameters: read rows back to their methods
    from wsss_bench.labels import display_labels
    from wsss_bench.plugins import load_plugins

    shown = {v: k for k, v in display_labels(load_plugins(), list(raw.index)).items()}
    labels = [shown.get(r[0], r[0]) for r in t.rows]
    assert {labels[i] for i in bold_rows} == {m for m in wsss if round(raw.loc[m, "hd95_mean"], 3) == best}
    # the † on an HD95 cell is the Holm-corrected Wilcoxon test of per-case mean HD95
    cmp = compare_to(apply_rule_to_rows(frame, "undefined")[lambda d: d.task == "brats"], "amecam+mg+cldf",
                     gate="label", column="hd95", methods=[m for m in raw.index if m != "amecam+mg+cldf"])
    for rec in cmp.to_dict("records"):
        cell = t.rows[labels.index(rec["method"])][2]
        assert ("†" in cell.split("\n")[0]) == (rec["p_holm"] < 0.05)
        assert raw.loc[rec["method"], "hd95_p_holm"] == pytest.approx(rec["p_holm"], nan_ok=True)


def test_bootstrap_leaves_undefined_slices_out():
    g = pd.DataFrame({"case_id": ["a", "a", "b", "b", "c"], "hd95": [1.0, np.nan, 3.0, 5.0, np.nan], "seed": 0})
    lo, hi = bootstrap_ci(g, 400, 1, column="hd95")
    assert 1.0 <= lo <= hi <= 5.0
    # case c has no defined slice: draws of only c are left out, never NaN
    assert np.isfinite(bootstrap_ci(g[g.case_id == "c"].assign(hd95=[np.nan]), 10, 1, column="hd95")).sum() == 0


def test_metrics_selects_columns_and_refuses_what_the_rows_lack(run_dir, frame):
    res = _report(run_dir, "--metrics", "dice,hd95", "--gate", "label", "--resamples", "0")
    assert res.exit_code == 0, res.output
    assert "HD95" in res.output and "ASSD" not in res.output.split("gate=label")[0] and "IoU" not in res.output
    res = _report(run_dir, "--metrics", "dice,hd100")
    assert res.exit_code == 2 and "hd100" in res.output and "Traceback" not in res.output
    old = frame.drop(columns=["hd95", "assd", "diag_mm", "hd95_3d", "assd_3d", "diag3d_mm"])
    with pytest.raises(UserError, match="no hd95 columns"):
        build_tables(old, "summary", "label", metrics="dice,hd95")
    # results made before the boundary columns: the tables are what they were
    plain = build_tables(old, "summary", "label", resamples=20)[0]
    assert all("HD95" not in h for h in plain.header) and RULE_UNDEFINED not in plain.footer


def test_per_volume_columns_use_the_stored_case_values(frame):
    t = summary_table(frame, "label", tasks=["flare21-kidney"], metrics=["dice", "hd95"], blocks=["all"],
                      per_volume=True, ci_resamples=0)
    assert "Kidney HD95 (3D) ↓" in t.header
    sel = frame[(frame.gate == "label") & (frame.task == "flare21-kidney") & (frame.method == "layercam+threshold")]
    per_case = sel.groupby("case_id")["hd95_3d"].first()
    raw = t.raw.set_index("method").loc["layercam+threshold"]
    assert raw["hd95_3d_mean"] == pytest.approx(per_case.dropna().mean())


def test_cases_table_csv_and_markdown(run_dir, frame):
    res = _report(run_dir, "--table", "cases", "--format", "csv", "--gate", "label")
    assert res.exit_code == 0, res.output
    csv = pd.read_csv(io.StringIO(res.output))
    sel = frame[frame.gate == "label"]
    assert len(csv) == sel.groupby(["task", "method", "case_id"]).ngroups
    row = csv[(csv.method == "layercam+threshold") & (csv.task == "brats")].iloc[0]
    rows = sel[(sel.method == "layercam+threshold") & (sel.task == "brats") & (sel.case_id == row.case_id)]
    assert row.hd95_3d == pytest.approx(rows.hd95_3d.iloc[0]) and row.n_slices == len(rows)
    assert row.n_pos == int((rows.label == 1).sum())
    inter = (rows.dice * (rows.pred_area + rows.gt_area) / 2).round().sum()
    assert row.dice3d == pytest.approx(2 * inter / (rows.pred_area.sum() + rows.gt_area.sum()))
    res = _report(run_dir, "--table", "cases", "--format", "markdown", "--gate", "label")
    assert res.exit_code == 0 and "HD95 (3D, mm) ↓" in res.output and "exactly one mask empty" in res.output
    res = _report(run_dir, "--table", "cases", "--format", "latex")
    assert res.exit_code == 2 and "csv or markdown" in res.output


def test_run_summary_and_bench_table_gain_the_columns(frame):
    t = run_summary(frame)
    assert "HD95 mm (all)" in t.header and t.footer == RULE_UNDEFINED
    old = frame.drop(columns=["hd95", "assd", "diag_mm", "hd95_3d", "assd_3d", "diag3d_mm"])
    assert "HD95" not in summary_markdown(old)
    from types import SimpleNamespace

    from wsss_bench.reporting.summary import bench_table

    cells = [SimpleNamespace(method="layercam+threshold")]
    planned = [SimpleNamespace(table="t", row="LayerCAM", task="brats", cells=cells, error=None)]
    table = SimpleNamespace(name="t", caption="c", tasks=["brats"],
                            rows=[SimpleNamespace(name="LayerCAM", upper_bound=False, supplementary=False,
                                                  note_for=lambda p: None)])
    bt = bench_table(frame, planned, table, resamples=30)
    assert bt.header == ["method", "brats Dice", "brats HD95", "brats ASSD"]
    sel = frame[(frame.gate == "label") & (frame.task == "brats") & (frame.method == "layercam+threshold")]
    lo, hi = bootstrap_ci(sel, 30, bootstrap_seed(sel, "brats"), column="hd95")
    assert bt.rows[0][2].startswith(f"{sel.hd95.mean():.3f} ± ") and f"[{lo:.3f}, {hi:.3f}]" in bt.rows[0][2]
    assert RULE_UNDEFINED in bt.footer
    assert bench_table(old, planned, table, resamples=30).header == ["method", "brats Dice"]
    assert bench_table(frame, planned, table, resamples=30, metrics="dice").header == ["method", "brats Dice"]


def test_wilcoxon_drops_cases_whose_mean_is_undefined():
    rng = np.random.default_rng(0)
    cases = [f"c{i}" for i in range(8)]
    ref = pd.DataFrame({"task": "t", "method": "ref", "gate": "label", "case_id": cases, "hd95": rng.random(8)})
    other = ref.assign(method="m", hd95=ref.hd95 + 1.0)
    other.loc[0, "hd95"] = np.nan  # case c0 undefined for m: the pair drops out, 7 remain
    res = compare_to(pd.concat([ref, other]), "ref", column="hd95").iloc[0]
    assert res["n_cases"] == 7 and np.isfinite(res["p"])
    other.loc[1:2, "hd95"] = np.nan  # 5 common cases left: below the minimum, not tested
    res = compare_to(pd.concat([ref, other]), "ref", column="hd95").iloc[0]
    assert res["n_cases"] == 5 and res["note"].startswith("n/a")
