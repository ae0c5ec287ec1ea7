"""What a ``bench`` or ``run`` would do, and about how long it would take, without training.

:func:`make_plan` lists the phase-1 units (gate classifiers, map sources, refiners) and the
cells of a command, in the order the command runs them, and says for each whether it is
cached:

- a **unit** is probed with a dry artifact cache (:class:`DryCache`): it runs the unit's
  preparation, every artifact it finds is a hit, and the first artifact it would have to
  build stops it (:class:`WouldBuild`, a ``BaseException`` so no plugin's ``except
  Exception`` swallows it).  Nothing is trained, nothing is written to the cache;
- a **cell** is cached when the identity stored in the run folder (:mod:`rundir`) matches
  its identity now, the same test the command itself makes before it skips a cell.

Like the command, the plan leaves out the units of cells that are already finished in the run
folder (:func:`~wsss_bench.running.bench.finished_cells`), and it charges a unit for the
expensive shared model its refiner's feature backbone would train (the CDM behind CLDF's
diffusion features) when no earlier unit builds it: a probe stops at a unit's *first* missing
artifact, which for CLDF is its seeds' source, not the backbone.

Each uncached item gets an estimate from :data:`COSTS`, seconds per unit or cell measured on
the cpu profile on this project's 2-core reference machine (one thread per worker), scaled
to the command's profile by :func:`scale` and to the threads each worker gets by
:func:`thread_factor`.  The plan reads the data of every task (it needs the cells'
identities), so a cold data cache is prepared first.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from wsss_bench.cache import ArtifactCache, Built
from wsss_bench.profiles import load_profile
from wsss_bench.running.bench import build_unit, finished_cells, shared_units
from wsss_bench.running.runner import Session
from wsss_bench.spec import parse_specs

#: cpu-profile seconds per item, one thread: ``kind:plugin`` -> (seconds, knobs the cost
#: scales with).  Measured in the cold cpu bench of Tables 1-3 + Fig. 4 with the convergence
#: rule (the mean ``seconds`` of each kind of unit and cell in its manifest; 2-core machine, 2
#: one-thread workers; results/README.md).  A trained model stops by its rule, mostly before
#: its cap, so its cost is scaled by the cap only as an upper bound.  ``refiner:cldf`` includes
#: its seeds and a share of the task's feature cache; ``maps:<plugin>`` is a source whose model
#: is cached and whose test maps are not; ``trainmaps:<plugin>`` is the training-split maps a
#: cell's pseudo-mask stage computes once per (task, source) when they are not cached yet (only
#: the slow sources are listed; the others take about a second).
COSTS: dict[str, tuple[float, tuple[str, ...]]] = {
    "gate:": (89.1, ("classifier.epochs",)),
    "source:cdm": (1143.0, ("cdm.iterations", "cdm.batch")),
    "source:dig": (93.0, ("dig.epochs",)),
    "source:mg": (445.0, ("noisy_classifier.iterations", "mg.t_ref")),
    "source:amecam": (246.0, ("amecam.stage1_epochs",)),
    "source:seam": (54.5, ("seam.epochs",)),
    "source:scorecam": (24.5, ()),
    "source:gradcam": (0.8, ()),
    "source:gradcampp": (0.3, ()),
    "source:layercam": (0.4, ()),
    "refiner:cldf": (28.3, ("cldf.epochs",)),
    "refiner:fsl": (36.8, ("fsl.iterations",)),
    "refiner:threshold": (0.2, ()),
    "maps:cdm": (150.0, ()),
    "maps:mg": (25.0, ("mg.t_ref",)),
    "trainmaps:cdm": (195.0, ()),
    "trainmaps:scorecam": (48.0, ()),
    "cell:cldf": (6.8, ()),
    "cell:": (1.5, ()),
    # the shared model a refiner's feature backbone trains, when no source unit of the command
    # builds it first: the CDM is source:cdm less its test maps; the UNet encoder's noisy
    # classifier is source:mg less maps:mg; the ResNets' classifiers are the gate's
    "backbone:cdm": (993.0, ("cdm.iterations", "cdm.batch")),
    "backbone:unet-encoder": (420.0, ("noisy_classifier.iterations",)),
    "backbone:resnet18": (89.1, ("classifier.epochs",)),
    "backbone:resnet50": (89.1, ("classifier.epochs",)),
}
#: time of a stage at t torch threads relative to one thread: Amdahl's law with the parallel
#: fraction 0.8 fitted to the 2-thread measurements of benchmarks/results/perf_threads.md (CDM
#: training 0.58, classifier 0.60, noisy classifier 0.60, MG maps 0.53, CDM saliency 0.61 of
#: the 1-thread time); beyond 2 threads it is an extrapolation
PARALLEL_FRACTION = 0.8
#: an unknown plugin (a third party's): this many cpu seconds, flagged in the plan
UNKNOWN_SECONDS = 30.0
REFERENCE_PROFILE = "cpu"


class WouldBuild(BaseException):
    """Raised by :class:`DryCache` at the first artifact that is not cached."""

    def __init__(self, stage: str, key: str) -> None:
        super().__init__(f"{stage} {key[:10]}")
        self.stage, self.key = stage, key


class DryCache(ArtifactCache):
    """An artifact cache that only looks: hits are returned, a miss raises :class:`WouldBuild`."""

    def build(self, stage: str, key: str, builder: Any, describe: dict | None = None) -> Built:
        path = self.lookup(stage, key)
        if path is None or self.force or not self.enabled:
            raise WouldBuild(stage, key)
        self.events.append({"stage": stage, "key": key, "hit": True})
        return Built(path, key, True)


@dataclass
class PlanItem:
    phase: str  # "1.1", "1.2" (shared units) or "2" (cells)
    label: str
    cost_key: str
    cached: bool
    missing: str = ""  # the first artifact stage that would be built
    seconds: float = 0.0  # estimate, 0 when cached
    known: bool = True  # False: no measured cost for this plugin


def _knob(profile: Any, path: str) -> float:
    section, key = path.split(".")
    value = dict(getattr(profile, section))[key]
    return float(len(value)) if isinstance(value, (list, tuple)) else float(value)


def scale(profile: Any, knobs: tuple[str, ...], reference: Any) -> float:
    """Cost factor of ``profile`` vs the reference (cpu) profile: pixels x the knobs' ratios."""
    factor = (float(profile.image_size) / float(reference.image_size)) ** 2
    for k in knobs:
        ref = _knob(reference, k)
        factor *= _knob(profile, k) / ref if ref else 1.0
    return factor


def estimate(cost_key: str, profile: Any, reference: Any) -> tuple[float, bool]:
    """(seconds, known) of one uncached item."""
    if cost_key in COSTS:
        sec, knobs = COSTS[cost_key]
        return sec * scale(profile, knobs, reference), True
    generic = cost_key.split(":")[0] + ":"
    if generic in COSTS and cost_key.startswith("cell:"):
        sec, knobs = COSTS[generic]
        return sec * scale(profile, knobs, reference), True
    return UNKNOWN_SECONDS * scale(profile, (), reference), False


def thread_factor(threads: int) -> float:
    """Wall time at ``threads`` torch threads relative to one thread (:data:`PARALLEL_FRACTION`)."""
    t = max(1, int(threads))
    return (1.0 - PARALLEL_FRACTION) + PARALLEL_FRACTION / t


def worker_threads(jobs: int) -> int:
    """Torch threads each of ``jobs`` local workers gets (the local executor uses this rule)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, int(jobs)))


def _plugin_name(spec: str) -> str:
    return spec.split("[")[0].strip()


@contextmanager
def _quiet() -> Iterator[None]:
    """No stage lines inside: a probe's stages end at their first miss."""
    before = os.environ.get("WSSS_BENCH_NO_PROGRESS")
    os.environ["WSSS_BENCH_NO_PROGRESS"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("WSSS_BENCH_NO_PROGRESS", None)
        else:
            os.environ["WSSS_BENCH_NO_PROGRESS"] = before


def probe_unit(session: Any, unit: Any) -> tuple[str, str]:
    """('', '') if every artifact of ``unit`` is cached, else the (stage, key) it would build first."""
    try:
        with _quiet():
            build_unit(session, unit)
    except WouldBuild as stop:
        return stop.stage, stop.key
    return "", ""


def probe_backbone(session: Any, host: Any, unit: Any) -> tuple[str, str, str]:
    """(backbone name, stage, key) of the model a refiner unit's feature backbone would train
    first, or ('', '', '') when it has no backbone or its models are cached."""
    if unit.kind != "refiner":
        return "", "", ""
    spec = parse_specs(unit.spec)[0]
    try:
        defaults = host.get("refiners", spec.name).params
    except Exception:  # an unknown refiner fails in the unit itself, with its own message
        return "", "", ""
    if "backbone" not in defaults:
        return "", "", ""
    backbone = str(spec.expand()[0].get("backbone", defaults["backbone"]))
    try:
        with _quiet():
            session.context(unit.task, unit.seed).plugin("backbones", backbone)
    except WouldBuild as stop:
        return _plugin_name(backbone), stop.stage, stop.key
    except Exception:  # a bad backbone fails in the unit itself
        return "", "", ""
    return "", "", ""


def make_plan(cfg: Any, host: Any, cells: list) -> list[PlanItem]:
    """Every unit and cell the command would run, cached or not, with estimates."""
    session = Session(cfg, host=host)
    session.cache = DryCache(session.cache.root, enabled=session.cache.enabled, force=session.cache.force)
    finished = {c.key for c in finished_cells(cfg, host, cells, {}, session)}  # the command skips their units
    profile, reference = cfg.load_profile(), load_profile(REFERENCE_PROFILE)
    items: list[PlanItem] = []
    claimed: dict[str, str] = {}  # artifact key -> the unit that builds it first
    fresh: set[tuple[str, int, str]] = set()  # (task, seed, source spec) built by this command
    for level, units in enumerate(shared_units([c for c in cells if c.key not in finished])):
        for u in units:
            missing, art = probe_unit(session, u)
            if missing and art in claimed:  # an earlier unit builds it; this one runs after it
                missing = f"{missing} (built by {claimed[art]})"
            elif missing:
                claimed[art] = u.label
            name = _plugin_name(u.spec)
            key = f"{u.kind}:{name}" if u.kind != "gate" else "gate:"
            if missing.startswith("maps") and f"maps:{name}" in COSTS:
                key = f"maps:{name}"
            item = PlanItem(f"1.{level + 1}", u.label, key, not missing, missing)
            if missing and u.kind == "source":  # no training-split maps yet: the first cell that
                fresh.add((u.task, u.seed, u.spec))  # scores its pseudo-masks computes them
            if missing:
                item.seconds, item.known = estimate(key, profile, reference)
                backbone, stage, art = probe_backbone(session, host, u)
                if art and art not in claimed:  # this unit trains its backbone's model too
                    claimed[art] = u.label
                    item.missing += f" and {stage} (backbone {backbone})"
                    extra, known = estimate(f"backbone:{backbone}", profile, reference)
                    item.seconds, item.known = item.seconds + extra, item.known and known
            items.append(item)
    for c in cells:
        key = f"cell:{_plugin_name(c.refiner_spec)}"
        item = PlanItem("2", f"cell {c.task} {c.method} seed {c.seed}", key, c.key in finished)
        if not item.cached:
            item.seconds, item.known = estimate(key, profile, reference)
            for spec in c.source_specs:
                where = (c.task, c.seed, spec)
                if where in fresh and f"trainmaps:{_plugin_name(spec)}" in COSTS:
                    item.seconds += estimate(f"trainmaps:{_plugin_name(spec)}", profile, reference)[0]
                fresh.discard(where)
        items.append(item)
    return items


def render(items: list[PlanItem], jobs: int = 1, threads: int = 1) -> list[str]:
    """Plain lines: one per item, then the totals (worker time, and wall time at ``jobs``
    workers of ``threads`` torch threads each; the items' estimates are one-thread times)."""
    lines = []
    speed = thread_factor(threads)
    items = [PlanItem(it.phase, it.label, it.cost_key, it.cached, it.missing, it.seconds * speed, it.known)
             for it in items]
    for it in items:
        if it.cached:
            status = "cached"
        else:
            what = f"to build from {it.missing}, " if it.missing else "to run, "
            status = f"{what}~{_dur(it.seconds)}" + ("" if it.known else " (no measured cost: a guess)")
        lines.append(f"[{it.phase}] {it.label}: {status}")
    todo = [it for it in items if not it.cached]
    total = sum(it.seconds for it in todo)
    wall = 0.0
    for phase in sorted({it.phase for it in items}):  # phases run one after the other
        part = [it.seconds for it in todo if it.phase == phase]
        if part:
            wall += max(sum(part) / max(1, jobs), max(part))
    lines.append(f"{len(items)} item(s): {len(items) - len(todo)} cached, {len(todo)} to run; estimated "
                 f"{_dur(total)} of worker time, about {_dur(wall)} wall with {jobs} worker(s) of {threads} "
                 f"thread(s)")
    return lines


def _dur(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["COSTS", "DryCache", "WouldBuild", "PlanItem", "make_plan", "probe_unit", "probe_backbone", "render", "scale",
           "estimate", "thread_factor", "worker_threads"]
