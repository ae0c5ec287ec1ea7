"""Built-in table exporters: Markdown, LaTeX (booktabs), CSV and HTML.

``wsss-bench report --format NAME`` picks one.  Listing plugins imports this module, so
nothing heavy (pandas, torch) is imported at module level.

Conventions every exporter here follows (see :mod:`wsss_bench.reporting.report`): a cell's text after
``"\n"`` is a second, smaller line (the bootstrap CI); a table with ``groups`` and
``subheader`` (a StatTable) gets the paper's two-level header where the format can draw one.
"""
from __future__ import annotations

import re
from typing import ClassVar

from wsss_bench.errors import UserError
from wsss_bench.hookspecs import hookimpl
from wsss_bench.interfaces import Exporter, ReportTable


def _bolded(table: ReportTable, wrap) -> list[list[str]]:
    return [[wrap(cell) if (i, j) in table.bold else cell for j, cell in enumerate(row)]
            for i, row in enumerate(table.rows)]


class MarkdownExporter(Exporter):
    """GitHub pipe table; bold as **x**; the footer as a paragraph below the table."""

    name: ClassVar[str] = "markdown"
    suffix: ClassVar[str] = ".md"
    description: ClassVar[str] = "GitHub-flavoured Markdown pipe table"

    @staticmethod
    def _cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    def export(self, table: ReportTable) -> str:
        from tabulate import tabulate

        rows = _bolded(table, lambda c: f"**{c}**" if c.strip() else c)
        rows = [[self._cell(c) for c in row] for row in rows]
        # Pipe tables cannot draw a rule inside the body: an empty row marks the break.
        body: list[list[str]] = []
        for i, row in enumerate(rows):
            body.append(row)
            if i in table.rules_after and i < len(rows) - 1:
                body.append([""] * len(row))
        text = tabulate(body, headers=[self._cell(h) for h in table.header], tablefmt="github",
                        disable_numparse=True)
        parts = [f"**{self._cell(table.title)}**"] if table.title else []
        parts.append(text)
        if table.footer:
            parts.append(self._cell(table.footer))
        return "\n\n".join(parts) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}
_LATEX_SYMBOL = {"±": r"$\pm$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "—": "---", "–": "--",
                 "<": r"$<$", ">": r"$>$", "†": r"$^{\dagger}$", "‡": r"$^{\ddagger}$",
                 "…": r"\ldots{}", "≥": r"$\geq$",
                 "≤": r"$\leq$", "×": r"$\times$", "∩": r"$\cap$"}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in [*_LATEX_SPECIAL, *_LATEX_SYMBOL]))


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and spell ±, ↑, ↓, †, ‡, dashes and a few symbols in LaTeX."""
    text = _LATEX_RE.sub(lambda m: _LATEX_SPECIAL.get(m.group(0)) or _LATEX_SYMBOL[m.group(0)], text)
    return "".join(ch if ord(ch) < 128 else "?" for ch in text)  # pdflatex without inputenc tricks


def _quotes(text: str) -> str:
    """Typographic quotes for LaTeX: 'x' -> `x' and "x" -> ``x''."""
    text = re.sub(r'"([^"]*)"', r"``\1''", text)
    return re.sub(r"(?<![A-Za-z])'([^']*)'", r"`\1'", text)


def _sentence(text: str) -> str:
    """Capitalise the first letter (a caption is a sentence)."""
    return text[:1].upper() + text[1:] if text else text


_FOOTER_FACTS = re.compile(r"gate=([\w-]+); profile=([\w,-]+); seeds?=([\w,\s-]+?); data=([\w ,-]+?)\.")


class LatexExporter(Exporter):
    """A booktabs ``table``: \\toprule/\\midrule/\\bottomrule, bold as \\textbf, a note below.

    Two presets (``latex[preset=compact]``, ``latex[preset=full]``):

    - ``compact`` (for a paper, the default of ``report --table table1|2|3``): only the
      all-slice Dice and IoU columns (``latex[metrics=dice]`` keeps Dice alone), mean±std
      without the CI line, the paper's method names, a ``table*`` (both columns) when there
      are more than three number columns, no ``\\resizebox``, ``\\textsuperscript`` marks and
      a two-line note; needs only ``booktabs``.
    - ``full``: every column of the report (CIs, paper values, positive-slice blocks) and the
      whole footer; tables wider than 7 columns are scaled to the line width with
      ``\\resizebox``, which needs ``graphicx``.
    - ``auto`` (default): compact for the paper tables (Table 1-3), full for the others.

    A table with ``groups`` gets the paper's header: the task names over their columns
    (\\multicolumn + \\cmidrule), then the metric line.
    """

    name: ClassVar[str] = "latex"
    suffix: ClassVar[str] = ".tex"
    description: ClassVar[str] = ("LaTeX booktabs table: preset=compact (paper tables; booktabs) or full "
                                  "(every column; booktabs, graphicx)")
    params: ClassVar[dict] = {"preset": "auto", "metrics": "dice+iou"}
    wide: ClassVar[int] = 7
    compact_wide: ClassVar[int] = 3  # more number columns than this do not fit one journal column

    def validate(self) -> None:
        if self.p["preset"] not in ("auto", "compact", "full"):
            raise self.bad_param("preset", "is not one of auto, compact (paper-ready), full (every column)")
        if self.p["metrics"] not in ("dice", "dice+iou"):
            raise self.bad_param("metrics", "is not one of dice, dice+iou (the compact preset's columns)")

    def preset_for(self, table: ReportTable) -> str:
        if self.p["preset"] != "auto":
            return self.p["preset"]
        return "compact" if getattr(table, "kind", "") in ("table1", "table2", "table3") else "full"

    @staticmethod
    def _cell(text: str, bold: bool, compact: bool = False) -> str:
        lines = text.split("\n")
        first = lines[0]
        mark = ""
        if compact and "†" in first:
            first, mark = first.replace("†", ""), "\\textsuperscript{\\dag}"
        first = latex_escape(first)
        if bold and first.strip():
            first = f"\\textbf{{{first}}}"
        first += mark
        if len(lines) == 1 or compact:
            return first
        rest = "".join(f"\\\\{{\\scriptsize {latex_escape(x)}}}" for x in lines[1:] if x.strip())
        return f"\\begin{{tabular}}[c]{{@{{}}c@{{}}}}{first}{rest}\\end{{tabular}}" if rest else first

    def _keep(self, table: ReportTable) -> list[int]:
        """Compact: the columns to keep (0 = row labels, then all-slice Dice/IoU only)."""
        sub = list(getattr(table, "subheader", None) or table.header)
        wanted = {"Dice ↑"} | ({"IoU ↑"} if self.p["metrics"] == "dice+iou" else set())
        keep = [0] + [j for j, h in enumerate(sub) if j and h.strip() in wanted]
        return keep if len(keep) > 1 else list(range(len(table.header)))

    def _note(self, table: ReportTable, marks: bool) -> str:
        """Two lines: what the numbers are and under what setting; what bold and marks mean."""
        m = _FOOTER_FACTS.search(table.footer or "")
        setting = (f" (gate={m.group(1)}; profile {m.group(2)}; seed {m.group(3).strip()}; {m.group(4)} data)"
                   if m else "")
        first = f"Mean$\\pm$std over all test slices{latex_escape(setting)}; bold: best weakly supervised value."
        second = ("\\textsuperscript{\\dag}\\,Differs from CLDF (paired Wilcoxon signed-rank test on per-case "
                  "Dice, Holm-corrected, $p<0.05$)." if marks else "")
        return first + ("\\\\" + second if second else "")

    def export(self, table: ReportTable) -> str:
        compact = self.preset_for(table) == "compact"
        groups = list(getattr(table, "groups", None) or [])
        sub = list(getattr(table, "subheader", None) or [])
        header = list(table.header)
        keep = self._keep(table) if compact else list(range(len(header)))
        rows = [[self._cell(row[j], (i, j) in table.bold, compact) for j in keep] for i, row in enumerate(table.rows)]
        if compact and groups and len(sub) == len(header):
            spans, at = [], 1
            for label, span in groups:
                n = sum(1 for j in keep if at <= j < at + span)
                if n:
                    spans.append((label, n))
                at += span
            groups, sub = spans, [("" if j == 0 else sub[j].replace(" ↑", "")) for j in keep]
            sub[0] = "Method"
            sub = [s + (" $\\uparrow$" if k else "") for k, s in enumerate(sub)]
        header = [header[j] for j in keep]
        ncol = len(header)
        if compact:
            star = ncol - 1 > self.compact_wide
            env = "table*" if star else "table"
            lines = ["% generated by wsss-bench (preset compact); needs \\usepackage{booktabs}",
                     f"\\begin{{{env}}}[t]", "\\centering", "\\scriptsize" if ncol - 1 > 6 else "\\footnotesize",
                     f"\\setlength{{\\tabcolsep}}{{{3 if star else 4}pt}}"]
        else:
            env = "table"
            lines = ["% generated by wsss-bench (preset full); needs \\usepackage{booktabs} and \\usepackage{graphicx}",
                     "\\begin{table}[t]", "\\centering"]
        if table.title:  # LaTeX numbers its tables itself: drop a leading "Table 1:"
            title = _sentence(re.sub(r"^Table\s+\d+\s*:\s*", "", table.title))
            lines.append(f"\\caption{{{latex_escape(_quotes(title))}}}")
        wide = not compact and ncol > self.wide
        if wide:
            lines.append("\\resizebox{\\linewidth}{!}{%")
        lines += [f"\\begin{{tabular}}{{l{'c' * max(ncol - 1, 0)}}}", "\\toprule"]
        if groups and sum(n for _, n in groups) == ncol - 1 and len(sub) == ncol:
            cells, rules, at = [""], [], 2
            for label, span in groups:
                cells.append(f"\\multicolumn{{{span}}}{{c}}{{{latex_escape(label)}}}" if span > 1 else latex_escape(label))
                rules.append(f"\\cmidrule(lr){{{at}-{at + span - 1}}}")
                at += span
            lines += [" & ".join(cells) + " \\\\", " ".join(rules)]
            lines.append(" & ".join(h if compact else latex_escape(h) for h in sub) + " \\\\")
        else:
            lines.append(" & ".join(latex_escape(h) for h in header) + " \\\\")
        lines.append("\\midrule")
        for i, row in enumerate(rows):
            lines.append(" & ".join(row) + " \\\\")
            if i in table.rules_after and i < len(rows) - 1:
                lines.append("\\midrule")
        lines += ["\\bottomrule", "\\end{tabular}"]
        if wide:
            lines.append("}")
        if compact:
            marks = any("\\dag" in c for row in rows for c in row)
            lines.append(f"\\par\\smallskip{{\\footnotesize {self._note(table, marks)}\\par}}")
        elif table.footer:
            lines += [f"% {table.footer}".replace("\n", " "),
                      f"\\par\\smallskip{{\\footnotesize\\raggedright {latex_escape(_quotes(table.footer))}\\par}}"]
        lines.append(f"\\end{{{env}}}")
        return "\n".join(lines) + "\n"


class CsvExporter(Exporter):
    """The table's tidy numbers (``raw``), one row per cell group, full float precision."""

    name: ClassVar[str] = "csv"
    suffix: ClassVar[str] = ".csv"
    description: ClassVar[str] = "machine-readable CSV of the underlying numbers (not the formatted strings)"

    def export(self, table: ReportTable) -> str:
        if table.raw is None:
            raise UserError(f"table {table.title!r} carries no raw numbers; the csv format needs "
                            "a table built by wsss_bench.reporting.report (choose markdown or latex instead)")
        return table.raw.to_csv(index=False, lineterminator="\n")

class HtmlExporter(Exporter):
    """An HTML ``<table>`` (booktabs-like rules in CSS); ``export`` gives a standalone page.

    ``report --format html`` builds the whole page (all tables, figures, per-case table) with
    :func:`wsss_bench.reporting.report.html_page`, which calls :meth:`fragment` for each table.
    """

    name: ClassVar[str] = "html"
    suffix: ClassVar[str] = ".html"
    description: ClassVar[str] = "self-contained HTML (report --format html: tables, figures, per-case table)"

    @staticmethod
    def _esc(text: str) -> str:
        import html

        return html.escape(text, quote=True)

    def _cell(self, text: str, bold: bool, tag: str = "td") -> str:
        lines = text.split("\n")
        first = self._esc(lines[0])
        if bold and first.strip():
            first = f"<b>{first}</b>"
        rest = "".join(f'<span class="ci">{self._esc(x)}</span>' for x in lines[1:] if x.strip())
        klass = ' class="failed"' if lines[0].startswith("failed") else ""
        value = lines[0].split("±")[0].rstrip("†‡").strip()
        data = f' data-value="{self._esc(value)}"' if re.fullmatch(r"-?[0-9.]+", value) else ""
        return f"<{tag}{klass}{data}>{first}{rest}</{tag}>"

    def fragment(self, table: ReportTable, table_id: str | None = None, sortable: bool = False) -> str:
        ncol = len(table.header)
        groups = list(getattr(table, "groups", None) or [])
        sub = list(getattr(table, "subheader", None) or [])
        attrs = ' class="wsss' + (' sortable"' if sortable else '"') + (f' id="{self._esc(table_id)}"' if table_id else "")
        out = ['<div style="overflow-x:auto">', f"<table{attrs}>"]
        if table.title:
            out.append(f"<caption style=\"caption-side:top;text-align:left;font-weight:600\">{self._esc(table.title)}</caption>")
        out.append("<thead>")
        if groups and sum(n for _, n in groups) == ncol - 1 and len(sub) == ncol:
            out.append("<tr><th></th>" + "".join(f'<th class="group" colspan="{n}">{self._esc(g)}</th>' for g, n in groups) + "</tr>")
            out.append("<tr>" + "".join(f"<th>{self._esc(h)}</th>" for h in sub) + "</tr>")
        else:
            out.append("<tr>" + "".join(f"<th>{self._esc(h)}</th>" for h in table.header) + "</tr>")
        out.append("</thead><tbody>")
        for i, row in enumerate(table.rows):
            klass = ' class="rule"' if i - 1 in table.rules_after else ""
            out.append(f"<tr{klass}>" + "".join(self._cell(c, (i, j) in table.bold) for j, c in enumerate(row)) + "</tr>")
        out.append("</tbody></table></div>")
        if table.footer:
            out.append(f'<p class="footer">{self._esc(table.footer)}</p>')
        return "\n".join(out)

    def export(self, table: ReportTable) -> str:
        from wsss_bench.reporting.report import html_page

        return html_page([(table.title or "Results", [table])], self, title=table.title or "wsss-bench table")


@hookimpl
def register_exporters(register):
    register(MarkdownExporter)
    register(LatexExporter)
    register(CsvExporter)
    register(HtmlExporter)
