"""One task's slices, labels and splits, ready for the methods (docs/protocol.md sections 4-5).

:func:`load_task_data` is the single entry point: it writes the phantom when no data root is
given, builds (or reuses) the dataset's slice store, labels the slices for the task, splits the
cases and composes the test set.  Seeds (section 12):

- case split: ``derive_seed(base_seed, <dataset name>, "split")``, so the three FLARE tasks share
  one split;
- test negatives: ``derive_seed(base_seed, <task id>, "test/negatives")``;
- validation negatives: ``derive_seed(base_seed, <task id>, "val/negatives")``;
- ``batches(shuffle=True)`` without a seed: ``derive_seed(base_seed, <task id>, "batches")``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from rich.markup import escape

from wsss_bench import integrity
from wsss_bench.cache import atomic_write_json, stable_hash
from wsss_bench.data import splits as sp
from wsss_bench.data.spacing import spacing_record
from wsss_bench.data.store import SliceStore, case_geometry, data_fingerprint, prepare_slices
from wsss_bench.errors import UserError
from wsss_bench.interfaces import DatasetSource, SliceBatch, TaskDef
from wsss_bench.lazy import torch
from wsss_bench.profiles import common, load_profile
from wsss_bench.progress import say
from wsss_bench.seeding import derive_seed

AMBIGUOUS_POLICIES = ("exclude", "negative")
PHANTOM_MARKER = ".done"
PHANTOM_META = ".phantom.json"
#: the phantom's file records (hidden: not part of the data fingerprint)
PHANTOM_FILES = ".files.json"


# --------------------------------------------------------------------------- phantoms
def phantom_dir(cache_root: Path, source: DatasetSource, profile: Any, seed: int) -> Path:
    """One folder per (dataset, profile, generator version, seed, phantom sizes)."""
    sizes = stable_hash([dict(profile.get("brain_phantom") or {}), dict(profile.get("abdomen_phantom") or {})], 8)
    return Path(cache_root) / "phantoms" / f"{source.name}-{profile.name}-{source.phantom_version}-seed{seed}-{sizes}"


def ensure_phantom(source: DatasetSource, profile: Any, cache_root: Path, seed: int = 0, force_since: float = 0.0) -> Path:
    """The phantom folder for (dataset, profile, generator version, seed), written once, atomically.

    Its files' records (size, BLAKE2b) are kept in ``.files.json``; a folder that fails
    :func:`check_phantom` is moved to ``phantoms/.quarantine/`` and written again, with one line
    naming the bad file.  One written before ``force_since`` (``--force``) is written again.
    """
    final = phantom_dir(cache_root, source, profile, seed)
    damage = None
    if final.is_symlink() or (final / PHANTOM_MARKER).is_file():
        try:
            check_phantom(final)
        except integrity.Damaged as err:
            damage = err
        else:
            if not force_since or (final / PHANTOM_MARKER).stat().st_mtime >= force_since:
                return final
        try:
            moved = integrity.quarantine(final, final.parent / ".quarantine")
        except FileNotFoundError:  # another process moved it first
            moved = None
        if damage is None and moved is not None:  # intact, written again under --force
            shutil.rmtree(moved, ignore_errors=True)
        damage = (damage, moved) if damage is not None and moved is not None else None
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        source.synthesize(tmp, profile, seed)
        meta = {
            "dataset": source.name,
            "generator_version": source.phantom_version,
            "seed": int(seed),
            "profile": profile.name,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / PHANTOM_META).write_text(json.dumps(meta, indent=2))
        _record_phantom(tmp)
        (tmp / PHANTOM_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%S"))
        try:
            os.replace(tmp, final)
        except OSError:  # written meanwhile by another process
            if not (final / PHANTOM_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    integrity.mark_verified(final, "phantom")
    if damage is not None:
        say(escape(integrity.report(damage[0], damage[1], f"{source.name} phantom")))
    return final


def _record_phantom(folder: Path) -> None:
    _write_files_record(folder, integrity.record_folder(folder, skip=(PHANTOM_FILES, PHANTOM_MARKER)))


def _write_files_record(folder: Path, files: dict) -> None:
    atomic_write_json(folder / PHANTOM_FILES, {"files": files})


def check_phantom(final: Path) -> None:
    """Raise :class:`integrity.Damaged` unless the phantom folder ``final`` is as written (sizes
    always; BLAKE2b digests on first use in this process and under ``--verify``).  A phantom
    written before records existed is adopted."""
    if final.is_symlink():
        raise integrity.Damaged(final, f"is a symbolic link (to {os.readlink(final)}); a phantom folder is never a link")
    path = final / PHANTOM_FILES
    if not path.is_file():
        _record_phantom(final)
        integrity.mark_verified(final, "phantom")
        return
    try:
        files = json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise integrity.Damaged(path, f"unreadable ({err})") from None
    full = integrity.needs_full(final, "phantom", files)
    integrity.check_folder(final, files, full=full)
    if full:
        integrity.mark_verified(final, "phantom")
        if integrity.restamp(final, files):
            _write_files_record(final, files)


# --------------------------------------------------------------------------- task data
@dataclass
class TaskData:
    """Slices of one task: labels, split indices and lazy access to images and masks.

    Row indices refer to the dataset's slice store; ``labels`` is int8 with 1 positive,
    0 negative, -1 ambiguous (ambiguous rows become 0 under ``ambiguous="negative"``).
    """

    task: TaskDef
    store: SliceStore
    data_root: Path
    is_phantom: bool
    phantom: dict | None
    base_seed: int
    ambiguous_policy: str
    labels: np.ndarray
    ambiguous: np.ndarray
    fg_fraction: np.ndarray
    tissue_fraction: np.ndarray
    case_ids: np.ndarray
    z: np.ndarray
    case_split: dict[str, list[str]]
    seeds: dict[str, int]
    test_info: dict
    #: (N, 3) float64: each slice's (row, column, slice) pixel spacing in mm (its case's)
    spacing: np.ndarray | None = None
    val_info: dict = field(default_factory=dict)
    _split_idx: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------- facts
    @property
    def image_size(self) -> int:
        return int(self.store.meta["image_size"])

    @property
    def channels(self) -> int:
        return int(self.store.meta["channels"])

    @property
    def fingerprint(self) -> str:
        return str(self.store.meta["fingerprint"])

    def __len__(self) -> int:
        return len(self.labels)

    # ----------------------------------------------------------------- access
    def split(self, name: str) -> np.ndarray:
        """Sorted row indices: train = non-ambiguous slices of the training cases; val and test =
        all positive slices of their cases plus a seeded subset of hard negatives (tissue
        fraction >= ``negative_min_tissue``) at the test ratio."""
        if name not in self._split_idx:
            raise UserError(f"unknown split '{name}'; choose one of {', '.join(sp.SPLITS)}")
        return self._split_idx[name].copy()

    def _rows(self, idx: Any) -> np.ndarray:
        return np.asarray(idx, dtype=np.int64).reshape(-1)

    def images(self, idx: Any) -> np.ndarray:
        """(n, C, S, S) float32 in [0, 1]."""
        return np.asarray(self.store.images[self._rows(idx)], dtype=np.float32)

    def masks(self, idx: Any) -> np.ndarray:
        """(n, S, S) bool task foreground."""
        lab = np.asarray(self.store.labels[self._rows(idx)])
        if self.task.foreground is None:
            return lab > 0
        return np.isin(lab, self.task.foreground)

    def batches(
        self,
        split_or_idx: str | Any,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        with_masks: bool = False,
        device: str = "cpu",
    ) -> Iterator[SliceBatch]:
        """Iterate over a split (or explicit rows) as SliceBatch of torch tensors."""
        idx = self.split(split_or_idx) if isinstance(split_or_idx, str) else self._rows(split_or_idx)
        if shuffle:
            seed = derive_seed(self.base_seed, self.task.task_id, "batches") if seed is None else seed
            idx = idx[np.random.default_rng(seed).permutation(len(idx))]
        for start in range(0, len(idx), int(batch_size)):
            rows = idx[start : start + int(batch_size)]
            images = torch.from_numpy(self.images(rows)).to(device)
            labels = torch.from_numpy(self.labels[rows].astype(np.int64)).to(device)
            masks = torch.from_numpy(self.masks(rows)).to(device) if with_masks else None
            yield SliceBatch(
                images=images,
                labels=labels,
                index=rows,
                case_ids=[str(c) for c in self.case_ids[rows]],
                z=[int(v) for v in self.z[rows]],
                masks=masks,
            )

    # ----------------------------------------------------------------- record
    def summary(self) -> dict:
        """JSON-able description for the run manifest."""
        per_split = {}
        for name in sp.SPLITS:
            in_cases = np.isin(self.case_ids, self.case_split[name])
            rows = self._split_idx[name]
            per_split[name] = {
                "cases": list(self.case_split[name]),
                "n_cases": len(self.case_split[name]),
                "n_slices": int(len(rows)),
                "n_pos": int((self.labels[rows] == sp.POSITIVE).sum()),
                "n_neg": int((self.labels[rows] == sp.NEGATIVE).sum()),
                "n_ambiguous": int((self.ambiguous & in_cases).sum()),
                "ambiguous_policy": self.ambiguous_policy,
                "n_slices_in_cases": int(in_cases.sum()),
            }
        return {
            "task": self.task.task_id,
            "dataset": self.task.dataset,
            "image_size": self.image_size,
            "channels": self.channels,
            "data": "phantom" if self.is_phantom else "real",
            "data_root": str(self.data_root),
            "phantom": self.phantom,
            "generator_version": self.phantom["generator_version"] if self.phantom else "real",
            "fingerprint": self.fingerprint,
            "store_key": self.store.key,
            "case_cap": int(self.store.meta["case_cap"]),
            "n_cases": len(self.store.meta["cases"]),
            "n_slices": len(self),
            "preprocess_version": self.store.meta["preprocess_version"],
            "label_rule": "positive f > 0.01, negative f == 0, ambiguous otherwise (f on the S x S mask)",
            "seeds": dict(self.seeds),
            "splits": per_split,
            "test": dict(self.test_info),
            "val": dict(self.val_info),
        }


def _common() -> Any:
    return common()


def _resolve_profile(profile: Any) -> Any:
    if isinstance(profile, str):
        return load_profile(profile)
    return profile


def case_spacing(store: "SliceStore", source: Any, root: Path) -> dict[str, list[float]]:
    """case id -> (row, column, slice) spacing in mm of its slices.

    Read from the store's meta; a store built before the field existed gets it from the
    headers under ``root`` (the store is not rewritten, its key does not change).
    """
    rec = store.meta.get("spacing")
    if rec is None:
        cases = list(store.meta["cases"])
        shapes = [case_geometry(source, Path(root), c)[1] for c in cases]
        rec = spacing_record(source, Path(root), cases, shapes, int(store.meta["image_size"]))
        store.meta["spacing"] = rec
    return {str(k): [float(x) for x in v] for k, v in rec["cases"].items()}


def load_task_data(
    source: DatasetSource,
    task_id: str,
    data_root: Path | None,
    profile: Any,
    base_seed: int,
    cache_root: Path,
    phantom_seed: int = 0,
    ambiguous: str = "exclude",
    jobs: int | None = None,
    force_since: float = 0.0,
) -> TaskData:
    """Everything a cell needs about its task's data (phantom when ``data_root`` is None).

    ``jobs``: worker processes that prepare the slice store if it is not built yet (default:
    the usable cores; the store does not depend on it).
    """
    profile = _resolve_profile(profile)
    if task_id not in source.tasks:
        raise UserError(
            f"dataset '{source.name}' has no task '{task_id}'; its tasks are: {', '.join(sorted(source.tasks))}"
        )
    if ambiguous not in AMBIGUOUS_POLICIES:
        raise UserError(f"ambiguous={ambiguous!r}: choose one of {', '.join(AMBIGUOUS_POLICIES)}")
    task = source.tasks[task_id]
    rules = profile.get("common") or _common()
    cache_root = Path(cache_root)
    size = int(profile.image_size)
    if data_root is None:
        root = ensure_phantom(source, profile, cache_root, phantom_seed, force_since=force_since)
        phantom = json.loads((root / PHANTOM_META).read_text())
        phantom.pop("seconds", None)
        cap = 0
        extra = {"phantom": phantom}
    else:
        root = Path(data_root)
        phantom = None
        cap = int(dict(profile.real_case_cap).get(source.cap_key, 0)) if source.cap_key else 0
        extra = None
    store = prepare_slices(source, root, size, cache_root, case_cap=cap, extra_key=extra, jobs=jobs,
                           force_since=force_since)

    index = store.index
    case_ids = index["case_id"].to_numpy().astype(str)
    z = index["z"].to_numpy(dtype=np.int64)
    tissue = index["tissue_fraction"].to_numpy(dtype=np.float64)
    fg_px = store.label_pixels(task.foreground)
    if task.foreground is not None and fg_px.sum() == 0:
        raise UserError(
            f"task '{task_id}': target label {list(task.foreground)} is absent from all "
            f"{len(store.meta['cases'])} case(s) under {root}; check the label convention "
            f"(liver 1, kidney 2, spleen 3, pancreas 4)"
        )
    fg = fg_px / float(size * size)
    raw = sp.slice_labels(fg, float(rules["label_fg_fraction"]))
    amb = raw == sp.AMBIGUOUS
    labels = raw.copy()
    if ambiguous == "negative":
        labels[amb] = sp.NEGATIVE

    rule = getattr(source, "split_rule", "tenths")
    phantom_split = dict(profile.get("phantom_split") or {}) if data_root is None else {}
    if source.cap_key in phantom_split:  # phantoms of this profile: fixed train/val/test case counts
        rule = "counts:" + "/".join(str(int(v)) for v in phantom_split[source.cap_key])
    seeds = {
        "split": derive_seed(base_seed, source.name, "split"),
        "test_negatives": derive_seed(base_seed, task_id, "test/negatives"),
        "val_negatives": derive_seed(base_seed, task_id, "val/negatives"),
    }
    cases = sp.case_split(list(store.meta["cases"]), rule, seeds["split"])
    idx = {"train": np.flatnonzero(np.isin(case_ids, cases["train"]) & (labels != sp.AMBIGUOUS))}
    min_tissue = float(rules["negative_min_tissue"])
    composed = {}
    for name in ("val", "test"):  # validation is built like the test set (checkpoint selection, convergence)
        in_split = np.isin(case_ids, cases[name])
        pos = np.flatnonzero(in_split & (labels == sp.POSITIVE))
        pool = np.flatnonzero(in_split & (labels == sp.NEGATIVE) & (tissue >= min_tissue))
        idx[name], composed[name] = sp.compose_test(pos, pool, seeds[f"{name}_negatives"])
        composed[name]["min_tissue_fraction"] = min_tissue
    test_info, val_info = composed["test"], composed["val"]
    by_case = case_spacing(store, source, root)
    uniq, inverse = np.unique(case_ids, return_inverse=True)
    spacing = np.array([by_case[c] for c in uniq], dtype=np.float64).reshape(-1, 3)[inverse]

    return TaskData(
        task=task,
        store=store,
        data_root=root,
        is_phantom=data_root is None,
        phantom=phantom,
        base_seed=int(base_seed),
        ambiguous_policy=ambiguous,
        labels=labels,
        ambiguous=amb,
        fg_fraction=fg,
        tissue_fraction=tissue,
        case_ids=case_ids,
        z=z,
        case_split=cases,
        seeds=seeds,
        test_info=test_info,
        spacing=spacing,
        val_info=val_info,
        _split_idx=idx,
    )


__all__ = ["TaskData", "load_task_data", "ensure_phantom", "phantom_dir", "data_fingerprint"]
