"""The data fingerprint: what identifies a dataset's files, so a changed file makes a new store.

sha256 over the sorted (relative path, byte size, content sha256) of every regular file under a
data root; content hashes are remembered per file stamp under ``<cache>/hashes/`` so a large
dataset is read in full once.  Special files (FIFOs, sockets, dangling links) are skipped with a
note: reading one could block forever.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.markup import escape

from wsss_bench.cache import atomic_write_json
from wsss_bench.progress import say

#: files modified less than this many seconds before hashing are hashed again next time
RACY_SECONDS = 2.0
HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_memo_path(cache_root: Path, root: Path) -> Path:
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return Path(cache_root) / "hashes" / f"{digest}.json"


def data_fingerprint(root: Path, cache_root: Path | None = None, jobs: int | None = None) -> str:
    """sha256 over the sorted (relative path, byte size, content sha256) of every file under ``root``.

    Hidden files and folders (name starting with '.') are skipped, so cache markers and OS
    litter do not change the fingerprint.  With ``cache_root`` each file's content hash is
    remembered in ``<cache_root>/hashes/`` under its (size, mtime_ns, ctime_ns), so a dataset is
    read in full once; a file modified within ``RACY_SECONDS`` of hashing is not remembered
    (a same-size rewrite within one timestamp tick could not be told apart).
    """
    root = Path(root)
    entries = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except OSError:  # a symbolic link that points nowhere or loops
                skipped.append(f"{p.relative_to(root).as_posix()} (a link that points nowhere)")
                continue
            if not stat.S_ISREG(st.st_mode):  # FIFO, socket, device: reading could block forever
                skipped.append(f"{p.relative_to(root).as_posix()} (not a regular file)")
                continue
            entries.append((p.relative_to(root).as_posix(), p, [st.st_size, st.st_mtime_ns, st.st_ctime_ns]))
    if skipped:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        say(escape(f"note: {root}: skipped {len(skipped)} file(s) that are not regular files: {shown}"))
    memo_path = _hash_memo_path(cache_root, root) if cache_root is not None else None
    memo: dict = {}
    if memo_path is not None and memo_path.is_file():
        try:
            memo = json.loads(memo_path.read_text()).get("files", {})
        except (OSError, ValueError):
            memo = {}
    digests: dict[str, str] = {}
    todo = []
    for rel, path, stamp in entries:
        known = memo.get(rel)
        if known is not None and known[:3] == stamp:
            digests[rel] = known[3]
        else:
            todo.append((rel, path))
    if todo:
        workers = max(1, min(len(todo), int(jobs or usable_cores())))
        if workers == 1:
            hashed = [file_sha256(path) for _, path in todo]
        else:  # hashlib releases the GIL: threads read and hash files in parallel

            with ThreadPoolExecutor(workers) as pool:
                hashed = list(pool.map(file_sha256, [path for _, path in todo]))
        digests.update({rel: d for (rel, _), d in zip(todo, hashed)})
    if memo_path is not None and todo:
        now = time.time_ns()
        fresh = {rel: [*stamp, digests[rel]] for rel, _, stamp in entries
                 if now - stamp[1] > RACY_SECONDS * 1e9}
        if fresh != memo:
            atomic_write_json(memo_path, {"root": str(root.resolve()), "files": fresh})
    h = hashlib.sha256()
    for rel, _, stamp in sorted(entries, key=lambda e: e[0]):
        h.update(f"{rel}\t{stamp[0]}\t{digests[rel]}\n".encode())
    return h.hexdigest()


def usable_cores() -> int:
    """CPU cores this process may run on (the default of ``--jobs``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
