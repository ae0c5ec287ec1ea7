"""The newcomer's path: the README's test command works on a machine without Chromium or a
cluster, and the shipped texts stand alone (they never cite the team's internal spec files)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_test_suite_does_not_pretend_to_be_ci(pytester, monkeypatch):
    """tests/conftest.py keeps progress bars off without setting ``CI``: with ``CI`` set, a
    machine without Chromium fails tests/test_html.py instead of skipping it."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("WSSS_BENCH_NO_BARS", raising=False)
    monkeypatch.delenv("WSSS_BENCH_NO_PROGRESS", raising=False)
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_probe="""
import os, sys
from wsss_bench import progress

def test_probe(monkeypatch):
    assert "CI" not in os.environ
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # even on a terminal
    assert not progress.bars_enabled()
    assert progress.log_lines_enabled()
""")
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_html_browser_test_skips_without_chromium_outside_ci(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import test_html

    monkeypatch.setattr(test_html, "CHROMIUM", None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        test_html._chromium([], tmp_path)
    monkeypatch.setenv("CI", "1")  # the real CI demands the browser
    with pytest.raises(pytest.fail.Exception):
        test_html._chromium([], tmp_path)


def test_ci_script_exports_ci():
    text = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^export CI=1$", text, re.M)
