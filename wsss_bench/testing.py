"""Contract tests for wsss-bench plugins, shipped as a pytest plugin (entry point ``pytest11``).

Run the suite on any registered plugin, ours or yours, from your own package::

    pytest --wsss-bench-plugin randomcam            # one item (any kind)
    pytest --wsss-bench-plugin cams:randomcam       # kind-qualified
    pytest --wsss-bench-plugin my_entry_point       # everything an entry point registers
    pytest --wsss-bench-plugin builtin              # every built-in (what our CI runs)
    pytest --wsss-bench-plugin all                  # everything installed

or set ``wsss_bench_plugins = randomcam`` in the ``[pytest]`` ini section.  Each selected
plugin runs on the ``smoke`` profile's synthetic phantom (CPU) and is checked against the
promises of its interface: shapes, value ranges, determinism under a seed, parameters that
round-trip through spec strings, cache keys that change with parameters.
"""
from __future__ import annotations

from pathlib import Path

from wsss_bench import PLUGIN_API
from wsss_bench.errors import UserError
from wsss_bench.interfaces import target_api
from wsss_bench.plugins import load_plugins

SUITE = Path(__file__).with_name("contract_suite.py")


def pytest_addoption(parser) -> None:
    group = parser.getgroup("wsss-bench", "wsss-bench plugin contract suite")
    group.addoption("--wsss-bench-plugin", action="append", default=[], metavar="NAME",
                    help="run the wsss-bench contract suite on this plugin (name, kind:name, "
                         "entry-point name, 'builtin' or 'all'); repeatable")
    group.addoption("--wsss-bench-task", default=None, metavar="TASK",
                    help="task the contract suite runs CAM sources / refiners on (default: brats "
                         "or the plugin's contract_tasks)")
    parser.addini("wsss_bench_plugins", "plugins the wsss-bench contract suite runs on", type="args", default=[])


def selection(config) -> list[str]:
    chosen = list(config.getoption("--wsss-bench-plugin") or [])
    return chosen or list(config.getini("wsss_bench_plugins") or [])


def pytest_configure(config) -> None:
    """Add the suite to the collection: always when asked on the command line; from the ini
    value only for a whole-suite run (no explicit paths), so `pytest tests/test_x.py` stays quick."""
    import pytest

    config.addinivalue_line("markers", "wsss_contract: a wsss-bench plugin contract test")
    asked = bool(config.getoption("--wsss-bench-plugin"))
    whole_run = config.args_source != pytest.Config.ArgsSource.ARGS
    if (asked or (whole_run and selection(config))) and str(SUITE) not in [str(a) for a in config.args]:
        config.args.append(str(SUITE))


def pytest_report_header(config) -> list[str] | None:
    """Say which plugin API this wsss-bench provides and which one each selected plugin targets
    (an older one runs through an adapter, see docs/plugins.md)."""
    if not selection(config):
        return None

    host = load_plugins()
    lines = [f"wsss-bench plugin API {PLUGIN_API}"]
    for kind, name in select_items(host, selection(config)):
        api = target_api(host.get(kind, name)) if kind != "commands" else PLUGIN_API
        note = " (runs through the API 1 adapter)" if api < PLUGIN_API and kind == "refiners" and api == 1 else ""
        lines.append(f"  {kind}:{name} targets plugin API {api}{note}")
    return lines


def select_items(host, names: list[str]) -> list[tuple[str, str]]:
    """(kind, name) pairs picked by the selection words; an unknown word is an error."""
    picked: list[tuple[str, str]] = []
    every = [(kind, e.name, e.plugin) for kind, reg in host.registries.items() for e in reg.list()]
    for word in names:
        if word == "all":
            found = [(k, n) for k, n, _ in every]
        elif word == "builtin":
            found = [(k, n) for k, n, p in every if host.infos[p].builtin]
        elif ":" in word and (word.split(":", 1)[0] in host.registries
                              or not any(n == word for _, n, _ in every)):  # not a qualified name
            kind, name = word.split(":", 1)
            if kind not in host.registries:
                raise UserError(f"--wsss-bench-plugin {word}: unknown kind '{kind}'; kinds: {', '.join(host.registries)}")
            host.registries[kind].entry(name)
            found = [(kind, name)]
        else:
            found = [(k, n) for k, n, p in every if n == word or p == word]
            if not found:
                raise UserError(f"--wsss-bench-plugin {word}: no registered plugin or item of that name; "
                                f"installed: {', '.join(sorted({n for _, n, _ in every}))}")
        picked += [f for f in found if f not in picked and f[0] != "commands"]
    return picked
