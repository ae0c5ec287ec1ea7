"""Progress lines of long stages carry an ETA from the mean rate so far."""
from __future__ import annotations

import re

from wsss_bench import progress as pg


def test_eta_is_the_mean_rate_times_what_is_left():
    assert pg.eta_text(10, 40, 5.0) == ", ETA 15s"  # 0.5 s per step, 30 steps left
    assert pg.eta_text(1, 100, 60.0) == ", ETA 99.0 min"
    assert pg.eta_text(0, 10, 3.0) == "" and pg.eta_text(10, 10, 3.0) == "" and pg.eta_text(3, None, 1.0) == ""


def test_log_lines_of_a_long_stage_show_elapsed_and_eta(monkeypatch, capsys):
    monkeypatch.delenv("WSSS_BENCH_NO_PROGRESS", raising=False)
    monkeypatch.setenv("CI", "1")  # plain lines, no bar
    clock = iter(float(t) for t in range(0, 1000, 2))  # every call 2 s later
    monkeypatch.setattr(pg.time, "perf_counter", lambda: next(clock))
    with pg.progress("train thing", 10) as advance:
        for _ in range(10):
            advance(1)
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "train thing: " in ln and "%)" in ln]
    assert lines, out
    m = re.search(r"1/10 \(10%\), (\d+)s, ETA (\d+)s", lines[0])
    assert m, lines[0]
    elapsed, eta = int(m.group(1)), int(m.group(2))
    assert eta == round(elapsed / 1 * 9)  # mean rate so far x 9 steps left
