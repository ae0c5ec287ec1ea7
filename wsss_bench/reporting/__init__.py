"""Reporting: tables, statistics, the HTML page, figures, mask export and the paper's numbers.

Nothing here computes a cell's numbers: reporting reads a run folder (through
:mod:`wsss_bench.running.rundir`) and never enters a cell's identity.
"""
