"""What the cache serves is what it wrote: per-file records, checks, quarantine.

Every cached folder (an artifact, a slice store, a phantom) records, when it is written, each of
its files' byte size, BLAKE2b digest and, for ``.npy`` and ``.safetensors`` files, the array
header (shape and dtype; tensor names, shapes and dtypes).  Reading checks them in two grades:

- **cheap**, on every read: the file is a regular file (no symlink), its size is the recorded
  one and its array header parses to the recorded shape and dtype -- a few ``stat`` calls and
  header reads, whatever the file's size;
- **full**, the first time a folder is used in a process and on every read under ``--verify``:
  the BLAKE2b digest of every byte, so a flipped bit in a weight or a label is found.

A folder that fails either check is moved aside (:func:`quarantine`, never deleted: the bytes
stay available for a post-mortem) and rebuilt by its owner, which prints one line naming the
bad file.  The digest is BLAKE2b (hashlib, no extra dependency): about 1 GB/s on one core,
cheap next to the work that made the file (benchmarks/perf_verify.py measures it).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
import time
import uuid
from pathlib import Path
from typing import Any

#: read size while hashing
CHUNK = 4 << 20
#: folders (by resolved path and recorded identity) fully hashed in this process
_VERIFIED: set[tuple[str, str]] = set()
_STATE = {"always": False}


class Damaged(Exception):
    """A cached file failed its integrity check; ``str()`` names the file and what is wrong."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def set_verify_always(on: bool) -> None:
    """``--verify``: hash every cached file on every read, not only on its first use in a process."""
    _STATE["always"] = bool(on)


def verify_always() -> bool:
    return _STATE["always"]


def hash_file(path: Path | str) -> str:
    """BLAKE2b (128-bit) hex digest of a file's bytes."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def _npy_header(path: Path) -> dict:
    import numpy as np

    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if reader is None:
            raise ValueError(f"unknown .npy version {version}")
        shape, fortran, dtype = reader(fh)
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError("holds Python objects")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return {"shape": [int(s) for s in shape], "dtype": dtype.str, "fortran": bool(fortran), "bytes": expected}


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError("header length is implausible")
        raw = fh.read(n)
    if len(raw) != n:
        raise ValueError("header is truncated")
    header = json.loads(raw)
    tensors = {k: [v["dtype"], list(v["shape"])] for k, v in sorted(header.items()) if k != "__metadata__"}
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    digest = hashlib.blake2b(json.dumps(tensors, sort_keys=True).encode(), digest_size=8).hexdigest()
    return {"tensors": len(tensors), "names_shapes_dtypes": digest, "bytes": 8 + n + end}


def array_header(path: Path) -> dict | None:
    """Shape/dtype record of an array file (``.npy``, ``.safetensors``), None for other files;
    raises ValueError when the header does not parse."""
    path = Path(path)
    if path.suffix == ".npy":
        return _npy_header(path)
    if path.suffix == ".safetensors":
        return _safetensors_header(path)
    return None


def record_file(path: Path) -> dict:
    """The integrity record of one file: size, BLAKE2b, its array header where it has one, and
    its (mtime, ctime) stamp (see :func:`needs_full`)."""
    st = os.stat(path)
    rec: dict[str, Any] = {"size": st.st_size, "blake2b": hash_file(path), "stamp": [st.st_mtime_ns, st.st_ctime_ns]}
    head = array_header(path)
    if head is not None:
        rec["array"] = head
    return rec


def record_folder(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Records of every regular file under ``folder`` (relative POSIX paths), except names in ``skip``."""
    folder = Path(folder)
    out: dict[str, dict] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            if rel in skip or not p.is_file() or p.is_symlink():
                continue
            out[rel] = record_file(p)
    return out


def check_folder(folder: Path, records: dict[str, dict], full: bool) -> None:
    """Raise :class:`Damaged` for the first file of ``folder`` that does not match its record.

    The cheap part (regular file, size, array header) always runs; ``full`` adds the digest.
    """
    folder = Path(folder)
    if folder.is_symlink():
        raise Damaged(folder, f"the folder is a symbolic link (to {os.readlink(folder)}); cached folders are never links")
    for rel, rec in records.items():
        p = folder / rel
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            raise Damaged(p, "missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise Damaged(p, "not a regular file (a link or a special file)")
        if st.st_size != rec["size"]:
            raise Damaged(p, f"{st.st_size} bytes, {rec['size']} written")
        if "array" in rec:
            try:
                head = array_header(p)
            except (ValueError, KeyError, TypeError, OSError) as err:
                raise Damaged(p, f"array header unreadable ({err})") from None
            want = dict(rec["array"])
            if head != want:
                raise Damaged(p, f"array header {_brief(head)} differs from the written {_brief(want)}")
    if full:
        for rel, rec in records.items():
            p = folder / rel
            if hash_file(p) != rec["blake2b"]:
                raise Damaged(p, "content differs from what was written (BLAKE2b mismatch)")


def _brief(head: dict | None) -> str:
    if not head:
        return "none"
    if "shape" in head:
        return f"{tuple(head['shape'])} {head['dtype']}" + (" fortran-order" if head.get("fortran") else "")
    return f"{head.get('tensors')} tensors ({head.get('names_shapes_dtypes')}), {head.get('bytes')} bytes"


#: a folder holding more bytes than this skips the first-use full hash while none of its files
#: was touched since it was recorded or last fully hashed (same mtime and ctime: any write,
#: truncation, copy or chmod changes the ctime, and user space cannot set it back); ``--verify``
#: always hashes.  A paper-scale slice store is tens of GB: hashing it in every process of a
#: SLURM array would cost minutes per job.
LARGE_BYTES = 1 << 30


def _stamps_hold(folder: Path, records: dict[str, dict]) -> bool:
    for rel, rec in records.items():
        try:
            st = os.stat(Path(folder) / rel)
        except OSError:
            return False
        if rec.get("stamp") != [st.st_mtime_ns, st.st_ctime_ns]:
            return False
    return True


def needs_full(folder: Path, identity: str, records: dict[str, dict] | None = None) -> bool:
    """True when ``folder`` (with this recorded identity) must be fully hashed now: ``--verify``
    is on, or it was not hashed yet in this process -- unless it is larger than
    :data:`LARGE_BYTES` and no file was touched since its stamps were taken."""
    if verify_always():
        return True
    if (os.path.realpath(folder), identity) in _VERIFIED:
        return False
    if records and sum(int(r.get("size", 0)) for r in records.values()) > LARGE_BYTES \
            and _stamps_hold(folder, records):
        return False
    return True


def restamp(folder: Path, records: dict[str, dict]) -> bool:
    """After a successful full check: refresh the records' stamps in place (a copied cache is
    hashed once, not at every first use); True when one changed and the record should be saved."""
    changed = False
    for rel, rec in records.items():
        st = os.stat(Path(folder) / rel)
        stamp = [st.st_mtime_ns, st.st_ctime_ns]
        if rec.get("stamp") != stamp:
            rec["stamp"] = stamp
            changed = True
    return changed


def mark_verified(folder: Path, identity: str) -> None:
    _VERIFIED.add((os.path.realpath(folder), identity))


def forget_verified(folder: Path) -> None:
    real = os.path.realpath(folder)
    for item in [v for v in _VERIFIED if v[0] == real]:
        _VERIFIED.discard(item)


def quarantine(path: Path, qroot: Path) -> Path:
    """Move ``path`` (a folder or a link to one) to ``qroot/<name>-<time>-<rand>``; return the new path.

    Quarantined folders are kept for inspection; nothing reads them and deleting them is safe.
    """
    path, qroot = Path(path), Path(qroot)
    qroot.mkdir(parents=True, exist_ok=True)
    dest = qroot / f"{path.name}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
    os.replace(path, dest)
    forget_verified(path)
    return dest


def report(damage: Damaged, moved: Path, what: str) -> str:
    """The one line printed after a damaged folder was moved aside and rebuilt."""
    return f"damaged cache file {damage.path} ({damage.reason}): moved to {moved} and rebuilt the {what}"
