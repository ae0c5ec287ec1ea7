"""RunContext: what a plugin sees of a run, and the one mechanism for each service.

A context belongs to one (task, seed) in a process and is shared by that pair's cells, so a
model trained for one cell is reused by the next.  What it offers (docs/plugins.md has the
exact signatures):

- ``ctx.data``: images and image-level labels (a mask-free view,
  :class:`~wsss_bench.data.view.DataView`);
- ``ctx.artifact``: any cached artifact (content key, atomic, resumable);
- ``ctx.shared_model``: any trained model (classifier, CDM, SEAM, AME-CAM, DiG, FSL, ...):
  built, trained on the resumable loop, cached as safetensors, memoised;
- ``ctx.plugin``: a registered plugin, bound and prepared, memoised (backbones, MG);
- ``ctx.maps``: a map source's maps on train, val or test, cached, read-only memmap;
- seeds, records, timed stages, progress and bf16 autocast.

Every trained model a cell uses leaves a ``model/<name>`` record in that cell's log: how its
training stopped (:func:`wsss_bench.quality.read_stop_record`).

The context knows no method.  What a cell did (records, stages, artifacts, seeds) goes to
that cell's own :class:`~wsss_bench.records.CellLog`; a memoised model or plugin replays
its records into every cell that uses it.
"""
from __future__ import annotations

import contextlib
import json
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from wsss_bench.cache import (ArtifactCache, Built, atomic_path, atomic_write_json, closure_hash,
                             open_memmap_reserved, stable_hash)
from wsss_bench.data.view import DataView
from wsss_bench.errors import PluginError, UserError
from wsss_bench.lazy import torch
from wsss_bench.nn import training
from wsss_bench.plugins import load_plugins
from wsss_bench.progress import log_line, log_lines_enabled, progress, say
from wsss_bench.quality import MODEL_RECORD, read_stop_record
from wsss_bench.records import CellLog, TaskDef
from wsss_bench.seeding import derive_seed
from wsss_bench.spec import parse_specs

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from wsss_bench.interfaces import CamSource, Plugin

#: how many derived seeds a cell lists in its manifest (per-slice seeds would flood it)
MAX_LISTED_SEEDS = 200
#: artifacts a map source writes per split
MAPS_STAGE = "maps"


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; a clear error for unavailable CUDA."""
    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
        return name
    if name != "cpu":
        raise UserError(f"--device {name}: unknown device; use auto, cpu or cuda[:N]")
    return name


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class TrainRun:
    """What a shared model's ``train(model, run)`` gets: where to checkpoint, its seed, its device,
    and the progress callback (call ``run.advance(1)`` per step)."""

    work: Path
    seed: int
    device: str
    advance: Callable[[int], Any]


@dataclass
class _Memo:
    value: Any
    used: list[str]
    records: dict[str, Any]
    seeds: dict[str, int]


# ============================================================================ the context
class RunContext:
    """Everything a stage needs.  One per (task, seed) in a process; shared by its cells."""

    def __init__(
        self,
        task: TaskDef,
        data: Any,
        profile: Any,
        base_seed: int,
        device: str,
        cache: ArtifactCache,
        bf16: bool = False,
        host: Any = None,
    ) -> None:
        self.task = task
        self.task_data = data  # the full TaskData: the runner scores with it; plugins never see it
        self.data = DataView(data, self)
        self.profile = profile
        self.base_seed = base_seed
        self.device = device
        self.cache = cache
        self.bf16 = bf16
        self.host = host
        self.log = CellLog()
        self.cell_label = ""  # the cell whose stages run now (for log lines)
        self.profile_hash = stable_hash(dict(profile), 16)
        self._memo: dict[Any, _Memo] = {}
        self._model_keys: dict[str, str] = {}
        self._acting: list[Any] = []
        self._upstream: dict[int, list[str]] = {}  # id(plugin) -> keys its prepare used

    def __getattr__(self, name: str) -> Any:
        if name == "classifier":  # removed in plugin API 3: a plugin written for API 2 gets the fix
            raise PluginError("ctx.classifier() was removed in plugin API 3 (the context knows no method); "
                              "call wsss_bench.nn.classifier.get_classifier(ctx) instead")
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    # ------------------------------------------------------------------ per-cell bookkeeping
    def begin_cell(self, label: str = "") -> CellLog:
        """Start a new cell's log (records, stages, artifacts, seeds); returns it."""
        self.log = CellLog()
        self.cell_label = label
        return self.log

    @property
    def records(self) -> dict[str, Any]:
        return self.log.records

    @property
    def stages(self) -> list[dict[str, Any]]:
        return self.log.stages

    @property
    def used(self) -> list[str]:
        return self.log.used

    @property
    def seeds_used(self) -> dict[str, int]:
        return self.log.seeds

    def record(self, key: str, value: Any) -> None:
        """Add a fact to the current cell's manifest (e.g. AME-CAM's polarity and both drops)."""
        self.log.records[key] = value

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; wall time and peak RSS go to the cell's manifest (and, in a log, a
        plain line when it starts and ends)."""
        t0 = time.perf_counter()
        where = f" [{self.cell_label}]" if self.cell_label else ""
        if log_lines_enabled():
            log_line(f"stage {name}{where}: started")
        cuda = str(self.device).startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        ok = False
        try:
            yield
            ok = True
        finally:
            seconds = time.perf_counter() - t0
            entry = {"stage": name, "seconds": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
            if cuda:
                entry["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            self.log.stages.append(entry)
            if log_lines_enabled():
                log_line(f"stage {name}{where}: {'done' if ok else 'failed'} in {seconds:.1f}s")

    def progress(self, description: str, total: int | None):
        return progress(description, total)

    @contextmanager
    def acting(self, plugin: Any) -> Iterator[None]:
        """Mark ``plugin`` as the one whose code runs now (the data view's mask guard asks)."""
        self._acting.append(plugin)
        try:
            yield
        finally:
            self._acting.pop()

    @property
    def acting_plugin(self) -> Any:
        return self._acting[-1] if self._acting else None

    @property
    def data_key(self) -> str:
        """What the data is, for cache keys: the slice store's key (data content fingerprint,
        store and preprocessing versions, image encoding, reader parameters), or the bare
        fingerprint for data objects without a store (tests)."""
        store = getattr(self.task_data, "store", None)
        key = getattr(store, "key", None)
        return str(key) if key else str(self.task_data.fingerprint)

    # ------------------------------------------------------------------ seeds
    def seed(self, component: str) -> int:
        value = derive_seed(self.base_seed, self.task.task_id, component)
        if len(self.log.seeds) < MAX_LISTED_SEEDS or component in self.log.seeds:
            self.log.seeds[component] = value
        return value

    def generator(self, component: str, device: str = "cpu") -> "torch.Generator":
        g = torch.Generator(device=device)
        g.manual_seed(self.seed(component))
        return g

    def autocast(self):
        """bf16 autocast when --bf16 was given, else a no-op context."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu",
                              dtype=torch.bfloat16)

    # ------------------------------------------------------------------ artifacts
    def artifact_key(
        self,
        stage: str,
        plugin: Any,
        params: dict[str, Any] | None = None,
        upstream: Sequence[str] = (),
        version: str | None = None,
        source: Any = None,
    ) -> tuple[str, dict[str, Any]]:
        """The content key of an artifact and the description stored with it.

        key = stage + plugin name + version + source hash (the plugin's module and every
        project module it imports) + parameters + upstream keys + seed + data fingerprint
        + the resolved profile, the task, bf16 and the device type.
        """
        if isinstance(plugin, str):
            name, ver = plugin, version or "1"
            srcs = source if isinstance(source, (list, tuple)) else ([source] if source is not None else [])
        else:
            cls = plugin if isinstance(plugin, type) else type(plugin)
            name, ver = cls.name or cls.__name__, version or cls.version
            srcs = list(source) if isinstance(source, (list, tuple)) else [source or cls]
        src = closure_hash(*srcs) if srcs else ""
        params = dict(params if params is not None else getattr(plugin, "p", {}))
        device_type = "cuda" if str(self.device).startswith("cuda") else "cpu"
        key = self.cache.key(stage, name, ver, src, {"params": params, "profile": self.profile_hash,
                                                      "task": self.task.task_id, "bf16": bool(self.bf16),
                                                      "device": device_type}, list(upstream),
                             self.base_seed, self.data_key)
        describe = {"plugin": name, "version": ver, "params": params, "task": self.task.task_id,
                    "profile": self.profile.name, "seed": self.base_seed, "bf16": bool(self.bf16),
                    "device": device_type}
        return key, describe

    def artifact(
        self,
        stage: str,
        plugin: Any,
        build: Callable[[Path], dict | None],
        params: dict[str, Any] | None = None,
        upstream: Sequence[str] = (),
        version: str | None = None,
        source: Any = None,
    ) -> Built:
        """A cached artifact of this task/seed/data/profile; ``build(workdir)`` writes it."""
        key, describe = self.artifact_key(stage, plugin, params, upstream, version, source)
        built = self.cache.build(stage, key, build, describe)
        self.log.used.append(key)
        if built.hit:
            say(f"  [dim]reused cached {stage} ({describe['plugin']}, {key[:10]})[/dim]")
        return built

    # ------------------------------------------------------------------ memo with replay
    @contextmanager
    def _capturing(self) -> Iterator[dict[str, Any]]:
        """Collect what the enclosed code adds to the cell log (to replay it on memo hits)."""
        used0, rec0, seeds0 = len(self.log.used), dict(self.log.records), dict(self.log.seeds)
        out: dict[str, Any] = {}
        yield out
        out["used"] = list(self.log.used[used0:])
        out["records"] = {k: v for k, v in self.log.records.items() if k not in rec0 or rec0[k] is not v}
        out["seeds"] = {k: v for k, v in self.log.seeds.items() if k not in seeds0}

    def _replay(self, memo: _Memo) -> Any:
        self.log.used.extend(memo.used)
        self.log.records.update(memo.records)
        for k, v in memo.seeds.items():
            if len(self.log.seeds) < MAX_LISTED_SEEDS:
                self.log.seeds.setdefault(k, v)
        return memo.value

    # ------------------------------------------------------------------ shared models
    def shared_model(
        self,
        name: str,
        build: Callable[[], "torch.nn.Module"],
        train: Callable[["torch.nn.Module", TrainRun], tuple[dict[str, "torch.Tensor"], dict[str, Any]]],
        params: dict[str, Any],
        source: Sequence[Any] = (),
        upstream: Sequence[str] = (),
        total: int | None = None,
    ) -> "torch.nn.Module":
        """The one way a trained model is made: built, trained, cached, memoised.

        ``build()`` returns a freshly initialised module (seeded by the caller, e.g. with
        ``ctx.seed(f"init/{name}")``); ``train(model, run)`` trains it on the resumable loop
        (:mod:`wsss_bench.nn.training`), checkpointing into ``run.work``, and returns
        (weights, info).  The weights are stored as ``<name>.safetensors`` (the artifact's
        stage is ``name``); a build killed after training finished does not train again.
        ``params`` must hold everything that changes the weights; ``source`` the modules
        whose code does (the training loop is always included); ``upstream`` the keys of
        artifacts the model depends on.  Returns the model loaded, in eval, frozen
        (``requires_grad=False``), on ``ctx.device``; a second call is free.
        """
        from safetensors.torch import load_file, save_file

        if ("provided", name) in self._memo:
            return self._replay(self._memo[("provided", name)])
        key, _ = self.artifact_key(name, name, params=params, upstream=upstream, source=[*source, training])
        if ("model", key) in self._memo:
            return self._replay(self._memo[("model", key)])
        fname = name.replace("-", "_")
        with self._capturing() as cap:
            model = build()

            def builder(work: Path) -> dict:
                out, meta = work / f"{fname}.safetensors", work / f"{fname}.train.json"
                if out.is_file() and meta.is_file():  # killed after training finished
                    return {"train": json.loads(meta.read_text())}
                with self.stage(f"train/{name}"), self.progress(f"train {name}", total) as advance:
                    run = TrainRun(work=work, seed=self.seed(f"train/{name}"), device=self.device, advance=advance)
                    weights, info = train(model, run)
                with atomic_path(out) as tmp:
                    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp))
                atomic_write_json(meta, info)
                training.clear_checkpoint(work)
                return {"train": info}

            built = self.artifact(name, name, builder, params=params, upstream=upstream,
                                  source=[*source, training])
            model.load_state_dict(load_file(str(built.path / f"{fname}.safetensors")))
            model.to(self.device).eval().requires_grad_(False)
            # how it stopped, for the rows made from it (replayed with the memo)
            self.record(f"{MODEL_RECORD}{name}", read_stop_record(built.path / f"{fname}.train.json",
                                                                  getattr(training, "convergence_of", None)))
        self._model_keys[name] = built.key
        self._memo[("model", key)] = _Memo(model, cap["used"], cap["records"], cap["seeds"])
        return model

    def provide_model(self, name: str, model: "torch.nn.Module", key: str = "provided") -> None:
        """Make ``shared_model(name, ...)`` return ``model`` in this context (tests, diagnostics:
        a tiny randomised network in place of a trained one)."""
        self._model_keys[name] = key
        self._memo[("provided", name)] = _Memo(model, [key], {}, {})

    def shared_model_key(self, name: str) -> str:
        """The artifact key of shared model ``name`` made earlier in this context (for ``upstream``)."""
        if name not in self._model_keys:
            raise KeyError(f"shared model '{name}' has not been made in this context yet")
        return self._model_keys[name]

    # ------------------------------------------------------------------ plugins
    def _host(self) -> Any:
        if self.host is None:
            self.host = load_plugins()
        return self.host

    def instantiate(self, kind: str, spec: str) -> "Plugin":
        """A plugin of ``kind`` from one spec string (no grid), unbound and unprepared."""
        specs = parse_specs(spec)
        grids = specs[0].expand() if len(specs) == 1 else []
        if len(grids) != 1:
            raise UserError(f"{kind} spec '{spec}' must name one plugin with one value per parameter")
        return self._host().get(kind, specs[0].name)(**grids[0])

    def plugin(self, kind: str, spec: "str | Plugin", sources: Sequence[Any] = ()) -> "Plugin":
        """A registered plugin, instantiated, bound to this context and prepared, memoised
        per canonical spec: a refiner gets its feature backbone (``kind="backbones"``) or a
        second map source (``kind="cams"``) this way, and the runner prepares the cell's
        sources with the same call.  Refiners are prepared with ``sources``.
        """
        inst = self.instantiate(kind, spec) if isinstance(spec, str) else spec
        memo_key = ("plugin", kind, inst.spec(), tuple(s.spec() for s in sources))
        if memo_key in self._memo:
            return self._replay(self._memo[memo_key])
        inst.ctx = self
        with self._capturing() as cap, self.acting(inst), self.stage(f"prepare/{inst.spec()}"):
            if kind == "refiners":
                inst.prepare(self, tuple(sources))
            else:
                inst.prepare(self)
        self._upstream[id(inst)] = list(dict.fromkeys(cap["used"]))
        self._memo[memo_key] = _Memo(inst, cap["used"], cap["records"], cap["seeds"])
        return inst

    def upstream(self, plugin: "Plugin") -> list[str]:
        """The keys of the artifacts ``plugin``'s ``prepare`` used (trained models, maps, ...),
        for the ``upstream=`` of an artifact built from it; [] for a plugin this context did
        not prepare."""
        return list(self._upstream.get(id(plugin), []))

    @contextmanager
    def recording(self) -> Iterator[list[str]]:
        """Collect the keys of the artifacts used inside the block (built, reused or replayed
        from memo), in order, without repeats; the yielded list is filled when the block ends::

            with ctx.recording() as used:
                maps = ctx.maps(self.cam, "train")
            ctx.artifact("seeds", self, build, upstream=used)
        """
        start = len(self.log.used)
        keys: list[str] = []
        try:
            yield keys
        finally:
            keys.extend(dict.fromkeys(self.log.used[start:]))

    # ------------------------------------------------------------------ maps
    def maps(self, source: "str | CamSource", split: str) -> "np.ndarray":
        """``source``'s maps on a split: (N, S, S) float32 in [0, 1], read-only memmap.

        Row i is slice ``ctx.data.split(split)[i]``.  Built once per source, split, upstream
        models and data, and cached; the runner uses the same call for the test split.
        """
        if isinstance(source, str):
            source = self.plugin("cams", source)
        elif getattr(source, "ctx", None) is not self:
            source = self.plugin("cams", source)
        memo_key = ("maps", source.spec(), split)
        if memo_key in self._memo:
            return self._replay(self._memo[memo_key])
        idx = self.data.split(split)
        size = int(self.data.image_size)
        bs = int(self.profile.classifier.batch)
        upstream = self.upstream(source)
        spec = source.spec()

        def build(work: Path) -> dict:
            arr = open_memmap_reserved(work / "maps.npy", np.float32, (len(idx), size, size))
            pos = 0
            with self.stage(f"maps/{spec}/{split}"), self.progress(f"maps {spec} ({split})", len(idx)) as advance, \
                    self.acting(source):
                for batch in self.data.batches(idx, bs, device=self.device):
                    grad = torch.no_grad() if getattr(source, "no_grad", False) else torch.enable_grad()
                    with grad:
                        out = source.maps(batch)
                    try:
                        check_maps(out, batch, source)
                    except PluginError:
                        self._blame_corrupt_artifact(upstream, source)
                        raise
                    arr[pos:pos + len(batch)] = out.detach().float().clamp(0, 1).cpu().numpy()
                    pos += len(batch)
                    advance(len(batch))
            arr.flush()
            del arr
            return {"n": int(len(idx)), "split": split}

        with self._capturing() as cap:
            built = self.artifact(MAPS_STAGE, source, build, params={**source.p, "split": split}, upstream=upstream)
        maps = np.load(built.path / "maps.npy", mmap_mode="r")
        self._memo[memo_key] = _Memo(maps, cap["used"], cap["records"], cap["seeds"])
        return maps

    def _blame_corrupt_artifact(self, upstream: Sequence[str], source: Any) -> None:
        """Impossible maps: raise a corrupt-artifact error when one of the artifacts they were
        made from fails a full re-hash (it is moved aside), else return (the plugin is at fault)."""
        bad = self.cache.recheck(list(upstream))
        if bad is not None:
            err, moved = bad
            self._memo.clear()  # models loaded from the bad file must not be served again
            raise UserError((
                f"the maps of '{source.name}' are invalid because the cached artifact file {err.path} is "
                f"corrupt ({err.reason}); it was moved to {moved}: run the same command again to rebuild it"))


def check_maps(maps: Any, batch: Any, source: Any) -> None:
    """A map source's output must be (B, S, S), finite, in [0, 1]."""
    b, s = len(batch), batch.images.shape[-1]
    if tuple(maps.shape) != (b, s, s):
        raise PluginError(f"CAM source '{source.name}' returned maps of shape {tuple(maps.shape)}; "
                          f"expected (B, S, S) = {(b, s, s)}")
    if not torch.isfinite(maps).all() or maps.min() < -1e-4 or maps.max() > 1 + 1e-4:
        raise PluginError(f"CAM source '{source.name}' returned maps outside [0, 1] or non-finite values")
