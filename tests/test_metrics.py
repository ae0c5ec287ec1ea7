"""Metrics, gates, aggregates and statistics on hand-made inputs (docs/protocol.md sections 7-8)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from wsss_bench.errors import UserError
from wsss_bench.metrics import apply_gate, dice_iou
from wsss_bench.reporting.stats import aggregate, bootstrap_ci, classifier_gate_stats, compare_to, holm


def masks(*pixel_sets, shape=(4, 4)):
    """(B, H, W) bool masks, each given as a list of (row, col) foreground pixels."""
    out = np.zeros((len(pixel_sets), *shape), dtype=bool)
    for b, pixels in enumerate(pixel_sets):
        for r, c in pixels:
            out[b, r, c] = True
    return out


# --------------------------------------------------------------------------- dice / iou
def test_exact_fractions():
    pred = masks([(0, 0), (0, 1), (0, 2)])  # 3 pixels
    gt = masks([(0, 1), (0, 2), (1, 1), (1, 2)])  # 4 pixels, 2 shared
    dice, iou = dice_iou(pred, gt)
    assert dice.dtype == np.float64 and iou.dtype == np.float64 and dice.shape == (1,)
    assert dice[0] == 4 / 7  # exact: computed in float64 with no epsilon
    assert iou[0] == 2 / 5


def test_empty_rules():
    pred = masks([], [(0, 0)], [], [(1, 1)])
    gt = masks([], [], [(2, 2)], [(1, 1)])
    dice, iou = dice_iou(pred, gt)
    # empty/empty -> 1; empty GT with a prediction -> 0; empty pred, non-empty GT -> 0; perfect -> 1
    np.testing.assert_array_equal(dice, [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(iou, [1.0, 0.0, 0.0, 1.0])


def test_torch_and_numpy_agree():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    pred = rng.random((6, 8, 8)) > 0.6
    gt = rng.random((6, 8, 8)) > 0.5
    gt[0] = False
    pred[1] = False
    gt[1] = False
    ref = dice_iou(pred, gt)
    for p, g in [(torch.from_numpy(pred), torch.from_numpy(gt)), (torch.from_numpy(pred), gt)]:
        got = dice_iou(p, g)
        for a, b in zip(ref, got):
            assert b.dtype == np.float64
            np.testing.assert_array_equal(a, b)


def test_rejects_maps_and_bad_shapes():
    with pytest.raises(TypeError):
        dice_iou(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), bool))
    with pytest.raises(ValueError):
        dice_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    with pytest.raises(ValueError):
        dice_iou(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 3), bool))


# --------------------------------------------------------------------------- gates
def test_gates_numpy():
    pred = np.ones((3, 2, 2), dtype=bool)
    labels = np.array([1, 0, 1])
    p1 = np.array([0.2, 0.5, 0.9])
    out, passed = apply_gate(pred, "label", labels, p1)
    np.testing.assert_array_equal(passed, [True, False, True])
    assert out[0].all() and not out[1].any() and out[2].all()
    assert pred.all()  # input untouched
    out, passed = apply_gate(pred, "classifier", labels, p1)
    np.testing.assert_array_equal(passed, [False, True, True])  # p1 == 0.5 passes
    assert not out[0].any() and out[1].all()
    out, passed = apply_gate(pred, "none")
    assert passed.all() and out.all()
    with pytest.raises(UserError):
        apply_gate(pred, "oracle", labels, p1)


def test_gates_torch():
    torch = pytest.importorskip("torch")
    pred = torch.ones((2, 2, 2), dtype=torch.bool)
    out, passed = apply_gate(pred, "label", torch.tensor([0, 1]), None)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool
    assert not out[0].any() and out[1].all()
    np.testing.assert_array_equal(passed, [False, True])


# --------------------------------------------------------------------------- aggregates
def frame(rows, method="m", task="t", gate="label", seed=0):
    """rows: (case_id, z, label, dice, iou)."""
    return pd.DataFrame(
        [{"task": task, "method": method, "gate": gate, "case_id": c, "z": z, "label": lab,
          "dice": d, "iou": i, "seed": seed, "profile": "smoke", "classifier_p1": 0.5}
         for c, z, lab, d, i in rows]
    )


def test_aggregate_known_values():
    df = frame([("a", 0, 1, 0.5, 0.25), ("a", 1, 1, 1.0, 1.0), ("a", 2, 0, 1.0, 1.0),
                ("b", 0, 1, 0.0, 0.0)])
    agg = aggregate(df)
    assert len(agg) == 1
    r = agg.iloc[0]
    assert (r.n_slices, r.n_pos, r.n_neg, r.n_cases) == (4, 3, 1, 2)
    d = np.array([0.5, 1.0, 1.0, 0.0])
    assert r.dice_mean == pytest.approx(0.625)
    assert r.dice_std == pytest.approx(d.std(ddof=0)) and r.dice_std != pytest.approx(d.std(ddof=1))
    assert r.dice_pos_mean == pytest.approx(0.5)
    assert r.dice_pos_std == pytest.approx(np.std([0.5, 1.0, 0.0]))
    assert r.dice_case_mean == pytest.approx((2.5 / 3 + 0.0) / 2)
    assert r.iou_mean == pytest.approx(2.25 / 4)
    assert r.dice_seed_std == 0.0


def test_aggregate_groups_and_duplicates():
    df = pd.concat([frame([("a", 0, 1, 1.0, 1.0)], method="x"),
                    frame([("a", 0, 1, 0.0, 0.0)], method="y"),
                    frame([("a", 0, 1, 0.0, 0.0)], method="y", gate="none")])
    agg = aggregate(df)
    assert list(zip(agg.method, agg.gate)) == [("x", "label"), ("y", "label"), ("y", "none")]
    with pytest.raises(UserError, match="twice"):
        aggregate(pd.concat([df, df]))


def test_aggregate_seed_spread():
    df = pd.concat([frame([("a", 0, 1, 1.0, 1.0)], seed=0), frame([("a", 0, 1, 0.5, 0.5)], seed=1)])
    r = aggregate(df).iloc[0]
    assert r.n_seeds == 2 and r.dice_mean == pytest.approx(0.75)
    assert r.dice_seed_std == pytest.approx(0.25)


def test_bootstrap_deterministic_and_brackets_mean():
    rng = np.random.default_rng(1)
    rows = [(f"c{c}", z, 1, float(rng.random()), 0.0) for c in range(12) for z in range(rng.integers(1, 6))]
    df = frame(rows)
    lo, hi = bootstrap_ci(df, 500, seed=7)
    assert (lo, hi) == bootstrap_ci(df, 500, seed=7)
    assert (lo, hi) != bootstrap_ci(df, 500, seed=8)
    assert lo < df.dice.mean() < hi
    one = frame([("a", 0, 1, 0.3, 0.0), ("a", 1, 1, 0.5, 0.0)])
    assert bootstrap_ci(one, 50, seed=0) == pytest.approx((0.4, 0.4))
    agg = aggregate(df, ci_resamples=200)
    assert agg.dice_ci_lo.iloc[0] < agg.dice_mean.iloc[0] < agg.dice_ci_hi.iloc[0]


# --------------------------------------------------------------------------- tests
def test_holm():
    adj = holm([0.01, 0.04, 0.03, np.nan])
    # sorted 0.01, 0.03, 0.04 with m = 3: 0.03, max(0.03, 0.06), max(0.06, 0.04)
    np.testing.assert_allclose(adj[:3], [0.03, 0.06, 0.06])
    assert np.isnan(adj[3])
    assert holm([0.9, 0.8]).tolist() == [1.0, 1.0]


def paired_frame(n_cases, methods):
    rows = []
    for m, offset in methods.items():
        for c in range(n_cases):
            rows.append(frame([(f"c{c}", 0, 1, min(1.0, 0.1 * c / n_cases + offset), 0.0)], method=m))
    return pd.concat(rows, ignore_index=True)


def test_compare_to_wilcoxon_and_holm():
    from scipy.stats import wilcoxon

    df = paired_frame(8, {"CLDF": 0.5, "a": 0.2, "b": 0.45})
    df.loc[(df.method == "b") & (df.case_id == "c3"), "dice"] = 0.9  # not all the same sign
    out = compare_to(df, "CLDF")
    assert list(out.method) == ["a", "b"] and (out.n_cases == 8).all()
    ref = df[df.method == "CLDF"].dice.to_numpy()
    raw = [wilcoxon(df[df.method == m].dice.to_numpy(), ref).pvalue for m in ("a", "b")]
    np.testing.assert_allclose(out.p, raw)
    np.testing.assert_allclose(out.p_holm, holm(raw))


def test_compare_to_na_below_six_cases():
    df = paired_frame(5, {"CLDF": 0.5, "a": 0.2})
    out = compare_to(df, "CLDF")
    assert np.isnan(out.p.iloc[0]) and out.note.iloc[0].startswith("n/a")
    out = compare_to(paired_frame(6, {"CLDF": 0.5, "a": 0.2}), "CLDF")
    assert out.p.iloc[0] < 0.05


def test_classifier_gate_stats():
    df = frame([("a", 0, 1, 1, 1), ("a", 1, 1, 1, 1), ("a", 2, 0, 1, 1), ("b", 0, 0, 1, 1)])
    df["classifier_p1"] = [0.9, 0.4, 0.3, 0.6]
    r = classifier_gate_stats(df).iloc[0]
    assert r.auc == pytest.approx(0.75) and r.sensitivity == 0.5 and r.specificity == 0.5
