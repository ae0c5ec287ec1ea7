"""Errors that are the user's to fix: the CLI prints them as one line and exits 2.

Besides :class:`UserError` (bad input, data or configuration) and :class:`PluginError` (a
plugin that cannot load or is misconfigured), :func:`disk_problem` turns the operating
system's refusals to write (disk full, quota, read-only file system, no permission) into one
sentence naming the file: they are the machine's state, not a bug, and rerunning the same
command after freeing space resumes where the run stopped.
"""
from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Iterable


class UserError(Exception):
    """A mistake in input, data or configuration.

    The message names the file, plugin or parameter at fault and says what would fix it.
    The CLI prints it without a traceback and exits with code 2.
    """


class PluginError(UserError):
    """A plugin could not be loaded, registered or configured."""


#: errno values that mean "this machine cannot write there now", never a bug
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
#: local names under which the writers keep the file they write (see _path_in_traceback)
_PATH_LOCALS = ("path", "tmp", "dst", "out", "work", "final")


def _path_in_traceback(err: BaseException) -> str | None:
    """The file a failed write was writing: the OSError's own filename, else the innermost
    frame's ``path``/``tmp``/... local (``write()`` reports no filename on ENOSPC)."""
    if getattr(err, "filename", None):
        name = str(err.filename)
        other = getattr(err, "filename2", None)
        return f"{name} -> {other}" if other else name
    tb, frames = err.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for local in _PATH_LOCALS:
            value = frame.f_locals.get(local)
            if isinstance(value, (str, Path, os.PathLike)) and str(value):
                return str(value)
    return None


def _as_os_error(err: BaseException) -> OSError | None:
    """``err`` itself when it is an OSError; for a library that reports an operating-system error
    in its own exception type (safetensors: ``IoError(Os { code: 28, ... })``), an OSError with
    that errno and ``err``'s traceback; else None."""
    if isinstance(err, OSError):
        return err
    if type(err).__name__ != "SafetensorError":
        return None
    text = str(err)
    found = re.search(r"Os \{ code: (\d+)", text)
    if found is not None:
        code = int(found.group(1))
    else:
        code = next((c for c in sorted(DISK_ERRNOS) if os.strerror(c) in text), 0)
        if not code:
            return None
    mapped = OSError(code, os.strerror(code))
    mapped.__traceback__ = err.__traceback__
    return mapped


def disk_problem(err: BaseException, folders: Iterable[str | Path] = ()) -> str | None:
    """One sentence for an OSError that says the disk refused a write, else None.

    ``folders`` (the cache and the run folder) are named when the file is not known.
    """
    err = _as_os_error(err)
    if err is None or err.errno not in DISK_ERRNOS:
        return None
    where = _path_in_traceback(err)
    target = where or " or ".join(str(f) for f in folders) or "the cache or the run folder"
    reason = err.strerror or os.strerror(err.errno)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable or point --cache-dir / --out elsewhere"
    else:
        fix = "free some space or point --cache-dir / --out at a larger disk"
    return (f"cannot write {target}: {reason} (errno {errno.errorcode.get(err.errno, err.errno)}); {fix}, then "
            f"run the same command again (finished work is kept and reused)")
