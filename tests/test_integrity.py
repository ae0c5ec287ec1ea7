"""Integrity of the cache: what it serves is what it wrote, and damage is repaired.

Each case damages one cached file the way a disk, a sync tool or a careless hand would (bit
flips that keep every float finite, overwritten bytes, truncation, deletion, a folder replaced
by a symlink or by another key's folder, an array of the wrong shape) and checks that the next
run names the file in one line, moves the damaged folder to ``.quarantine`` (the bytes kept),
rebuilds it, and ends with per-slice rows equal to a clean run's.  The clean reference is a
separate run into a separate cache: never the code under test reading its own output.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from wsss_bench import integrity
from wsss_bench.cache import META, ArtifactCache
from wsss_bench.data.readers import BratsDataset
from wsss_bench.data.store import INTEGRITY
from wsss_bench.data.taskdata import load_task_data

ROW_COLS = ["task", "method", "gate", "case_id", "z", "dice", "iou"]


# ============================================================================ helpers
def _args(cache: Path, out: Path, *extra) -> list:
    return ["run", "--profile", "smoke", "--cam", "gradcam", "--method", "threshold",
            "--cache-dir", cache, "--out", out, *extra]


def _rows(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "results.parquet")
    cols = [c for c in ROW_COLS if c in df.columns]
    return df[cols].sort_values(cols[:5]).reset_index(drop=True)


def _only(cache: Path, stage: str) -> Path:
    """The one artifact folder of ``stage``; for maps, the test split's (a cell also writes its
    sources' training-split maps, scored as pseudo-masks)."""
    found = [d for d in (cache / "artifacts" / stage).iterdir() if not d.name.startswith(".")]
    if stage == "maps":
        found = [d for d in found if json.loads((d / "artifact.json").read_text())["meta"].get("split") == "test"]
    assert len(found) == 1, found
    return found[0]


def _store(cache: Path) -> Path:
    found = [d for d in (cache / "slices").iterdir() if not d.name.startswith(".")]
    assert len(found) == 1, found
    return found[0]


def _data_offset(path: Path) -> int:
    return int(np.load(path, mmap_mode="r").offset)


def _flip_finite(path: Path, n: int = 200) -> None:
    """Flip the lowest mantissa bit of ``n`` float32 weights: every value stays finite."""
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    for i in range(n):
        pos = header + 4 * (7 + 37 * i)
        raw[pos] ^= 0x01
    path.write_bytes(bytes(raw))
    arr = np.frombuffer(bytes(raw[header:header + (len(raw) - header) // 4 * 4]), dtype="<f4")
    assert np.isfinite(arr).all()


def _damage_lines(output: str) -> list[str]:
    return [ln for ln in " ".join(output.split("\n")).split("damaged cache file")[1:]]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean run: its cache (copied by each case) and its per-slice rows (the reference)."""
    from typer.testing import CliRunner

    from wsss_bench import cli

    base = tmp_path_factory.mktemp("integrity-clean")
    cli._STATE["host"] = None
    result = CliRunner().invoke(cli.app, [str(a) for a in _args(base / "cache", base / "out")])
    assert result.exit_code == 0, result.output
    return base / "cache", _rows(base / "out")


def _copy_cache(clean_cache: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(clean_cache, dst, symlinks=True)
    return dst


# ============================================================================ artifacts
def test_bit_flipped_weights_labels_and_phantom_are_found_and_rebuilt(run_cli, clean, tmp_path):
    """Finite bit flips in the classifier, 3,000 overwritten label bytes in the slice store and a
    changed phantom NIfTI: each named in one line, moved aside, rebuilt; final rows = clean rows."""
    clean_cache, reference = clean
    cache = _copy_cache(clean_cache, tmp_path)
    weights = _only(cache, "classifier") / "classifier.safetensors"
    _flip_finite(weights)
    labels = _store(cache) / "labels.npy"
    raw = bytearray(labels.read_bytes())
    off = _data_offset(labels)
    raw[off:off + 3000] = bytes([0x11]) * 3000
    labels.write_bytes(bytes(raw))
    nii = sorted((cache / "phantoms").glob("*/BraTS2021_*/*seg.nii.gz"))[0]
    blob = bytearray(nii.read_bytes())
    blob[-10] ^= 0xFF
    nii.write_bytes(bytes(blob))

    result = run_cli(*_args(cache, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for bad in (weights, labels, nii):
        assert f"damaged cache file {bad}" in text, (bad, text)
    assert text.count("damaged cache file") == 3 and text.count("and rebuilt the") == 3
    pd.testing.assert_frame_equal(_rows(tmp_path / "out"), reference)
    kept = list((cache / "artifacts" / ".quarantine" / "classifier").glob("*/classifier.safetensors"))
    assert len(kept) == 1 and kept[0].read_bytes() != weights.read_bytes()  # the damaged bytes, kept
    assert list((cache / "slices" / ".quarantine").glob("*/labels.npy"))
    assert list((cache / "phantoms" / ".quarantine").glob("*"))
    again = run_cli(*_args(cache, tmp_path / "out2"))
    assert again.exit_code == 0 and "damaged" not in again.output


def test_symlinked_and_foreign_artifact_folders_are_refused(run_cli, clean, tmp_path):
    """A maps folder replaced by a symlink, and the classifier folder replaced by another key's
    folder (the classifier-p1 artifact): neither is served; both are moved aside and rebuilt."""
    clean_cache, reference = clean
    cache = _copy_cache(clean_cache, tmp_path)
    maps = _only(cache, "maps")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(maps), str(elsewhere))
    maps.symlink_to(elsewhere, target_is_directory=True)
    clf = _only(cache, "classifier")
    shutil.rmtree(clf)
    shutil.copytree(_only(cache, "classifier-p1"), clf)

    result = run_cli(*_args(cache, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"damaged cache file {maps} (is a symbolic link" in text, text
    assert f"damaged cache file {clf / META} (records classifier-p1/" in text, text
    assert not maps.is_symlink() and (maps / "maps.npy").is_file()
    assert elsewhere.is_dir()  # the link's target is never touched
    pd.testing.assert_frame_equal(_rows(tmp_path / "out"), reference)


@pytest.mark.parametrize("damage", ["truncated weights", "deleted maps", "maps with 20 rows", "maps transposed",
                                    "maps float64 NaN"])
def test_damaged_artifact_file_is_named_and_rebuilt_cache_level(tmp_path, damage):
    """Each damage of an artifact's file is caught by the cheap check (no full hash needed):
    the next build() names the file, quarantines the folder and rebuilds it."""
    cache = ArtifactCache(tmp_path / "artifacts")
    made = []

    def build(work: Path) -> dict:
        made.append(1)
        np.save(work / "maps.npy", np.linspace(0, 1, 14 * 8 * 8, dtype=np.float32).reshape(14, 8, 8))
        from safetensors.numpy import save_file

        save_file({"w": np.ones((64, 64), np.float32)}, str(work / "m.safetensors"))
        return {}

    first = cache.build("maps", "k" * 64, build)
    maps, weights = first.path / "maps.npy", first.path / "m.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
        bad = weights
    elif damage == "deleted maps":
        maps.unlink()
        bad = maps
    else:
        arr = {"maps with 20 rows": np.zeros((20, 8, 8), np.float32),
               "maps transposed": np.zeros((8, 8, 14), np.float32),
               "maps float64 NaN": np.full((14, 8, 4), np.nan)}[damage]  # float64 of the same byte size
        np.save(maps, arr)
        bad = maps
    again = cache.build("maps", "k" * 64, build)
    assert len(made) == 2 and not again.hit
    assert cache.events[-1]["repaired"] == str(bad)
    assert np.load(again.path / "maps.npy").shape == (14, 8, 8)
    assert len(list((tmp_path / "artifacts" / ".quarantine" / "maps").iterdir())) == 1


def test_full_hash_on_first_use_and_with_verify(tmp_path, monkeypatch):
    """A same-size content change passes the cheap check once the folder was hashed in this
    process, is found on the first use in a new process (simulated) and always under --verify."""
    cache = ArtifactCache(tmp_path / "artifacts")
    built = cache.build("maps", "v" * 64, lambda w: np.save(w / "a.npy", np.arange(64, dtype=np.float32)))
    path = built.path / "a.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    assert cache.build("maps", "v" * 64, lambda w: None).hit  # hashed at build: cheap check only
    monkeypatch.setattr(integrity, "_STATE", {"always": True})  # --verify
    rebuilt = []
    cache.build("maps", "v" * 64, lambda w: (rebuilt.append(1), np.save(w / "a.npy", np.arange(64, dtype=np.float32)))[1])
    assert rebuilt == [1] and cache.events[-1]["repaired"] == str(path)
    monkeypatch.setattr(integrity, "_STATE", {"always": False})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))
    monkeypatch.setattr(integrity, "_VERIFIED", set())  # a new process
    rebuilt.clear()
    cache.build("maps", "v" * 64, lambda w: (rebuilt.append(1), np.save(w / "a.npy", np.arange(64, dtype=np.float32)))[1])
    assert rebuilt == [1]


def test_artifact_written_before_records_is_adopted(tmp_path):
    cache = ArtifactCache(tmp_path / "artifacts")
    built = cache.build("maps", "a" * 64, lambda w: np.save(w / "a.npy", np.zeros(3, np.float32)))
    meta = json.loads((built.path / META).read_text())
    del meta["files"]
    (built.path / META).write_text(json.dumps(meta))
    again = cache.build("maps", "a" * 64, lambda w: pytest.fail("an intact legacy artifact is not rebuilt"))
    assert again.hit and "a.npy" in json.loads((built.path / META).read_text())["files"]


def test_nan_maps_from_a_corrupt_model_blame_the_artifact(run_cli, clean, tmp_path):
    """The classifier's file turns to NaN after this process hashed it (a disk going bad during a
    long bench): the maps come out non-finite, and the message names the model file, not the
    map source; the next run rebuilds it."""
    clean_cache, reference = clean
    cache = _copy_cache(clean_cache, tmp_path)
    first = run_cli(*_args(cache, tmp_path / "out0"))  # hashes every artifact in this process
    assert first.exit_code == 0, first.output
    weights = _only(cache, "classifier") / "classifier.safetensors"
    raw = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header:] = (np.full((len(raw) - header) // 4, np.nan, "<f4").tobytes() + b"\0" * 4)[:len(raw) - header]
    weights.write_bytes(bytes(raw))
    shutil.rmtree(_only(cache, "maps"))
    shutil.rmtree(_only(cache, "classifier-p1"))
    bad = run_cli(*_args(cache, tmp_path / "out"))
    text = " ".join(bad.output.split())
    assert bad.exit_code != 0, text
    assert f"cached artifact file {weights} is corrupt" in text and "run the same command again" in text, text
    fixed = run_cli(*_args(cache, tmp_path / "out"))
    assert fixed.exit_code == 0, fixed.output
    pd.testing.assert_frame_equal(_rows(tmp_path / "out"), reference)


# ============================================================================ stores and phantoms
def test_truncated_store_and_force_rebuild_store_and_phantom(smoke_profile, tmp_path, capsys):
    cache = tmp_path / "c"
    first = load_task_data(BratsDataset(), "brats", None, smoke_profile, 0, cache)
    store = Path(first.store.path)
    images = store / "images.npy"
    want = np.asarray(first.images(np.arange(len(first))))
    with open(images, "r+b") as fh:
        fh.truncate(images.stat().st_size - 1000)
    again = load_task_data(BratsDataset(), "brats", None, smoke_profile, 0, cache)
    out = " ".join(capsys.readouterr().out.split())
    assert f"damaged cache file {images}" in out and "rebuilt the brats slice store" in out
    np.testing.assert_array_equal(np.asarray(again.images(np.arange(len(again)))), want)
    assert (store / INTEGRITY).is_file()

    phantom_done = next((cache / "phantoms").glob("*/.done"))
    store_done = store / "done"
    t_phantom, t_store = phantom_done.stat().st_mtime, store_done.stat().st_mtime
    time.sleep(0.05)
    forced = load_task_data(BratsDataset(), "brats", None, smoke_profile, 0, cache, force_since=time.time())
    assert next((cache / "phantoms").glob("*/.done")).stat().st_mtime > t_phantom
    assert (store / "done").stat().st_mtime > t_store
    np.testing.assert_array_equal(np.asarray(forced.images(np.arange(len(forced)))), want)
    assert not os.path.islink(store)


def test_large_folders_skip_the_first_use_hash_only_while_untouched(tmp_path, monkeypatch):
    """Above LARGE_BYTES an untouched folder is not re-hashed in a new process; any write to a
    file (same size, so the cheap check passes) changes its ctime and brings the full hash back."""
    cache = ArtifactCache(tmp_path / "artifacts")
    make = lambda w: np.save(w / "a.npy", np.arange(256, dtype=np.float32))  # noqa: E731
    built = cache.build("maps", "l" * 64, make)
    monkeypatch.setattr(integrity, "LARGE_BYTES", 0)
    monkeypatch.setattr(integrity, "_VERIFIED", set())  # a new process

    def no_hash(path):
        raise AssertionError("hashed an untouched large folder")

    real_hash = integrity.hash_file
    monkeypatch.setattr(integrity, "hash_file", no_hash)
    assert cache.build("maps", "l" * 64, make).hit
    monkeypatch.setattr(integrity, "hash_file", real_hash)
    path = built.path / "a.npy"
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, b"\x01", path.stat().st_size - 3)
    os.close(fd)
    monkeypatch.setattr(integrity, "_VERIFIED", set())
    again = cache.build("maps", "l" * 64, make)
    assert not again.hit and cache.events[-1]["repaired"] == str(path)
