"""Content-addressed artifact store with atomic writes.

key = sha256 over (stage, plugin name, plugin version, plugin source hash, parameters,
upstream keys, seed, data fingerprint).  An artifact is a directory built in a private
work directory and moved into place with ``os.replace`` only after its builder returned,
so a failure is never cached and an interrupted build leaves nothing that looks complete.
The work directory survives a failed or interrupted build, so long trainings can resume
from their last checkpoint.  A file lock serialises concurrent builders of one key
(e.g. SLURM array jobs sharing a classifier).
"""
from __future__ import annotations

import ast
import errno
import fcntl
import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.markup import escape

from wsss_bench import integrity
from wsss_bench.progress import say

META = "artifact.json"


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, float) and obj.is_integer():
        return obj  # keep 1.0 distinct from 1 via json repr
    if isinstance(obj, Path):
        return str(obj)
    return obj


def stable_hash(obj: Any, length: int = 64) -> str:
    text = json.dumps(_canonical(obj), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def source_hash(*objs: Any) -> str:
    """sha256 of the source files defining ``objs`` (classes, functions or modules)."""
    h = hashlib.sha256()
    for obj in objs:
        try:
            path = inspect.getsourcefile(obj)
        except TypeError:
            path = None
        if path and os.path.exists(path):
            h.update(Path(path).read_bytes())
        else:
            h.update(repr(obj).encode())
    return h.hexdigest()[:16]


#: project modules that cannot change a number (plumbing, printing, registration, the run
#: folder, reporting); edits to them do not invalidate artifacts nor finished cells.  Everything
#: else a plugin or the cell stages import from wsss_bench or wsss_bench_plugins, directly or
#: through another project module, is part of the source hash.
NEUTRAL_MODULES = frozenset({
    "wsss_bench", "wsss_bench.hookspecs", "wsss_bench.errors", "wsss_bench.progress", "wsss_bench.lazy",
    "wsss_bench.registry", "wsss_bench.plugins", "wsss_bench.cli", "wsss_bench.cache",
    "wsss_bench.running", "wsss_bench.running.manifest", "wsss_bench.running.rundir",
    "wsss_bench.running.runner", "wsss_bench.running.bench",
    "wsss_bench.testing", "wsss_bench.contract_suite", "wsss_bench._compat", "wsss_bench_plugins",
    "wsss_bench.integrity",
})
#: packages whose every module is neutral (tables, statistics marks, HTML, figures, mask export)
NEUTRAL_PACKAGES = ("wsss_bench.reporting",)
_PROJECT_PREFIXES = ("wsss_bench", "wsss_bench_plugins")
_IMPORTS_MEMO: dict[tuple[str, int, int], tuple[str, ...]] = {}


def _is_project(name: str) -> bool:
    return name.split(".")[0] in _PROJECT_PREFIXES


def is_neutral(name: str) -> bool:
    """True for a module whose edits cannot change a number (:data:`NEUTRAL_MODULES`)."""
    return name in NEUTRAL_MODULES or any(name == p or name.startswith(p + ".") for p in NEUTRAL_PACKAGES)


def _module_file(name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None
    origin = getattr(spec, "origin", None) if spec else None
    return origin if origin and origin.endswith(".py") and os.path.exists(origin) else None


def _imported_project_modules(path: str) -> tuple[str, ...]:
    """Project modules named by the import statements of one file (lazy ones inside functions
    included, ``if TYPE_CHECKING:`` blocks excluded), memoised by (path, size, mtime)."""
    st = os.stat(path)
    memo_key = (path, st.st_size, st.st_mtime_ns)
    if memo_key in _IMPORTS_MEMO:
        return _IMPORTS_MEMO[memo_key]
    tree = ast.parse(Path(path).read_text(), filename=path)
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if _is_project(a.name))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and _is_project(node.module):
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # submodules imported by name
    found = tuple(sorted(n for n in names if _module_file(n)))
    _IMPORTS_MEMO[memo_key] = found
    return found


def source_files(*objs: Any) -> list[str]:
    """The files defining ``objs`` plus every project module they import, transitively,
    except :data:`NEUTRAL_MODULES`; sorted."""
    seen: set[str] = set()
    todo: list[str] = []
    for obj in objs:
        try:
            path = inspect.getsourcefile(obj)
        except TypeError:
            path = None
        if path and os.path.exists(path):
            todo.append(os.path.abspath(path))
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_project_modules(path):
            if is_neutral(name):
                continue
            dep = _module_file(name)
            if dep:
                todo.append(os.path.abspath(dep))
    return sorted(seen)


def closure_hash(*objs: Any) -> str:
    """sha256 over the sources of ``objs`` and the project modules they import (transitively).

    Editing a function in ``nn/cam.py`` therefore changes the key of every artifact made by a
    plugin that imports it (GradCAM, LayerCAM, ...).  Objects without a source file (strings,
    numbers) are hashed by their ``repr``.
    """
    h = hashlib.sha256()
    files = source_files(*objs)
    for path in files:
        h.update(os.path.basename(path).encode())
        h.update(Path(path).read_bytes())
    for obj in objs:
        try:
            has_file = bool(inspect.getsourcefile(obj))
        except TypeError:
            has_file = False
        if not has_file:
            h.update(repr(obj).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ atomic file writes
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str | Path, path: Path) -> None:
    """Give a mkstemp file (mode 0600) the usual mode for the user's umask, then move it in place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; moved onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _publish(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def reserve(path: Path) -> None:
    """Make sure every byte of the (sparse) file ``path`` has its disk blocks, so a later write
    through a memory map cannot die of SIGBUS on a full disk: ``posix_fallocate`` where the file
    system supports it, else a free-space check.  Raises OSError(ENOSPC) naming ``path``."""
    path = Path(path)
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise OSError(err.errno, os.strerror(err.errno), str(path)) from None
        st, vfs = os.fstat(fd), os.fstatvfs(fd)
        missing = size - st.st_blocks * 512
        if missing > vfs.f_bavail * vfs.f_frsize:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    finally:
        os.close(fd)


def open_memmap_reserved(path: Path, dtype: Any, shape: tuple[int, ...]) -> Any:
    """``np.lib.format.open_memmap(path, "w+", dtype, shape)`` with its blocks reserved first
    (:func:`reserve`): a full disk is an OSError naming the file, never a bus error."""
    import numpy as np

    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    try:
        reserve(path)
    except OSError:
        del arr
        Path(path).unlink(missing_ok=True)
        raise
    return arr


# ------------------------------------------------------------------ the store
@dataclass
class Built:
    path: Path
    key: str
    hit: bool  # True when reused from the cache


class ArtifactCache:
    """Artifacts under ``root/<stage>/<key>/``; ``enabled=False`` builds into a throwaway dir."""

    def __init__(self, root: Path, enabled: bool = True, force: bool = False) -> None:
        self.root = Path(root)
        self.enabled = enabled
        self.force = force
        self.events: list[dict[str, Any]] = []
        #: key -> (stage, folder) of every artifact served or built through this cache
        self.served: dict[str, tuple[str, Path]] = {}

    @staticmethod
    def key(
        stage: str,
        plugin: str,
        version: str,
        source: str,
        params: dict[str, Any],
        upstream: list[str] | tuple[str, ...] = (),
        seed: int | None = None,
        data: str = "",
    ) -> str:
        return stable_hash(
            {"stage": stage, "plugin": plugin, "version": version, "source": source, "params": params,
             "upstream": list(upstream), "seed": seed, "data": data}
        )

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Path | None:
        path = self.path(stage, key)
        return path if (path / META).is_file() else None

    @contextmanager
    def _lock(self, stage: str, key: str) -> Iterator[None]:
        lock = self.root / stage / f".{key}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def build(self, stage: str, key: str, builder: Callable[[Path], dict | None], describe: dict | None = None) -> Built:
        """Return the artifact directory for ``key``, running ``builder(workdir)`` if needed.

        ``builder`` writes its files into ``workdir`` (which persists across a failed attempt,
        for checkpoints) and returns extra metadata.  Only on success is the directory moved
        into place.  A cached directory is served only after it passed its integrity check
        (:mod:`wsss_bench.integrity`); one that fails is moved to ``<root>/.quarantine/`` and
        rebuilt, and one line names the bad file.
        """
        if not self.enabled:
            tmp = Path(tempfile.mkdtemp(prefix=f"wsss-{stage}-"))
            meta = builder(tmp) or {}
            _write_meta(tmp, stage, key, describe, meta, 0.0)
            self.events.append({"stage": stage, "key": key, "hit": False, "cache": "off"})
            return Built(tmp, key, False)
        final = self.path(stage, key)
        damage: tuple[integrity.Damaged, Path] | None = None
        with self._lock(stage, key):
            if not self.force and (final.is_symlink() or (final / META).is_file()):
                try:
                    self._check(stage, key, final)
                except integrity.Damaged as err:
                    damage = (err, integrity.quarantine(final, self.quarantine_root(stage)))
                else:
                    self.events.append({"stage": stage, "key": key, "hit": True})
                    self.served[key] = (stage, final)
                    return Built(final, key, True)
            work = self.root / stage / f".partial-{key}"
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            meta = builder(work) or {}
            _write_meta(work, stage, key, describe, meta, time.perf_counter() - t0)
            if final.is_symlink() or (final.exists() and not self.force):  # a folder without its record
                moved = integrity.quarantine(final, self.quarantine_root(stage))
                if damage is None:
                    damage = (integrity.Damaged(final / META, "missing"), moved)
            elif final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
            integrity.mark_verified(final, key)
        self.events.append({"stage": stage, "key": key, "hit": False})
        self.served[key] = (stage, final)
        if damage is not None:
            say(escape(integrity.report(damage[0], damage[1], f"{stage} artifact {key[:10]}")))
            self.events[-1]["repaired"] = damage[0].path
        return Built(final, key, False)

    def quarantine_root(self, stage: str) -> Path:
        """Where damaged artifacts of ``stage`` are moved (kept for inspection, never read)."""
        return self.root / ".quarantine" / stage

    def _check(self, stage: str, key: str, final: Path) -> None:
        """Raise :class:`integrity.Damaged` unless ``final`` holds the artifact ``stage``/``key``
        as written: a real folder, its record naming this key, every file as recorded (the full
        hash on first use in this process and under ``--verify``)."""
        if final.is_symlink():
            raise integrity.Damaged(final, f"is a symbolic link (to {os.readlink(final)}); an artifact "
                                           f"folder is never a link, so it is not served")
        try:
            meta = read_meta(final)
        except (OSError, ValueError) as err:
            raise integrity.Damaged(final / META, f"unreadable ({err})") from None
        if meta.get("key") != key or meta.get("stage") != stage:
            raise integrity.Damaged(final / META, f"records {meta.get('stage')}/{str(meta.get('key'))[:16]}, "
                                                  f"not {stage}/{key[:16]} (a folder moved or copied)")
        files = meta.get("files")
        if not isinstance(files, dict):  # written before files were recorded: adopt it as it is
            meta["files"] = integrity.record_folder(final, skip=(META,))
            atomic_write_json(final / META, meta)
            integrity.mark_verified(final, key)
            return
        full = integrity.needs_full(final, key, files)
        integrity.check_folder(final, files, full=full)
        if full:
            integrity.mark_verified(final, key)
            if integrity.restamp(final, files):
                atomic_write_json(final / META, meta)

    def recheck(self, keys: list[str] | tuple[str, ...]) -> tuple[integrity.Damaged, Path] | None:
        """Fully re-hash the artifacts ``keys`` served by this cache; the first damaged one is
        moved aside and returned with its new place (None when all are intact).  Used when a
        result looks impossible (non-finite maps) to tell a corrupt artifact from a plugin bug."""
        for key in keys:
            if key not in self.served:
                continue
            stage, final = self.served[key]
            try:
                meta = read_meta(final)
                integrity.check_folder(final, meta.get("files") or {}, full=True)
            except (OSError, ValueError) as err:
                return integrity.Damaged(final / META, f"unreadable ({err})"), final
            except integrity.Damaged as err:
                with self._lock(stage, key):
                    moved = integrity.quarantine(final, self.quarantine_root(stage))
                self.served.pop(key, None)
                return err, moved
        return None


def _write_meta(directory: Path, stage: str, key: str, describe: dict | None, meta: dict, seconds: float) -> None:
    """Write ``artifact.json``: the key, what built it, and each file's integrity record."""
    files = integrity.record_folder(directory, skip=(META,))
    atomic_write_json(directory / META, {"stage": stage, "key": key, "describe": describe or {},
                                         "meta": meta, "build_seconds": round(seconds, 3), "files": files,
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())
