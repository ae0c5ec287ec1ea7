"""The core carries the paper's cells: combined map sources, the backbone axis, maps on any
split, shared models with one resumable loop, mask isolation and honest cell identity."""
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
import torch
from typer.testing import CliRunner

from wsss_bench import cli
from wsss_bench.errors import PluginError, UserError
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
def test_maps_on_the_training_split_cover_every_training_slice(tmp_path):
    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host)
    ctx = session.context("brats", 0)
    train = ctx.maps("gradcam", "train")
    assert train.shape == (len(ctx.data.split("train")), 32, 32)
    assert not train.flags.writeable
    assert float(train.max()) <= 1.0 and float(train.min()) >= 0.0 and np.ptp(train) > 0
    again = ctx.maps("gradcam", "train")  # memoised: the same array
    assert again is train
    source = ctx.plugin("cams", "gradcam")
    assert ctx.plugin("cams", "gradcam") is source  # one prepared instance per canonical spec
    batch = next(iter(ctx.data.batches(ctx.data.split("train")[:4], 4)))
    with torch.no_grad():
        direct = source.maps(batch)
    assert np.allclose(train[:4], direct.numpy(), atol=1e-6)


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
def test_data_view_refuses_masks_unless_declared(tmp_path):
    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host)
    ctx = session.context("brats", 0)
    train = ctx.data.split("train")[:3]
    gradcam = host.get("cams", "gradcam")()
    with ctx.acting(gradcam), pytest.raises(PluginError, match="gradcam.*reads_train_masks"):
        ctx.data.masks(train)
    with ctx.acting(gradcam), pytest.raises(PluginError):
        next(iter(ctx.data.batches(train, 2, with_masks=True)))
    with pytest.raises(PluginError):
        ctx.data.store  # noqa: B018 - the raw store holds the labels
    with pytest.raises(PluginError):
        ctx.data.fg_fraction  # noqa: B018 - foreground areas are mask information

    class Supervised(Refiner):
        name, needs_cam, reads_train_masks = "sup", False, True

        def refine(self, batch, maps, sources):  # pragma: no cover
            raise NotImplementedError

    sup = Supervised()
    with ctx.acting(sup):
        assert ctx.data.masks(train).shape == (3, 32, 32)
        with pytest.raises(PluginError, match="test slices"):
            ctx.data.masks(ctx.data.split("test")[:2])


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


def test_bf16_and_source_hash_enter_artifact_keys(tmp_path):
    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host)
    ctx = session.context("brats", 0)
    gradcam = host.get("cams", "gradcam")()
    plain, _ = ctx.artifact_key("maps", gradcam)
    ctx.bf16 = True
    assert ctx.artifact_key("maps", gradcam)[0] != plain
    ctx.bf16 = False
    assert ctx.artifact_key("maps", gradcam)[0] == plain


# ---------------------------------------------------------------------------- shared models
def test_shared_model_is_built_once_and_memoised_with_its_records(tmp_path):
    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host)
    ctx = session.context("brats", 0)
    builds = []

    def build():
        builds.append("build")
        return torch.nn.Linear(3, 2)

    def train(model, run):
        ctx.record("toy/trained", True)
        assert run.work.is_dir() and run.seed == ctx.seed("train/toy")
        return {k: v + 1 for k, v in model.state_dict().items()}, {"ok": True}

    ctx.begin_cell()
    a = ctx.shared_model("toy", build, train, params={"x": 1})
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    log = ctx.begin_cell()
    b = ctx.shared_model("toy", build, train, params={"x": 1})
    assert b is a and builds == ["build"]
    # the model's stop record replays too (a train info without a convergence record: fixed steps)
    assert log.records == {"toy/trained": True, "model/toy": {"stop_reason": "fixed steps", "steps": None}}
    assert log.used == [ctx.shared_model_key("toy")]
    assert list((tmp_path / "artifacts" / "toy").glob("*/toy.safetensors"))
    fresh = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host).context("brats", 0)
    c = fresh.shared_model("toy", build, lambda m, r: pytest.fail("retrained"), params={"x": 1})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


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


def test_classifier_training_killed_after_a_checkpoint_resumes_bit_identical(tmp_path):
    from wsss_bench.nn import training
    from wsss_bench.nn.classifier import build_classifier, train_classifier
    from wsss_bench.profiles import load_profile

    host = load_plugins()
    session = Session(RunConfig(profile="smoke", device="cpu", cache_dir=tmp_path), host=host)
    ctx = session.context("brats", 0)
    prof = load_profile("smoke")
    prof["classifier"] = type(prof.classifier)(epochs=3, batch=8)

    def run(work, stop_at=None):
        model = build_classifier(prof.cam_classifier, 4, seed=1)
        ticks = []

        def progress(n):
            ticks.append(n)
            if stop_at is not None and len(ticks) == stop_at:
                raise KeyboardInterrupt

        return train_classifier(model, ctx.data, prof, "cpu", seed=3, flips=True, progress=progress, work=work)

    full, info = run(tmp_path / "full")
    per_epoch = info["cap"] // 3
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", stop_at=per_epoch + 2)  # killed in epoch 2, after epoch 1's checkpoint
    state = training.load_state(tmp_path / "cut")
    assert state is not None and state["iteration"] == per_epoch
    assert not list((tmp_path / "cut").glob("*.pt"))  # safetensors + JSON, nothing pickled
    resumed, info2 = run(tmp_path / "cut")
    assert info2["resumed_from"] == per_epoch and info["resumed_from"] is None
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert info2["val_auc"] == info["val_auc"] and info2["best_step"] == info["best_step"]
