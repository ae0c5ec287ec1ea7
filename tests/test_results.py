"""The committed reference results agree with their own per-slice data (results/check.py)."""
from __future__ import annotations

import importlib.util
import re
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


def test_readme_prose_numbers_come_from_the_results(tmp_path):
    """Every decimal, minute count and percentage in the README's Quick start and Results prose
    is recomputed from results/cpu; a hand-typed figure (the old '14.6 min', '0.258', '78%') fails."""
    check = _check_module(ROOT / "results")
    readme = (ROOT / "README.md").read_text()
    assert check.check_readme_numbers(ROOT / "README.md", ROOT / "results" / "cpu") == []
    for typed in ("It took 14.6 min including the install.", "It printed Dice 0.258.", "They take 78% of it."):
        bad = tmp_path / "README.md"
        bad.write_text(readme.replace("Running it again reuses", typed + " Running it again reuses", 1))
        problems = check.check_readme_numbers(bad, ROOT / "results" / "cpu")
        number = re.search(r"\d+(?:\.\d+)?", typed).group()
        assert len(problems) == 1 and repr(number) in problems[0], problems
    text = readme.split("<!-- results/cpu tables: begin -->")[1]
    assert "Dice and IoU" not in text.split("<!-- results/cpu tables: end -->")[0]  # captions promise what is shown
