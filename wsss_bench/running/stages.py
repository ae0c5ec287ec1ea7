"""The stages of one cell: what computes its numbers, and nothing else.

    prepare sources -> maps (per source, test split) -> prepare refiner -> refine -> gate -> score
    -> pseudo-masks (training-split mask and seed quality, for the manifest)

Each stage is a small function of the cell's :class:`CellState`.  Everything a stage trains or
computes goes through the context (``ctx.plugin``, ``ctx.maps``, ``ctx.shared_model``,
``ctx.artifact``), so cells that share a trained model or a source's maps reuse them.  A new
stage is one function added to :data:`CELL_STAGES`.

This module (with the project modules it imports) is the runner's part of a cell's identity
(:func:`wsss_bench.running.runner.cell_identity`): the run folder, the manifest, progress and
reporting live elsewhere, so editing them never makes a finished cell recompute.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from wsss_bench.boundary import score_cell
from wsss_bench.cache import stable_hash
from wsss_bench.context import RunContext
from wsss_bench.errors import PluginError, UserError
from wsss_bench.lazy import pd, torch
from wsss_bench.metrics import apply_gate, dice_iou
from wsss_bench.nn.classifier import get_classifier, predict_p1
from wsss_bench.quality import MODEL_RECORD, mask_agreement, model_quality, rule_masks, seed_quality

GATES = ("label", "classifier", "none")


@dataclass
class CellState:
    """What the stages of one cell hand each other."""

    ctx: RunContext
    cell: Cell
    profile: Any
    sources: tuple = ()
    maps: tuple = ()
    refiner: Any = None
    test: Any = None
    pred: Any = None
    #: softmax p(1) of the task's CAM classifier per test slice (gate=classifier, and a column)
    p1: Any = None
    #: gate -> (gated masks, gate pass per slice)
    gated: dict[str, tuple] = field(default_factory=dict)
    frame: Any = None
    #: names of the trained models the maps and masks came from (made before the gate)
    map_models: list = field(default_factory=list)
    #: training-split pseudo-mask and seed quality (the manifest's ``pseudo_masks``)
    pseudo: dict = field(default_factory=dict)


def stage_prepare_sources(st: CellState) -> None:
    """Each map source, bound and prepared (trains what it needs; shared across cells)."""
    st.sources = tuple(st.ctx.plugin("cams", spec) for spec in st.cell.source_specs)


def stage_maps(st: CellState) -> None:
    """Each source's maps on the test slices (cached per source: shared by every cell using it)."""
    st.test = st.ctx.data.split("test")
    st.maps = tuple(st.ctx.maps(source, "test") for source in st.sources)


def stage_prepare_refiner(st: CellState) -> None:
    st.refiner = st.ctx.plugin("refiners", st.cell.refiner_spec, sources=st.sources)


def stage_refine(st: CellState) -> None:
    """Masks for every test slice (before any gate)."""
    ctx, refiner = st.ctx, st.refiner
    size = int(ctx.data.image_size)
    bs = int(st.profile.classifier.batch)
    pred = np.zeros((len(st.test), size, size), dtype=bool)
    pos = 0
    with ctx.stage(f"refine/{st.cell.refiner_spec}"), ctx.acting(refiner):
        for batch in ctx.data.batches(st.test, bs, device=ctx.device):
            maps = tuple(torch.from_numpy(np.array(m[pos:pos + len(batch)])).to(ctx.device) for m in st.maps)
            masks = refiner.refine(batch, maps, st.sources)
            if tuple(masks.shape) != (len(batch), size, size):
                raise PluginError(f"refiner '{refiner.name}' returned masks of shape {tuple(masks.shape)}; "
                                  f"expected {(len(batch), size, size)}")
            pred[pos:pos + len(batch)] = masks.bool().cpu().numpy()
            pos += len(batch)
    st.pred = pred


def stage_gate(st: CellState) -> None:
    """Blank predictions per gate: label (true image label), classifier (its p(1) >= 0.5), none."""
    ctx = st.ctx
    labels = ctx.data.labels[st.test].astype(int)
    st.p1 = classifier_p1(ctx, st.test)
    for gate in GATES:
        st.gated[gate] = apply_gate(st.pred, gate, labels, st.p1)


def stage_score(st: CellState) -> None:
    """Dice, IoU, HD95 and ASSD per test slice and gate, against the test masks (read here only);
    HD95/ASSD of each case volume on its rows (``*_3d``, see :func:`wsss_bench.boundary.score_cell`)."""
    ctx, cell, test = st.ctx, st.cell, st.test
    data = ctx.task_data
    gt = data.masks(test)
    labels = data.labels[test].astype(int)
    p1 = st.p1
    names, counts = np.unique(data.case_ids, return_counts=True)
    spacing = data.spacing[test] if data.spacing is not None else np.ones((len(test), 3))
    boundary = score_cell(st.pred, gt, {gate: st.gated[gate][1] for gate in GATES}, data.case_ids[test],
                          data.z[test], spacing, dict(zip(names.tolist(), counts.tolist())))
    frames = []
    for gate in GATES:
        gated, passed = st.gated[gate]
        dice, iou = dice_iou(gated, gt)
        frames.append(pd.DataFrame({
            "task": cell.task, "method": cell.method, "cam": cell.cam_spec or "", "refiner": cell.refiner_spec,
            "gate": gate, "case_id": data.case_ids[test], "z": data.z[test].astype(int), "split": "test",
            "label": labels, "fg_fraction": data.fg_fraction[test], "gt_area": gt.reshape(len(test), -1).sum(1),
            "pred_area": np.asarray(gated).reshape(len(test), -1).sum(1), "gate_pass": passed,
            "classifier_p1": p1, "dice": dice, "iou": iou, **boundary[gate], "seed": cell.seed,
            "params": json.dumps({"sources": {n: dict(p) for n, p in cell.sources},
                                  "refiner": dict(cell.refiner_params)}, default=str),
        }))
    st.frame = pd.concat(frames, ignore_index=True)


def stage_pseudo_masks(st: CellState) -> None:
    """Quality of the training-split pseudo-masks, after the method: each map source's masks
    (its own rule) and the refiner's training seeds against the training masks, over the
    positive training slices.  The masks are read here, by the runner; no plugin sees them."""
    ctx, data = st.ctx, st.ctx.task_data
    train = np.asarray(data.split("train"))
    is_pos = np.asarray(data.labels)[train] == 1  # row i of ctx.maps(source, "train") is train[i]
    pos = train[is_pos]
    out: dict[str, Any] = {"split": "train", "slices": "positive", "n_slices": int(len(pos)),
                           "sources": {}, "seeds": None}
    st.pseudo = out
    if not len(pos):
        return
    refiner = st.refiner
    sources = {s.spec(): s for s in st.sources}
    for name in refiner.implied_sources([s.name for s in st.sources]) if refiner is not None else ():
        source = ctx.plugin("cams", name)  # the instance the refiner added (memoised per spec)
        sources.setdefault(source.spec(), source)
    with ctx.stage("pseudo-masks"):
        gt = np.asarray(data.masks(pos)).astype(bool)
        for spec, source in sources.items():
            maps = ctx.maps(source, "train")  # what the method wrote (cached), else made once here
            out["sources"][spec] = {"rule": source.mask_rule,
                                    **mask_agreement(rule_masks(np.asarray(maps)[is_pos], source.mask_rule), gt)}
        seeds = getattr(refiner, "train_seeds", lambda: None)()
        if seeds is not None:
            out["seeds"] = _seed_report(st, seeds, train)


def _seed_report(st: CellState, seeds: tuple, train: Any) -> dict[str, Any]:
    rows, fg, bg = (np.asarray(a) for a in seeds)
    name = getattr(st.refiner, "name", "?")
    size = int(st.ctx.data.image_size)
    if fg.shape != (len(rows), size, size) or bg.shape != fg.shape:
        raise PluginError(f"refiner '{name}': train_seeds() returned fg {fg.shape} and bg {bg.shape} for "
                          f"{len(rows)} rows; expected ({len(rows)}, {size}, {size}) each")
    if not np.isin(rows, train).all():
        raise PluginError(f"refiner '{name}': train_seeds() names rows outside the training split")
    data = st.ctx.task_data
    gt = np.asarray(data.masks(rows)).astype(bool)
    tissue = (np.asarray(data.images(rows)) != 0).any(axis=1)
    return {"n_slices": int(len(rows)), **seed_quality(fg.astype(bool), bg.astype(bool), gt, tissue)}


#: the stages of a cell, in order
CELL_STAGES: tuple[tuple[str, Callable[[CellState], None]], ...] = (
    ("prepare sources", stage_prepare_sources),
    ("maps", stage_maps),
    ("prepare refiner", stage_prepare_refiner),
    ("refine", stage_refine),
    ("gate", stage_gate),
    ("score", stage_score),
    ("pseudo-masks", stage_pseudo_masks),
)


def check_scorable(ctx: RunContext) -> None:
    """Before any training: the test split must hold slices to score.  The test negatives are
    drawn in proportion to the positives, so test cases without a positive
    slice leave the split empty."""
    data = ctx.task_data
    if len(data.split("test")) == 0:
        cases = list(data.case_split.get("test", []))
        names = ", ".join(cases[:4]) + (", ..." if len(cases) > 4 else "")
        raise UserError(f"task '{ctx.task.task_id}': the test case(s) {names} under {data.data_root} hold no "
                        f"positive slice, so the test split, whose negatives are drawn "
                        f"in proportion to its positives, is empty and nothing can be scored; use data whose "
                        f"test cases contain the target, more cases, or another --seed (another case split)")


def compute_cell(ctx: RunContext, cell: Any, profile: Any) -> tuple[CellState, dict[str, Any]]:
    """Run the stages of one cell; returns its final state (``state.frame``: per-slice rows for
    every gate; ``state.pred``: the masks before gating) and the info for its manifest."""
    check_scorable(ctx)
    st = CellState(ctx, cell, profile)
    for name, stage in CELL_STAGES:
        if name == "gate":  # the models made so far are the ones the maps and masks come from
            st.map_models = [k[len(MODEL_RECORD):] for k in ctx.log.records if k.startswith(MODEL_RECORD)]
        stage(st)
    log = ctx.log
    classifier = gate_stats(ctx.data.labels[st.test], st.p1)
    info = {"artifacts": list(dict.fromkeys(log.used)), "records": dict(log.records),
            "base_seed": ctx.base_seed, "derived_seeds": dict(log.seeds),
            "classifier_gate": classifier,
            "model_quality": model_quality(log.records, classifier, st.map_models),
            "pseudo_masks": st.pseudo,
            "thresholds": {"cam": profile.common.cam_threshold, "otsu_bins": profile.common.otsu_bins},
            "stage_list": [name for name, _ in CELL_STAGES]}
    return st, info


def classifier_p1(ctx: RunContext, idx) -> Any:
    """softmax p(1) of the task's CAM classifier on slices ``idx`` (gate=classifier), cached."""
    model = get_classifier(ctx)
    key = ctx.shared_model_key("classifier")
    rows = np.asarray(idx)

    def build(work: Path) -> dict:
        bs = int(ctx.profile.classifier.batch)
        p1 = np.asarray(predict_p1(model, ctx.data.batches(rows, bs, device=ctx.device)))
        np.save(work / "p1.npy", p1.astype(np.float64))
        return {}

    built = ctx.artifact("classifier-p1", "cam-classifier", build,
                         params={"rows": stable_hash(rows.tolist(), 16)}, upstream=[key])
    return np.load(built.path / "p1.npy")


def gate_stats(labels, p1) -> dict[str, float | None]:
    """Test AUC, sensitivity and specificity of gate=classifier (reported next to the tables)."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    pred = np.asarray(p1) >= 0.5
    auc = float(roc_auc_score(labels, p1)) if len(set(labels.tolist())) == 2 else None
    pos, neg = labels == 1, labels == 0
    return {"auc": auc,
            "sensitivity": float(pred[pos].mean()) if pos.any() else None,
            "specificity": float((~pred[neg]).mean()) if neg.any() else None}


