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


def _copy_results(dest: Path) -> Path:
    """results/ and the table files its bench manifests name, under ``dest``."""
    shutil.copytree(ROOT / "results", dest / "results")
    (dest / "benchmarks").mkdir()
    for toml in (ROOT / "benchmarks").glob("*.toml"):
        shutil.copy(toml, dest / "benchmarks" / toml.name)
    return dest / "results"


def test_committed_tables_equal_their_recomputation():
    assert _check_module(ROOT / "results").main() == 0


def test_check_fails_on_an_edited_number(tmp_path):
    copy = _copy_results(tmp_path)
    summaries = sorted(copy.rglob("summary.md")) + sorted(copy.rglob("tables.md"))
    assert summaries
    text = summaries[0].read_text()
    i = next(k for k, ch in enumerate(text) if ch.isdigit() and text[k - 1] == ".")
    summaries[0].write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])  # one digit changed
    assert _check_module(copy).main() == 1


def test_check_fails_on_an_edited_paper_table_or_readme_number(tmp_path):
    copy = _copy_results(tmp_path)
    tex = copy / "cpu" / "latex" / "table1.tex"
    text = tex.read_text()
    i = text.index("0.", text.index("\\midrule")) + 2
    tex.write_text(text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:])
    assert _check_module(copy).main() == 1
    # the README's results/cpu block is checked too
    _copy_results(tmp_path / "r2")
    readme = (ROOT / "README.md").read_text()
    begin = readme.index("<!-- results/cpu tables: begin -->")
    i = readme.index("| 0.", begin) + 4
    (tmp_path / "r2" / "README.md").write_text(readme[:i] + str((int(readme[i]) + 1) % 10) + readme[i + 1:])
    assert _check_module(tmp_path / "r2" / "results").main() == 1
    (tmp_path / "r2" / "README.md").write_text(readme)
    assert _check_module(tmp_path / "r2" / "results").main() == 0
