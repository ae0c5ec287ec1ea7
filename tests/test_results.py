"""The committed reference results agree with their own per-slice data (results/check.py)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _check_module(folder: Path):
    spec = importlib.util.spec_from_file_location("results_check", folder / "check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.HERE = folder
    return mod


def test_committed_tables_equal_their_recomputation():
    assert _check_module(ROOT / "results").main() == 0


def test_check_fails_on_an_edited_number(tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(ROOT / "results", copy)
    summaries = sorted(copy.rglob("summary.md")) + sorted(copy.rglob("tables.md"))
    assert summaries
    text = summaries[0].read_text()
    i = next(k for k, ch in enumerate(text) if ch.isdigit() and text[k - 1] == ".")
    summaries[0].write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])  # one digit changed
    assert _check_module(copy).main() == 1
