"""A committed run folder re-reports on a fresh clone: phantoms and slice stores are found by
key in the cache in use, regenerated where absent, and figures that need no images are made
even when images cannot be had."""
from __future__ import annotations

import json
import shutil

import pytest


@pytest.fixture(scope="module")
def committed_run(tmp_path_factory):
    """A real smoke run, then moved as a clone moves it: another folder, the maker's cache gone."""
    from typer.testing import CliRunner

    from wsss_bench import cli

    base = tmp_path_factory.mktemp("clone")
    maker_cache, made = base / "maker-cache", base / "made"
    res = CliRunner().invoke(cli.app, ["run", "--profile", "smoke", "--task", "brats", "--cam", "gradcam",
                                       "--method", "threshold", "--cache-dir", str(maker_cache), "--out", str(made)])
    assert res.exit_code == 0, res.output
    committed = base / "repo" / "results" / "smoke"
    shutil.copytree(made, committed)
    shutil.rmtree(made)
    shutil.rmtree(maker_cache)  # the maker's phantoms and slice stores do not exist here
    return committed


def test_report_html_and_figures_work_without_the_makers_cache(committed_run, tmp_path, run_cli):
    manifest = json.loads((committed_run / "manifest.json").read_text())
    entry = manifest["data"]["brats/seed0"]
    assert not (tmp_path / "x").exists() and not __import__("pathlib").Path(entry["data_root"]).exists()
    fresh = tmp_path / "fresh-cache"
    page = tmp_path / "report.html"
    res = run_cli("report", committed_run, "--format", "html", "--output", page, "--cache-dir", fresh)
    assert res.exit_code == 0, res.output
    assert page.read_text().count("data:image/png;base64,") >= 2  # the grid (needs images) and the boxplots
    assert (fresh / "slices" / entry["store_key"] / "done").is_file()  # rebuilt under the recorded key
    res = run_cli("figures", committed_run, "--out", tmp_path / "figs", "--cache-dir", fresh, "--format", "png")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "figs" / "fig3_qualitative.png").is_file()


def test_figures_without_images_still_make_the_others(committed_run, tmp_path, run_cli, monkeypatch):
    from wsss_bench.data import locate

    def no_images(*a, **k):
        from wsss_bench.errors import UserError

        raise UserError("no images here (simulated)")

    monkeypatch.setattr(locate, "locate", no_images)
    res = run_cli("figures", committed_run, "--out", tmp_path / "figs", "--cache-dir", tmp_path / "c", "--format", "png")
    assert res.exit_code == 0, res.output
    made = sorted(p.name for p in (tmp_path / "figs").iterdir())
    assert made == ["dice_boxplots.png"] and "Qualitative grid" in res.output
