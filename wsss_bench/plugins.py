"""The plugin manager: one pluggy manager, entry points loaded one by one.

Built-in plugins are entry points of this project's own distribution (group ``wsss_bench``),
so ours and third-party plugins load by one mechanism.  A plugin that fails to import or to
register is skipped with one warning line naming its entry point, module and distribution,
the error and where in the plugin it was raised; a plugin that registers a name another
plugin already holds names both distributions: the first one (built-ins first) keeps the
name, the other stays reachable as ``distribution:name`` (``file:name`` for a loose file).  A
refiner written for plugin API 1 (one map source) is adapted at registration
(:func:`wsss_bench.interfaces.adapt_refiner`); a plugin for a newer API is skipped.
``strict`` (``--strict`` or ``WSSS_BENCH_STRICT_PLUGINS=1``) makes each of these fatal: a
:class:`PluginError` that says so.  A broken plugin can only break itself.

Problems go to ``report`` (the CLI prints each as one plain ``warning:`` line, see
:func:`show_problem`); without one they are :class:`PluginLoadWarning` Python warnings.

Environment:
- ``WSSS_BENCH_LOAD_PLUGINS=a,b``: load only these third-party entry points ("" = none);
  the built-ins always load.
- ``WSSS_BENCH_PLUGINS_DIR=DIR[:DIR]``: extra directories of loose ``*.py`` plugin files
  (same as ``--plugins-dir``).  Each file is Python code, executed with the user's
  permissions by every command (``list`` and ``profiles`` too); the CLI names the files it ran.
- ``WSSS_BENCH_STRICT_PLUGINS=1``: re-raise plugin errors.
- ``WSSS_BENCH_TRACE_PLUGINS=1``: print every hook call.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterable

import pluggy

from wsss_bench import hookspecs
from wsss_bench.errors import PluginError, UserError
from wsss_bench.interfaces import adapt_refiner, api_problem
from wsss_bench.registry import Registry

GROUP = "wsss_bench"
BUILTIN_DIST = "wsss-bench"

#: registry kind -> (hook name, what one item is called)
HOOKS: dict[str, tuple[str, str]] = {
    "datasets": ("register_datasets", "dataset"),
    "cams": ("register_cam_sources", "CAM source"),
    "backbones": ("register_backbones", "feature backbone"),
    "refiners": ("register_refiners", "refiner"),
    "exporters": ("register_exporters", "exporter"),
    "executors": ("register_executors", "executor"),
    "commands": ("register_commands", "command"),
}


class PluginLoadWarning(UserWarning):
    """A plugin was skipped because it failed to load or register."""


class StrictPluginError(PluginError):
    """A plugin problem made fatal by ``strict`` (raised through the register callbacks)."""


_SHOWN: set[str] = set()


def show_problem(message: str) -> None:
    """Print one plugin problem as one plain line on stderr (each message once per process:
    the CLI may load the plugins twice, e.g. for ``run --plugins-dir``)."""
    if message in _SHOWN:
        return
    _SHOWN.add(message)
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    origin: str  # "entry point NAME = MODULE" or a file path
    error: str | None = None
    provides: list[str] = field(default_factory=list)  # "kind:name"
    module: str = ""  # the module an entry point names (or the file's module name)

    @property
    def qualifier(self) -> str:
        """What qualifies this plugin's item names on a clash (``qualifier:name``): the
        distribution of an entry point, the file name (without .py) of a loose file."""
        return self.distribution if self.origin.startswith("entry point") else self.module or self.name

    @property
    def builtin(self) -> bool:
        return self.distribution == BUILTIN_DIST

    def describe(self) -> str:
        """How messages name the plugin: entry point, module and distribution (or the file)."""
        if self.origin.startswith("entry point"):
            return (f"entry point '{self.name}' (module {self.module or '?'}, distribution "
                    f"{self.distribution} {self.version}{', built-in' if self.builtin else ''})")
        return f"file {self.origin}"


def _raised_at(err: BaseException) -> str:
    """'FILE:LINE' of the plugin code that raised ``err`` (the deepest frame outside the
    import machinery, pluggy and this module), or '' when there is none."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    here = os.path.abspath(__file__)
    pluggy_dir = os.path.dirname(os.path.abspath(pluggy.__file__))
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        name = frame.filename
        if name.startswith("<") or os.path.abspath(name) == here or name.startswith(pluggy_dir):
            continue
        if os.sep + "importlib" + os.sep in name:
            continue
        return f"{name}:{frame.lineno}"
    return ""


def _renamed(obj: Any, name: str) -> Any:
    """``obj`` as registered under ``name``: a plugin class gets a subclass whose ``name`` is the
    qualified one (so its spec strings, row labels, memo and cache keys are its own); other
    objects (commands) are registered as they are."""
    if isinstance(obj, type) and isinstance(getattr(obj, "name", None), str):
        return type(obj.__name__, (obj,), {"name": name, "__module__": obj.__module__,
                                           "__qualname__": obj.__qualname__, "__doc__": obj.__doc__})
    return obj


class Host:
    """The loaded plugins and one registry per kind."""

    def __init__(self, strict: bool = False, trace: bool = False,
                 report: Callable[[str], None] | None = None) -> None:
        self.strict = strict
        self.report = report
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if trace:
            self.pm.trace.root.setwriter(lambda msg: sys.stderr.write(msg))
            self.pm.enable_tracing()
        self.registries: dict[str, Registry] = {k: Registry(k, noun) for k, (_, noun) in HOOKS.items()}
        self.infos: dict[str, PluginInfo] = {}
        self.problems: list[str] = []
        #: loose plugin files executed from --plugins-dir / WSSS_BENCH_PLUGINS_DIR, in load order
        self.loose_files: list[Path] = []

    # ----------------------------------------------------------------- loading
    def _problem(self, message: str, fatal: str, err: BaseException | None = None) -> None:
        """Record one problem: fatal under strict (``fatal`` says so), else one warning line."""
        self.problems.append(message)
        if self.strict:
            raise StrictPluginError(fatal) from err
        if self.report is not None:
            self.report(message)
        else:
            warnings.warn(message, PluginLoadWarning, stacklevel=4)

    def _fail(self, info: PluginInfo, err: BaseException, what: str) -> None:
        info.error = " ".join(f"{type(err).__name__}: {err}".split())  # one line
        where = _raised_at(err)
        at = f" (raised at {where})" if where else ""
        fix = ("fix or uninstall it" if info.origin.startswith("entry point") else "fix or remove the file")
        self._problem(f"plugin {info.describe()} {what} and was skipped: {info.error}{at}",
                      f"plugin {info.describe()} {what}: {info.error}{at}. This is fatal under --strict "
                      f"(WSSS_BENCH_STRICT_PLUGINS); {fix}, or run without --strict to skip it", err)

    def add_plugin(self, obj: Any, info: PluginInfo) -> None:
        if info.name in self.infos and self.infos[info.name].error is None:
            first = self.infos[info.name]
            self._problem(
                f"plugin {info.describe()} has the same name as the loaded plugin {first.describe()} "
                f"and was skipped; rename one of the two entry points",
                f"plugin {info.describe()} has the same name as the loaded plugin {first.describe()}. "
                f"This is fatal under --strict; rename one of the two entry points")
            return
        self.infos[info.name] = info
        try:
            self.pm.register(obj, name=info.name)
        except Exception as err:  # pluggy validation errors (bad hook names, signatures)
            self._fail(info, err, "failed to register")

    def load_entry_points(self, only: set[str] | None = None) -> None:
        eps = sorted(entry_points(group=GROUP), key=lambda e: (e.dist is None or e.dist.name != BUILTIN_DIST, e.name))
        for ep in eps:
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            builtin = dist == BUILTIN_DIST
            if not builtin and only is not None and ep.name not in only:
                continue
            info = PluginInfo(ep.name, dist, version, f"entry point {ep.name} = {ep.value}",
                              module=ep.value.split(":")[0].strip())
            try:
                obj = ep.load()
            except Exception as err:
                self.infos[info.name] = info
                self._fail(info, err, "failed to import")
                continue
            self.add_plugin(obj, info)

    def load_directory(self, directory: Path) -> None:
        directory = Path(directory)
        if not directory.is_dir():
            raise UserError(f"--plugins-dir {directory}: not a directory; point it at a folder of *.py plugin files")
        for path in sorted(directory.glob("*.py")):
            name = path.stem
            info = PluginInfo(name, f"file:{path.parent}", "-", str(path), module=path.stem)
            mod_name = f"wsss_bench_local_plugins.{name}"
            self.loose_files.append(path.resolve())
            try:
                spec = importlib.util.spec_from_file_location(mod_name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            except Exception as err:
                self.infos[info.name] = info
                self._fail(info, err, "failed to import")
                continue
            self.add_plugin(module, info)

    def collect(self) -> None:
        """Call every register_* hook once per plugin, so each item is attributed to its plugin."""
        plugins = self.pm.list_name_plugin()
        for kind, (hook_name, _noun) in HOOKS.items():
            registry = self.registries[kind]
            for plugin_name, plugin in plugins:
                info = self.infos.get(plugin_name)
                if info is None or info.error:
                    continue
                others = [p for n, p in plugins if n != plugin_name]
                caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
                try:
                    caller(register=self._register_cb(kind, registry, info))
                except StrictPluginError:
                    raise
                except Exception as err:
                    self._fail(info, err, f"raised in {hook_name}")

    def _register_cb(self, kind: str, registry: Registry, info: PluginInfo) -> Callable[..., None]:
        def register(obj: Any, name: str | None = None) -> None:
            item_name = name or getattr(obj, "name", None) or getattr(obj, "__name__", "")
            if kind == "commands":
                item_name = (name or getattr(obj, "__name__", "")).replace("_", "-")
            if item_name and isinstance(item_name, str) and item_name in registry:
                holder = registry.entry(item_name).plugin
                first = self.infos.get(holder)
                who = first.describe() if first is not None else f"'{holder}'"
                kept = "the built-in" if first is not None and first.builtin else "the first"
                clash = (f"plugin {info.describe()} tried to register {registry.noun} '{item_name}', already "
                         f"registered by {who}")
                if self.strict:
                    self._problem(clash, f"{clash}. This is fatal under --strict; rename the {registry.noun} "
                                         f"of one of them")
                qualified = f"{info.qualifier}:{item_name}"
                if qualified in registry or registry.add(qualified, _renamed(obj, qualified), info.name):
                    self._problem(f"{clash}; kept {kept}; rename the {registry.noun} of one of them", clash)
                    return
                info.provides.append(f"{kind}:{qualified}")
                self._problem(f"{clash}; kept {kept} as '{item_name}'; this plugin's {registry.noun} is "
                              f"reachable as '{qualified}' (or rename it)", clash)
                return
            problem = api_problem(obj, registry.noun, item_name) if isinstance(obj, type) else None
            if problem:
                self._problem(f"plugin {info.describe()}: {problem}; skipped it", f"plugin {info.describe()}: {problem}")
                return
            if kind == "refiners":
                obj = adapt_refiner(obj)
            problem = registry.add(item_name, obj, info.name)
            if problem:
                self._problem(problem, f"{problem}. This is fatal under --strict")
                return
            info.provides.append(f"{kind}:{item_name}")

        return register

    # ----------------------------------------------------------------- lookups
    def get(self, kind: str, name: str) -> Any:
        return self.registries[kind].get(name)

    def tasks(self) -> dict[str, Any]:
        """task id -> the dataset class that provides it."""
        out: dict[str, Any] = {}
        for entry in self.registries["datasets"].list():
            for task_id in getattr(entry.obj, "tasks", {}):
                out.setdefault(task_id, entry.obj)
        return out

    def task(self, task_id: str):
        """(dataset class, TaskDef) for ``task_id``, or a did-you-mean error."""
        tasks = self.tasks()
        if task_id not in tasks:
            close = difflib.get_close_matches(task_id, list(tasks), n=2, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UserError(f"unknown task '{task_id}'.{hint} Available: {', '.join(sorted(tasks)) or '(none)'}")
        cls = tasks[task_id]
        return cls, cls.tasks[task_id]


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def load_plugins(
    strict: bool | None = None,
    plugins_dirs: Iterable[Path | str] = (),
    only: Iterable[str] | None = None,
    trace: bool | None = None,
    report: Callable[[str], None] | None = None,
) -> Host:
    """Build a Host: entry points, then plugin directories, then every register hook.

    ``report(message)`` receives each plugin problem (default: a :class:`PluginLoadWarning`);
    the CLI passes :func:`show_problem`."""
    strict = _env_flag("WSSS_BENCH_STRICT_PLUGINS") if strict is None else strict
    trace = _env_flag("WSSS_BENCH_TRACE_PLUGINS") if trace is None else trace
    if only is None and "WSSS_BENCH_LOAD_PLUGINS" in os.environ:
        only = [s.strip() for s in os.environ["WSSS_BENCH_LOAD_PLUGINS"].split(",") if s.strip()]
    dirs = [Path(d) for d in plugins_dirs]
    env_dirs = os.environ.get("WSSS_BENCH_PLUGINS_DIR", "")
    dirs += [Path(d) for d in env_dirs.split(os.pathsep) if d]
    host = Host(strict=strict, trace=trace, report=report)
    host.load_entry_points(set(only) if only is not None else None)
    for d in dirs:
        host.load_directory(d)
    host.collect()
    return host
