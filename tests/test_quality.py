"""Model quality next to every row and pseudo-mask quality on the training split.

References are independent of the code under test: hand counts on tiny masks, naive float64
loops, and the CLDF refiner's own seed composition record.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsss_bench.plugins import load_plugins
from wsss_bench.quality import (STOP_CAP_IMPROVING, mask_agreement, model_quality, read_stop_record, row_flags,
                                rule_masks, seed_quality, stop_record)
from wsss_bench.reporting.quality import QualityIndex, seeds_table
from wsss_bench.reporting.summary import bench_table, to_markdown
from wsss_bench.reporting.tables import build_tables, render_many
from wsss_bench.running import stages
from wsss_bench.running.runner import Cell, RunConfig, Session


# ---------------------------------------------------------------------------- hand counts
def test_mask_agreement_equals_a_hand_count():
    pred = np.zeros((2, 3, 3), bool)
    gt = np.zeros((2, 3, 3), bool)
    pred[0, 0, :] = True          # slice 0: P = 3 pixels of row 0
    gt[0, 0, 1:] = True           #          G = 2 of them, both hit: tp 2
    gt[0, 2, 2] = True            #          and one missed G pixel: |G| = 3
    pred[1, 1, 1] = True          # slice 1: P = 1 pixel, G = 2 others: tp 0
    gt[1, 2, :2] = True
    got = mask_agreement(pred, gt)
    # by hand: tp = 2, |P| = 4, |G| = 5
    assert (got["tp"], got["pred"], got["gt"]) == (2, 4, 5)
    assert got["precision"] == pytest.approx(2 / 4) and got["recall"] == pytest.approx(2 / 5)
    assert got["dice"] == pytest.approx(4 / 9)
    assert got["dice_slice_mean"] == pytest.approx((4 / 6 + 0.0) / 2)  # slice 0: 2*2/(3+3); slice 1: 0


def test_mask_agreement_matches_a_naive_loop_and_handles_empty_sets():
    rng = np.random.default_rng(3)
    pred, gt = rng.random((5, 8, 8)) < 0.3, rng.random((5, 8, 8)) < 0.2
    tp = fp = fn = 0
    for p, g in zip(pred.reshape(-1).tolist(), gt.reshape(-1).tolist()):
        tp += p and g
        fp += p and not g
        fn += g and not p
    got = mask_agreement(pred, gt)
    assert got["precision"] == pytest.approx(tp / (tp + fp), rel=1e-12)
    assert got["recall"] == pytest.approx(tp / (tp + fn), rel=1e-12)
    assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-12)
    empty = mask_agreement(np.zeros((1, 2, 2), bool), np.ones((1, 2, 2), bool))
    assert empty["precision"] is None and empty["recall"] == 0.0 and empty["empty_pred_slices"] == 1


def test_seed_quality_counts_bg_against_the_background_and_tissue_by_hand():
    gt = np.zeros((1, 2, 4), bool)
    gt[0, 0, 0] = True                              # one target pixel
    fg = np.zeros_like(gt)
    fg[0, 0, :2] = True                             # 2 fg seeds, 1 on target
    bg = np.zeros_like(gt)
    bg[0, 1, :] = True                              # 4 bg seeds, all background
    bg[0, 0, 0] = True                              # + 1 on the target: 5 bg seeds
    tissue = np.zeros_like(gt)
    tissue[0, :, :2] = True                         # tissue = columns 0-1: bg seeds inside = (0,0),(1,0),(1,1)
    got = seed_quality(fg, bg, gt, tissue)
    assert got["fg"]["precision"] == pytest.approx(1 / 2) and got["fg"]["recall"] == pytest.approx(1.0)
    assert got["bg"]["precision"] == pytest.approx(4 / 5)   # 4 of 5 bg seeds lie in the background
    assert got["bg"]["recall"] == pytest.approx(4 / 7)      # of 7 background pixels
    assert got["bg_in_tissue"] == 3 and got["bg_tissue_share"] == pytest.approx(3 / 5)


def test_rule_masks_follow_each_sources_rule():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    maps = rng.random((3, 16, 16)).astype(np.float32) ** 3
    lo, hi = maps.min(axis=(1, 2), keepdims=True), maps.max(axis=(1, 2), keepdims=True)
    mm = (maps.astype(np.float64) - lo) / (hi - lo)
    assert np.array_equal(rule_masks(maps, "cam"), mm > 0.5)
    mm32 = ((maps - lo) / (hi - lo)).astype(np.float32)
    want = np.stack([m > threshold_otsu(m, nbins=256) for m in mm32])
    assert np.array_equal(rule_masks(maps, "otsu"), want)
    with pytest.raises(ValueError):
        rule_masks(maps, "bogus")


# ---------------------------------------------------------------------------- stop records and marks
def _conv(reason: str) -> dict:
    return {"criterion": "val AUC", "stop_reason": reason, "steps": 60, "cap": 60, "kept_step": 60, "best": 0.8,
            "curve": [[30, 0.6, 0.7, 0.5], [60, 0.5, 0.8, 0.4]]}


def test_stop_records_are_read_from_the_train_info(tmp_path):
    assert stop_record({"convergence": _conv("converged")})["stop_reason"] == "converged"
    staged = stop_record({"stage1": {"convergence": _conv("converged")},
                          "stage2": {"convergence": _conv(STOP_CAP_IMPROVING)}})
    assert staged["stop_reason"] == STOP_CAP_IMPROVING and set(staged["stages"]) == {"stage1", "stage2"}
    assert stop_record({"iterations": 3000}) == {"stop_reason": "fixed steps", "steps": 3000}
    path = tmp_path / "toy.train.json"
    path.write_text(json.dumps({"convergence": _conv(STOP_CAP_IMPROVING)}))
    assert read_stop_record(path)["stop_reason"] == STOP_CAP_IMPROVING
    assert "curve" not in read_stop_record(path)  # the manifest keeps the short record only
    assert read_stop_record(tmp_path / "missing.train.json")["stop_reason"] == "fixed steps"


def test_marks_need_a_model_the_maps_come_from():
    records = {"model/classifier": {"stop_reason": "converged"}, "model/cdm": {"stop_reason": STOP_CAP_IMPROVING}}
    low = {"auc": 0.8, "sensitivity": 0.5, "specificity": 0.9}
    # MG-only maps: the classifier only gates; the CDM behind the maps stopped while improving
    q = model_quality(records, low, ["cdm"])
    assert q["flags"] == ["cdm stopped at its step cap while still improving"]
    assert row_flags(q, "label") == q["flags"]
    assert row_flags(q, "classifier")[0].startswith("classifier test AUC 0.800 < 0.9 (it gates this row)")
    ok = model_quality({"model/classifier": {"stop_reason": "converged"}}, {"auc": 0.97}, ["classifier"])
    assert ok["flags"] == [] and row_flags(ok, "classifier") == []
    assert model_quality({}, low, ["classifier"])["flags"] == ["classifier test AUC 0.800 < 0.9"]


# ---------------------------------------------------------------------------- end to end
@pytest.fixture
def toy_classifier(monkeypatch):
    """The smoke CAM classifier, trained for real, reporting a given stop reason; the test AUC
    the gate sees is set, since a smoke classifier cannot reach 0.9 in seconds."""
    from wsss_bench.nn import classifier as clf

    real = clf.train_classifier

    def use(reason: str, auc: float) -> None:
        def train(*args, **kwargs):
            weights, info = real(*args, **kwargs)
            info["convergence"] = _conv(reason)
            return weights, info

        def stats(labels, p1):
            return {"auc": auc, "sensitivity": 0.9, "specificity": 0.9}

        monkeypatch.setattr(clf, "train_classifier", train)
        monkeypatch.setattr(stages, "gate_stats", stats)

    return use


@pytest.mark.parametrize("reason, auc, marked", [(STOP_CAP_IMPROVING, 0.95, "classifier stopped at its step cap"),
                                                 ("converged", 0.95, None),
                                                 ("converged", 0.85, "classifier test AUC 0.850 < 0.9")])
def test_the_mark_appears_for_an_under_trained_model_and_not_for_a_converged_one(
        tmp_path, toy_classifier, one_thread, reason, auc, marked):
    toy_classifier(reason, auc)
    out = tmp_path / "run"
    cfg = RunConfig(profile="smoke", device="cpu", out=out, cache_dir=tmp_path / "cache")  # private: patched model
    session = Session(cfg, host=load_plugins())
    got = session.run_cell(Cell("brats", "threshold", (), (("gradcam", ()),), 0))
    assert got.status == "done", got.error
    mq = got.info["model_quality"]
    assert mq["models"]["classifier"]["stop_reason"] == reason and "classifier" in mq["map_models"]
    assert mq["classifier"]["auc"] == auc
    from wsss_bench.running import rundir

    rundir.collect(out)
    rundir.write_manifest(out, {"profile": {}})
    frame = pd.read_parquet(out / "results.parquet")
    markdown = load_plugins().get("exporters", "markdown")()
    text = render_many(build_tables(frame, "summary", "label", quality=out), markdown)
    quality_rows = [line for line in text.splitlines() if line.startswith("| gradcam+threshold | BraTS21")]
    assert quality_rows and reason in quality_rows[-1]  # the model-quality table names the stop reason
    results = text.split("**Model quality")[0]
    row = next(line for line in results.splitlines() if line.startswith("| gradcam+threshold |"))
    if marked:
        assert "‡" in row.split("|")[2] and marked in results  # the Dice cell carries the mark; the note why
    else:
        assert "‡" not in results and "in doubt" not in text
    # HTML page: the marked result table, then the model-quality and pseudo-mask sections
    from wsss_bench.reporting.html import html_report

    page = html_report(out, load_plugins().get("exporters", "html")(), gate="label", figures=False)
    head, _, tail = page.partition("<h2>Model quality</h2>")
    assert tail and "Pseudo-mask quality (training split)" in tail and reason in tail
    assert ("‡" in head) == bool(marked)
    # CSV: one table shape, the quality columns in the row
    csv = render_many(build_tables(frame, "summary", "label", quality=out, quality_table=False),
                      load_plugins().get("exporters", "csv")())
    rows = pd.read_csv(__import__("io").StringIO(csv))
    assert rows["classifier_auc"].item() == pytest.approx(auc) and reason in rows["stop_reasons"].item()
    assert (marked or "") in str(rows["quality_flags"].fillna("").item())
    # the bench table marks the same cell and lists the classifier's test stats per task
    from wsss_bench.running.bench import PlannedRow, Row, Table

    table = Table(Path("t.toml"), "t", "toy", "tab:t", ["brats"], [0], None,
                  [Row("GradCAM", "threshold", {"brats": "gradcam"})])
    planned = [PlannedRow("t", "GradCAM", "brats", [Cell("brats", "threshold", (), (("gradcam", ()),), 0)], None)]
    bench = to_markdown(bench_table(frame, planned, table, resamples=10, quality=out))
    assert f"BraTS21: CAM classifier test AUC {auc:.3f}" in bench and f"classifier {reason}" in bench
    assert ("‡" in bench.split("gate=label;")[0]) == bool(marked)  # the row's cell, before the footer


def test_pseudo_mask_quality_equals_a_naive_recount_and_cldf_seed_composition(tmp_path, one_thread):
    host = load_plugins()
    cfg = RunConfig(profile="smoke", device="cpu", out=tmp_path / "o", cache_dir=Path(os.environ["WSSS_BENCH_CACHE"]))
    session = Session(cfg, host=host)
    got = session.run_cell(Cell("brats", "cldf", (), (("gradcam", ()),), 0))
    assert got.status == "done", got.error
    pm = got.info["pseudo_masks"]
    assert set(pm["sources"]) == {"gradcam", "mg"}  # mg: added by the refiner (CAM+MG+CL)
    ctx = session.context("brats", 0)
    data = ctx.task_data
    train = data.split("train")
    pos = data.labels[train] == 1
    gt = data.masks(train[pos]).astype(bool)
    maps = np.asarray(ctx.maps("gradcam", "train"), dtype=np.float64)[pos]
    tp = npred = 0
    for m, g in zip(maps, gt):  # naive float64 min-max > 0.5 per slice
        lo, hi = m.min(), m.max()
        p = (m - lo) / (hi - lo) > 0.5 if hi - lo >= 1e-8 else np.zeros_like(g)
        tp += int((p & g).sum())
        npred += int(p.sum())
    rec = pm["sources"]["gradcam"]
    assert (rec["tp"], rec["pred"], rec["gt"]) == (tp, npred, int(gt.sum()))
    assert rec["precision"] == pytest.approx(tp / npred) and rec["slices"] == int(pos.sum())
    # the seeds against the refiner's own composition record (computed in the plugin)
    comp = got.info["records"]["cldf/seeds/train"]
    seeds = pm["seeds"]
    assert seeds["fg"]["pred"] == comp["fg"] and seeds["bg"]["pred"] == comp["bg"]
    assert seeds["bg_in_tissue"] == comp["bg_in_tissue"]
    assert seeds["bg_tissue_share"] == pytest.approx(comp["bg_tissue_share"])


def test_the_seeds_table_renders_in_every_format(tmp_path):
    host = load_plugins()
    records = [{"status": "done", "cell": {"task": "brats", "seed": 0}, "method": "amecam+cldf",
                "model_quality": {}, "pseudo_masks": {
                    "sources": {"amecam": {"rule": "cam", "slices": 4, "precision": 0.25, "recall": 0.5, "dice": 1 / 3},
                                "mg": {"rule": "otsu", "slices": 4, "precision": 0.1, "recall": 0.9, "dice": 0.18}},
                    "seeds": {"fg": {"slices": 4, "precision": 0.6, "recall": 0.2, "dice": 0.3},
                              "bg": {"slices": 4, "precision": 0.99, "recall": 0.4, "dice": 0.57},
                              "bg_tissue_share": 0.25}}}]
    index = QualityIndex.of([{"cells": records}])
    df = pd.DataFrame({"task": ["brats"], "method": ["amecam+cldf"], "gate": ["label"], "case_id": ["c"], "z": [0],
                       "label": [1], "dice": [0.5], "iou": [0.3]})
    table = build_tables(df, "seeds", quality=index)[0]
    assert table is not None and len(table.rows) == 4
    for name in ("markdown", "latex", "csv", "html"):
        text = render_many([table], host.get("exporters", name)())
        assert "0.250" in text or "0.25" in text, name
        assert ("bg seeds" in text) and ("Otsu" in text), name
    csv = pd.read_csv(__import__("io").StringIO(render_many([table], host.get("exporters", "csv")())))
    assert csv.loc[csv.masks == "bg seeds", "bg_tissue_share"].item() == pytest.approx(0.25)
    empty = seeds_table(QualityIndex(), df)
    assert empty.rows == [] and "before it existed" in empty.footer
