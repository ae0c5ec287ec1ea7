"""wsss_bench.running.runner: planning and running the paper's cells: combined map sources,
the backbone axis, no plugin touching a mask, one configuration per output folder, honest cell
identity, cell logs kept apart.  The run context's own tests are in test_context.py, the
training loop's in test_training.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from wsss_bench import cli
from wsss_bench.errors import UserError
from wsss_bench.interfaces import Refiner
from wsss_bench.plugins import load_plugins
from wsss_bench.running.runner import Cell, RunConfig, Session, parse_method, plan_cells

ROOT = Path(__file__).resolve().parent.parent


def _frame(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet")


def _hits(manifest: dict, stage: str) -> list[bool]:
    return [e["hit"] for e in manifest["cache_events"] if e["stage"] == stage]


# ---------------------------------------------------------------------------- combined sources
def test_two_sources_threshold_is_the_intersection_and_maps_are_shared(run_cli, tmp_path):
    base = ["run", "--profile", "smoke", "--method", "threshold", "--task", "brats"]
    both = run_cli(*base, "--cam", "gradcam+mg", "--out", tmp_path / "both")
    assert both.exit_code == 0, both.output
    single = run_cli(*base, "--cam", "gradcam,mg", "--out", tmp_path / "single")
    assert single.exit_code == 0, single.output
    # the single-source cells reuse the maps the combined cell made (one artifact per source and
    # split: the test maps, and the training maps its pseudo-mask quality was computed from)
    manifest = json.loads((tmp_path / "single" / "manifest.json").read_text())
    assert _hits(manifest, "maps") == [True] * 4

    f2, f1 = _frame(tmp_path / "both"), _frame(tmp_path / "single")
    none2 = f2[f2.gate == "none"].reset_index(drop=True)
    g = f1[(f1.gate == "none") & (f1.method == "gradcam+threshold")].reset_index(drop=True)
    m = f1[(f1.gate == "none") & (f1.method == "mg+threshold")].reset_index(drop=True)
    assert set(f2.method) == {"gradcam+mg+threshold"}
    assert (none2.pred_area <= np.minimum(g.pred_area, m.pred_area)).all()
    assert (none2.pred_area < np.minimum(g.pred_area, m.pred_area)).any()  # a real intersection
    assert parse_method("gradcam+mg+threshold") == (["gradcam", "mg"], "threshold")
    assert parse_method("layercam[layers=layer3+layer4]+mg+threshold") == (
        ["layercam[layers=layer3+layer4]", "mg"], "threshold")


def test_intersection_masks_equal_the_single_source_masks_anded():
    """In-process: the masks of gradcam+mg equal gradcam's AND mg's, slice for slice."""
    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=Path(os.environ["WSSS_BENCH_CACHE"])),
                      host=host)
    ctx = session.context("brats", 0)
    from wsss_bench.running.stages import CellState, stage_maps, stage_prepare_refiner, stage_prepare_sources, stage_refine

    def masks(cams):
        cell = plan_cells(host, ["brats"], cams, "threshold", [0])[0]
        st = CellState(ctx, cell, session.profile)
        for stage in (stage_prepare_sources, stage_maps, stage_prepare_refiner, stage_refine):
            stage(st)
        return st.pred

    both, g, m = masks("gradcam+mg"), masks("gradcam"), masks("mg")
    assert np.array_equal(both, g & m)
    assert both.sum() < min(g.sum(), m.sum())


# ---------------------------------------------------------------------------- maps on any split
# ---------------------------------------------------------------------------- backbone axis
class _FeatureRefiner(Refiner):
    name = "featref"
    params = {"backbone": "cdm", "k": 1}

    def refine(self, batch, maps, sources):  # pragma: no cover - planning only
        raise NotImplementedError


def test_backbone_grid_makes_cells_with_different_keys():
    host = load_plugins()
    host.registries["refiners"].add("featref", _FeatureRefiner, "tests")
    cells = plan_cells(host, ["brats"], "gradcam", "featref", [0], backbones="[cdm,cdm[t_scale=native]]")
    assert len(cells) == 2 and cells[0].key != cells[1].key
    assert {dict(c.refiner_params).get("backbone", "cdm") for c in cells} == {"cdm", "cdm[t_scale=native]"}
    assert cells[1].method == "gradcam+featref[backbone='cdm[t_scale=native]']"
    with pytest.raises(UserError, match="has no backbone parameter"):
        plan_cells(host, ["brats"], "gradcam", "threshold", [0], backbones="cdm")
    with pytest.raises(Exception, match="nosuch"):
        plan_cells(host, ["brats"], "gradcam", "featref", [0], backbones="nosuch")


def test_cli_backbone_error_is_one_line(run_cli, tmp_path):
    result = run_cli("run", "--profile", "smoke", "--method", "threshold", "--cam", "gradcam", "--backbone", "cdm",
                     "--out", tmp_path / "x")
    assert result.exit_code == 2 and "has no backbone parameter" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------------------- mask isolation
def test_no_plugin_touches_a_mask(monkeypatch, tmp_path):
    """Spy: run every registered map source (with threshold) and every refiner (with gradcam)
    on the smoke phantom; only the runner's scoring and plugins that declare
    ``reads_train_masks`` may read masks."""
    import inspect

    from wsss_bench.data.taskdata import TaskData

    calls: list[str] = []
    real = TaskData.masks

    def spy(self, idx):
        frames = [f.filename for f in inspect.stack()[1:6]]
        calls.append(next((f for f in frames if "wsss_bench" in f or "plugins" in f), frames[0]))
        return real(self, idx)

    monkeypatch.setattr(TaskData, "masks", spy)
    host = load_plugins()
    cfg = RunConfig(profile="smoke", device="cpu", out=tmp_path / "spy", cache_dir=Path(os.environ["WSSS_BENCH_CACHE"]))
    session = Session(cfg, host=host)
    cells = []
    for name in host.registries["cams"].names():
        cells.append(Cell("brats", "threshold", (), ((name, ()),), 0))
    declared = []
    for name in host.registries["refiners"].names():
        cls = host.get("refiners", name)
        if cls.reads_train_masks:
            declared.append(name)
            continue
        if name != "threshold" and getattr(cls, "__module__", "").startswith("wsss_bench_plugins"):
            cells.append(Cell("brats", name, (), (("gradcam", ()),) if cls.needs_cam else (), 0))
    for cell in cells:
        before = len(calls)
        session.run_cell(cell)
        readers = [c for c in calls[before:] if not c.endswith(os.path.join("wsss_bench", "running", "stages.py"))]
        assert not readers, f"{cell.method} read masks from {readers}"
        assert len(calls) > before  # the runner scored the cell against the masks
    assert len(cells) >= len(host.registries["cams"].names())


# ---------------------------------------------------------------------------- honest identity
def test_another_configuration_in_the_same_out_is_refused_or_replaced(run_cli, tmp_path):
    out = tmp_path / "run"
    base = ["run", "--profile", "smoke", "--method", "threshold", "--cam", "gradcam", "--task", "brats", "--out", out]
    first = run_cli(*base)
    assert first.exit_code == 0, first.output
    frame = _frame(out)
    assert len(list((out / "predictions").glob("*.npz"))) == 1  # masks kept for figures / NIfTI export
    other_seed = run_cli(*base, "--phantom-seed", "1")
    assert other_seed.exit_code == 2 and "another configuration" in other_seed.output
    assert "phantom_seed 0 -> 1" in " ".join(other_seed.output.split())
    other_profile = run_cli(*base[:2], "cpu", *base[3:])
    assert other_profile.exit_code == 2 and "profile 'smoke' -> 'cpu'" in " ".join(other_profile.output.split())
    pd.testing.assert_frame_equal(_frame(out), frame)  # nothing was relabelled
    forced = run_cli(*base, "--phantom-seed", "1", "--force")
    assert forced.exit_code == 0, forced.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["phantom_seed"] == 1
    assert not _frame(out)["dice"].equals(frame["dice"])  # recomputed on the other phantom


def test_cell_recomputes_when_a_plugin_changes(run_cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["run", "--profile", "smoke", "--method", "threshold", "--cam", "gradcam", "--task", "brats", "--out", out]
    assert run_cli(*args).exit_code == 0
    from wsss_bench_plugins.gradcam import GradCAM

    monkeypatch.setattr(GradCAM, "version", "999")
    again = run_cli(*args)
    assert again.exit_code == 0 and "changed since it was computed" in again.output


def _write_temp_copy(tmp_path: Path) -> Path:
    """A copy of the package and the built-in plugins, importable from ``tmp_path``."""
    shutil.copytree(ROOT / "wsss_bench", tmp_path / "wsss_bench", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "plugins", tmp_path / "wsss_bench_plugins", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_editing_an_imported_module_changes_the_plugin_source_hash(tmp_path):
    root = _write_temp_copy(tmp_path)
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        import wsss_bench, wsss_bench_plugins.gradcam as g
        assert wsss_bench.__file__.startswith(sys.argv[1]), wsss_bench.__file__
        from wsss_bench.cache import closure_hash
        print(closure_hash(g.GradCAM))
    """)

    def digest() -> str:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    before = digest()
    assert digest() == before
    cam = root / "wsss_bench" / "nn" / "cam.py"
    cam.write_text(cam.read_text().replace("def resolve_layers(", "def resolve_layers(  # edited\n", 1))
    edited = digest()
    assert edited != before  # GradCAM's logic lives in nn/cam.py
    progress = root / "wsss_bench" / "progress.py"
    cam.write_text(cam.read_text())
    progress.write_text(progress.read_text() + "\n# printing only\n")
    assert digest() == edited  # a neutral module does not invalidate artifacts


# ---------------------------------------------------------------------------- shared models
def test_cell_logs_do_not_leak_between_cells(tmp_path):
    host = load_plugins()
    cfg = RunConfig(profile="smoke", device="cpu", out=tmp_path / "o", cache_dir=Path(os.environ["WSSS_BENCH_CACHE"]))
    session = Session(cfg, host=host)
    mg = session.run_cell(Cell("brats", "threshold", (), (("mg", ()),), 0))
    gc = session.run_cell(Cell("brats", "threshold", (), (("gradcam", ()),), 0))
    assert "match/mg" in mg.info["records"] and "match/mg" not in gc.info["records"]
    assert not any(s["stage"].startswith("prepare/mg") for s in gc.info["stages"])
    assert gc.info["stage_list"] == ["prepare sources", "maps", "prepare refiner", "refine", "gate", "score",
                                     "pseudo-masks"]


