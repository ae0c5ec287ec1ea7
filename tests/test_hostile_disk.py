"""Full disks and special files: one sentence and exit 2, never a bus error, a hang or a traceback.

- a full disk while maps are written through a memory map (the blocks are reserved first, so
  the failure is ENOSPC at reservation, not SIGBUS at the first store into a hole) and while a
  model is saved (safetensors reports the OS error in its own exception type);
- a FIFO and dangling or looping symbolic links in a data root: skipped with a note when no
  case needs them; a case file that is a dangling link is one line naming it.
"""
from __future__ import annotations

import errno
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from wsss_bench import cache as cache_mod
from wsss_bench.data.readers import BratsDataset
from wsss_bench.data.store import data_fingerprint, prepare_slices
from wsss_bench.errors import disk_problem


def _args(tmp_path: Path, *extra) -> list:
    return ["run", "--profile", "smoke", "--cam", "gradcam", "--method", "threshold",
            "--cache-dir", tmp_path / "cache", "--out", tmp_path / "out", *extra]


def _one_error(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith(("error:", "cell failed"))]
    assert len(lines) == 1 and "Traceback" not in output, output
    return " ".join(output.split())


# ============================================================================ disk full
def test_full_disk_at_a_memmap_write_is_one_sentence(run_cli, tmp_path, monkeypatch):
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("maps.npy"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    result = run_cli(*_args(tmp_path))
    assert result.exit_code == 2
    text = _one_error(result.output)
    assert "No space left on device" in text and "maps.npy" in text and "run the same command again" in text
    monkeypatch.setattr(os, "posix_fallocate", real)
    again = run_cli(*_args(tmp_path))
    assert again.exit_code == 0, again.output


def test_reserve_without_fallocate_checks_free_space(tmp_path, monkeypatch):
    """File systems without fallocate: the free-space check refuses a map larger than the disk."""
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    class Tiny:
        f_bavail, f_frsize = 1, 4096

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    monkeypatch.setattr(os, "fstatvfs", lambda fd: Tiny)
    with pytest.raises(OSError) as info:
        cache_mod.open_memmap_reserved(tmp_path / "big.npy", np.float32, (64, 64, 64))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "big.npy")
    assert not (tmp_path / "big.npy").exists()
    monkeypatch.undo()
    arr = cache_mod.open_memmap_reserved(tmp_path / "ok.npy", np.float32, (16, 16))
    assert os.stat(tmp_path / "ok.npy").st_blocks * 512 >= arr.nbytes  # the blocks are there


def test_full_disk_at_a_model_save_is_one_sentence(run_cli, tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        raise safetensors.SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    result = run_cli(*_args(tmp_path))
    assert result.exit_code == 2
    text = _one_error(result.output)
    assert "No space left on device" in text and "run the same command again" in text
    assert "artifacts/classifier/" in text and ".safetensors" in text  # the checkpoint or the final weights
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert run_cli(*_args(tmp_path)).exit_code == 0


def test_library_errors_without_an_os_code_are_not_disk_problems():
    class SafetensorError(Exception):
        pass

    assert disk_problem(SafetensorError("invalid header")) is None
    assert disk_problem(RuntimeError("No space left on device")) is None  # only safetensors' own type is mapped
    assert "No space left" in disk_problem(SafetensorError("No space left on device"))


# ============================================================================ special files
def _bounded(fn, seconds: float = 120):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not return."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised below
            box["error"] = err

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked (on a FIFO?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_fifo_and_dangling_links_in_a_data_root_are_skipped_with_a_note(brats_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(brats_root, root)
    clean = data_fingerprint(root)
    os.mkfifo(root / "pipe")
    os.mkfifo(root / "BraTS2021_00000" / "notes.fifo")
    (root / "dangling").symlink_to(root / "nowhere")
    (root / "loop").symlink_to(root / "loop")
    assert _bounded(lambda: data_fingerprint(root)) == clean
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped 4 file(s) that are not regular files" in out and "pipe (not a regular file)" in out
    assert "dangling (a link that points nowhere)" in out
    store = _bounded(lambda: prepare_slices(BratsDataset(), root, 32, tmp_path / "cache", jobs=1))
    assert len(store) > 0


@pytest.mark.parametrize("kind", ["dangling link", "looping link", "fifo"])
def test_a_case_file_that_is_not_a_file_is_one_line(run_cli, brats_root, tmp_path, kind):
    root = tmp_path / "root"
    shutil.copytree(brats_root, root)
    seg = sorted(root.glob("BraTS2021_*/*_seg.nii.gz"))[1]
    seg.unlink()
    if kind == "dangling link":
        seg.symlink_to(tmp_path / "gone.nii.gz")
    elif kind == "looping link":
        seg.symlink_to(seg)
    else:
        os.mkfifo(seg)
    result = _bounded(lambda: run_cli(*_args(tmp_path, "--data-root", root)))
    assert result.exit_code == 2
    text = _one_error(result.output)
    assert str(seg) in text
    assert ("points nowhere or loops" in text) if "link" in kind else ("not a regular file" in text)
