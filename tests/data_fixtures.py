"""Session fixtures of the data-layer tests: smoke phantoms and task data, built once.

conftest.py loads this module as a pytest plugin, so every test module can ask for these
fixtures by name; import only plain names such as ``SMOKE_TASKS`` from here.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from wsss_bench.data.readers import BratsDataset, Flare21Dataset
from wsss_bench.data.taskdata import ensure_phantom, load_task_data
from wsss_bench.profiles import load_profile

SMOKE_TASKS = {
    "brats": BratsDataset,
    "flare21-kidney": Flare21Dataset,
    "flare21-spleen": Flare21Dataset,
    "flare21-liver": Flare21Dataset,
}

__all__ = ["smoke_profile", "data_cache", "brats_phantom", "flare_phantom", "smoke_task_data", "SMOKE_TASKS"]


@pytest.fixture(scope="session")
def smoke_profile():
    return load_profile("smoke")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wsss-data-cache")


@pytest.fixture(scope="session")
def brats_phantom(data_cache, smoke_profile) -> Path:
    return ensure_phantom(BratsDataset(), smoke_profile, data_cache, 0)


@pytest.fixture(scope="session")
def flare_phantom(data_cache, smoke_profile) -> Path:
    return ensure_phantom(Flare21Dataset(), smoke_profile, data_cache, 0)


@pytest.fixture(scope="session")
def smoke_task_data(data_cache, smoke_profile, brats_phantom, flare_phantom) -> dict:
    """task id -> TaskData on the smoke phantoms, base seed 0."""
    return {
        task: load_task_data(cls(), task, None, smoke_profile, 0, data_cache) for task, cls in SMOKE_TASKS.items()
    }


def _synth(tmp_path_factory, kind: str, cases: int) -> Path:
    """A smoke phantom in the real dataset's layout, written by ``wsss-bench data synth``."""
    from typer.testing import CliRunner

    from wsss_bench import cli

    root = tmp_path_factory.mktemp(kind)
    result = CliRunner().invoke(cli.app, ["data", "synth", "--kind", kind, "--out", str(root),
                                          "--cases", str(cases), "--profile", "smoke"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def brats_root(tmp_path_factory) -> Path:
    """A 5-case smoke phantom in the real BraTS21 layout, one per test module (tests may damage it)."""
    return _synth(tmp_path_factory, "brats", 5)
