"""Model quality and pseudo-mask quality in the reports: the marks, their footnotes and two tables.

The numbers come from each finished cell's record (``model_quality`` and ``pseudo_masks``,
written by the runner; :func:`wsss_bench.running.rundir.cell_quality` reads them):

- a row is marked :data:`QUALITY_MARK` when one of the models its maps come from stopped at its
  step cap while still improving, or when the CAM classifier its maps come from (or that gates
  it, gate=classifier) has test AUC < 0.9; the footnote says which and why;
- :func:`model_quality_table`: per task and method, the CAM classifier's test AUC, sensitivity
  and specificity and every trained model's stop reason;
- :func:`seeds_table` (``report --table seeds``): precision, recall and Dice of each map
  source's training-split masks and of the refiner's fg / bg seeds against the training
  masks, over the positive training slices, and the share of bg seeds inside the tissue.

Runs recorded before these diagnostics existed simply have no marks and no rows here.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from wsss_bench.interfaces import ReportTable
from wsss_bench.quality import row_flags
from wsss_bench.reporting.format import MISSING, _finite
from wsss_bench.reporting.layout import DEFAULT_TASK_LABELS, QUALITY_MARK
from wsss_bench.running import rundir

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd


def _num(x: Any, digits: int = 3) -> str:
    return f"{float(x):.{digits}f}" if x is not None and _finite(float(x)) else MISSING


class QualityIndex:
    """The quality records of a set of runs, keyed by (task, method, seed)."""

    def __init__(self, records: Mapping[tuple[str, str, Any], Mapping[str, Any]] | None = None) -> None:
        self.records = dict(records or {})

    @classmethod
    def of(cls, source: "str | os.PathLike | Sequence[Mapping[str, Any]] | QualityIndex | None") -> "QualityIndex":
        """From a run folder, loaded manifests, an index (returned as is) or None (empty)."""
        if isinstance(source, QualityIndex):
            return source
        if source is None:
            return cls()
        return cls(rundir.cell_quality(source))

    def __bool__(self) -> bool:
        return bool(self.records)

    def _of(self, method: str, task: str) -> list[tuple[Any, Mapping[str, Any]]]:
        return [(k[2], v) for k, v in sorted(self.records.items(), key=lambda kv: str(kv[0]))
                if k[0] == task and k[1] == method]

    def flags(self, method: str, task: str, gate: str) -> list[str]:
        """Why the row of ``method`` on ``task`` at ``gate`` is marked (over its seeds; empty: not)."""
        found = self._of(method, task)
        out: list[str] = []
        for seed, rec in found:
            for flag in row_flags(rec.get("model_quality"), gate):
                text = f"{flag} (seed {seed})" if len(found) > 1 else flag
                if text not in out:
                    out.append(text)
        return out

    def row_facts(self, method: str, task: str, gate: str) -> dict[str, Any]:
        """Tidy columns for a row (CSV): classifier stats (mean over seeds), stop reasons, flags."""
        found = self._of(method, task)
        if not found:
            return {}
        stats: dict[str, list[float]] = {"auc": [], "sensitivity": [], "specificity": []}
        reasons: dict[str, str] = {}
        for _, rec in found:
            mq = rec.get("model_quality") or {}
            for k in stats:
                v = (mq.get("classifier") or {}).get(k)
                if v is not None:
                    stats[k].append(float(v))
            for name in mq.get("map_models") or []:
                reason = str(((mq.get("models") or {}).get(name) or {}).get("stop_reason", "unknown"))
                reasons[name] = reason if reasons.get(name, reason) == reason else f"{reasons[name]} / {reason}"
        out = {f"classifier_{k}": (sum(v) / len(v) if v else float("nan")) for k, v in stats.items()}
        out["stop_reasons"] = "; ".join(f"{n}: {r}" for n, r in sorted(reasons.items()))
        out["quality_flags"] = "; ".join(self.flags(method, task, gate))
        return out

    def task_summary(self, task: str, methods: Iterable[str]) -> str:
        """One line for a bench table's footer: the task's CAM classifier test stats and the stop
        reason of every model behind ``methods`` (per seed where seeds differ)."""
        clf: dict[str, str] = {}
        stops: dict[str, set[str]] = {}
        wanted = set(methods)
        for (t, m, seed), rec in sorted(self.records.items(), key=lambda kv: str(kv[0])):
            if t != task or m not in wanted:
                continue
            mq = rec.get("model_quality") or {}
            c = mq.get("classifier") or {}
            if c:
                clf[str(seed)] = (f"AUC {_num(c.get('auc'))}, sensitivity {_num(c.get('sensitivity'), 2)}, "
                                  f"specificity {_num(c.get('specificity'), 2)}")
            for name, r in (mq.get("models") or {}).items():
                stops.setdefault(name, set()).add(str((r or {}).get("stop_reason", "unknown")))
        if not clf and not stops:
            return ""
        label = DEFAULT_TASK_LABELS.get(task, task)
        stats = "; ".join(f"seed {k}: {v}" for k, v in clf.items()) if len(set(clf.values())) > 1 \
            else next(iter(clf.values()), MISSING)
        reasons = ", ".join(f"{n} {'/'.join(sorted(r))}" for n, r in sorted(stops.items())) or MISSING
        return f"{label}: CAM classifier test {stats}; stop reasons: {reasons}."

    def footnote(self, marked: Iterable[tuple[str, str, Sequence[str]]]) -> str:
        """The table note for the marked rows (:func:`footnote`)."""
        return footnote(marked)


def footnote(marked: Iterable[tuple[str, str, Sequence[str]]], labels: Mapping[str, str] | None = None) -> str:
    """The table note for the marked rows: (task, method, flags) each."""
    labels = {**DEFAULT_TASK_LABELS, **(labels or {})}
    parts = [f"{labels.get(t, t)} {m}: {', '.join(f)}" for t, m, f in marked if f]
    if not parts:
        return ""
    return (f"{QUALITY_MARK}: a model behind this row is in doubt (classifier test AUC < 0.9, or a model stopped "
            f"at its step cap while still improving; see report --table quality): " + "; ".join(parts) + ".")


# --------------------------------------------------------------------------- tables
def _keys(index: QualityIndex, df: "pd.DataFrame | None") -> list[tuple[str, str, Any]]:
    keys = list(index.records)
    if df is not None and len(df):
        shown = set(zip(df["task"].astype(str), df["method"].astype(str)))
        keys = [k for k in keys if (k[0], k[1]) in shown]
    return sorted(keys, key=lambda k: (k[0], k[1], str(k[2])))


def model_quality_table(index: QualityIndex, df: "pd.DataFrame | None" = None) -> ReportTable | None:
    """Per task, method and seed: the CAM classifier's test stats and the models' stop reasons."""
    import pandas as pd

    keys = _keys(index, df)
    if not keys:
        return None
    rows, records = [], []
    for task, method, seed in keys:
        mq = index.records[(task, method, seed)].get("model_quality") or {}
        clf = mq.get("classifier") or {}
        models = mq.get("models") or {}
        used = set(mq.get("map_models") or [])
        stops = "; ".join(f"{n}: {(models[n] or {}).get('stop_reason', 'unknown')}" + ("" if n in used else " (gate)")
                          for n in sorted(models)) or MISSING
        flags = list(mq.get("flags") or [])
        rows.append([method, DEFAULT_TASK_LABELS.get(task, task), str(seed),
                     *(_num(clf.get(k)) for k in ("auc", "sensitivity", "specificity")), stops,
                     QUALITY_MARK if flags else ""])
        records.append({"task": task, "method": method, "seed": seed,
                        **{f"classifier_{k}": clf.get(k) for k in ("auc", "sensitivity", "specificity")},
                        "stop_reasons": stops, "map_models": ",".join(sorted(used)), "flags": "; ".join(flags)})
    note = ("Classifier: the task's CAM classifier on the test slices (AUC of softmax p(1); sensitivity and "
            "specificity of p(1) >= 0.5). Stop reasons: converged (no validation improvement for the rule's "
            "patience), cap on a plateau, cap while improving (marked), fixed steps (no validation criterion); "
            "(gate): used only by gate=classifier. "
            f"{QUALITY_MARK}: classifier test AUC < 0.9 or a model stopped at its cap while still improving.")
    return ReportTable(title="Model quality (the models each row's maps come from)",
                       header=["Method", "Task", "Seed", "AUC", "sensitivity", "specificity", "stop reasons", "mark"],
                       rows=rows, footer=note, raw=pd.DataFrame.from_records(records))


def _seed_row(method: str, task: str, seed: Any, what: str, rule: str, rec: Mapping[str, Any],
              tissue: Any = None) -> list[str]:
    return [method, DEFAULT_TASK_LABELS.get(task, task), str(seed), what, rule, str(rec.get("slices", MISSING)),
            _num(rec.get("precision")), _num(rec.get("recall")), _num(rec.get("dice")),
            _num(tissue) if tissue is not None else MISSING]


def seeds_table(index: QualityIndex, df: "pd.DataFrame | None" = None) -> ReportTable:
    """``report --table seeds``: training-split pseudo-mask and seed quality of every cell."""
    import pandas as pd

    rows, records = [], []
    for task, method, seed in _keys(index, df):
        pm = index.records[(task, method, seed)].get("pseudo_masks") or {}
        entries: list[tuple[str, str, Mapping[str, Any], Any]] = []
        for spec, rec in sorted((pm.get("sources") or {}).items()):
            rule = {"cam": "min-max > 0.5", "otsu": "Otsu"}.get(rec.get("rule"), str(rec.get("rule")))
            entries.append((f"{spec} masks", rule, rec, None))
        seeds = pm.get("seeds")
        if seeds:
            entries.append(("fg seeds", "vs target", seeds.get("fg") or {}, None))
            entries.append(("bg seeds", "vs background", seeds.get("bg") or {}, seeds.get("bg_tissue_share")))
        for what, rule, rec, tissue in entries:
            rows.append(_seed_row(method, task, seed, what, rule, rec, tissue))
            records.append({"task": task, "method": method, "seed": seed, "masks": what, "rule": rule,
                            **{k: rec.get(k) for k in ("slices", "tp", "pred", "gt", "precision", "recall", "dice",
                                                       "dice_slice_mean")},
                            "bg_tissue_share": tissue})
    note = ("Training split, positive slices only, pixels pooled over the slices: precision = |P∩G|/|P|, "
            "recall = |P∩G|/|G|, Dice = 2|P∩G|/(|P|+|G|), G the training mask (for bg seeds: its complement, "
            "the background). Masks: each map source by its own rule; seeds: the refiner's training seeds. "
            "bg in tissue: share of the bg seeds on non-zero input pixels. Computed by the runner after the "
            "method; no method sees a mask.")
    if not rows:
        note = "No cell of these runs recorded pseudo-mask quality (runs made before it existed). " + note
    return ReportTable(title="Pseudo-mask quality on the training split",
                       header=["Method", "Task", "Seed", "Masks", "Rule", "Slices", "precision", "recall", "Dice",
                               "bg in tissue"],
                       rows=rows, footer=note, raw=pd.DataFrame.from_records(records, columns=[
                           "task", "method", "seed", "masks", "rule", "slices", "tp", "pred", "gt", "precision",
                           "recall", "dice", "dice_slice_mean", "bg_tissue_share"]))
