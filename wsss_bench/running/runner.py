"""Runs cells.  A cell = task x map sources x refiner (with its backbone) x seed.

The cell's computation is :mod:`wsss_bench.running.stages`; this module plans cells, decides
whether a finished cell can be reused, and keeps the per-process state (:class:`Session`,
:class:`CellJob`).

Per-cell results are written atomically to ``<out>/cells/<key>.parquet`` with the cell's
identity (everything that changes its numbers: resolved profile, data fingerprint, phantom
seed, bf16, device type, each plugin's version and code, the code of the stages).  A re-run
skips a finished cell only when the identity matches; otherwise it recomputes it.
"""
from __future__ import annotations

import itertools
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from wsss_bench import integrity
from wsss_bench.cache import ArtifactCache, closure_hash, stable_hash
from wsss_bench.context import RunContext, peak_rss_mb, resolve_device
from wsss_bench.data import taskdata
from wsss_bench.errors import PluginError, UserError, disk_problem
from wsss_bench.labels import complete_sources
from wsss_bench.lazy import torch
from wsss_bench.plugins import load_plugins, show_problem
from wsss_bench.profiles import apply_overrides, flat_values, load_profile
from wsss_bench.progress import say
from wsss_bench import runwarnings
from wsss_bench.running import stages
from wsss_bench.running import rundir
from wsss_bench.running.rundir import save_predictions
from wsss_bench.running.stages import (  # noqa: F401  (re-exported: bench and tests import them from here)
    CELL_STAGES, GATES, CellState, check_scorable, classifier_p1, gate_stats, stage_gate, stage_maps,
    stage_prepare_refiner, stage_prepare_sources, stage_refine, stage_score)
from wsss_bench.seeding import set_determinism
from wsss_bench.spec import format_spec, parse_sources, parse_specs

#: the runner's modules whose code computes a cell (with what they import): the stages, and the
#: data layer that loads and splits the task's slices.  Part of every cell's identity.
COMPUTING_MODULES = (stages, taskdata)


# ============================================================================ cells
def _canonical_params(inst) -> tuple:
    """The parameters that differ from the plugin's defaults, sorted, hashable."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                        for k, v in inst.p.items() if v != inst.params.get(k)))


@dataclass(frozen=True)
class Cell:
    task: str
    refiner: str
    refiner_params: tuple
    sources: tuple = ()  # ((name, params), ...): the map sources, in the order of --cam a+b
    seed: int = 0

    @property
    def source_specs(self) -> list[str]:
        return [format_spec(name, dict(params)) for name, params in self.sources]

    @property
    def cam_spec(self) -> str | None:
        """The map sources as one spec string (``amecam+mg``), None without sources."""
        return "+".join(self.source_specs) if self.sources else None

    @property
    def refiner_spec(self) -> str:
        return format_spec(self.refiner, dict(self.refiner_params))

    @property
    def method(self) -> str:
        """Row label: 'source[+source...]+refiner' (the refiner alone when it uses no map).

        The last top-level '+' part is the refiner; :func:`parse_method` reads it back.
        """
        return f"{self.cam_spec}+{self.refiner_spec}" if self.sources else self.refiner_spec

    @property
    def key(self) -> str:
        return stable_hash([self.task, self.method, self.seed], 12)


def parse_method(label: str) -> tuple[list[str], str]:
    """(source specs, refiner spec) of a row label made by :attr:`Cell.method`."""
    combo = parse_sources(label)
    if len(combo) != 1:
        raise UserError(f"'{label}' is not one method label")
    parts = [p.text for p in combo[0]]
    return parts[:-1], parts[-1]


@dataclass
class RunConfig:
    profile: str = "smoke"
    out: Path = Path("runs/default")
    data_root: Path | None = None
    device: str = "auto"
    cache_dir: Path = Path.home() / ".cache" / "wsss-bench"
    bf16: bool = False
    use_cache: bool = True
    force: bool = False
    phantom_seed: int = 0
    ambiguous: str = "exclude"
    plugins_dirs: tuple[str, ...] = ()
    strict: bool = False
    executor: str = "local"
    #: per-dataset data roots (bench: --data-root brats=DIR,flare=DIR); keys are dataset names
    #: or their profile cap keys; a dataset not named here uses ``data_root`` (None: phantom)
    data_roots: tuple[tuple[str, str], ...] = ()
    #: profile overrides KEY=VALUE (``--set cdm.iterations=200``): a short device check
    overrides: tuple[str, ...] = ()
    #: NaN/inf voxels in real data: "error" (default) or "zero" (read as background, counted)
    nonfinite: str = "error"
    #: --verify: hash every cached file on every read (not only on its first use in a process)
    verify: bool = False
    #: with --force: phantoms and slice stores made before this time.time() are rebuilt (set
    #: once when the configuration is made, so workers do not rebuild each other's)
    force_since: float = 0.0

    def __post_init__(self) -> None:
        if self.force and not self.force_since:
            self.force_since = time.time()

    def load_profile(self):
        return apply_overrides(load_profile(self.profile), self.overrides)

    def root_for(self, dataset: Any) -> Path | None:
        roots = dict(self.data_roots)
        for key in (getattr(dataset, "name", ""), getattr(dataset, "cap_key", "")):
            if key and key in roots:
                return Path(roots[key])
        return self.data_root

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    def identity(self) -> dict[str, Any]:
        """What of the configuration changes numbers (the run folder's identity)."""
        profile = self.load_profile()
        dev = str(self.device)
        roots = {k: str(Path(v).resolve()) for k, v in self.data_roots}
        return {"profile": profile.name, "profile_values": stable_hash(dict(profile), 16),
                "data_root": str(Path(self.data_root).resolve()) if self.data_root else None,
                **({"data_roots": roots} if roots else {}),
                "phantom_seed": int(self.phantom_seed),
                "bf16": bool(self.bf16), "ambiguous": self.ambiguous, "nonfinite": self.nonfinite,
                "device_type": "cuda" if dev.startswith("cuda") or (dev == "auto" and _cuda()) else "cpu"}


def _cuda() -> bool:
    return bool(torch.cuda.is_available())


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # "done", "resumed", "failed"
    seconds: float = 0.0
    error: str | None = None
    user_error: bool = False
    info: dict[str, Any] = field(default_factory=dict)


# ============================================================================ planning
def _expand(host, kind: str, spec) -> list[tuple[str, tuple, Any]]:
    out = []
    for params in spec.expand():
        inst = host.get(kind, spec.name)(**params)
        out.append((spec.name, _canonical_params(inst), inst))
    return out


def _backbone_values(host, backbones: str) -> list[str]:
    """Canonical backbone specs from ``--backbone`` (``cdm``, ``'[cdm,resnet18]'``, ``cdm[t_scale=native]``)."""
    text = str(backbones).strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    values = []
    for spec in parse_specs(text):
        for name, params, inst in _expand(host, "backbones", spec):
            values.append(format_spec(name, dict(params)))
    return values


def plan_cells(host, tasks: list[str], cams: str | None, methods: str, seeds: list[int],
               backbones: str | None = None) -> list[Cell]:
    """Expand spec strings into cells, validating every plugin name and parameter first."""
    if not tasks:
        raise UserError("--task: no task given, so the grid is empty; name one, e.g. --task brats, or several: "
                        "--task brats,flare21-kidney")
    if not seeds:
        raise UserError("--seed: no seed given, so the grid is empty; e.g. --seed 0 or --seed 0,1,2")
    combos: list[tuple] = []
    if cams:
        for combo in parse_sources(cams):
            per_part = [[(name, params) for name, params, _ in _expand(host, "cams", part)] for part in combo]
            combos.extend(tuple(choice) for choice in itertools.product(*per_part))
    bb_values = _backbone_values(host, backbones) if backbones else None
    cells: list[Cell] = []
    for task in tasks:
        host.task(task)
        for spec in parse_specs(methods):
            refiners = []
            for name, params, inst in _expand(host, "refiners", spec):
                if bb_values is None:
                    refiners.append((name, params, inst))
                    continue
                if "backbone" not in inst.params:
                    raise UserError(f"--backbone: refiner '{name}' has no backbone parameter; use --backbone "
                                    f"with a refiner that takes features (e.g. cldf)")
                for bb in bb_values:
                    with_bb = host.get("refiners", name)(**{**dict(params), "backbone": bb})
                    refiners.append((name, _canonical_params(with_bb), with_bb))
            for name, rparams, ref in refiners:
                if ref.needs_cam and not combos:
                    raise UserError(f"--method {name} refines a CAM: add --cam NAME "
                                    f"(available: {', '.join(host.registries['cams'].names())})")
                for seed in seeds:
                    for sources in (combos if ref.needs_cam else [()]):
                        # one canonical label: the sources the refiner adds itself are named
                        # (--cam amecam --method cldf is the cell amecam+mg+cldf)
                        full = complete_sources(host, ref, tuple(sources)) if sources else ()
                        cells.append(Cell(task, name, rparams, full, seed))
    return list(dict.fromkeys(cells))


# ============================================================================ identity and the run folder
def plugin_identity(host, kind: str, name: str) -> dict[str, str]:
    cls = host.get(kind, name)
    return {"kind": kind, "name": name, "version": str(cls.version), "source": closure_hash(cls)}


def cell_identity(cfg: RunConfig, ctx: RunContext, host, cell: Cell) -> str:
    """Hash of everything that changes the cell's numbers: the configuration's identity, the
    data, each plugin's version and code (:func:`plugin_identity`) and the code of the stages
    (:mod:`wsss_bench.running.stages` and what it imports).  Reporting, the run folder, the
    manifest and progress are not part of it: editing them never recomputes a cell."""
    plugins = [plugin_identity(host, "cams", n) for n, _ in cell.sources]
    plugins.append(plugin_identity(host, "refiners", cell.refiner))
    ref_params = dict(cell.refiner_params)
    if "backbone" in ref_params or "backbone" in host.get("refiners", cell.refiner).params:
        bb = str(ref_params.get("backbone", host.get("refiners", cell.refiner).params.get("backbone", "")))
        try:
            plugins.append(plugin_identity(host, "backbones", parse_specs(bb)[0].name))
        except Exception:  # an invalid backbone fails in the cell itself, with its own message
            pass
    return stable_hash({"config": cfg.identity(), "data": ctx.data_key, "plugins": plugins,
                        "runner": closure_hash(*COMPUTING_MODULES)}, 16)


def compute_cell(ctx: RunContext, cell: Cell, profile: Any, out: Path | None = None):
    """Run the stages of one cell; returns (per-slice frame for every gate, info for the manifest).

    With ``out``, the predicted masks (before gating) are stored in the run folder
    (``<out>/predictions/<key>.npz``) for figures and NIfTI export.
    """
    st, info = stages.compute_cell(ctx, cell, profile)
    if out is not None:
        data = ctx.task_data
        save_predictions(out, cell.key, data.case_ids[st.test], data.z[st.test], st.pred,
                         task=cell.task, method=cell.method, seed=cell.seed)
    return st.frame, info


def check_out_dir(cfg: RunConfig) -> None:
    """Before any compute: the run folder is writable, and holds no results of another
    configuration (those would be relabelled); ``--force`` clears it instead."""
    rundir.prepare(cfg.out, cfg.identity(), force=cfg.force, values=flat_values(cfg.load_profile()))


# ============================================================================ execution
class Session:
    """Per-process state: plugins, loaded task data and contexts, shared across cells."""

    def __init__(self, cfg: RunConfig, host=None) -> None:
        self.cfg = cfg
        self.host = host or load_plugins(strict=cfg.strict, plugins_dirs=cfg.plugins_dirs, report=show_problem)
        self.profile = cfg.load_profile()
        self.device = resolve_device(cfg.device)
        self.cache = ArtifactCache(Path(cfg.cache_dir) / "artifacts", enabled=cfg.use_cache, force=cfg.force)
        integrity.set_verify_always(cfg.verify)
        self._contexts: dict[tuple[str, int], RunContext] = {}
        self._data_errors: dict[tuple[str, int], UserError] = {}

    def loaded(self, task_id: str, seed: int) -> RunContext | None:
        """The context of (task, seed) if this process has loaded it, else None (loads nothing)."""
        return self._contexts.get((task_id, seed))

    def data_summaries(self) -> dict[str, dict[str, Any]]:
        """"<task>/seed<seed>" -> the data summary of every task this process loaded (for the manifest)."""
        return {f"{t}/seed{s}": ctx.task_data.summary() for (t, s), ctx in self._contexts.items()}

    def context(self, task_id: str, seed: int) -> RunContext:
        if (task_id, seed) in self._data_errors:  # bad data: the same error for every cell, read once
            raise self._data_errors[(task_id, seed)]
        try:
            return self._context(task_id, seed)
        except UserError as err:
            self._data_errors[(task_id, seed)] = err
            raise

    def _context(self, task_id: str, seed: int) -> RunContext:
        if (task_id, seed) not in self._contexts:
            dataset_cls, task = self.host.task(task_id)
            t0 = time.perf_counter()
            reader = dataset_cls(**({"nonfinite": self.cfg.nonfinite} if "nonfinite" in dataset_cls.params else {}))
            data = taskdata.load_task_data(reader, task_id, self.cfg.root_for(dataset_cls), self.profile, seed,
                                  Path(self.cfg.cache_dir), phantom_seed=self.cfg.phantom_seed,
                                  ambiguous=self.cfg.ambiguous, force_since=self.cfg.force_since)
            ctx = RunContext(task, data, self.profile, seed, self.device, self.cache, bf16=self.cfg.bf16,
                             host=self.host)
            ctx.data_seconds = round(time.perf_counter() - t0, 3)
            self._contexts[(task_id, seed)] = ctx
        return self._contexts[(task_id, seed)]

    def run_cell(self, cell: Cell) -> CellOutcome:
        out = Path(self.cfg.out)
        ctx = self.context(cell.task, cell.seed)
        identity = cell_identity(self.cfg, ctx, self.host, cell)
        if not self.cfg.force:
            stored = rundir.stored_identity(out, cell.key)
            if stored is not None and stored == identity:
                return CellOutcome(cell, "resumed")
            if stored is not None:
                say(f"  {cell.task} {cell.method} seed {cell.seed}: the data or the code changed since it was "
                    f"computed; recomputing")
        t0 = time.perf_counter()

        ctx.begin_cell(f"{cell.task} {cell.method} seed {cell.seed}")
        ctx.stages.append({"stage": "data", "seconds": getattr(ctx, "data_seconds", 0.0),
                           "peak_rss_mb": round(peak_rss_mb(), 1)})
        set_determinism(ctx.seed(f"cell/{cell.method}"), self.device)
        with runwarnings.capture() as warned:  # a plugin's warning: one clean line, kept with the cell
            frame, info = compute_cell(ctx, cell, self.profile, out=out)
        if warned:
            info["warnings"] = list(warned)
        frame["profile"] = self.profile.name
        frame["data"] = "phantom" if ctx.task_data.is_phantom else "real"
        info["stages"] = list(ctx.stages)
        info["seconds"] = round(time.perf_counter() - t0, 3)
        rundir.write_cell(out, cell.key, frame, {"cell": asdict(cell), "method": cell.method, "status": "done",
                                                 "identity": identity, **info})
        return CellOutcome(cell, "done", info["seconds"], info=info)


class CellJob:
    """Picklable callable an executor applies to each cell (one Session per process)."""

    _sessions: dict[str, Session] = {}

    def __init__(self, cfg: RunConfig, host=None) -> None:
        self.cfg = cfg
        self._host = host

    def __getstate__(self):
        return {"cfg": self.cfg, "_host": None}

    def session(self) -> Session:
        key = stable_hash(self.cfg.to_json())
        if key not in CellJob._sessions:
            CellJob._sessions[key] = Session(self.cfg, host=self._host)
        return CellJob._sessions[key]

    def _record_failure(self, cell: Cell, error: str, user_error: bool) -> None:
        try:
            rundir.write_failure(self.cfg.out, cell.key, {"cell": asdict(cell), "method": cell.method,
                                                          "status": "failed", "error": error,
                                                          "user_error": user_error})
        except OSError:  # a full disk cannot take the record either; the message still reaches the user
            pass

    def __call__(self, cell: Cell) -> CellOutcome:
        t0 = time.perf_counter()
        try:
            return self.session().run_cell(cell)
        except UserError as err:
            self._record_failure(cell, str(err), True)
            return CellOutcome(cell, "failed", time.perf_counter() - t0, str(err), user_error=True)
        except Exception as err:  # a bug in a plugin or in us: keep the traceback next to the results
            disk = disk_problem(err, (self.cfg.cache_dir, self.cfg.out))
            if disk:  # disk full, quota, read-only: the machine's state, not a bug
                self._record_failure(cell, disk, True)
                return CellOutcome(cell, "failed", time.perf_counter() - t0, disk, user_error=True)
            tb = traceback.format_exc()
            try:
                path = rundir.write_traceback(self.cfg.out, cell.key, tb)
            except OSError:
                path = Path("(traceback not written: the run folder refused it)")
            message = f"{type(err).__name__}: {err} (traceback in {path})"
            self._record_failure(cell, message, False)
            return CellOutcome(cell, "failed", time.perf_counter() - t0, message)
