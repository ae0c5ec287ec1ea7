"""RunContext: what a plugin sees of a run (task, data, profile, device, seeds, cache)."""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from wsss_bench.cache import ArtifactCache, Built, source_hash, stable_hash
from wsss_bench.errors import UserError
from wsss_bench.interfaces import Plugin, TaskDef
from wsss_bench.progress import progress, say
from wsss_bench.seeding import derive_seed

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from wsss_bench.data.taskdata import TaskData


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; a clear error for unavailable CUDA."""
    import torch

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


class RunContext:
    """Everything a stage needs.  One per (task, seed) in a process; shared by its cells."""

    def __init__(
        self,
        task: TaskDef,
        data: "TaskData",
        profile: Any,
        base_seed: int,
        device: str,
        cache: ArtifactCache,
        bf16: bool = False,
    ) -> None:
        self.task = task
        self.data = data
        self.profile = profile
        self.base_seed = base_seed
        self.device = device
        self.cache = cache
        self.bf16 = bf16
        self.records: dict[str, Any] = {}
        self.stages: list[dict[str, Any]] = []
        self.used: list[str] = []  # artifact keys touched, in order (upstream of later stages)
        self.seeds_used: dict[str, int] = {}  # component -> derived seed, for the manifest
        self._memo: dict[str, Any] = {}
        self.profile_hash = stable_hash(dict(profile), 16)

    # ------------------------------------------------------------------ seeds
    def seed(self, component: str) -> int:
        value = derive_seed(self.base_seed, self.task.task_id, component)
        if len(self.seeds_used) < 200 or component in self.seeds_used:  # per-slice seeds would flood it
            self.seeds_used[component] = value
        return value

    def generator(self, component: str, device: str = "cpu") -> "torch.Generator":
        import torch

        g = torch.Generator(device=device)
        g.manual_seed(self.seed(component))
        return g

    # ------------------------------------------------------------------ caching
    def artifact_key(
        self,
        stage: str,
        plugin: Plugin | type | str,
        params: dict[str, Any] | None = None,
        upstream: list[str] | tuple[str, ...] = (),
        version: str | None = None,
        source: Any = None,
    ) -> tuple[str, dict[str, Any]]:
        """The content key of an artifact and the description stored with it.

        key = stage + plugin name + version + source hash + parameters + upstream keys + seed
        + data fingerprint (+ the resolved profile and the task).
        """
        if isinstance(plugin, str):
            name, ver, src = plugin, version or "1", source_hash(source) if source is not None else ""
        else:
            cls = plugin if isinstance(plugin, type) else type(plugin)
            name, ver, src = cls.name or cls.__name__, version or cls.version, source_hash(source or cls)
        params = dict(params if params is not None else getattr(plugin, "p", {}))
        key = self.cache.key(stage, name, ver, src, {"params": params, "profile": self.profile_hash,
                                                      "task": self.task.task_id}, upstream,
                             self.base_seed, self.data.fingerprint)
        describe = {"plugin": name, "version": ver, "params": params, "task": self.task.task_id,
                    "profile": self.profile.name, "seed": self.base_seed}
        return key, describe

    def artifact(
        self,
        stage: str,
        plugin: Plugin | type | str,
        build: Callable[[Path], dict | None],
        params: dict[str, Any] | None = None,
        upstream: list[str] | tuple[str, ...] = (),
        version: str | None = None,
        source: Any = None,
    ) -> Built:
        """A cached artifact of this task/seed/data/profile; ``build(workdir)`` writes it."""
        key, describe = self.artifact_key(stage, plugin, params, upstream, version, source)
        built = self.cache.build(stage, key, build, describe)
        self.used.append(key)
        if built.hit:
            say(f"  [dim]reused cached {stage} ({describe['plugin']}, {key[:10]})[/dim]")
        return built

    # ------------------------------------------------------------------ shared models
    def classifier(self) -> "torch.nn.Module":
        """The task's CAM classifier (METHODS section 0), trained once and cached (safetensors)."""
        if "classifier" in self._memo:
            self.used.append(self._memo["classifier_key"])
            return self._memo["classifier"]
        from safetensors.torch import load_file, save_file

        from wsss_bench.cache import atomic_path
        from wsss_bench.nn import classifier as clf

        spec, recipe = dict(self.profile.cam_classifier), dict(self.profile.classifier)
        model = clf.build_classifier(self.profile.cam_classifier, self.task.channels, seed=self.seed("init/classifier"))

        def build(work: Path) -> dict:
            with self.stage("train/classifier"):
                state, info = clf.train_classifier(model, self.data, self.profile, self.device,
                                                   self.seed("train/classifier"), flips=self.task.flips,
                                                   bf16=self.bf16)
            with atomic_path(work / "model.safetensors") as tmp:
                save_file({k: v.contiguous().cpu() for k, v in state.items()}, str(tmp))
            return {"train": info}

        built = self.artifact("classifier", "cam-classifier", build, params={**spec, **recipe},
                              source=clf)
        model.load_state_dict(load_file(str(built.path / "model.safetensors")))
        model.to(self.device).eval()
        self._memo.update(classifier=model, classifier_key=built.key)
        return model

    def classifier_p1(self, idx) -> Any:
        """softmax p(1) of the CAM classifier on slices ``idx`` (for gate=classifier)."""
        import numpy as np

        from wsss_bench.nn.classifier import predict_p1

        model = self.classifier()
        bs = int(self.profile.classifier.batch)
        return np.asarray(predict_p1(model, self.data.batches(idx, bs, device=self.device)))

    # ------------------------------------------------------------------ bookkeeping
    def record(self, key: str, value: Any) -> None:
        """Add a fact to this run's manifest (e.g. AME-CAM's polarity and both drops)."""
        self.records[key] = value

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage; wall time and peak RSS go to the manifest."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages.append({"stage": name, "seconds": round(time.perf_counter() - t0, 3),
                                "peak_rss_mb": round(peak_rss_mb(), 1)})

    def progress(self, description: str, total: int | None):
        return progress(description, total)

    def autocast(self):
        """bf16 autocast when --bf16 was given, else a no-op context."""
        import contextlib

        import torch

        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda" if self.device.startswith("cuda") else "cpu",
                              dtype=torch.bfloat16)
