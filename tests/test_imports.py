"""The import rule (docs/decisions.md): project and standard-library imports at module level,
lazy proxies for heavy third-party libraries only; so the graph of module-level project imports
shows every dependency, and it has no circle."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"wsss_bench": ROOT / "wsss_bench", "wsss_bench_plugins": ROOT / "plugins"}
#: modules another developer is rewriting (the rule applies to them once that lands), and the
#: built-in plugins: a plugin module imports the nn/ module that defines its torch networks inside
#: the method that needs it, so that listing plugins does not import torch (a torch.nn.Module
#: subclass cannot be defined without torch)
NOT_YET = ("wsss_bench.reporting", "wsss_bench.running.bench", "wsss_bench.running.rundir", "wsss_bench.cli",
           "wsss_bench.metrics", "wsss_bench_plugins")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = path
    return out


def _module_level_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules imported by ``path`` when it is imported (``if TYPE_CHECKING`` excluded)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)

    visit(tree.body)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _module_level_imports(path, name, set(mods)) for name, path in mods.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_module_level_import_graph_has_no_circle():
    graph = _graph()
    assert len(graph) > 60 and "wsss_bench.nn.classifier" in graph["wsss_bench.nn.cam"]
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_circle():
    graph = _graph()
    graph["wsss_bench.interfaces"] = graph["wsss_bench.interfaces"] | {"wsss_bench.context"}
    graph["wsss_bench.context"] = graph["wsss_bench.context"] | {"wsss_bench.nn.classifier"}
    graph["wsss_bench.nn.classifier"] = graph["wsss_bench.nn.classifier"] | {"wsss_bench.interfaces"}
    assert _cycle(graph) is not None


def test_project_and_standard_library_imports_are_at_module_level():
    """Imports inside functions hide dependencies (and circles) from the graph above; only heavy
    third-party libraries may be deferred, through ``wsss_bench.lazy`` proxies."""
    std = set(sys.stdlib_module_names)
    offenders = []
    for name, path in _modules().items():
        if name.startswith(NOT_YET):
            continue
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            # an import guarded by try/except ImportError (a platform module) stays where it is
            guarded = {id(x) for t in ast.walk(fn) if isinstance(t, ast.Try) for x in t.body}
            for node in ast.walk(fn):
                if id(node) in guarded:
                    continue
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    mods = ["." if node.level else (node.module or "")]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if mod == "." or top in PACKAGES or top in std:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, "imports inside functions:\n" + "\n".join(offenders)


def test_no_module_getattr_defers_imports():
    for name, path in _modules().items():
        if name.startswith(NOT_YET):
            continue
        tree = ast.parse(path.read_text())
        assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body), path


def test_listing_cams_does_not_import_torch():
    code = ("import sys\nfrom wsss_bench.cli import main\n"
            "try:\n    main(['list', 'cams'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'timm', 'monai', 'pandas', 'scipy', 'sklearn') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "gradcam" in out.stdout, out.stdout + out.stderr
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
