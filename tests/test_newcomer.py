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
    # the conftest loads its fixture modules (data_fixtures) from tests/
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
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


@pytest.mark.parametrize("command", ["run", "bench"])
def test_slurm_executor_off_a_cluster_is_one_sentence_and_writes_nothing(run_cli, tmp_path, monkeypatch, command):
    import shutil as _shutil

    real_which = _shutil.which
    monkeypatch.setattr(_shutil, "which", lambda name, *a, **k: None if name in ("sbatch", "srun") else real_which(name, *a, **k))
    out = tmp_path / "out"
    if command == "run":
        args = ["run", "--profile", "smoke", "--task", "brats", "--cam", "gradcam", "--method", "threshold"]
    else:
        toml = tmp_path / "t.toml"
        toml.write_text('[table]\nname = "t"\ncaption = "T."\nlabel = "tab:t"\ntasks = ["brats"]\nseeds = [0]\n[[rows]]\nname = "GradCAM"\ncam = "gradcam"\n'
                        'method = "threshold"\n', encoding="utf-8")
        args = ["bench", str(toml), "--profile", "smoke"]
    res = run_cli(*args, "--executor", "slurm[partition=gpu,gpus=1]", "--out", out,
                  "--cache-dir", tmp_path / "cache")
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "srun" not in res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "no SLURM" in lines[0] and "local[jobs=N]" in lines[0], res.output
    assert not out.exists() or not any(out.iterdir())


# The team's internal spec files; a user of this repository does not have them.
_INTERNAL = re.compile(r"\b(?:PROTO" r"COL|METH" r"ODS)\b|\bDES" r"IGN\.md\b")


def _shipped_texts():
    globs = ["README.md", "pyproject.toml", ".ci/run", "docs/**/*.md", "wsss_bench/**/*.py", "wsss_bench/**/*.toml",
             "plugins/**/*.py", "benchmarks/**/*.py", "benchmarks/**/*.toml", "benchmarks/**/*.md",
             "results/**/*.md", "results/**/*.tex", "results/**/*.py", "results/**/*.sh", "tests/**/*.py"]
    seen = set()
    for pattern in globs:
        for path in sorted(ROOT.glob(pattern)):
            if path.is_file() and path not in seen and path.name != Path(__file__).name:
                seen.add(path)
                yield path


def test_no_shipped_text_cites_the_internal_spec():
    """README, docs, help texts, code messages, report footers and committed tables cite the
    project's own pages (docs/protocol.md, docs/methods/) instead."""
    hits = []
    for path in _shipped_texts():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if _INTERNAL.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, f"{len(hits)} citation(s) of the internal spec:\n" + "\n".join(hits[:40])


def test_protocol_page_covers_what_the_code_cites():
    """Every 'protocol §N' the shipped texts cite is a section of docs/protocol.md."""
    page = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\. ", page, re.M)) | set(re.findall(r"^### (\d+\.\d+) ", page, re.M))
    cited = set()
    for path in _shipped_texts():
        text = path.read_text(encoding="utf-8", errors="replace")
        cited |= set(re.findall(r"protocol(?:\.md)?\s*(?:§|sections?\s)\s*(\d+(?:\.\d+)?)", text))
    missing = sorted(cited - sections, key=lambda s: [int(x) for x in s.split(".")])
    assert not missing, f"cited but not in docs/protocol.md: {missing}"
    for page_name in ("conventions", "diffusion", "cldf", "amecam", "backbones"):
        assert (ROOT / "docs" / "methods" / f"{page_name}.md").is_file()


def _all_helps():
    import typer

    from wsss_bench import cli

    group = typer.main.get_command(cli.app)
    out = [([], group)]
    for name, cmd in group.commands.items():
        out.append(([name], cmd))
        for sub, c in getattr(cmd, "commands", {}).items():
            out.append(([name, sub], c))
    return out


def test_every_option_help_shows_its_brackets_and_flags_show_no_type():
    """rich ate '[cdm,resnet18]' from `run --help`; every bracket of every option help text must
    survive, and a flag (it takes no value) shows no `<bool>`."""
    from typer.testing import CliRunner

    from wsss_bench import cli

    runner = CliRunner()
    checked = 0
    for argv, cmd in _all_helps():
        if hasattr(cmd, "commands") and argv:
            continue
        res = runner.invoke(cli.app, argv + ["--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
        assert res.exit_code == 0, (argv, res.output)
        flat = " ".join(res.output.split())
        assert "<bool>" not in flat, f"`{' '.join(argv)} --help` shows <bool>"
        for p in cmd.params:
            for token in re.findall(r"\[[^\]\s]*\]", (p.help or "").replace("\\[", "[")):
                if token.startswith("[default"):
                    continue
                checked += 1
                assert token in flat, f"`{' '.join(argv)} --help` drops {token!r} ({p.name})"
    assert checked >= 8


def test_version():
    from typer.testing import CliRunner

    from wsss_bench import __version__, cli

    res = CliRunner().invoke(cli.app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"wsss-bench {__version__}"
