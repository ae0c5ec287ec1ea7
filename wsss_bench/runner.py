"""Runs cells.  A cell = task x CAM source x refiner x seed; its stages are

    data -> (classifier, other trained models) -> maps on the test set -> masks -> gates -> scores

Each stage's output is a cached artifact, so cells that share a trained model reuse it.
Per-cell results are written atomically to ``<out>/cells/<key>.parquet``; a re-run skips
finished cells (resume) unless ``force``.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from wsss_bench.cache import ArtifactCache, atomic_path, atomic_write_json, stable_hash
from wsss_bench.context import RunContext, peak_rss_mb, resolve_device
from wsss_bench.errors import PluginError, UserError
from wsss_bench.interfaces import CamSource, Refiner
from wsss_bench.profiles import load_profile
from wsss_bench.progress import say
from wsss_bench.spec import format_spec, parse_specs

GATES = ("label", "classifier", "none")


@dataclass(frozen=True)
class Cell:
    task: str
    refiner: str
    refiner_params: tuple
    cam: str | None
    cam_params: tuple
    seed: int

    @property
    def cam_spec(self) -> str | None:
        return format_spec(self.cam, dict(self.cam_params)) if self.cam else None

    @property
    def refiner_spec(self) -> str:
        return format_spec(self.refiner, dict(self.refiner_params))

    @property
    def method(self) -> str:
        """Row label: 'cam+refiner' (or the refiner alone when it uses no CAM)."""
        return f"{self.cam_spec}+{self.refiner_spec}" if self.cam else self.refiner_spec

    @property
    def key(self) -> str:
        return stable_hash([self.task, self.method, self.seed], 12)


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

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # "done", "resumed", "failed"
    seconds: float = 0.0
    error: str | None = None
    user_error: bool = False
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ planning
def _instantiate(host, kind: str, name: str, params: dict):
    cls = host.get(kind, name)
    return cls(**params)


def plan_cells(host, tasks: list[str], cams: str | None, methods: str, seeds: list[int]) -> list[Cell]:
    """Expand spec strings into cells, validating every plugin name and parameter first."""
    cam_cells: list[tuple[str, tuple]] = []
    if cams:
        for spec in parse_specs(cams):
            for params in spec.expand():
                inst = _instantiate(host, "cams", spec.name, params)
                cam_cells.append((spec.name, tuple(sorted((k, v if not isinstance(v, list) else tuple(v))
                                                          for k, v in inst.p.items() if v != inst.params.get(k)))))
    cells: list[Cell] = []
    for task in tasks:
        host.task(task)
        for spec in parse_specs(methods):
            for params in spec.expand():
                ref = _instantiate(host, "refiners", spec.name, params)
                rparams = tuple(sorted((k, v if not isinstance(v, list) else tuple(v))
                                       for k, v in ref.p.items() if v != ref.params.get(k)))
                if ref.needs_cam and not cam_cells:
                    raise UserError(f"--method {spec.name} refines a CAM: add --cam NAME "
                                    f"(available: {', '.join(host.registries['cams'].names())})")
                for seed in seeds:
                    for cam_name, cparams in (cam_cells if ref.needs_cam else [(None, ())]):
                        cells.append(Cell(task, spec.name, rparams, cam_name, cparams, seed))
    return cells


# ------------------------------------------------------------------ execution
class Session:
    """Per-process state: plugins, loaded task data and contexts, shared across cells."""

    def __init__(self, cfg: RunConfig, host=None) -> None:
        from wsss_bench.plugins import load_plugins

        self.cfg = cfg
        self.host = host or load_plugins(strict=cfg.strict, plugins_dirs=cfg.plugins_dirs)
        self.profile = load_profile(cfg.profile)
        self.device = resolve_device(cfg.device)
        self.cache = ArtifactCache(Path(cfg.cache_dir) / "artifacts", enabled=cfg.use_cache, force=cfg.force)
        self._contexts: dict[tuple[str, int], RunContext] = {}

    def context(self, task_id: str, seed: int) -> RunContext:
        if (task_id, seed) not in self._contexts:
            from wsss_bench.data.taskdata import load_task_data

            dataset_cls, task = self.host.task(task_id)
            with_timer = time.perf_counter()
            data = load_task_data(dataset_cls(), task_id, self.cfg.data_root, self.profile, seed,
                                  Path(self.cfg.cache_dir), phantom_seed=self.cfg.phantom_seed,
                                  ambiguous=self.cfg.ambiguous)
            ctx = RunContext(task, data, self.profile, seed, self.device, self.cache, bf16=self.cfg.bf16)
            ctx.stages.append({"stage": "data", "seconds": round(time.perf_counter() - with_timer, 3),
                               "peak_rss_mb": round(peak_rss_mb(), 1)})
            self._contexts[(task_id, seed)] = ctx
        return self._contexts[(task_id, seed)]

    def run_cell(self, cell: Cell) -> CellOutcome:
        out = Path(self.cfg.out)
        done = out / "cells" / f"{cell.key}.parquet"
        if done.is_file() and not self.cfg.force:
            return CellOutcome(cell, "resumed")
        t0 = time.perf_counter()
        from wsss_bench.seeding import set_determinism

        ctx = self.context(cell.task, cell.seed)
        set_determinism(ctx.seed(f"cell/{cell.method}"), self.device)
        first_stage = len(ctx.stages)
        frame, info = compute_cell(ctx, self.host, cell, self.profile)
        frame["profile"] = self.profile.name
        frame["data"] = "phantom" if ctx.data.is_phantom else "real"
        with atomic_path(done) as tmp:
            frame.to_parquet(tmp, index=False)
        info["stages"] = ctx.stages[first_stage:]
        info["seconds"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(out / "cells" / f"{cell.key}.json", {"cell": asdict(cell), "method": cell.method, **info})
        return CellOutcome(cell, "done", info["seconds"], info=info)


def _check_maps(maps, batch, cam: CamSource):
    import torch

    b, s = len(batch), batch.images.shape[-1]
    if tuple(maps.shape) != (b, s, s):
        raise PluginError(f"CAM source '{cam.name}' returned maps of shape {tuple(maps.shape)}; "
                          f"expected (B, S, S) = {(b, s, s)}")
    if not torch.isfinite(maps).all() or maps.min() < -1e-4 or maps.max() > 1 + 1e-4:
        raise PluginError(f"CAM source '{cam.name}' returned maps outside [0, 1] or non-finite values")


def compute_cell(ctx: RunContext, host, cell: Cell, profile):
    """All stages of one cell; returns (per-slice frame for every gate, info for the manifest)."""
    import numpy as np
    import pandas as pd
    import torch

    from wsss_bench.metrics import apply_gate, dice_iou

    data = ctx.data
    test = data.split("test")
    bs = int(profile.classifier.batch)
    size = data.image_size
    used_before = len(ctx.used)

    cam: CamSource | None = None
    maps_mm = None
    if cell.cam:
        cam = host.get("cams", cell.cam)(**dict(cell.cam_params))
        cam.ctx = ctx
        with ctx.stage(f"prepare/{cell.cam_spec}"):
            cam.prepare(ctx)

        def build_maps(work: Path) -> dict:
            arr = np.lib.format.open_memmap(work / "maps.npy", mode="w+", dtype=np.float32, shape=(len(test), size, size))
            pos = 0
            with ctx.stage(f"maps/{cell.cam_spec}"), ctx.progress(f"maps {cell.cam_spec}", len(test)) as advance:
                for batch in data.batches(test, bs, device=ctx.device):
                    with torch.no_grad() if getattr(cam, "no_grad", False) else _null():
                        maps = cam.maps(batch)
                    _check_maps(maps, batch, cam)
                    arr[pos:pos + len(batch)] = maps.detach().float().clamp(0, 1).cpu().numpy()
                    pos += len(batch)
                    advance(len(batch))
            arr.flush()
            del arr
            return {"n": int(len(test))}

        built = ctx.artifact("maps", cam, build_maps, upstream=list(dict.fromkeys(ctx.used[used_before:])))
        maps_mm = np.load(built.path / "maps.npy", mmap_mode="r")

    refiner: Refiner = host.get("refiners", cell.refiner)(**dict(cell.refiner_params))
    refiner.ctx = ctx
    with ctx.stage(f"prepare/{cell.refiner_spec}"):
        refiner.prepare(ctx, cam)
    pred = np.zeros((len(test), size, size), dtype=bool)
    pos = 0
    with ctx.stage(f"refine/{cell.refiner_spec}"):
        for batch in data.batches(test, bs, device=ctx.device):
            maps = torch.from_numpy(np.array(maps_mm[pos:pos + len(batch)])).to(ctx.device) if maps_mm is not None else None
            masks = refiner.refine(batch, maps, cam)
            if tuple(masks.shape) != (len(batch), size, size):
                raise PluginError(f"refiner '{refiner.name}' returned masks of shape {tuple(masks.shape)}; "
                                  f"expected {(len(batch), size, size)}")
            pred[pos:pos + len(batch)] = masks.bool().cpu().numpy()
            pos += len(batch)

    gt = data.masks(test)
    labels = data.labels[test].astype(int)
    p1 = _classifier_p1(ctx, test)
    frames = []
    for gate in GATES:
        gated, passed = apply_gate(pred, gate, labels, p1)
        dice, iou = dice_iou(gated, gt)
        frames.append(pd.DataFrame({
            "task": cell.task, "method": cell.method, "cam": cell.cam_spec or "", "refiner": cell.refiner_spec,
            "gate": gate, "case_id": data.case_ids[test], "z": data.z[test].astype(int), "split": "test",
            "label": labels, "fg_fraction": data.fg_fraction[test], "gt_area": gt.reshape(len(test), -1).sum(1),
            "pred_area": np.asarray(gated).reshape(len(test), -1).sum(1), "gate_pass": passed,
            "classifier_p1": p1, "dice": dice, "iou": iou, "seed": cell.seed,
            "params": json.dumps({"cam": dict(cell.cam_params), "refiner": dict(cell.refiner_params)}, default=str),
        }))
    info = {"artifacts": list(dict.fromkeys(ctx.used[used_before:])), "records": dict(ctx.records),
            "base_seed": ctx.base_seed, "derived_seeds": dict(ctx.seeds_used),
            "classifier_gate": ctx._memo.get("gate_stats"),
            "thresholds": {"cam": profile.common.cam_threshold, "otsu_bins": profile.common.otsu_bins}}
    return pd.concat(frames, ignore_index=True), info


def _null():
    import contextlib

    return contextlib.nullcontext()


def _classifier_p1(ctx: RunContext, test):
    """p(1) of the CAM classifier on the test slices, cached; gate statistics go to the manifest."""
    import numpy as np

    if "p1" in ctx._memo:
        return ctx._memo["p1"]

    def build(work: Path) -> dict:
        p1 = ctx.classifier_p1(test)
        np.save(work / "p1.npy", p1.astype(np.float64))
        return {}

    ctx.classifier()
    built = ctx.artifact("classifier-p1", "cam-classifier", build, params={"split": "test"},
                         upstream=[ctx._memo["classifier_key"]])
    p1 = np.load(built.path / "p1.npy")
    ctx._memo["p1"] = p1
    ctx._memo["gate_stats"] = gate_stats(ctx.data.labels[test], p1)
    return p1


def gate_stats(labels, p1) -> dict[str, float | None]:
    """Test AUC, sensitivity and specificity of gate=classifier (reported next to the tables)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    pred = np.asarray(p1) >= 0.5
    auc = float(roc_auc_score(labels, p1)) if len(set(labels.tolist())) == 2 else None
    pos, neg = labels == 1, labels == 0
    return {"auc": auc,
            "sensitivity": float(pred[pos].mean()) if pos.any() else None,
            "specificity": float((~pred[neg]).mean()) if neg.any() else None}


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

    def __call__(self, cell: Cell) -> CellOutcome:
        t0 = time.perf_counter()
        try:
            return self.session().run_cell(cell)
        except UserError as err:
            return CellOutcome(cell, "failed", time.perf_counter() - t0, str(err), user_error=True)
        except Exception as err:  # a bug in a plugin or in us: keep the traceback next to the results
            tb = traceback.format_exc()
            path = Path(self.cfg.out) / "cells" / f"{cell.key}.error.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(tb)
            return CellOutcome(cell, "failed", time.perf_counter() - t0,
                               f"{type(err).__name__}: {err} (traceback in {path})")
