"""Tables from the per-slice results: the reporting API in one import.

Data flows one way: ``results.parquet`` -> :mod:`~wsss_bench.reporting.load` -> statistics
(:mod:`~wsss_bench.reporting.stats`) -> a :class:`~wsss_bench.interfaces.ReportTable` laid out
by :mod:`~wsss_bench.reporting.layout` and :mod:`~wsss_bench.reporting.tables` (numbers written
by :mod:`~wsss_bench.reporting.format`) -> an exporter, or the HTML page
(:mod:`~wsss_bench.reporting.html`).  Nothing recomputes a metric from images, and no layout
decision reaches back into the results.  This module only gathers the public names, so
scripts and plugins keep one stable import.
"""
from __future__ import annotations

from wsss_bench.reporting.format import MISSING, fmt_ci, fmt_mean_std, fmt_p, fmt_stat
from wsss_bench.reporting.html import html_page, html_report, run_meta
from wsss_bench.reporting.layout import (ALPHA, BLOCKS, DEFAULT_TASK_LABELS, MARK, METRIC_LABELS, TABLES, UP, Col,
                                         RowSpec, StatTable, available, cldf_references, gates_of)
from wsss_bench.reporting.load import (REQUIRED_COLUMNS, FailedCell, bootstrap_resamples, failed_cells,
                                       load_manifests, load_results)
from wsss_bench.reporting.tables import (build_tables, classifier_table, paper_table, per_case_table,
                                         reference_table, render, render_many, significance_table, summary_table,
                                         write_report, write_text)

__all__ = ["MISSING", "fmt_ci", "fmt_mean_std", "fmt_p", "fmt_stat", "html_page", "html_report", "run_meta",
           "ALPHA", "BLOCKS", "DEFAULT_TASK_LABELS", "MARK", "METRIC_LABELS", "TABLES", "UP", "Col", "RowSpec",
           "StatTable", "available", "cldf_references", "gates_of", "REQUIRED_COLUMNS", "FailedCell",
           "bootstrap_resamples", "failed_cells", "load_manifests", "load_results", "build_tables",
           "classifier_table", "paper_table", "per_case_table", "reference_table", "render", "render_many",
           "significance_table", "summary_table", "write_report", "write_text"]
