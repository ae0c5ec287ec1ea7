"""The slice store at scale: parallel and resumable builds, the image codec, header geometry,
locking, and the content fingerprint (issues 16 and 8)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from wsss_bench.data import store as st
from wsss_bench.data.preprocess import resize_images, resize_masks, tissue_fraction
from wsss_bench.data.readers import BratsDataset, Flare21Dataset, read_header
from wsss_bench.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _digests(path: Path) -> dict[str, str]:
    """sha256 of every file of a store except build.json (how long it took, with how many jobs); for
    integrity.json, the files' recorded digests only (its stamps are the files' mtimes)."""
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())
           if p.name not in ("build.json", "integrity.json")}
    if (path / "integrity.json").is_file():
        rec = json.loads((path / "integrity.json").read_text())
        out["integrity.json"] = str(sorted((k, r["blake2b"]) for k, r in rec["files"].items()))
    return out


@pytest.fixture
def parallel(monkeypatch):
    """Use the worker pool even for smoke-sized volumes."""
    monkeypatch.setattr(st, "PARALLEL_MIN_VOXELS", 0)


class CountingBrats(BratsDataset):
    """BraTS reader that counts decoded cases (same name/version, so the same store key)."""

    loaded: list = []

    def load_case(self, root, case):
        CountingBrats.loaded.append(case)
        return super().load_case(root, case)


# --------------------------------------------------------------------------- codec
def test_codec_error_is_half_a_step_and_exact_at_the_ends():
    x = np.concatenate([np.linspace(0, 1, 100_001), np.random.default_rng(0).random(10_000)]).astype(np.float32)
    for name, levels in (("uint8", 255), ("uint16", 65535)):
        codec = st.CODECS[name]
        q = codec.encode(x)
        assert q.dtype == np.dtype(name)
        ref = np.floor(x.astype(np.float64) * levels + 0.5)  # independent float64 rounding
        assert np.abs(q.astype(np.float64) - ref).max() <= 1  # ties may go either way
        back = codec.decode(q)
        assert back.dtype == np.float32
        err = np.abs(back.astype(np.float64) - x)
        assert err.max() <= 0.5 / levels + 1e-7 and codec.max_error == 0.5 / levels
        assert err.max() > 0.45 / levels  # it does quantise
        assert codec.decode(codec.encode(np.array([0.0, 1.0], np.float32))).tolist() == [0.0, 1.0]
    assert np.array_equal(st.CODECS["float32"].decode(st.CODECS["float32"].encode(x)), x)


@pytest.mark.parametrize("width", [32, 7, 1])
def test_label_packing_round_trips_every_4_bit_value(width):
    labels = np.random.default_rng(width).integers(0, 16, size=(5, 3, width), dtype=np.uint8)
    labels[0, 0] = 15
    packed = st.pack4(labels)
    assert packed.shape == (5, 3, (width + 1) // 2) and packed.dtype == np.uint8
    assert np.array_equal(st.unpack4(packed, width), labels)
    # independent reference for the layout: even column in the low nibble
    assert int(packed[0, 0, 0]) == int(labels[0, 0, 0]) + 16 * (int(labels[0, 0, 1]) if width > 1 else 0)


def test_labels_are_stored_in_4_bits_only_when_the_reader_promises_it(tmp_path, brats_phantom):
    class NoPromise(BratsDataset):
        label_max = None

    packed = st.prepare_slices(BratsDataset(), brats_phantom, 32, tmp_path / "a", jobs=1)
    plain = st.prepare_slices(NoPromise(), brats_phantom, 32, tmp_path / "b", jobs=1)
    assert packed.labels.raw.shape[1:] == (32, 16) and plain.labels.raw.shape[1:] == (32, 32)
    assert packed.key != plain.key and packed.meta["label_codec"]["bits"] == 4
    assert packed.labels.shape == plain.labels.shape == (len(packed), 32, 32)
    assert np.array_equal(packed.labels[:], plain.labels.raw[:])
    assert set(np.unique(packed.labels[:]).tolist()) == {0, 1, 2, 4}


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_label_values_agree_with_unique(dtype):
    from wsss_bench.data.readers import label_values

    rng = np.random.default_rng(3)
    for values in ([0], [0, 4], [0, 1, 2, 4], [3, 7, 40], [0, 200]):
        data = rng.choice(values, size=(20, 21, 22)).astype(dtype)
        assert label_values(data).tolist() == np.unique(data).tolist()


# --------------------------------------------------------------------------- reading
def _reference_slices(source, root, case, size):
    """The float path before the compact store: reader -> preprocess, float32."""
    image, labels = source.load(root, case)
    return resize_images(image, size), resize_masks(labels, size)


@pytest.mark.parametrize("cls, task", [(BratsDataset, "brats"), (Flare21Dataset, "flare21-kidney")])
def test_store_returns_the_float_images_within_the_quantisation(smoke_task_data, cls, task):
    td = smoke_task_data[task]
    store = td.store
    assert store.meta["image_codec"]["name"] == "uint8" and store.images.raw.dtype == np.uint8
    source, root, size = cls(), td.data_root, td.image_size
    worst = 0.0
    for case in store.meta["cases"]:
        rows = np.flatnonzero(td.case_ids == case)
        ref_img, ref_lab = _reference_slices(source, root, case, size)
        got = td.images(rows)
        assert got.dtype == np.float32 and got.shape == ref_img.shape
        err = np.abs(got.astype(np.float64) - ref_img)
        worst = max(worst, err.max())
        assert err.max() <= 0.5 / 255 + 1e-6, case
        # the stored codes are exactly the codec of the float slices (rows in the right place)
        assert np.array_equal(store.images.raw[rows], st.CODECS["uint8"].encode(ref_img))
        assert np.array_equal(np.asarray(store.labels[rows]), ref_lab)
        assert np.array_equal(td.z[rows], np.arange(len(rows)))
        # tissue fraction is the protocol's, on the float slices
        assert np.array_equal(td.tissue_fraction[rows], tissue_fraction(ref_img))
        for v in np.unique(ref_lab[ref_lab > 0]):
            assert np.array_equal(store.index[f"px_{v}"].to_numpy()[rows], (ref_lab == v).sum(axis=(1, 2)))
    assert worst > 0.4 / 255  # the comparison is not vacuous


def test_reader_matches_an_independent_float64_reference(brats_phantom, flare_phantom):
    case = "BraTS2021_00001"
    image, labels = BratsDataset().load(brats_phantom, case)
    for c, m in enumerate(BratsDataset.modalities):
        ref = nib.as_closest_canonical(nib.load(str(brats_phantom / case / f"{case}_{m}.nii.gz"))).get_fdata()
        ref = (ref - ref.min()) / (ref.max() - ref.min())
        assert np.abs(image[c] - ref).max() < 1e-6
    hu = nib.as_closest_canonical(nib.load(str(flare_phantom / "TrainingImg" / "train_001_0000.nii.gz"))).get_fdata()
    ct, _ = Flare21Dataset().load(flare_phantom, "train_001")
    assert np.abs(ct[0] - (np.clip(hu, -160, 240) + 160) / 400).max() < 1e-6


@pytest.mark.parametrize("affine", [
    np.diag([-2.0, -2.0, 3.0, 1.0]),
    np.array([[0, 0, -2.0, 0], [0, 1.5, 0, 0], [-3.0, 0, 0, 0], [0, 0, 0, 1]]),
    np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]]),
])
def test_header_geometry_is_the_decoded_ras_shape(tmp_path, affine):
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.int16), affine), str(path))
    _, disk, ras = read_header(path)
    assert disk == (5, 6, 7)
    assert ras == nib.as_closest_canonical(nib.load(str(path))).get_fdata().shape


def test_geometry_of_the_phantoms_needs_no_voxels(brats_phantom, flare_phantom, monkeypatch):
    shapes = {c: BratsDataset().load(brats_phantom, c)[1].shape for c in ("BraTS2021_00000",)}
    shapes_f = {c: Flare21Dataset().load(flare_phantom, c)[1].shape for c in ("train_000", "train_001")}

    def no_decode(*_a, **_k):
        raise AssertionError("voxels decoded")

    monkeypatch.setattr("wsss_bench.data.readers.read_ras", no_decode)
    for c, shape in shapes.items():
        assert BratsDataset().geometry(brats_phantom, c) == (4, shape)
    for c, shape in shapes_f.items():  # train_001 is stored LPS-style: the header path permutes
        assert Flare21Dataset().geometry(flare_phantom, c) == (1, shape)


# --------------------------------------------------------------------------- parallel
@pytest.mark.parametrize("cls", [BratsDataset, Flare21Dataset])
def test_jobs_1_and_2_give_byte_identical_stores(tmp_path, parallel, brats_phantom, flare_phantom, cls):
    root = brats_phantom if cls is BratsDataset else flare_phantom
    one = st.prepare_slices(cls(), root, 32, tmp_path / "j1", jobs=1)
    two = st.prepare_slices(cls(), root, 32, tmp_path / "j2", jobs=2)
    assert one.key == two.key and one.built and two.built
    assert _digests(one.path) == _digests(two.path)
    assert set(_digests(one.path)) == {"images.npy", "labels.npy", "index.parquet", "meta.json", "integrity.json", "done"}
    import json

    assert json.loads((two.path / "build.json").read_text())["workers"] == 2
    assert json.loads((one.path / "build.json").read_text())["workers"] == 1
    assert not list((tmp_path / "j2" / "slices").glob(".build-*"))


def test_concurrent_builders_share_one_store(tmp_path, brats_phantom):
    out: list = []

    def build():
        out.append(st.prepare_slices(BratsDataset(), brats_phantom, 32, tmp_path, jobs=1))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and out[0].path == out[1].path
    assert sorted(s.built for s in out) == [False, True]


# --------------------------------------------------------------------------- resume
KILL_SCRIPT = """
import sys, time
from pathlib import Path
from wsss_bench.data import store
from wsss_bench.data.readers import BratsDataset

class SlowBrats(BratsDataset):
    def load_case(self, root, case):
        time.sleep(0.5)
        return super().load_case(root, case)

store.PARALLEL_MIN_VOXELS = 0
store.prepare_slices(SlowBrats(), Path(sys.argv[1]), 32, Path(sys.argv[2]), jobs=int(sys.argv[3]))
print("finished")
"""


@pytest.mark.parametrize("jobs", [1, 2])
def test_sigkilled_preparation_resumes_to_the_same_store(tmp_path, brats_phantom, jobs):
    reference = st.prepare_slices(BratsDataset(), brats_phantom, 32, tmp_path / "ref", jobs=1)
    cache = tmp_path / "killed"
    script = tmp_path / "prep.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(brats_phantom), str(cache), str(jobs)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    slices = cache / "slices"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(slices.glob(".build-*/cases/*.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # workers die with their parent: nothing is written after this point
    builds = list(slices.glob(".build-*"))
    assert len(builds) == 1 and not (slices / reference.key).exists()
    done = sorted(p.name for p in (builds[0] / "cases").glob("*.json"))
    time.sleep(0.5)
    assert sorted(p.name for p in (builds[0] / "cases").glob("*.json")) == done
    assert 2 <= len(done) < 5

    CountingBrats.loaded = []
    resumed = st.prepare_slices(CountingBrats(), brats_phantom, 32, cache, jobs=1)
    assert resumed.built and resumed.key == reference.key
    assert len(CountingBrats.loaded) == 5 - len(done)  # only the cases not done were read
    assert _digests(resumed.path) == _digests(reference.path)
    assert not list(slices.glob(".build-*"))


def test_interrupted_build_keeps_finished_cases(tmp_path, brats_phantom):
    class FailsAtThird(BratsDataset):
        def load_case(self, root, case):
            if case == "BraTS2021_00002":
                raise KeyboardInterrupt  # Ctrl-C: not the data's fault, the build is kept
            return super().load_case(root, case)

    with pytest.raises(KeyboardInterrupt):
        st.prepare_slices(FailsAtThird(), brats_phantom, 32, tmp_path, jobs=1)
    (build,) = (tmp_path / "slices").glob(".build-*")
    assert len(list((build / "cases").glob("*.json"))) == 2
    CountingBrats.loaded = []
    again = st.prepare_slices(CountingBrats(), brats_phantom, 32, tmp_path, jobs=1)
    assert CountingBrats.loaded == ["BraTS2021_00002", "BraTS2021_00003", "BraTS2021_00004"]
    fresh = st.prepare_slices(BratsDataset(), brats_phantom, 32, tmp_path / "fresh", jobs=1)
    assert _digests(again.path) == _digests(fresh.path)


def test_bad_data_in_a_worker_leaves_nothing(tmp_path, parallel, brats_phantom):
    root = tmp_path / "brats"
    shutil.copytree(brats_phantom, root)
    seg = root / "BraTS2021_00003" / "BraTS2021_00003_seg.nii.gz"
    img = nib.load(str(seg))
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, img.affine), str(seg))
    with pytest.raises(UserError, match=r"values \[3\]") as err:
        st.prepare_slices(BratsDataset(), root, 32, tmp_path / "cache", jobs=2)
    assert str(seg) in str(err.value)
    slices = tmp_path / "cache" / "slices"
    assert [p.name for p in slices.iterdir()] == [".locks"]


def test_store_version_and_codec_enter_the_key(brats_phantom, monkeypatch):
    src = BratsDataset()
    a = st.store_key(src, "f", 32, 0)
    assert st.store_key(src, "f", 32, 0, codec="float32") != a
    assert st.store_key(BratsDataset(nonfinite="zero"), "f", 32, 0) != a
    monkeypatch.setattr(st, "STORE_VERSION", "1")
    assert st.store_key(src, "f", 32, 0) != a


def test_float32_codec_stores_the_preprocessed_floats(tmp_path, brats_phantom):
    s = st.prepare_slices(BratsDataset(), brats_phantom, 32, tmp_path, jobs=1, codec="float32")
    rows = np.flatnonzero(s.index["case_id"].to_numpy() == "BraTS2021_00004")
    ref, _ = _reference_slices(BratsDataset(), brats_phantom, "BraTS2021_00004", 32)
    assert np.array_equal(s.images[rows], ref)


# --------------------------------------------------------------------------- fingerprint
def _old(path: Path, seconds: float = 60.0) -> None:
    t = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(t, t))


def test_fingerprint_sees_same_size_content_changes(tmp_path):
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    f = root / "a" / "x.nii.gz"
    f.write_bytes(b"1234")
    first = st.data_fingerprint(root)
    f.write_bytes(b"1235")
    assert st.data_fingerprint(root) != first
    f.write_bytes(b"1234")
    assert st.data_fingerprint(root) == first
    (root / ".marker").write_text("hidden files do not count")
    assert st.data_fingerprint(root) == first


def test_unchanged_files_are_hashed_once(tmp_path, monkeypatch):
    root, cache = tmp_path / "data", tmp_path / "cache"
    root.mkdir()
    files = [root / f"f{i}.bin" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 1000)
        _old(f)
    from wsss_bench.data import fingerprint as fp

    real = fp.file_sha256
    calls: list[str] = []

    def spy(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(fp, "file_sha256", spy)
    first = st.data_fingerprint(root, cache)
    assert sorted(calls) == ["f0.bin", "f1.bin", "f2.bin"]
    calls.clear()
    assert st.data_fingerprint(root, cache) == first and calls == []
    files[1].write_bytes(bytes([9]) * 1000)  # same size, new content
    _old(files[1], 30)
    changed = st.data_fingerprint(root, cache)
    assert changed != first and calls == ["f1.bin"]
    calls.clear()
    assert st.data_fingerprint(root, cache) == changed and calls == []
    # a file written just now is not remembered (a same-size rewrite could share its mtime)
    files[2].write_bytes(bytes([7]) * 1000)
    st.data_fingerprint(root, cache)
    calls.clear()
    st.data_fingerprint(root, cache)
    assert calls == ["f2.bin"]
    # without a cache every file is hashed
    calls.clear()
    assert st.data_fingerprint(root) == st.data_fingerprint(root, cache)
    assert sorted(calls) == ["f0.bin", "f1.bin", "f2.bin", "f2.bin"]  # 3 uncached + the recent one


def test_store_key_follows_the_content(tmp_path, brats_phantom):
    root = tmp_path / "brats"
    shutil.copytree(brats_phantom, root)
    first = st.prepare_slices(BratsDataset(), root, 32, tmp_path / "cache", jobs=1)
    flair = root / "BraTS2021_00000" / "BraTS2021_00000_flair.nii.gz"
    img = nib.load(str(flair))
    data = np.asanyarray(img.dataobj).copy()
    data[data > 0] *= np.float32(0.5)  # same size on disk? not guaranteed for gzip: compare keys only
    nib.save(nib.Nifti1Image(data, img.affine), str(flair))
    second = st.prepare_slices(BratsDataset(), root, 32, tmp_path / "cache", jobs=1)
    assert second.key != first.key and second.built
