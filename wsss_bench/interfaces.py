"""The small interfaces every plugin sees.

A plugin class declares ``name``, ``version`` (part of every cache key: bump it when the
outputs change) and ``params`` (defaults; spec strings such as ``gradcam[layer=layer3]``
override them).  The runner binds a :class:`~wsss_bench.context.RunContext` to the plugin
(``plugin.ctx``) before calling ``prepare``.

Tensor conventions: images are ``(B, C, S, S)`` float32 in [0, 1] on ``ctx.device``;
maps are ``(B, S, S)`` float in [0, 1]; masks are ``(B, S, S)`` bool.

This module must stay light: no torch import at module level (plugin listing imports it).
"""
from __future__ import annotations

import abc
import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Sequence

from wsss_bench import PLUGIN_API
from wsss_bench.errors import PluginError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd
    import torch

    from wsss_bench.context import RunContext


# --------------------------------------------------------------------------- parameters
def coerce_param(plugin: str, key: str, default: Any, value: Any) -> Any:
    """Convert a spec-string value to the type of the parameter's default."""
    if default is None or value is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(default, int) and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, (list, tuple)):
            items = list(value) if isinstance(value, (list, tuple)) else str(value).split("+")
            return [
                coerce_param(plugin, key, default[0], v) if default else v for v in items
            ]
        if isinstance(default, str):
            return str(value)
    except (TypeError, ValueError):
        raise PluginError(
            f"plugin '{plugin}': parameter '{key}' expects {type(default).__name__} "
            f"(default {default!r}), got {value!r}"
        ) from None
    return value


class Plugin:
    """Base class of every configurable plugin."""

    kind: ClassVar[str] = "plugin"
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    params: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""
    #: only a plugin that sets this (the fully supervised upper bound) may read training
    #: masks through ``ctx.data``; every other plugin gets a PluginError if it tries
    reads_train_masks: ClassVar[bool] = False
    #: the plugin API version (:data:`wsss_bench.PLUGIN_API`) this plugin was written for;
    #: None: the current one, except a refiner with the first single-source signature (API 1)
    plugin_api: ClassVar[int | None] = None

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            known = ", ".join(f"{k}={v!r}" for k, v in self.params.items()) or "none"
            hint = ""
            close = difflib.get_close_matches(unknown[0], list(self.params), n=1)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            raise PluginError(
                f"{self.kind} plugin '{self.name}' has no parameter "
                f"{', '.join(repr(u) for u in unknown)}{hint}; its parameters are: {known}"
            )
        resolved = dict(self.params)
        for key, value in params.items():
            resolved[key] = coerce_param(self.name, key, self.params[key], value)
        self.p: dict[str, Any] = resolved
        self.ctx: RunContext | None = None
        self.validate()

    def validate(self) -> None:
        """Check parameter values; raise PluginError naming the bad one."""

    def bad_param(self, key: str, why: str) -> PluginError:
        return PluginError(f"{self.kind} plugin '{self.name}': parameter {key}={self.p.get(key)!r} {why}")

    @classmethod
    def source_file(cls) -> str:
        return inspect.getsourcefile(cls) or ""

    def spec(self) -> str:
        """Canonical spec string: the name plus the parameters that differ from defaults."""
        changed = {k: v for k, v in self.p.items() if v != self.params.get(k)}
        return format_spec(self.name, changed)


# --------------------------------------------------------------------------- data records
# TaskDef and SliceBatch live in wsss_bench.records (no imports, so data/ and the context can
# use them without importing the plugin interfaces); re-exported here for plugin authors.
from wsss_bench.records import SliceBatch, TaskDef  # noqa: E402
from wsss_bench.spec import format_spec


# --------------------------------------------------------------------------- plugin kinds
class DatasetSource(Plugin):
    """Reads one dataset's on-disk layout and writes its synthetic phantom."""

    kind: ClassVar[str] = "dataset"
    tasks: ClassVar[dict[str, TaskDef]] = {}
    cap_key: ClassVar[str] = ""  # key of the profile's real_case_cap

    @abc.abstractmethod
    def cases(self, root: Path) -> list[str]:
        """Sorted case ids under ``root``; UserError naming the root if there are none."""

    @abc.abstractmethod
    def load(self, root: Path, case: str) -> tuple["np.ndarray", "np.ndarray"]:
        """One case as (image (C, X, Y, Z) float32 in [0, 1], labels (X, Y, Z) uint8), RAS."""

    @abc.abstractmethod
    def synthesize(self, out: Path, profile: Any, seed: int, n_cases: int | None = None) -> None:
        """Write the phantom for ``profile`` into ``out`` in this dataset's real layout."""

    @property
    @abc.abstractmethod
    def phantom_version(self) -> str:
        """Version of the phantom generator (part of the data fingerprint)."""


class CamSource(Plugin):
    """Produces an activation map per image."""

    kind: ClassVar[str] = "cam"
    #: how a map becomes a mask (docs/protocol.md section 6): "cam" = minmax > 0.5, "otsu" = Otsu
    mask_rule: ClassVar[str] = "cam"

    def prepare(self, ctx: "RunContext") -> None:
        """Train or load what the method needs (through ``ctx.artifact``)."""

    @abc.abstractmethod
    def maps(self, batch: SliceBatch) -> "torch.Tensor":
        """(B, S, S) maps in [0, 1] at image size for ``batch.images``."""


class Refiner(Plugin):
    """Turns maps (or images) into binary masks.

    ``sources`` are the cell's prepared map sources, in the order of ``--cam a+b`` (empty when
    ``needs_cam`` is False); ``maps[i]`` holds ``sources[i]``'s (B, S, S) maps of the batch.
    A refiner obtains anything else it needs (a feature backbone, an extra map source, the
    maps of the training slices) from the context: ``ctx.plugin`` and ``ctx.maps``.
    """

    kind: ClassVar[str] = "refiner"
    needs_cam: ClassVar[bool] = True

    def prepare(self, ctx: "RunContext", sources: "Sequence[CamSource]") -> None:
        """Train what the refiner needs."""

    def implied_sources(self, sources: "Sequence[str]") -> list[str]:
        """Names of the map sources this refiner adds by itself to the cell's ``sources``
        (default: none).  The cell's canonical label names them, so ``--cam amecam --method
        cldf`` and ``--cam amecam+mg --method cldf`` are one cell with one label."""
        return []

    @abc.abstractmethod
    def refine(self, batch: SliceBatch, maps: "Sequence[torch.Tensor]", sources: "Sequence[CamSource]") -> "torch.Tensor":
        """(B, S, S) bool masks."""

    def train_seeds(self) -> "tuple[Any, Any, Any] | None":
        """The training seeds this refiner made in ``prepare``, for the runner's seed-quality
        report: (row indices into the task's slices, fg (N, S, S) bool, bg (N, S, S) bool),
        or None for a refiner that trains on no seeds.  Never given any mask."""
        return None


class FeatureBackbone(Plugin):
    """Per-pixel features at image resolution, never materialised densely for many images."""

    kind: ClassVar[str] = "backbone"

    def prepare(self, ctx: "RunContext") -> None:
        """Train or load the network."""

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Feature dimension D."""

    @abc.abstractmethod
    def gather(self, images: "torch.Tensor", coords: "torch.Tensor") -> "torch.Tensor":
        """Features (N, D) at pixels ``coords`` (N, 3) = (batch index, row, column)."""

    @abc.abstractmethod
    def stream(self, image: "torch.Tensor", chunk: int) -> Iterator[tuple[slice, "torch.Tensor"]]:
        """Yield (flat pixel range, features (n, D)) over one image (C, S, S) in chunks."""


@dataclass
class ReportTable:
    """A laid-out table handed to exporters; numbers are already formatted."""

    title: str
    header: list[str]  # header[0] labels the row-name column
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)  # (row, column) to emphasise
    rules_after: list[int] = field(default_factory=list)  # draw a rule after these rows
    footer: str = ""
    raw: "pd.DataFrame | None" = None  # tidy numbers for machine-readable formats
    kind: str = ""  # "table1".."table3" for the paper's tables (the LaTeX exporter's compact preset)


class Exporter(Plugin):
    """Writes a ReportTable in one format."""

    kind: ClassVar[str] = "exporter"
    suffix: ClassVar[str] = ".txt"

    @abc.abstractmethod
    def export(self, table: ReportTable) -> str:
        """The table as text."""


class Executor(Plugin):
    """Runs many cells: in this process, in a pool, or on a cluster."""

    kind: ClassVar[str] = "executor"

    @abc.abstractmethod
    def map(self, fn: Callable[[Any], Any], cells: Sequence[Any]) -> list[Any]:
        """Apply ``fn`` to every cell; a failing cell yields its exception, others go on."""


# --------------------------------------------------------------------------- plugin API versions
def target_api(cls: Any) -> int:
    """The plugin API version ``cls`` was written for: its ``plugin_api``, else 1 for a refiner
    whose ``refine`` names its third parameter ``cam`` (the first published signature
    ``refine(batch, maps, cam)``), else the current :data:`wsss_bench.PLUGIN_API`."""
    declared = getattr(cls, "plugin_api", None)
    if declared is not None:
        return int(declared)
    if isinstance(cls, type) and issubclass(cls, Refiner):
        try:
            names = list(inspect.signature(cls.refine).parameters)
        except (TypeError, ValueError):
            names = []
        if len(names) >= 4 and names[3] == "cam":  # self, batch, maps, cam
            return 1
    return PLUGIN_API


def api_problem(cls: Any, noun: str, name: str) -> str | None:
    """One sentence when ``cls`` targets a plugin API this wsss-bench cannot serve, else None."""
    api = target_api(cls)
    if api > PLUGIN_API:
        return (f"{noun} '{name}' targets plugin API {api}, newer than this wsss-bench's {PLUGIN_API}; "
                f"upgrade wsss-bench or use a release of the plugin written for API {PLUGIN_API}")
    if api < 1:
        return f"{noun} '{name}' declares plugin_api = {api}; plugin API versions start at 1"
    return None


def adapt_refiner(cls: type[Refiner]) -> type[Refiner]:
    """A refiner written for plugin API 1 (one map source: ``prepare(ctx, cam)`` and
    ``refine(batch, maps, cam)`` with ``maps`` a tensor or None) as a current refiner; any
    other class is returned unchanged.  Such a refiner accepts at most one ``--cam`` source."""
    if not (isinstance(cls, type) and issubclass(cls, Refiner)) or target_api(cls) != 1:
        return cls
    original = cls

    def _one(self: Refiner, sources: Sequence[Any]) -> Any:
        if len(sources) > 1:
            raise PluginError(f"refiner '{self.name}' was written for plugin API 1 (one map source) and cannot "
                              f"refine the combined sources {'+'.join(s.spec() for s in sources)}; give it one "
                              f"--cam source")
        return sources[0] if sources else None

    def prepare(self: Refiner, ctx: "RunContext", sources: Sequence[Any] = ()) -> None:
        original.prepare(self, ctx, _one(self, tuple(sources)))

    def refine(self: Refiner, batch: SliceBatch, maps: Sequence[Any], sources: Sequence[Any]) -> Any:
        return original.refine(self, batch, maps[0] if len(maps) else None, _one(self, tuple(sources)))

    return type(cls.__name__, (cls,), {
        "prepare": prepare, "refine": refine, "plugin_api": 1, "adapted_from": cls,
        "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})


PLUGIN_KINDS: dict[str, type[Plugin]] = {
    "datasets": DatasetSource,
    "cams": CamSource,
    "refiners": Refiner,
    "backbones": FeatureBackbone,
    "exporters": Exporter,
    "executors": Executor,
}
