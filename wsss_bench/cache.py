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

import fcntl
import hashlib
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
        into place.
        """
        if not self.enabled:
            tmp = Path(tempfile.mkdtemp(prefix=f"wsss-{stage}-"))
            meta = builder(tmp) or {}
            _write_meta(tmp, stage, key, describe, meta, 0.0)
            self.events.append({"stage": stage, "key": key, "hit": False, "cache": "off"})
            return Built(tmp, key, False)
        final = self.path(stage, key)
        with self._lock(stage, key):
            if not self.force and (final / META).is_file():
                self.events.append({"stage": stage, "key": key, "hit": True})
                return Built(final, key, True)
            work = self.root / stage / f".partial-{key}"
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            meta = builder(work) or {}
            _write_meta(work, stage, key, describe, meta, time.perf_counter() - t0)
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        self.events.append({"stage": stage, "key": key, "hit": False})
        return Built(final, key, False)


def _write_meta(directory: Path, stage: str, key: str, describe: dict | None, meta: dict, seconds: float) -> None:
    atomic_write_json(directory / META, {"stage": stage, "key": key, "describe": describe or {},
                                         "meta": meta, "build_seconds": round(seconds, 3),
                                         "created": time.strftime("%Y-%m-%dT%H:%M:%S")})


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())
