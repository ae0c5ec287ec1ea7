"""LaTeX that pastes into a paper: the compact preset (default for the paper tables) and the
full one, each parsed strictly by pylatexenc and, where pdflatex is installed, compiled."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from wsss_bench.plugins import load_plugins
from wsss_bench.reporting.report import StatTable

ROOT = Path(__file__).resolve().parents[1]
PDFLATEX = shutil.which("pdflatex")


def _latex(**params):
    return load_plugins().get("exporters", "latex")(**params)


def _stat_table(kind="table1", tasks=("BraTS21", "Kidney", "Spleen", "Liver")):
    sub = ["Method"]
    groups = []
    for t in tasks:
        sub += ["Dice ↑", "Dice (paper)", "IoU ↑", "IoU (paper)", "Dice (pos) ↑"]
        groups.append((t, 5))
    header = ["Method"] + [f"{t} {s}" for t in tasks for s in sub[1:6]]
    cell = "0.412±0.31†\n[0.35, 0.47]"
    rows = [[name] + [cell, "0.392±0.29", "0.301±0.30\n[0.25, 0.36]", "0.286±0.24", "0.5±0.2"] * len(tasks)
            for name in ("GradCAM", "LayerCAM", "CLDF", "FSL (UNet)")]
    return StatTable(title="Table 1: segmentation on the 'four' tasks (gate=label)", header=header, rows=rows,
                     bold={(2, 1)}, rules_after=[2],
                     footer="gate=label; profile=cpu; seed=0; data=phantom. Values: mean±std over all test slices "
                            "(seed component 'bootstrap'). Rows: CLDF = amecam+mg+cldf.",
                     groups=groups, subheader=sub, kind=kind)


def _parse_strict(tex: str) -> None:
    from pylatexenc.latexwalker import LatexWalker

    nodes, _, _ = LatexWalker(tex, tolerant_parsing=False).get_latex_nodes()
    assert nodes


def _body_rows(tex: str) -> list[str]:
    body = tex.split("\\midrule", 1)[1].split("\\bottomrule", 1)[0]
    return [ln for ln in body.splitlines() if ln.strip().endswith("\\\\")]


def _ncols(tex: str) -> int:
    return len(re.search(r"\\begin\{tabular\}\{(l c*)\}".replace(" ", ""), tex).group(1))


@pytest.mark.parametrize("preset", ["compact", "full"])
def test_every_preset_parses_and_every_row_has_the_header_columns(preset):
    tex = _latex(preset=preset).export(_stat_table())
    _parse_strict(tex)
    n = _ncols(tex)
    for row in _body_rows(tex):
        assert len(re.findall(r"(?<!\\)&", re.sub(r"\\begin\{tabular\}.*?\\end\{tabular\}", "X", row))) == n - 1, row


def test_compact_is_paper_ready():
    t = _stat_table()
    tex = _latex().export(t)  # auto: a paper table gets the compact preset
    assert "preset compact" in tex
    assert "\\resizebox" not in tex and "graphicx" not in tex
    assert "\\begin{table*}" in tex and tex.rstrip().endswith("\\end{table*}")  # 8 number columns: both columns
    assert _ncols(tex) == 1 + 2 * 4  # Dice and IoU per task; no CI, paper, positive-slice columns
    assert "[0.35" not in tex and "(paper)" not in tex and "begin{tabular}[c]" not in tex
    assert "\\textsuperscript{\\dag}" in tex and "$^{\\dagger}$" not in tex
    caption = re.search(r"\\caption\{(.*)\}", tex).group(1)
    assert caption[0].isupper() and "'" not in caption.replace("`four'", "")
    note = tex.split("\\bottomrule", 1)[1]
    assert note.count("\\\\") <= 1  # at most two lines
    assert "amecam" not in note and "bootstrap" not in note  # no spec strings in the note
    dice_only = _latex(preset="compact", metrics="dice").export(t)
    assert _ncols(dice_only) == 1 + 4
    one_column = _latex(metrics="dice").export(_stat_table("table3", ("BraTS21", "Kidney")))
    assert "\\begin{table}" in one_column and "table*" not in one_column


def test_full_keeps_every_column_and_the_whole_footer():
    t = _stat_table(kind="")  # not a paper table: auto means full
    tex = _latex().export(t)
    assert "preset full" in tex and "\\resizebox" in tex and "graphicx" in tex
    assert _ncols(tex) == 1 + 5 * 4 and "[0.35, 0.47]" in tex and "$^{\\dagger}$" in tex
    assert "`bootstrap'" in tex  # typographic quotes
    with pytest.raises(Exception, match="preset"):
        _latex(preset="tiny")


def test_committed_paper_tables_in_both_presets_parse():
    from wsss_bench.reporting.report import build_tables, load_results

    df = load_results(ROOT / "results" / "cpu")
    for kind in ("table1", "table2", "table3"):
        for table in build_tables(df, kind, "label", with_paper=True):
            table.kind = kind
            for preset in ("compact", "full"):
                _parse_strict(_latex(preset=preset).export(table))


@pytest.mark.skipif(PDFLATEX is None, reason="pdflatex not installed (apt-get install texlive-latex-recommended)")
@pytest.mark.parametrize("preset,packages", [("compact", "booktabs"), ("full", "booktabs,graphicx")])
def test_every_preset_compiles_with_pdflatex(tmp_path, preset, packages):
    """The synthetic table and the committed Tables 1 and 3 in a two-column paper."""
    from wsss_bench.reporting.report import build_tables, load_results

    df = load_results(ROOT / "results" / "cpu")
    tex = _latex(preset=preset).export(_stat_table())
    for kind in ("table1", "table3"):
        for table in build_tables(df, kind, "label", with_paper=True):
            table.kind = kind
            tex += "\n" + _latex(preset=preset).export(table)
        tex += "\n" + _latex(preset=preset, metrics="dice").export(table)
    doc = (f"\\documentclass[twocolumn]{{article}}\n\\usepackage{{{packages}}}\n\\begin{{document}}\n"
           f"Text.\n{tex}\n\\end{{document}}\n")
    (tmp_path / "t.tex").write_text(doc, encoding="utf-8")
    res = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "t.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:]
    log = (tmp_path / "t.log").read_text(errors="replace")
    if preset == "compact":
        assert "Overfull \\hbox" not in log  # fits without \resizebox
