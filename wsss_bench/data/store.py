"""The slice store: a dataset's preprocessed slices, written once, memory-mapped afterwards.

``<cache_root>/slices/<key>/`` holds

- ``images.npy``  (N, C, S, S) float32, read with ``mmap_mode="r"``;
- ``labels.npy``  (N, S, S) uint8, the dataset's full label map (so tasks of one dataset share it);
- ``index.parquet`` one row per slice: ``case_id``, ``z``, ``tissue_fraction`` and ``px_<v>``, the
  number of pixels of each label value v > 0 on the final S x S mask;
- ``meta.json`` what was built from what; ``done`` written last.

The folder is built under a temporary name and moved into place with ``os.replace``, so a reader
never sees a half-written store and a finished store is never rebuilt.  The key hashes the data
fingerprint (sha256 over sorted relative paths and sizes, PROTOCOL section 12), the image size,
the case cap, the preprocessing version and the reader's name/version.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wsss_bench.data.preprocess import PREPROCESS_VERSION, preprocess_volume, tissue_fraction
from wsss_bench.errors import UserError

STORE_VERSION = "1"
DONE = "done"


def data_fingerprint(root: Path) -> str:
    """sha256 over the sorted relative paths and byte sizes of every file under ``root``.

    Hidden files and folders (name starting with '.') are skipped, so cache markers and OS
    litter do not change the fingerprint.
    """
    root = Path(root)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            entries.append((p.relative_to(root).as_posix(), p.stat().st_size))
    h = hashlib.sha256()
    for rel, size in sorted(entries):
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


def store_key(source: Any, fingerprint: str, image_size: int, case_cap: int, extra: Any = None) -> str:
    spec = {
        "store": STORE_VERSION,
        "preprocess": PREPROCESS_VERSION,
        "dataset": source.name,
        "reader_version": str(getattr(source, "version", "")),
        "fingerprint": fingerprint,
        "image_size": int(image_size),
        "case_cap": int(case_cap),
        "extra": extra,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{source.name}-s{int(image_size)}-{digest}"


@dataclass
class SliceStore:
    """An opened store; arrays are memory maps opened on first use (and dropped on pickling)."""

    path: Path
    meta: dict
    index: Any  # pandas.DataFrame
    built: bool = False  # True when this call built the store
    _arrays: dict = field(default_factory=dict, repr=False)

    @property
    def key(self) -> str:
        return self.meta["key"]

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    @property
    def images(self) -> np.ndarray:
        return self._array("images")

    @property
    def labels(self) -> np.ndarray:
        return self._array("labels")

    def __len__(self) -> int:
        return len(self.index)

    def label_pixels(self, values: tuple[int, ...] | None) -> np.ndarray:
        """Pixels per slice whose label is in ``values`` (None = any label > 0)."""
        cols = [c for c in self.index.columns if c.startswith("px_")]
        if values is not None:
            cols = [c for c in cols if int(c[3:]) in set(values)]
        if not cols:
            return np.zeros(len(self.index), dtype=np.int64)
        return self.index[cols].to_numpy(dtype=np.int64).sum(axis=1)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state


def open_store(path: Path, built: bool = False) -> SliceStore:
    import pandas as pd

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    return SliceStore(path=path, meta=meta, index=pd.read_parquet(path / "index.parquet"), built=built)


def _build(source: Any, root: Path, cases: list[str], size: int, tmp: Path, meta: dict) -> None:
    """Preprocess every case into part files, then gather them into the two big arrays."""
    import pandas as pd
    from numpy.lib.format import open_memmap

    parts = tmp / "parts"
    parts.mkdir(parents=True)
    rows: list[dict] = []
    channels = None
    for k, case in enumerate(cases):
        image, labels = source.load(root, case)
        if channels is None:
            channels = image.shape[0]
        elif image.shape[0] != channels:
            raise UserError(f"case {case} under {root} has {image.shape[0]} channels, earlier cases {channels}")
        imgs, labs = preprocess_volume(image, labels, size)
        np.save(parts / f"{k:06d}-images.npy", imgs)
        np.save(parts / f"{k:06d}-labels.npy", labs)
        tf = tissue_fraction(imgs)
        counts = {int(v): (labs == v).sum(axis=(1, 2)) for v in np.unique(labs) if v > 0}
        for zi in range(labs.shape[0]):
            row = {"case_id": case, "z": zi, "tissue_fraction": float(tf[zi])}
            row.update({f"px_{v}": int(c[zi]) for v, c in counts.items()})
            rows.append(row)
    n = len(rows)
    images = open_memmap(tmp / "images.npy", mode="w+", dtype=np.float32, shape=(n, channels, size, size))
    labels_mm = open_memmap(tmp / "labels.npy", mode="w+", dtype=np.uint8, shape=(n, size, size))
    at = 0
    for k in range(len(cases)):
        imgs = np.load(parts / f"{k:06d}-images.npy")
        labs = np.load(parts / f"{k:06d}-labels.npy")
        images[at : at + len(imgs)] = imgs
        labels_mm[at : at + len(labs)] = labs
        at += len(imgs)
    images.flush()
    labels_mm.flush()
    del images, labels_mm
    shutil.rmtree(parts)
    index = pd.DataFrame(rows)
    px_cols = sorted((c for c in index.columns if c.startswith("px_")), key=lambda c: int(c[3:]))
    index[px_cols] = index[px_cols].fillna(0).astype(np.int64)
    index = index[["case_id", "z", "tissue_fraction", *px_cols]]
    index.to_parquet(tmp / "index.parquet", index=False)
    meta.update({"n_slices": n, "channels": int(channels), "label_values": [int(c[3:]) for c in px_cols]})
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def prepare_slices(
    source: Any,
    root: Path,
    image_size: int,
    cache_root: Path,
    case_cap: int = 0,
    extra_key: Any = None,
) -> SliceStore:
    """Open the store of ``root`` at ``image_size``, building it first if needed.

    ``case_cap`` > 0 keeps the first ``case_cap`` cases by sorted id.  ``extra_key`` (JSON-able)
    is folded into the key, e.g. the phantom's generator version and seed.
    """
    root = Path(root)
    cases = source.cases(root)  # validates the layout before anything is hashed or written
    if case_cap and case_cap > 0:
        cases = cases[: int(case_cap)]
    fingerprint = data_fingerprint(root)
    key = store_key(source, fingerprint, image_size, case_cap, extra_key)
    base = Path(cache_root) / "slices"
    final = base / key
    if (final / DONE).is_file():
        return open_store(final)
    base.mkdir(parents=True, exist_ok=True)
    if final.exists():  # left over without its marker: not trustworthy
        shutil.rmtree(final, ignore_errors=True)
    tmp = base / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    meta = {
        "key": key,
        "dataset": source.name,
        "reader_version": str(getattr(source, "version", "")),
        "data_root": str(root.resolve()),
        "fingerprint": fingerprint,
        "image_size": int(image_size),
        "case_cap": int(case_cap),
        "cases": cases,
        "preprocess_version": PREPROCESS_VERSION,
        "store_version": STORE_VERSION,
        "extra": extra_key,
    }
    t0 = time.perf_counter()
    built = False
    try:
        _build(source, root, cases, int(image_size), tmp, meta)
        meta["build_seconds"] = round(time.perf_counter() - t0, 3)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        (tmp / DONE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            os.replace(tmp, final)
            built = True
        except OSError:  # another process finished first: use its store
            if not (final / DONE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return open_store(final, built=built)
