"""The slice store: a dataset's preprocessed slices, written once, memory-mapped afterwards.

``<cache_root>/slices/<key>/`` holds

- ``images.npy``  (N, C, S, S) uint8 codes q = rint(255 x) of the float images x in [0, 1];
  :attr:`SliceStore.images` decodes them on read as ``q / 255`` (float32), so every consumer
  sees float32 in [0, 1] within 1/510 of the preprocessed image (docs/data.md, "Slice store");
- ``labels.npy``  the dataset's full label map (so tasks of one dataset share it): (N, S, S/2) uint8
  holding two 4-bit labels per byte when the reader declares labels <= 15 (``label_max``, both
  built-in datasets), else (N, S, S) uint8; :attr:`SliceStore.labels` reads (N, S, S) uint8 either way;
- ``index.parquet`` one row per slice: ``case_id``, ``z``, ``tissue_fraction`` and ``px_<v>``, the
  number of pixels of each label value v > 0 on the final S x S mask;
- ``meta.json`` what was built from what (identical for every build of the same key), including
  ``spacing``: each case's pixel spacing in mm on the S x S slice grid (row, column, slice), from
  the NIfTI header, for the boundary metrics (``wsss_bench.data.spacing``);
- ``build.json`` how this copy was built (seconds, jobs, resumed cases); ``done`` written last.

Building (docs/protocol.md sections 4 and 12, issue "real data at full scale"):

1. the case list is validated and every case's geometry is read from its NIfTI headers alone,
   so the row range of every case in the final arrays is known before any voxel is decoded;
2. the two arrays are created at their final size in ``.build-<key>/`` and each case writes
   its rows in place (``os.pwrite``, no memory map, so memory stays flat in the number of
   cases); all-zero slices are left unwritten (they read as zeros and, on file systems with
   sparse files, take no disk blocks);
3. a case is done when its record ``cases/<k>.json`` exists (written after its rows are synced),
   so a killed preparation resumes with the cases not yet done; ``--jobs N`` runs cases in
   worker processes, and the output does not depend on N;
4. the finished folder is published with one ``os.replace``: a reader never sees a half store.

A lock file serialises builders of one key; the second simply opens the first one's store.
The key hashes the data fingerprint (content hashes, below), the image size, the case cap,
the preprocessing and store versions, the image codec and the reader's name, version and
parameters.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from rich.markup import escape

from wsss_bench import integrity
from wsss_bench.data.fingerprint import data_fingerprint, usable_cores  # noqa: F401  (the store's API)
from wsss_bench.data.preprocess import PREPROCESS_VERSION, resize_images, resize_masks, tissue_fraction
from wsss_bench.data.spacing import spacing_record
from wsss_bench.errors import UserError
from wsss_bench.lazy import pd, torch
from wsss_bench.progress import progress, say

STORE_VERSION = "2"
DONE = "done"
#: slices resized per torch call inside a case (bounds a worker's temporary memory)
Z_CHUNK = 32
#: below this many voxels left to prepare the cases run in this process: a worker pool costs
#: about a second to start, which only pays off for real-size volumes
PARALLEL_MIN_VOXELS = 4e7


# --------------------------------------------------------------------------- image codecs
@dataclass(frozen=True)
class ImageCodec:
    """How float images in [0, 1] are stored: ``q = rint(levels * x)``, read as ``q / levels``.

    ``levels = 0`` stores float32 unchanged.
    """

    name: str
    dtype: str
    levels: int

    @property
    def max_error(self) -> float:
        """Largest |decoded - original| for x in [0, 1] (half a quantisation step)."""
        return 0.0 if not self.levels else 0.5 / self.levels

    def encode(self, x: np.ndarray) -> np.ndarray:
        if not self.levels:
            return np.ascontiguousarray(x, dtype=np.float32)
        q = np.rint(np.multiply(x, np.float32(self.levels), dtype=np.float32))
        np.clip(q, 0, self.levels, out=q)
        return q.astype(self.dtype)

    def decode(self, q: np.ndarray) -> np.ndarray:
        if not self.levels:
            return np.asarray(q, dtype=np.float32)
        return np.divide(q, np.float32(self.levels), dtype=np.float32)

    def describe(self) -> dict:
        rule = "float32 as preprocessed" if not self.levels else f"q = rint({self.levels} x); x' = q / {self.levels}"
        return {"name": self.name, "dtype": self.dtype, "levels": self.levels, "rule": rule,
                "max_abs_error": self.max_error}


CODECS = {
    "uint8": ImageCodec("uint8", "uint8", 255),
    "uint16": ImageCodec("uint16", "uint16", 65535),
    "float32": ImageCodec("float32", "float32", 0),
}
#: the store's image codec; chosen by measurement (docs/data.md, "Image codec")
DEFAULT_CODEC = "uint8"


def get_codec(name: str) -> ImageCodec:
    if name not in CODECS:
        raise UserError(f"image codec {name!r}: choose one of {', '.join(CODECS)}")
    return CODECS[name]


# --------------------------------------------------------------------------- label packing
def pack4(labels: np.ndarray) -> np.ndarray:
    """(..., S) uint8 labels <= 15 -> (..., ceil(S/2)): even columns in the low nibble, odd in the high."""
    if labels.shape[-1] % 2:
        labels = np.concatenate([labels, np.zeros(labels.shape[:-1] + (1,), labels.dtype)], axis=-1)
    return (labels[..., 0::2] | (labels[..., 1::2] << 4)).astype(np.uint8)


def unpack4(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack4` for rows of ``width`` pixels."""
    out = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), dtype=np.uint8)
    out[..., 0::2] = packed & 15
    out[..., 1::2] = packed >> 4
    return out[..., :width]


def label_bits(source: Any) -> int:
    """4 when the reader guarantees label values <= 15 (it validates them), else 8."""
    top = getattr(source, "label_max", None)
    return 4 if top is not None and int(top) <= 15 else 8


def _write_json_atomic(path: Path, obj: Any, indent: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent))
    os.replace(tmp, path)


def reader_params(source: Any) -> dict:
    return dict(getattr(source, "p", {}) or {})


def store_key(
    source: Any, fingerprint: str, image_size: int, case_cap: int, extra: Any = None, codec: str = DEFAULT_CODEC
) -> str:
    spec = {
        "store": STORE_VERSION,
        "preprocess": PREPROCESS_VERSION,
        "dataset": source.name,
        "reader_version": str(getattr(source, "version", "")),
        "reader_params": reader_params(source),
        "fingerprint": fingerprint,
        "image_size": int(image_size),
        "case_cap": int(case_cap),
        "codec": codec,
        "label_bits": label_bits(source),
        "extra": extra,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return f"{source.name}-s{int(image_size)}-{digest}"


# --------------------------------------------------------------------------- reading
class StoredImages:
    """The image array of a store: indexes like a (N, C, S, S) float32 array, decodes on read."""

    def __init__(self, raw: np.ndarray, codec: ImageCodec) -> None:
        self.raw = raw
        self.codec = codec
        self.shape = raw.shape
        self.ndim = raw.ndim
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        return self.codec.decode(self.raw[idx])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)


class StoredLabels:
    """The label array of a store: indexes like a (N, S, S) uint8 array, unpacks 4-bit rows on read."""

    def __init__(self, raw: np.ndarray, bits: int, width: int) -> None:
        self.raw, self.bits, self.width = raw, bits, width
        self.shape = (raw.shape[0], raw.shape[1], width)
        self.ndim = 3
        self.dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: Any) -> np.ndarray:
        rows = self.raw[idx]
        return unpack4(rows, self.width) if self.bits == 4 else np.asarray(rows)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype, copy=False)


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

    @property
    def codec(self) -> ImageCodec:
        return get_codec(self.meta.get("image_codec", {}).get("name", "float32"))

    def _array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = np.load(self.path / f"{name}.npy", mmap_mode="r")
        return self._arrays[name]

    @property
    def images(self) -> StoredImages:
        """(N, C, S, S) float32 in [0, 1] on indexing (decoded from the stored codes)."""
        return StoredImages(self._array("images"), self.codec)

    @property
    def labels(self) -> StoredLabels:
        """(N, S, S) uint8 label maps on indexing (unpacked from 4 bits where stored so)."""
        bits = int(self.meta.get("label_codec", {}).get("bits", 8))
        return StoredLabels(self._array("labels"), bits, int(self.meta["image_size"]))

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
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
    return SliceStore(path=path, meta=meta, index=pd.read_parquet(path / "index.parquet"), built=built)


# --------------------------------------------------------------------------- integrity
#: the store's file records (size, BLAKE2b, array headers), written before ``done``
INTEGRITY = "integrity.json"
#: files of a finished store that are recorded and checked on every open
RECORDED = ("images.npy", "labels.npy", "index.parquet", "meta.json")


def _record_store(folder: Path) -> None:
    records = {name: integrity.record_file(folder / name) for name in RECORDED}
    _write_json_atomic(folder / INTEGRITY, {"key": folder.name.removeprefix(".build-"), "files": records}, indent=1)


def check_store(final: Path, key: str) -> None:
    """Raise :class:`integrity.Damaged` unless the finished store ``final`` is as written:
    a real folder whose record names ``key``, files of the recorded sizes and array headers,
    and (first open in this process, or ``--verify``) the recorded BLAKE2b digests.  A store
    finished before records existed is adopted: its records are written now."""
    if final.is_symlink():
        raise integrity.Damaged(final, f"is a symbolic link (to {os.readlink(final)}); a store folder is never a link")
    path = final / INTEGRITY
    if not path.is_file():
        if not all((final / name).is_file() for name in RECORDED):
            missing = next(name for name in RECORDED if not (final / name).is_file())
            raise integrity.Damaged(final / missing, "missing")
        _record_store(final)
        integrity.mark_verified(final, key)
        return
    try:
        rec = json.loads(path.read_text())
        files = rec["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise integrity.Damaged(path, f"unreadable ({err})") from None
    if rec.get("key") != key:
        raise integrity.Damaged(path, f"records store {rec.get('key')!r}, not {key!r} (a folder moved or copied)")
    full = integrity.needs_full(final, key, files)
    integrity.check_folder(final, files, full=full)
    if full:
        integrity.mark_verified(final, key)
        if integrity.restamp(final, files):
            _write_json_atomic(path, rec, indent=1)


def _usable(final: Path, key: str, force_since: float) -> bool:
    """True when ``final`` is a finished store that passes :func:`check_store` and is not older
    than ``force_since`` (``--force`` rebuilds stores made before the run started)."""
    if not (final.is_symlink() or (final / DONE).is_file()):
        return False
    if force_since and not final.is_symlink() and (final / DONE).stat().st_mtime < force_since:
        return False
    try:
        check_store(final, key)
    except integrity.Damaged:
        return False
    return True


# --------------------------------------------------------------------------- one case
def case_geometry(source: Any, root: Path, case: str) -> tuple[int, tuple[int, int, int]]:
    """(channels, RAS shape) of a case: from the headers when the reader can, else by loading it."""
    geometry = getattr(source, "geometry", None)
    if geometry is not None:
        channels, shape = geometry(root, case)
    else:  # a third-party reader without header access: decode once to count
        image, labels = source.load(root, case)
        channels, shape = image.shape[0], labels.shape
    return int(channels), tuple(int(s) for s in shape)


def _load_case(source: Any, root: Path, case: str) -> tuple[np.ndarray, np.ndarray, dict]:
    if hasattr(source, "load_case"):
        return source.load_case(root, case)
    image, labels = source.load(root, case)
    return image, labels, {}


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_runs(fd: int, block: np.ndarray, keep: np.ndarray, base: int, row0: int) -> None:
    """Write the rows of ``block`` flagged in ``keep`` at their final offsets, run by run."""
    row_bytes = block[0].nbytes if len(block) else 0
    z = 0
    while z < len(block):
        if not keep[z]:
            z += 1
            continue
        end = z
        while end < len(block) and keep[end]:
            end += 1
        _pwrite_all(fd, np.ascontiguousarray(block[z:end]).data, base + (row0 + z) * row_bytes)
        z = end


def _prepare_case(job: dict) -> dict:
    """Load, preprocess and write one case's rows in place; then write its record.  Pure in the job."""
    source, root, case = job["source"], Path(job["root"]), job["case"]
    size, row0, z_expected = job["size"], job["row"], job["z"]
    codec = get_codec(job["codec"])
    image, labels, notes = _load_case(source, root, case)
    if image.shape[0] != job["channels"] or tuple(labels.shape) != tuple(job["shape"]):
        raise UserError(
            f"case {case} under {root}: its voxels have shape {tuple(image.shape)} but its headers "
            f"said ({job['channels']}, {', '.join(map(str, job['shape']))}); the file changed while preparing?"
        )
    tf = np.empty(z_expected, dtype=np.float64)
    fd = os.open(job["images"], os.O_WRONLY)
    try:
        for z0 in range(0, z_expected, Z_CHUNK):
            z1 = min(z_expected, z0 + Z_CHUNK)
            block = resize_images(image[..., z0:z1], size)  # (n, C, S, S) float32
            tf[z0:z1] = tissue_fraction(block)
            q = codec.encode(block)
            _write_runs(fd, q, q.reshape(len(q), -1).any(axis=1), job["images_offset"], row0 + z0)
            del block, q
        os.fsync(fd)
    finally:
        os.close(fd)
    del image
    labs = resize_masks(labels.astype(np.uint8, copy=False), size)  # (Z, S, S)
    if job["label_bits"] == 4:
        if labs.max(initial=0) > 15:
            raise UserError(f"case {case} under {root}: label value {int(labs.max())} does not fit the 4-bit "
                            f"label store that {type(source).__name__}.label_max promises")
        stored = pack4(labs)  # (Z, S, S/2)
    else:
        stored = labs
    fd = os.open(job["labels"], os.O_WRONLY)
    try:
        _write_runs(fd, stored, stored.reshape(len(stored), -1).any(axis=1), job["labels_offset"], row0)
        os.fsync(fd)
    finally:
        os.close(fd)
    counts = {int(v): (labs == v).sum(axis=(1, 2)) for v in np.unique(labs) if v > 0}
    rows = []
    for zi in range(z_expected):
        row = {"case_id": case, "z": zi, "tissue_fraction": float(tf[zi])}
        row.update({f"px_{v}": int(c[zi]) for v, c in counts.items()})
        rows.append(row)
    record = {"case": case, "k": job["k"], "rows": rows, "notes": notes}
    _write_json_atomic(Path(job["record"]), record)
    return {"k": job["k"], "case": case, "n": z_expected}


def _worker_init(parent: int) -> None:
    """Worker process setup: die with the parent (Linux), one torch thread per worker."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:  # pragma: no cover - best effort
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

    torch.set_num_threads(1)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_jobs(jobs: list[dict], workers: int, advance: Callable[[int], None]) -> None:
    """Run every case job, serially here or in ``workers`` processes; re-raise the first failure.

    On a failure no new case starts; the running ones finish; the error of the case with the
    lowest index among the failed ones is raised.
    """
    if workers <= 1:
        with _one_torch_thread():
            for job in jobs:
                _prepare_case(job)
                advance(1)
        return

    method = "fork" if sys.platform.startswith("linux") else "spawn"
    if method == "fork":
        torch.get_num_threads()  # loads torch once here, inherited by every forked worker
    errors: dict[int, BaseException] = {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_worker_init,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_prepare_case, job): job["k"] for job in jobs}
        for fut in as_completed(futures):
            err = fut.exception() if not fut.cancelled() else None
            if err is None:
                if not fut.cancelled():
                    advance(1)
                continue
            errors[futures[fut]] = err
            for other in futures:
                other.cancel()
    if errors:
        err = errors[min(errors)]
        if isinstance(err, BrokenProcessPool):
            raise UserError(
                "a slice-preparation worker died (out of memory?); the cases already prepared are kept: "
                "run again, with fewer --jobs if memory is short"
            ) from None
        raise err


# --------------------------------------------------------------------------- building
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _plan(source: Any, root: Path, cases: list[str], size: int, codec: str, bits: int) -> dict:
    """Every case's channels, RAS shape and first row, from the headers; validates geometry."""
    entries, channels, row = [], None, 0
    for case in cases:
        c, shape = case_geometry(source, root, case)
        if channels is None:
            channels = c
        elif c != channels:
            raise UserError(f"case {case} under {root} has {c} channels, earlier cases {channels}")
        entries.append({"case": case, "channels": c, "shape": list(shape), "row": row, "z": shape[2]})
        row += shape[2]
    return {"cases": entries, "n_slices": row, "channels": int(channels or 0), "image_size": int(size),
            "codec": codec, "label_bits": int(bits)}


def _arrays(build: Path, plan: dict, codec: ImageCodec) -> dict[str, tuple[Path, int]]:
    """Create (or reopen) the two final arrays; their paths and data offsets."""
    from numpy.lib.format import open_memmap

    n, c, s = plan["n_slices"], plan["channels"], plan["image_size"]
    label_width = (s + 1) // 2 if plan["label_bits"] == 4 else s
    want = {"images": ((n, c, s, s), np.dtype(codec.dtype)), "labels": ((n, s, label_width), np.dtype(np.uint8))}
    out = {}
    for name, (shape, dtype) in want.items():
        path = build / f"{name}.npy"
        mm = None
        if path.is_file():
            try:
                mm = np.load(path, mmap_mode="r")
                if mm.shape != shape or mm.dtype != dtype:
                    mm = None
            except (OSError, ValueError):
                mm = None
        if mm is None:  # the header is written, the data region stays a hole until written
            mm = open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        out[name] = (path, int(mm.offset))
        del mm
    return out


def _finish(build: Path, plan: dict, meta: dict) -> None:
    """Gather the case records into the index and meta; mark the folder done."""
    rows: list[dict] = []
    notes: dict = {}
    for k, entry in enumerate(plan["cases"]):
        record = json.loads((build / "cases" / f"{k:06d}.json").read_text())
        rows.extend(record["rows"])
        if record.get("notes"):
            notes[entry["case"]] = record["notes"]
    index = pd.DataFrame(rows)
    px_cols = sorted((c for c in index.columns if c.startswith("px_")), key=lambda c: int(c[3:]))
    index[px_cols] = index[px_cols].fillna(0).astype(np.int64)
    index = index[["case_id", "z", "tissue_fraction", *px_cols]]
    index.to_parquet(build / "index.parquet", index=False)
    meta.update({"n_slices": int(plan["n_slices"]), "channels": int(plan["channels"]),
                 "label_values": [int(c[3:]) for c in px_cols], "case_notes": notes})
    (build / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(build / "cases")
    (build / "plan.json").unlink()
    _record_store(build)
    (build / DONE).write_text(meta["key"])


def prepare_slices(
    source: Any,
    root: Path,
    image_size: int,
    cache_root: Path,
    case_cap: int = 0,
    extra_key: Any = None,
    jobs: int | None = None,
    codec: str | None = None,
    force_since: float = 0.0,
) -> SliceStore:
    """Open the store of ``root`` at ``image_size``, building (or resuming) it first if needed.

    A finished store is checked before it is opened (:func:`check_store`); a damaged one is
    moved to ``slices/.quarantine/`` and rebuilt, with one line naming the bad file.  A store
    finished before ``force_since`` (a time.time(); ``--force``) is rebuilt.

    ``case_cap`` > 0 keeps the first ``case_cap`` cases by sorted id.  ``extra_key`` (JSON-able)
    is folded into the key, e.g. the phantom's generator version and seed.  ``jobs`` worker
    processes prepare cases (default: the usable cores); the store is the same for every value.
    """
    root = Path(root)
    codec = codec or DEFAULT_CODEC
    image_codec = get_codec(codec)
    jobs = usable_cores() if jobs is None else int(jobs)
    if jobs < 1:
        raise UserError(f"jobs={jobs}: need at least 1 worker")
    cases = source.cases(root)  # validates the layout before anything is hashed or written
    if case_cap and case_cap > 0:
        cases = cases[: int(case_cap)]
    base = Path(cache_root) / "slices"
    fingerprint = data_fingerprint(root, cache_root, jobs)
    key = store_key(source, fingerprint, image_size, case_cap, extra_key, codec)
    final = base / key
    if _usable(final, key, force_since):
        return open_store(final)
    damage = None
    with _locked(base / ".locks" / key):
        if _usable(final, key, force_since):  # built by another process while we waited
            return open_store(final)
        if final.is_symlink() or (final / DONE).is_file():
            try:
                check_store(final, key)
                shutil.rmtree(final)  # intact but made before this --force run
            except integrity.Damaged as err:
                damage = (err, integrity.quarantine(final, base / ".quarantine"))
        elif final.exists():  # left over without its marker: not trustworthy
            shutil.rmtree(final, ignore_errors=True)
        build = base / f".build-{key}"
        t0 = time.perf_counter()
        resumed = 0
        if not (build / DONE).is_file():
            plan_path = build / "plan.json"
            plan = None
            if plan_path.is_file():  # resuming: the key pins the data, so the plan still holds
                try:
                    plan = json.loads(plan_path.read_text())
                except ValueError:
                    plan = None
            if plan is None:
                plan = _plan(source, root, cases, int(image_size), codec, label_bits(source))
                if build.exists():
                    shutil.rmtree(build)
                _write_json_atomic(plan_path, plan)
            arrays = _arrays(build, plan, image_codec)
            (build / "cases").mkdir(exist_ok=True)
            todo = []
            for k, entry in enumerate(plan["cases"]):
                record = build / "cases" / f"{k:06d}.json"
                if record.is_file():
                    resumed += 1
                    continue
                todo.append({
                    "source": source, "root": str(root), "case": entry["case"], "k": k,
                    "row": entry["row"], "z": entry["z"], "channels": entry["channels"],
                    "shape": entry["shape"], "size": int(image_size), "codec": codec,
                    "label_bits": plan["label_bits"],
                    "images": str(arrays["images"][0]), "images_offset": arrays["images"][1],
                    "labels": str(arrays["labels"][0]), "labels_offset": arrays["labels"][1],
                    "record": str(record),
                })
            voxels = sum(e["channels"] * int(np.prod(e["shape"])) for e in plan["cases"])
            left = voxels * len(todo) / max(1, len(plan["cases"]))
            workers = min(jobs, len(todo)) if left >= PARALLEL_MIN_VOXELS else 1

            try:
                with progress(f"preparing {source.name} slices", len(plan["cases"])) as advance:
                    advance(resumed)
                    _run_jobs(todo, workers, advance)
            except UserError:  # bad data: nothing of this build is worth keeping
                shutil.rmtree(build, ignore_errors=True)
                raise
            meta = {
                "key": key,
                "dataset": source.name,
                "reader_version": str(getattr(source, "version", "")),
                "reader_params": reader_params(source),
                "data_root": str(root.resolve()),
                "fingerprint": fingerprint,
                "image_size": int(image_size),
                "case_cap": int(case_cap),
                "cases": cases,
                "preprocess_version": PREPROCESS_VERSION,
                "store_version": STORE_VERSION,
                "image_codec": image_codec.describe(),
                "label_codec": {"bits": plan["label_bits"], "rule": (
                    "two labels per byte: even column low nibble, odd column high nibble"
                    if plan["label_bits"] == 4 else "one uint8 label per pixel")},
                "extra": extra_key,
                "spacing": spacing_record(source, root, [e["case"] for e in plan["cases"]],
                                          [e["shape"] for e in plan["cases"]], int(image_size)),
            }
            _finish(build, plan, meta)
            (build / "build.json").write_text(json.dumps({
                "seconds": round(time.perf_counter() - t0, 3), "jobs": jobs, "workers": workers,
                "resumed_cases": resumed, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }, indent=2))
        os.replace(build, final)
        integrity.mark_verified(final, key)
    if damage is not None:
        say(escape(integrity.report(damage[0], damage[1], f"{source.name} slice store")))
    return open_store(final, built=True)
