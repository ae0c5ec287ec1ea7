"""Find a finished run's data again, on this machine: by key in the current cache.

A manifest records where its phantom and slice store were (absolute paths of the machine that
made the run) and, more usefully, what they were: the slice store's content key and the
phantom's dataset, profile, generator version and seed.  Phantoms are a pure function of those,
and a slice store a pure function of its data and settings, so a committed run folder (such as
``results/cpu``) can be re-reported on a fresh clone: the store is looked up by its key in the
cache in use (``--cache-dir``, ``$WSSS_BENCH_CACHE`` or the default), and where it is absent the
phantom is regenerated and the store rebuilt, both checked against the recorded keys.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from wsss_bench.data.store import prepare_slices
from wsss_bench.data.taskdata import PHANTOM_MARKER, ensure_phantom, phantom_dir
from wsss_bench.errors import UserError
from wsss_bench.profiles import apply_overrides, load_profile


def current_cache() -> Path:
    """The cache in use when none is named: $WSSS_BENCH_CACHE, else ~/.cache/wsss-bench."""
    return Path(os.environ.get("WSSS_BENCH_CACHE") or Path.home() / ".cache" / "wsss-bench")


def _store_dir(cache: Path, key: str) -> Path | None:
    path = Path(cache) / "slices" / key
    return path if (path / "done").is_file() else None


def locate(source: Any, entry: Mapping[str, Any], manifest: Mapping[str, Any], cache_dir: Path,
           rebuild: bool = True) -> tuple[Path | None, Path | None]:
    """(slice store folder or None, data root or None) of one task's data, found on this machine.

    Order: the store by key in ``cache_dir``; then in the cache the manifest names (same
    machine); for a phantom, the phantom folder by name in ``cache_dir``, regenerated when
    absent (``rebuild``), and its store rebuilt there; for real data, the recorded data root
    if it still exists.  A regenerated phantom or store whose key differs from the recorded
    one (other generator or profile sizes in this version) is refused with one sentence."""
    key = str(entry.get("store_key") or "")
    recorded_cache = (manifest.get("config") or {}).get("cache_dir")
    for cache in [cache_dir] + ([Path(recorded_cache)] if recorded_cache else []):
        found = _store_dir(cache, key) if key else None
        if found is not None:
            return found, _existing(entry.get("data_root"))
    if entry.get("data") != "phantom":
        return None, _existing(entry.get("data_root"))
    root = _phantom(source, entry, manifest, Path(cache_dir), rebuild)
    if root is None:
        return None, None
    if not rebuild:
        return None, root
    meta = json.loads((root / ".phantom.json").read_text())
    meta.pop("seconds", None)
    store = prepare_slices(source, root, int(entry["image_size"]), Path(cache_dir), case_cap=0,
                           extra_key={"phantom": meta})
    if key and store.path.name != key:
        raise UserError(f"the slice store rebuilt for task {entry.get('task')} has key {store.path.name}, but the run "
                        f"recorded {key}: this version prepares slices differently; re-run the benchmark to report it")
    return store.path, root


def _existing(path: Any) -> Path | None:
    return Path(str(path)) if path and Path(str(path)).is_dir() else None


def _phantom(source: Any, entry: Mapping[str, Any], manifest: Mapping[str, Any], cache: Path,
             rebuild: bool) -> Path | None:
    phantom = entry.get("phantom") or {}
    config = manifest.get("config") or {}
    profile = apply_overrides(load_profile(str(phantom.get("profile") or config.get("profile"))),
                              list(config.get("overrides") or []))
    seed = int(phantom.get("seed", config.get("phantom_seed", 0)))
    want = Path(str(entry.get("data_root") or "")).name
    path = phantom_dir(cache, source, profile, seed)
    if want and path.name != want:
        raise UserError(f"the run's {source.name} phantom ({want}) cannot be made again by this version (it would "
                        f"make {path.name}: another generator or other phantom sizes); re-run the benchmark to report it")
    if (path / PHANTOM_MARKER).is_file():
        return path
    if not rebuild:
        return None
    if phantom.get("generator_version") and phantom["generator_version"] != source.phantom_version:
        raise UserError(f"the run used phantom generator {phantom['generator_version']}, this version has "
                        f"{source.phantom_version}; re-run the benchmark to report it")
    return ensure_phantom(source, profile, cache, seed)
