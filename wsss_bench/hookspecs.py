"""Hook specifications: how a plugin adds things to wsss-bench.

Each hook hands the plugin a ``register`` callback; the plugin calls it once per thing it
provides.  The host owns naming: a name already taken is refused with a warning naming both
plugins, so a third-party plugin never silently replaces a built-in.

    from wsss_bench.hookspecs import hookimpl

    @hookimpl
    def register_cam_sources(register):
        register(MyCam)          # a CamSource subclass whose class attribute ``name`` is set
"""
from __future__ import annotations

import pluggy

PROJECT = "wsss_bench"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_datasets(register):
    """Register DatasetSource subclasses: ``register(cls)``; their ``tasks`` become --task values."""


@hookspec
def register_cam_sources(register):
    """Register CamSource subclasses: ``register(cls)``; selected with ``--cam NAME[k=v]``."""


@hookspec
def register_backbones(register):
    """Register FeatureBackbone subclasses: ``register(cls)``; used by feature-based refiners."""


@hookspec
def register_refiners(register):
    """Register Refiner subclasses: ``register(cls)``; selected with ``--method NAME[k=v]``."""


@hookspec
def register_exporters(register):
    """Register Exporter subclasses: ``register(cls)``; selected with ``report --format NAME``."""


@hookspec
def register_executors(register):
    """Register Executor subclasses: ``register(cls)``; selected with ``run --executor NAME``."""


@hookspec
def register_commands(register):
    """Register CLI commands: ``register(function, name=None)``, a Typer-style command function."""
