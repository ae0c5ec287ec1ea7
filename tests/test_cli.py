"""The command line as a user meets it: the main job, re-use of the cache, listings, reports,
and one clear line (exit code 2, no traceback) for every kind of bad input."""
import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
from typer.testing import CliRunner

from wsss_bench import cli


def test_main_job_prints_the_table_and_reuses_the_cache(run_cli, tmp_path):
    out = tmp_path / "run"
    args = ["run", "--profile", "smoke", "--method", "threshold", "--cam", "gradcam", "--task", "brats", "--out", out]
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    for gate in ("label", "classifier", "none"):
        assert gate in first.output
    assert "Dice (all)" in first.output and "IoU (pos)" in first.output
    frame = pd.read_parquet(out / "results.parquet")
    assert set(frame["gate"]) == {"label", "classifier", "none"}
    assert {"case_id", "z", "label", "fg_fraction", "gt_area", "pred_area", "gate_pass", "classifier_p1",
            "dice", "iou", "seed", "profile"} <= set(frame.columns)
    assert frame["dice"].between(0, 1).all()
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("environment", "profile", "data", "plugins", "config", "cells"):
        assert key in manifest
    assert manifest["profile"]["image_size"] == 32
    assert manifest["data"]["brats/seed0"]["splits"]

    again = run_cli(*args[:-1], tmp_path / "run2")  # the same cell elsewhere reuses classifier and maps
    assert again.exit_code == 0, again.output
    assert "reused cached classifier" in again.output and "reused cached maps" in again.output
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "run2" / "results.parquet"), frame)
    resumed = run_cli(*args)  # the same command again: finished cells are not recomputed
    assert resumed.exit_code == 0 and "already done" in resumed.output and "Dice (all)" in resumed.output
    forced = run_cli(*args, "--force")
    assert forced.exit_code == 0 and "reused cached" not in forced.output
    # retrained from scratch with the same seed: bit-identical results on the CPU
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), frame)

    report = run_cli("report", out, "--format", "latex")
    assert report.exit_code == 0 and "\\toprule" in report.output and "gradcam+threshold" in report.output


def test_real_layout_data_root(run_cli, brats_root, tmp_path):
    result = run_cli("run", "--profile", "smoke", "--method", "threshold", "--cam", "gradcam",
                     "--task", "brats", "--data-root", brats_root, "--out", tmp_path / "real")
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(tmp_path / "real" / "results.parquet")
    assert set(frame["data"]) == {"real"}


def test_listings(run_cli):
    result = run_cli("plugins")
    assert result.exit_code == 0 and "gradcam" in result.output and "wsss-bench" in result.output
    cams = run_cli("list", "cams", "grad*")
    assert "gradcam" in cams.output and "layer" in cams.output
    tasks = run_cli("list", "tasks")
    for t in ("brats", "flare21-kidney", "flare21-spleen", "flare21-liver"):
        assert t in tasks.output


def _assert_clear_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {result.output}"


def test_bad_input_gives_one_clear_line(run_cli, tmp_path):
    base = ["run", "--profile", "smoke", "--method", "threshold", "--out", tmp_path / "x"]
    _assert_clear_error(run_cli(*base, "--cam", "gradcam", "--data-root", tmp_path / "nope"), "nope", "no such directory")
    _assert_clear_error(run_cli(*base, "--cam", "gradcam", "--task", "bratz"), "unknown task 'bratz'", "Did you mean 'brats'")
    _assert_clear_error(run_cli(*base, "--cam", "gradcan"), "unknown CAM source 'gradcan'", "Did you mean 'gradcam'")
    _assert_clear_error(run_cli(*base, "--cam", "gradcam[layer=layer3"), "malformed spec")
    _assert_clear_error(run_cli(*base, "--cam", "gradcam[layr=layer3]"), "has no parameter 'layr'", "layer=")
    _assert_clear_error(run_cli(*base, "--cam", "gradcam", "--profile", "fast"), "unknown profile 'fast'")
    _assert_clear_error(run_cli("list", "camz"), "unknown kind 'camz'")
    _assert_clear_error(run_cli("report", tmp_path / "empty", "--format", "latex"), "empty")


def test_missing_modality_and_shape_mismatch_name_the_files(run_cli, brats_root, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(brats_root, root)
    case = sorted(p for p in root.iterdir() if p.is_dir())[1]
    (case / f"{case.name}_t1ce.nii.gz").unlink()
    base = ["run", "--profile", "smoke", "--method", "threshold", "--cam", "gradcam", "--out", tmp_path / "o"]
    _assert_clear_error(run_cli(*base, "--data-root", root), case.name, "t1ce")

    root2 = tmp_path / "shape"
    shutil.copytree(brats_root, root2)
    case = sorted(p for p in root2.iterdir() if p.is_dir())[0]
    seg = case / f"{case.name}_seg.nii.gz"
    img = nib.load(str(seg))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), str(seg))
    _assert_clear_error(run_cli(*base, "--data-root", root2), case.name, "seg")


def test_help_shows_bracketed_examples_verbatim():
    """rich reads `[jobs=2]` as a markup tag and drops it from --help unless it is escaped."""
    import re

    import typer

    group = typer.main.get_command(cli.app)
    runner = CliRunner()
    checked = 0
    commands = [(name, cmd) for name, cmd in group.commands.items()]
    commands += [(f"data {n}", c) for n, c in getattr(group.commands.get("data"), "commands", {}).items()]
    for name, cmd in commands:
        if hasattr(cmd, "commands"):
            continue
        texts = [getattr(p, "help", None) or "" for p in cmd.params] + [cmd.help or ""]
        wanted = {t.replace("\\[", "[") for text in texts for t in re.findall(r"\w+\\?\[[^\s]*\]", text)}
        if not wanted:
            continue
        result = runner.invoke(cli.app, name.split() + ["--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
        assert result.exit_code == 0, result.output
        flat = " ".join(result.output.split())
        for token in wanted:
            checked += 1
            assert token in flat, f"`{name} --help` drops {token!r}"
    assert checked >= 4
