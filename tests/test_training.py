"""wsss_bench.nn.training, the one training loop: its convergence rule on toy curves, and a
killed training that resumes from its checkpoint bit-identical."""
from __future__ import annotations

import json

import pytest
import torch

from wsss_bench.nn import training as tr
from wsss_bench.plugins import load_plugins
from wsss_bench.running.runner import RunConfig, Session


class Toy(torch.nn.Module):
    """One parameter; step ``it`` sets it to ``it + 1``, so kept weights name their step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


def run(tmp_path, values, cap, every=1, patience=3, delta=0.01, higher=True, ties=None, progress=None, name="a"):
    """Train the toy for at most ``cap`` steps; the criterion at step s is values[s // every - 1]."""
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step(it):
        with torch.no_grad():
            model.w.fill_(it + 1)
        return float(100 - it)  # a training loss that falls

    def evaluate(m):
        k = int(m.w.item()) // every - 1
        return values[k], (None if ties is None else ties[k])

    crit = tr.Criterion("toy", evaluate, higher_is_better=higher)
    rule = tr.ConvergenceRule(every, patience, delta, 0.01)
    return tr.run_resumable(tmp_path / name, model, opt, cap, step, progress=progress, criterion=crit, rule=rule)


def reference(values, cap, every, patience, delta, higher=True):
    """Naive re-statement of the rule: (stop step, kept step, reason)."""
    best, kept, since = None, None, 0
    for k in range(cap // every):
        v = values[k]
        better = best is None or (v > best + delta if higher else v < best - delta * abs(best))
        if better:
            best, kept, since = v, (k + 1) * every, 0
        else:
            since += 1
        if since >= patience:
            return (k + 1) * every, kept, "converged"
    last = (cap // every) * every
    return last, kept, "cap while improving" if kept == last else "cap on a plateau"


def test_stops_on_a_plateau_and_keeps_the_best_weights(tmp_path):
    values = [0.5, 0.7, 0.8, 0.85, 0.855, 0.86, 0.80, 0.9, 0.9, 0.9]  # +0.005 steps are not "by more than delta"
    weights, info = run(tmp_path, values, cap=40, every=2, patience=3)
    conv = info["convergence"]
    stop, kept, reason = reference(values, 40, 2, 3, 0.01)
    assert (conv["steps"], conv["kept_step"], conv["stop_reason"]) == (stop, kept, reason) == (14, 8, "converged")
    assert info["iterations"] == 14 and conv["cap"] == 40
    assert weights["w"].item() == 8.0  # the kept step's weights, not the last
    assert [p[0] for p in conv["curve"]] == [2, 4, 6, 8, 10, 12, 14]
    assert [p[2] for p in conv["curve"]] == values[:7]
    assert conv["curve"][0][1] == pytest.approx((100 + 99) / 2)  # mean training loss since the last evaluation


def test_stops_at_the_cap_while_improving(tmp_path):
    values = [0.1 * k for k in range(1, 11)]
    weights, info = run(tmp_path, values, cap=10)
    conv = info["convergence"]
    assert (conv["steps"], conv["kept_step"], conv["stop_reason"]) == (10, 10, "cap while improving")
    assert reference(values, 10, 1, 3, 0.01) == (10, 10, "cap while improving")
    assert weights["w"].item() == 10.0


def test_stops_at_the_cap_on_a_plateau(tmp_path):
    values = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.8, 0.8]
    weights, info = run(tmp_path, values, cap=10, patience=3)
    conv = info["convergence"]
    assert (conv["steps"], conv["kept_step"], conv["stop_reason"]) == (10, 8, "cap on a plateau")
    assert reference(values, 10, 1, 3, 0.01) == (10, 8, "cap on a plateau")
    assert weights["w"].item() == 8.0


def test_a_loss_criterion_uses_a_relative_delta(tmp_path):
    values = [5.0, 4.0, 3.0, 2.99, 2.98, 2.0, 1.999, 1.998, 1.997, 1.5]
    _, info = run(tmp_path, values, cap=10, higher=False, patience=3, delta=0.01)
    conv = info["convergence"]
    assert reference(values, 10, 1, 3, 0.01, higher=False) == (9, 6, "converged")
    assert (conv["steps"], conv["kept_step"], conv["stop_reason"]) == (9, 6, "converged")


def test_the_tie_break_lets_a_lower_loss_win_at_equal_auc(tmp_path):
    values = [0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    ties = [0.5, 0.4, 0.2, 0.1, 0.0999, 0.0998, 0.0997, 0.0996]
    weights, info = run(tmp_path, values, cap=8, ties=ties, patience=3)
    conv = info["convergence"]
    assert (conv["kept_step"], conv["steps"], conv["stop_reason"]) == (4, 7, "converged")
    assert weights["w"].item() == 4.0


def test_an_undefined_criterion_never_wins_and_never_counts(tmp_path):
    _, info = run(tmp_path, [None] * 6, cap=6, patience=2)
    conv = info["convergence"]
    assert conv["stop_reason"] == "cap, criterion undefined" and conv["kept_step"] is None and conv["steps"] == 6


def test_resume_after_a_kill_ends_identically_and_the_record_reads_back(tmp_path):
    values = [0.5, 0.7, 0.8, 0.85, 0.855, 0.86, 0.80, 0.9, 0.9, 0.9]
    w_full, full = run(tmp_path, values, cap=40, every=2, patience=3, name="full")
    seen = []

    def killing(n):
        seen.append(n)
        if sum(seen) >= 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, values, cap=40, every=2, patience=3, progress=killing, name="cut")
    w_res, resumed = run(tmp_path, values, cap=40, every=2, patience=3, name="cut")
    assert resumed["resumed_from"] == 8 and w_res["w"].item() == w_full["w"].item()
    assert resumed["convergence"]["curve"] == full["convergence"]["curve"]
    assert resumed["convergence"]["stop_reason"] == full["convergence"]["stop_reason"]

    (tmp_path / "toy.train.json").write_text(json.dumps(full))
    (tmp_path / "cdm.train.json").write_text(json.dumps({"iterations": 3, "convergence": None}))
    rec = tr.convergence_of(tmp_path)
    assert list(rec) == ["toy"] and rec["toy"]["stop_reason"] == "converged" and rec["toy"]["kept_step"] == 8


def test_rule_from_profile_reads_k_patience_and_deltas():
    from wsss_bench.profiles import load_profile

    for name in ("smoke", "cpu", "paper"):
        prof = load_profile(name)
        rule = tr.rule_from_profile(prof, prof.classifier, "score", default_every=999)
        assert rule.every == prof.classifier.eval_every and rule.patience == prof.convergence.patience
        assert rule.delta == prof.convergence.delta_score and rule.delta_tie == prof.convergence.delta_loss
        assert tr.rule_from_profile(prof, prof.fsl, "loss", 1).delta == prof.convergence.delta_loss
    with pytest.raises(ValueError):
        tr.ConvergenceRule(0, 3, 0.1)


def test_auc_and_loss_match_sklearn():
    from sklearn.metrics import log_loss, roc_auc_score

    y = [0, 1, 1, 0, 1]
    p = [0.2, 0.9, 0.4, 0.5, 0.7]
    auc, loss = tr.auc_and_loss(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p)) and loss == pytest.approx(log_loss(y, p))
    assert tr.auc_and_loss([1, 1], [0.5, 0.9])[0] is None


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
