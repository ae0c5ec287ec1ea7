"""Loading results, laying out tables and exporting them (PROTOCOL section 9)."""
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
from wsss_bench.report import (
    fmt_mean_std,
    load_results,
    paper_table,
    render,
    significance_table,
    summary_table,
    write_report,
)

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
    assert [c.name for c in got] == ["markdown", "latex", "csv"]
    assert [c.suffix for c in got] == [".md", ".tex", ".csv"]
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
