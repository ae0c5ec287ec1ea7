"""Slice store, splits, labels, test composition and the TaskData API."""
from __future__ import annotations

import json

import numpy as np
import pytest
from data_fixtures import SMOKE_TASKS

from wsss_bench.data import splits as sp
from wsss_bench.data.readers import BratsDataset, Flare21Dataset
from wsss_bench.data.store import data_fingerprint, prepare_slices
from wsss_bench.data.taskdata import load_task_data
from wsss_bench.errors import UserError
from wsss_bench.profiles import Section


# --------------------------------------------------------------------------- split rules
@pytest.mark.parametrize(
    "n, expected", [(3, (1, 1, 1)), (5, (3, 1, 1)), (16, (12, 2, 2)), (14, (12, 1, 1)), (15, (11, 2, 2)), (1251, (1001, 125, 125))]
)
def test_brats_split_sizes(n, expected):
    assert sp.split_sizes(n, "tenths") == expected


@pytest.mark.parametrize("n, expected", [(361, (211, 50, 100)), (20, (12, 3, 5)), (6, (4, 1, 1)), (3, (2, 1, 0))])
def test_flare_split_sizes(n, expected):
    if expected[2] == 0:
        with pytest.raises(UserError, match="at least 3"):
            sp.split_sizes(n, "flare21")
    else:
        assert sp.split_sizes(n, "flare21") == expected


def test_round_is_half_up():
    assert [sp.round_half_up(x) for x in (0.5, 1.5, 2.5, 2.49)] == [1, 2, 3, 2]
    assert sp.n_test_negatives(5802) == 1073 and sp.n_test_negatives(2) == 0 and sp.n_test_negatives(3) == 1


def test_case_split_is_a_seeded_partition():
    ids = [f"c{i:02d}" for i in range(20)]
    a = sp.case_split(ids, "tenths", 1)
    assert sorted(a["train"] + a["val"] + a["test"]) == ids
    assert [len(a[k]) for k in sp.SPLITS] == [16, 2, 2]
    assert a == sp.case_split(list(reversed(ids)), "tenths", 1)
    assert a != sp.case_split(ids, "tenths", 2)


def test_slice_label_rule():
    f = np.array([0.0, 0.005, 0.01, 0.0101, 0.5])
    assert sp.slice_labels(f).tolist() == [0, -1, -1, 1, 1]


def test_compose_test_uses_all_of_a_small_pool():
    idx, info = sp.compose_test(np.arange(100), np.array([200, 201]), seed=0)
    assert info["n_neg_target"] == 18 and info["n_neg"] == 2 and info["pool_too_small"]
    assert len(idx) == 102 and info["negative_share"] == pytest.approx(2 / 102)


# --------------------------------------------------------------------------- task data
def test_every_split_has_positive_and_negative_slices(smoke_task_data):
    for task in SMOKE_TASKS:
        td = smoke_task_data[task]
        for name in sp.SPLITS:
            labels = td.labels[td.split(name)]
            assert (labels == 1).sum() >= 1 and (labels == 0).sum() >= 1, (task, name)


def test_ambiguous_slices_are_excluded_by_default(smoke_task_data, smoke_profile, data_cache):
    td = smoke_task_data["brats"]
    assert td.ambiguous.sum() > 0
    for name in sp.SPLITS:
        assert not td.ambiguous[td.split(name)].any()
    summary = td.summary()
    assert sum(summary["splits"][n]["n_ambiguous"] for n in sp.SPLITS) == td.ambiguous.sum()
    neg = load_task_data(BratsDataset(), "brats", None, smoke_profile, 0, data_cache, ambiguous="negative")
    assert (neg.labels >= 0).all()
    train_amb = np.isin(neg.case_ids, neg.case_split["train"]) & neg.ambiguous
    assert len(neg.split("train")) == len(td.split("train")) + train_amb.sum()
    with pytest.raises(UserError, match="ambiguous"):
        load_task_data(BratsDataset(), "brats", None, smoke_profile, 0, data_cache, ambiguous="drop")


def test_split_sizes_and_shared_flare_split(smoke_task_data, smoke_profile):
    brats = smoke_task_data["brats"].case_split
    assert [len(brats[k]) for k in sp.SPLITS] == list(sp.split_sizes(smoke_profile.brain_phantom.cases, "tenths"))
    flare = [smoke_task_data[t].case_split for t in ("flare21-kidney", "flare21-spleen", "flare21-liver")]
    assert flare[0] == flare[1] == flare[2]
    assert [len(flare[0][k]) for k in sp.SPLITS] == [4, 1, 1]


def test_train_holds_every_non_ambiguous_slice_of_its_cases(smoke_task_data):
    td = smoke_task_data["flare21-kidney"]
    expected = np.flatnonzero(np.isin(td.case_ids, td.case_split["train"]) & (td.labels != -1))
    assert np.array_equal(td.split("train"), expected)


def test_validation_is_built_like_the_test_set(smoke_task_data):
    """All positive val slices, no blank slice, hard negatives at the test ratio, seeded."""
    for task in SMOKE_TASKS:
        td = smoke_task_data[task]
        rows = td.split("val")
        in_val = np.isin(td.case_ids, td.case_split["val"])
        assert in_val[rows].all() and np.array_equal(rows, np.unique(rows))
        positives = np.flatnonzero(in_val & (td.labels == 1))
        assert np.array_equal(rows[td.labels[rows] == 1], positives)  # every val positive, nothing ambiguous
        assert set(np.unique(td.labels[rows]).tolist()) <= {0, 1}
        negatives = rows[td.labels[rows] == 0]
        assert (td.tissue_fraction[rows] >= 0.10)[td.labels[rows] == 0].all()  # no blank or near-blank slice
        pool = np.flatnonzero(in_val & (td.labels == 0) & (td.tissue_fraction >= 0.10))
        target = int(np.floor(len(positives) * 1073 / 5802 + 0.5))  # the test ratio, computed here
        assert len(negatives) == min(target, len(pool)) == td.val_info["n_neg"]
        assert np.isin(negatives, pool).all()
        blank = in_val & (td.labels == 0) & (td.tissue_fraction < 0.10)
        assert not np.isin(rows, np.flatnonzero(blank)).any()


def test_validation_negatives_are_seeded(tmp_path):
    """Same seed, same val rows; the subset is drawn with the seed of (base seed, task)."""
    pos, pool = np.arange(0, 40), np.arange(100, 200)
    a, info = sp.compose_test(pos, pool, seed=3)
    b, _ = sp.compose_test(pos, pool, seed=3)
    c, _ = sp.compose_test(pos, pool, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c) and info["n_neg"] == 7  # round(40 * 1073 / 5802)


def test_cpu_validation_split_keeps_the_test_ratio(data_cache):
    """On the cpu phantoms the hard-negative pool is large enough: the ratio is met exactly."""
    from wsss_bench.profiles import load_profile

    cpu = load_profile("cpu")
    td = load_task_data(BratsDataset(), "brats", None, cpu, 0, data_cache)
    again = load_task_data(BratsDataset(), "brats", None, cpu, 0, data_cache)
    other = load_task_data(BratsDataset(), "brats", None, cpu, 1, data_cache)
    info = td.val_info
    assert not info["pool_too_small"] and info["n_neg"] == int(np.floor(info["n_pos"] * 1073 / 5802 + 0.5))
    assert np.array_equal(td.split("val"), again.split("val"))
    assert td.seeds["val_negatives"] != other.seeds["val_negatives"]
    assert (td.tissue_fraction[td.split("val")] >= 0.10).all()


def test_test_set_composition(smoke_task_data, smoke_profile):
    for task in SMOKE_TASKS:
        td = smoke_task_data[task]
        rows = td.split("test")
        in_test = np.isin(td.case_ids, td.case_split["test"])
        assert in_test[rows].all()
        positives = np.flatnonzero(in_test & (td.labels == 1))
        assert np.array_equal(np.intersect1d(rows, positives), positives)  # every test positive
        negatives = rows[td.labels[rows] == 0]
        assert (td.tissue_fraction[negatives] >= 0.10).all()
        pool = in_test & (td.labels == 0) & (td.tissue_fraction >= 0.10)
        info = td.test_info
        assert info["n_neg"] == len(negatives) == min(sp.n_test_negatives(len(positives)), pool.sum())
        assert info["negative_share"] == pytest.approx(len(negatives) / len(rows))
        assert td.summary()["test"]["n_neg_target"] == sp.n_test_negatives(len(positives))


def test_masks_follow_the_task_foreground(smoke_task_data):
    kidney, liver = smoke_task_data["flare21-kidney"], smoke_task_data["flare21-liver"]
    rows = kidney.split("test")
    full = np.asarray(kidney.store.labels[rows])
    assert np.array_equal(kidney.masks(rows), full == 2)
    assert np.array_equal(liver.masks(rows), full == 1)
    assert np.allclose(kidney.masks(rows).mean(axis=(1, 2)), kidney.fg_fraction[rows])
    brats = smoke_task_data["brats"]
    assert np.array_equal(brats.masks([0, 5]), np.asarray(brats.store.labels[[0, 5]]) > 0)


def test_batches(smoke_task_data):
    td = smoke_task_data["brats"]
    rows = td.split("train")
    batches = list(td.batches("train", 7))
    assert sum(len(b) for b in batches) == len(rows)
    b = batches[0]
    assert tuple(b.images.shape) == (7, 4, 32, 32) and str(b.images.dtype) == "torch.float32"
    assert str(b.labels.dtype) == "torch.int64" and b.masks is None
    assert np.array_equal(b.index, rows[:7]) and b.z == [int(v) for v in td.z[rows[:7]]]
    with_masks = next(td.batches(rows[:3], 3, with_masks=True))
    assert with_masks.masks.dtype.is_floating_point is False and tuple(with_masks.masks.shape) == (3, 32, 32)
    a = np.concatenate([x.index for x in td.batches("train", 8, shuffle=True, seed=5)])
    c = np.concatenate([x.index for x in td.batches("train", 8, shuffle=True, seed=5)])
    assert np.array_equal(a, c) and not np.array_equal(a, rows) and np.array_equal(np.sort(a), rows)
    images = td.images(rows[:2])
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1


def test_summary_is_json_and_complete(smoke_task_data):
    s = smoke_task_data["flare21-spleen"].summary()
    json.dumps(s)
    assert s["data"] == "phantom" and s["generator_version"] == Flare21Dataset().phantom_version
    assert set(s["splits"]) == set(sp.SPLITS) and s["splits"]["test"]["cases"]
    assert {"negative_share", "n_neg_target", "negative_pool"} <= set(s["test"])
    assert len(s["fingerprint"]) == 64 and s["seeds"]["split"] > 0


def test_unknown_task_and_split(smoke_task_data, smoke_profile, data_cache):
    with pytest.raises(UserError, match="flare21-kidney"):
        load_task_data(Flare21Dataset(), "flare21-lung", None, smoke_profile, 0, data_cache)
    with pytest.raises(UserError, match="train"):
        smoke_task_data["brats"].split("holdout")


# --------------------------------------------------------------------------- store
def test_store_is_built_once(smoke_task_data, smoke_profile, data_cache):
    store = smoke_task_data["flare21-kidney"].store
    marker = store.path / "done"
    before = (marker.stat().st_mtime_ns, (store.path / "images.npy").stat().st_mtime_ns)
    again = load_task_data(Flare21Dataset(), "flare21-liver", None, smoke_profile, 0, data_cache)
    assert again.store.path == store.path and not again.store.built
    assert (marker.stat().st_mtime_ns, (store.path / "images.npy").stat().st_mtime_ns) == before
    assert not any(p.name.startswith(".tmp") for p in store.path.parent.iterdir())
    n = len(store.index)
    assert store.images.shape == (n, 1, 32, 32) and store.labels.shape == (n, 32, 32)
    assert store.images.dtype == np.float32 and store.labels.dtype == np.uint8


def test_fingerprint_covers_paths_and_sizes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.nii.gz").write_bytes(b"1234")
    first = data_fingerprint(tmp_path)
    (tmp_path / ".marker").write_text("hidden files do not count")
    assert data_fingerprint(tmp_path) == first
    (tmp_path / "a" / "x.nii.gz").write_bytes(b"12345")
    assert data_fingerprint(tmp_path) != first


def test_real_data_root_with_case_cap(tmp_path, brats_phantom, smoke_profile):
    """A data root is read as real data; the profile's cap keeps the first cases by sorted id."""
    profile = Section({**smoke_profile, "real_case_cap": Section({"brats": 3, "flare": 6})})
    td = load_task_data(BratsDataset(), "brats", brats_phantom, profile, 0, tmp_path)
    assert not td.is_phantom and td.summary()["data"] == "real" and td.summary()["generator_version"] == "real"
    assert td.store.meta["cases"] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    assert [len(td.case_split[k]) for k in sp.SPLITS] == [1, 1, 1]
    assert td.store.built


def test_absent_target_label_is_an_error(tmp_path, flare_phantom, smoke_profile):
    import shutil

    import nibabel as nib

    root = tmp_path / "flare"
    shutil.copytree(flare_phantom, root)
    for path in (root / "TrainingMask").iterdir():
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj).copy()
        data[data == 3] = 0
        nib.save(nib.Nifti1Image(data, img.affine), str(path))
    with pytest.raises(UserError, match="target label \\[3\\]"):
        load_task_data(Flare21Dataset(), "flare21-spleen", root, smoke_profile, 0, tmp_path / "cache")


def test_prepare_slices_validates_before_writing(tmp_path):
    with pytest.raises(UserError):
        prepare_slices(BratsDataset(), tmp_path / "missing", 32, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()
