"""Safety (issue 14): no code path can unpickle or evaluate text, and a run needs no network.

1. A scan of the package and the built-in plugins (``wsss_bench/``, ``plugins/``) parses every
   file (so comments and docstrings never count) and fails on any of:
   - a pickle-family module or call (``pickle``, ``cPickle``, ``_pickle``, ``dill``,
     ``cloudpickle``, ``joblib``, ``shelve``, ``marshal``; ``read_pickle``/``to_pickle``);
   - ``torch.load(...)`` without ``weights_only=True`` (or ``from torch import load``);
   - ``np.load(...)``/``numpy.load(...)`` with ``allow_pickle`` set to anything but ``False``;
   - the builtins ``eval(...)``/``exec(...)`` (``model.eval()`` is a method, not the builtin).
   The scanner is checked on a file holding each pattern (it must flag them) and on one
   holding the same words in comments, strings and methods (it must not).
2. The smoke pipeline runs with the network switched off in the process: every socket
   connect outside AF_UNIX, ``socket.create_connection`` and name lookups raise, and every
   attempt is recorded; the run succeeds and none was attempted.
"""
from __future__ import annotations

import ast
import socket
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from wsss_bench import cli

ROOT = Path(__file__).resolve().parents[1]
SCANNED = (ROOT / "wsss_bench", ROOT / "plugins")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
PICKLE_NAMES = {"read_pickle", "to_pickle", "Unpickler", "loads_pickle"}


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def violations(path: Path) -> list[str]:
    """Every unsafe construct of one Python file, as 'file:line: what'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def add(node: ast.AST, what: str) -> None:
        found.append(f"{path}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PICKLE_MODULES:
                    add(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in PICKLE_MODULES:
                add(node, f"from {node.module} import ...")
            if mod == "torch" and node.module == "torch" and any(a.name == "load" for a in node.names):
                add(node, "from torch import load (use torch.load(..., weights_only=True))")
        elif isinstance(node, ast.Attribute) and node.attr in PICKLE_NAMES:
            add(node, f".{node.attr}")
        elif isinstance(node, ast.Name) and (node.id in PICKLE_MODULES or node.id in PICKLE_NAMES):
            add(node, node.id)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
                add(node, f"{func.id}(...)")
            if isinstance(func, ast.Attribute) and func.attr == "load" and isinstance(func.value, ast.Name):
                if func.value.id == "torch" and not _is_true(_kw(node, "weights_only")):
                    add(node, "torch.load without weights_only=True")
                if func.value.id in ("np", "numpy"):
                    allow = _kw(node, "allow_pickle")
                    if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                        add(node, "np.load with allow_pickle")
    return found


def test_the_scanner_flags_each_pattern_and_nothing_else(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent('''
        import pickle
        import cloudpickle as cp
        from joblib import dump
        import numpy as np
        import torch
        from torch import load
        state = torch.load("w.pt")
        also = torch.load("w.pt", weights_only=False)
        arr = np.load("a.npy", allow_pickle=True)
        flag = True
        arr2 = np.load("a.npy", allow_pickle=flag)
        value = eval("1 + 1")
        exec("x = 1")
        frame = pd.read_pickle("f.pkl")
    '''))
    found = violations(bad)
    for what in ("import pickle", "import cloudpickle", "from joblib", "from torch import load",
                 "torch.load without weights_only=True", "np.load with allow_pickle", "eval(...)", "exec(...)",
                 ".read_pickle"):
        assert any(what in f for f in found), (what, found)
    assert sum("torch.load without" in f for f in found) == 2
    assert sum("np.load with allow_pickle" in f for f in found) == 2

    good = tmp_path / "good.py"
    good.write_text(textwrap.dedent('''
        """Never pickle; torch.load(path) would unpickle; eval(text) too; np.load(allow_pickle=True)."""
        import numpy as np
        import torch
        # import pickle  -- a comment
        note = "exec(code) and pickle.loads are what we never do"
        state = torch.load("w.pt", weights_only=True)
        arr = np.load("a.npy")
        arr2 = np.load("a.npy", allow_pickle=False)
        def f(model):
            model.eval()
            return model
    '''))
    assert violations(good) == []


def test_no_pickle_no_unsafe_load_no_eval_in_the_package():
    files = sorted(p for d in SCANNED for p in d.rglob("*.py"))
    assert len(files) > 20
    found = [v for f in files for v in violations(f)]
    assert found == [], "\n".join(found)


# ============================================================================ no network at run time
@pytest.fixture
def no_network(monkeypatch):
    """Every network attempt in this process raises, and is recorded."""
    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(what: str):
        attempts.append(what)
        return OSError(f"network access attempted at run time: {what}")

    def connect(self, address):
        if self.family == getattr(socket, "AF_UNIX", None):
            return real_connect(self, address)
        raise refuse(f"connect {address!r}")

    def connect_ex(self, address):
        if self.family == getattr(socket, "AF_UNIX", None):
            return real_connect_ex(self, address)
        raise refuse(f"connect_ex {address!r}")

    def create_connection(address, *args, **kwargs):
        raise refuse(f"create_connection {address!r}")

    def getaddrinfo(host, *args, **kwargs):
        raise refuse(f"getaddrinfo {host!r}")

    class NoInetSocket(socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family in (socket.AF_INET, socket.AF_INET6):
                raise refuse(f"socket({family!r})")
            super().__init__(family, type, proto, fileno)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "socket", NoInetSocket)
    return attempts


def test_the_guard_refuses_the_network(no_network):
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen("http://example.com", timeout=1)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", 9))
    assert len(no_network) >= 2
    no_network.clear()
    a, b = socket.socketpair()  # local pipes (multiprocessing) stay allowed
    a.close(), b.close()
    assert no_network == []


def test_smoke_run_needs_no_network(no_network, monkeypatch, tmp_path):
    monkeypatch.setitem(cli._STATE, "host", None)
    result = CliRunner().invoke(cli.app, [
        "run", "--profile", "smoke", "--task", "brats", "--cam", "gradcam", "--method", "threshold",
        "--device", "cpu", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert no_network == []
    assert len(pd.read_parquet(tmp_path / "out" / "results.parquet"))
    # it trained from scratch (a fresh cache): the classifier's weights were built in this run
    assert list((tmp_path / "cache" / "artifacts" / "classifier").glob("*/classifier.safetensors"))
