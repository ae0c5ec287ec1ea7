"""Shared fixtures: every test uses a private cache and no progress bars."""
from __future__ import annotations

import os

import pytest

# Fixtures live in modules of their own and reach every test module from here, never by star import:
# data_fixtures = the smoke phantoms and task data, built once per session.
pytest_plugins = ["pytester", "data_fixtures"]

# No rich progress bars in tests.  Not through ``CI``: that variable means "the real CI"
# (``.ci/run`` exports it), where a missing browser fails tests/test_html.py instead of skipping.
os.environ.setdefault("WSSS_BENCH_NO_BARS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tests never touch the user's cache; the session-wide cache dir is shared between tests."""
    root = tmp_path_factory.getbasetemp() / "wsss-cache"
    monkeypatch.setenv("WSSS_BENCH_CACHE", str(root))
    for var in ("WSSS_BENCH_LOAD_PLUGINS", "WSSS_BENCH_PLUGINS_DIR", "WSSS_BENCH_STRICT_PLUGINS",
                "WSSS_BENCH_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "wsss-cache"


@pytest.fixture
def run_cli(monkeypatch):
    """``run_cli(*args)``: the command line in this process (typer's CliRunner), with a fresh
    plugin host and fresh plugin warnings for each test."""
    from typer.testing import CliRunner

    from wsss_bench import cli
    from wsss_bench import plugins as plugins_mod

    monkeypatch.setitem(cli._STATE, "host", None)
    if hasattr(plugins_mod, "_SHOWN"):
        monkeypatch.setattr(plugins_mod, "_SHOWN", set())  # each test sees its own plugin warnings
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli.app, [str(a) for a in args])

    return invoke


@pytest.fixture
def one_thread():
    """Tiny networks: one intra-op thread is faster and immune to a busy second core."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
