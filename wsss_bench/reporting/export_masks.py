"""Predicted masks out of a run: stored per cell, read back per slice, exported as NIfTI.

Three parts, each usable alone:

1. **Stored predictions**: the run folder (:mod:`wsss_bench.running.rundir`) holds one cell's
   ungated S x S masks of its test slices in ``<run>/predictions/<cell key>.npz``; :func:`gated`
   applies a gate on reading, from the results' ``gate_pass``.
2. **Reading a run's slices**: :class:`RunSlices` finds a task's preprocessed images and ground
   truth through the manifest (the slice store in the run's cache, else the source volumes,
   preprocessed again by :mod:`wsss_bench.data.preprocess`).
3. **Back to the source volume** (docs/protocol.md section 4 inverted): :func:`to_source_space` restacks
   a case's (Z, S, S) slices into the RAS volume, undoes the centre crop and the resize, then
   the reader's RAS reorientation, so the array has the on-disk shape and is saved with the
   source file's affine and header: it overlays the original scan in 3D Slicer or ITK-SNAP.

Inverse of resize + crop (our choice, docs/metrics.md): the forward mask resize is a
``nearest-exact`` gather, so output pixel r of an axis *is* source pixel ``idx[r]``.  Each
source pixel that some output pixel sampled takes that value (the mean, where upsampling
sampled it several times); source pixels in between are linearly interpolated from the two
nearest sampled ones, per axis, and the result is thresholded at 0.5.  Source pixels outside
the centre crop's footprint are background.  Slices a run did not predict (outside the test
set) are background too, and listed in the export's ``export.json``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from wsss_bench.errors import UserError
from wsss_bench.reporting.load import load_manifests, load_results
from wsss_bench.running.rundir import PREDICTIONS_DIR, Predictions, load_predictions


def gated(pred: Predictions, results: "Any", gate: str) -> np.ndarray:
    """The masks as scored under ``gate``: blanked where the results' ``gate_pass`` is False."""
    rows = results[(results["task"] == pred.task) & (results["method"] == pred.method)
                   & (results["gate"] == gate) & (results["seed"] == pred.seed)]
    if gate == "none" or not len(rows):
        return pred.masks
    passed = {(str(c), int(z)): bool(g) for c, z, g in zip(rows["case_id"], rows["z"], rows["gate_pass"])}
    keep = np.array([passed.get((c, int(z)), True) for c, z in zip(pred.case_ids, pred.z)])
    return pred.masks & keep[:, None, None]


# --------------------------------------------------------------------------- 2. a run's slices
def _datasets() -> dict[str, Any]:
    from wsss_bench.data.readers import BUILTIN_DATASETS

    return {cls.name: cls for cls in BUILTIN_DATASETS}


def task_def(dataset: str, task: str):
    cls = _datasets().get(dataset)
    if cls is None or task not in cls.tasks:
        raise UserError(f"task {task!r} of dataset {dataset!r} is not a built-in task; masks can be "
                        f"read back only for {', '.join(sorted(t for c in _datasets().values() for t in c.tasks))}")
    return cls, cls.tasks[task]


def label_file(dataset: str, root: Path, case: str) -> Path:
    """The source label volume of ``case``: BraTS ``*_seg.nii.gz``, FLARE21 its mask file."""
    from wsss_bench.data import phantom_abdomen, phantom_brain
    from wsss_bench.data.readers import flare_layout

    if dataset == "brats":
        return phantom_brain.case_files(Path(root), case)["seg"]
    if dataset == "flare21":
        return phantom_abdomen.case_paths(Path(root), case, flare_layout(Path(root)))[1]
    raise UserError(f"dataset {dataset!r}: no source label layout known; export works for brats and flare21")


def data_entry(manifests: Sequence[Mapping[str, Any]], task: str, seed: int | None = None) -> tuple[dict, dict]:
    """(the manifest's data summary of ``task`` (at ``seed`` when recorded), its manifest)."""
    for m in manifests:
        entries = m.get("data") or {}
        keys = [k for k in entries if str(k).split("/")[0] == task]
        keys.sort(key=lambda k: (k != f"{task}/seed{seed}", k))
        if keys:
            return dict(entries[keys[0]]), dict(m)
    raise UserError(f"no manifest records the data of task {task!r}; pass the run directory "
                    "`wsss-bench run` wrote (its manifest.json lists the data root)")


class RunSlices:
    """Images and ground truth of one task's slices, as the run saw them (S x S, RAS)."""

    def __init__(self, manifests: Sequence[Mapping[str, Any]], task: str, seed: int | None = None,
                 cache_dir: str | Path | None = None) -> None:
        """``cache_dir``: the cache in use (default: $WSSS_BENCH_CACHE or ~/.cache/wsss-bench).
        The run's slice store is found there by its key, and a phantom run's data is made again
        there when absent (:mod:`wsss_bench.data.locate`): the paths the manifest recorded
        belong to the machine that made the run."""
        from wsss_bench.data import locate
        from wsss_bench.data.store import open_store

        self.entry, manifest = data_entry(manifests, task, seed)
        self.task = task
        self.dataset = str(self.entry.get("dataset", ""))
        self.cls, self.taskdef = task_def(self.dataset, task)
        self.size = int(self.entry["image_size"])
        cache = Path(cache_dir) if cache_dir is not None else locate.current_cache()
        store_dir, root = locate.locate(self.cls(), self.entry, manifest, cache)
        self.root = root if root is not None else Path(str(self.entry.get("data_root", "")))
        self.store = open_store(store_dir) if store_dir is not None else None
        self._cases: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _foreground(self, labels: np.ndarray) -> np.ndarray:
        fg = self.taskdef.foreground
        return labels > 0 if fg is None else np.isin(labels, fg)

    def case(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        """(images (Z, C, S, S) float32, ground truth (Z, S, S) bool) of every slice of a case."""
        if case_id not in self._cases:
            if self.store is not None:
                rows = np.flatnonzero(self.store.index["case_id"].to_numpy().astype(str) == str(case_id))
                if len(rows):
                    order = rows[np.argsort(self.store.index["z"].to_numpy()[rows], kind="stable")]
                    imgs = np.asarray(self.store.images[order], dtype=np.float32)
                    self._cases[case_id] = (imgs, self._foreground(np.asarray(self.store.labels[order])))
                    return self._cases[case_id]
            if not self.root.is_dir():
                raise UserError(f"case {case_id}: neither the run's slice store nor its data root {self.root} "
                                "exists any more; re-run `wsss-bench run` (cached) to rebuild them")
            from wsss_bench.data.preprocess import preprocess_volume

            image, labels = self.cls().load(self.root, case_id)
            imgs, labs = preprocess_volume(image, labels, self.size)
            self._cases[case_id] = (imgs, self._foreground(labs))
        return self._cases[case_id]

    def slices(self, case_ids: Sequence[str], z: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(images (n, C, S, S), ground truth (n, S, S)) of the given slices."""
        imgs, gts = [], []
        for c, zi in zip(case_ids, z):
            im, gt = self.case(str(c))
            imgs.append(im[int(zi)])
            gts.append(gt[int(zi)])
        return np.stack(imgs), np.stack(gts)

    def label_path(self, case_id: str) -> Path:
        return label_file(self.dataset, self.root, case_id)


# --------------------------------------------------------------------------- 3. source space
def unresize_slices(slices: np.ndarray, h: int, w: int) -> np.ndarray:
    """(Z, S, S) masks of one case -> (h, w, Z) bool in the RAS volume's in-plane grid."""
    from wsss_bench.data.preprocess import crop_offsets, resized_shape

    slices = np.asarray(slices)
    if slices.ndim != 3 or slices.shape[1] != slices.shape[2]:
        raise ValueError(f"slices must be (Z, S, S), got {slices.shape}")
    size = slices.shape[1]
    h2, w2 = resized_shape(h, w, size)
    oh, ow = crop_offsets(h2, w2, size)
    vol = np.moveaxis(slices.astype(np.float64), 0, 2)  # (S, S, Z)
    for axis, (n_src, n_res, off) in enumerate(((h, h2, oh), (w, w2, ow))):
        vol = _inverse_axis(vol, n_src, n_res, off, size, axis)
    return vol >= 0.5


def _inverse_axis(v: np.ndarray, n_src: int, n_res: int, off: int, size: int, axis: int) -> np.ndarray:
    from wsss_bench.data.preprocess import nearest_exact_index

    src = nearest_exact_index(n_src, n_res)[off: off + size]  # source pixel of each output pixel
    v = np.moveaxis(v, axis, 0)  # (S, ...)
    uniq, inv = np.unique(src, return_inverse=True)
    acc = np.zeros((len(uniq),) + v.shape[1:])
    np.add.at(acc, inv, v)
    acc /= np.bincount(inv, minlength=len(uniq)).reshape((-1,) + (1,) * (v.ndim - 1))
    # interpolate every source pixel between the sampled ones: weights per source pixel
    x = np.arange(n_src, dtype=np.float64)
    pos = np.searchsorted(uniq, x, side="right") - 1  # last sampled pixel <= x
    lo = np.clip(pos, 0, len(uniq) - 1)
    hi = np.clip(pos + 1, 0, len(uniq) - 1)
    span = (uniq[hi] - uniq[lo]).astype(np.float64)
    t = np.where(span > 0, (x - uniq[lo]) / np.where(span > 0, span, 1.0), 0.0)
    t = np.clip(t, 0.0, 1.0)
    shape = (-1,) + (1,) * (v.ndim - 1)
    out = acc[lo] * (1 - t).reshape(shape) + acc[hi] * t.reshape(shape)
    # footprint of the crop: source pixels whose nearest resized pixel is inside it
    back = nearest_exact_index(n_res, n_src)
    out[(back < off) | (back >= off + size)] = 0.0
    return np.moveaxis(out, 0, axis)


def to_source_space(slices: np.ndarray, reference: Any) -> np.ndarray:
    """A case's (Z, S, S) masks -> uint8 array in the on-disk voxel grid of ``reference``.

    ``reference`` is the case's source NIfTI (a nibabel image or a path).  The slices are in the
    reader's RAS frame (``nib.as_closest_canonical``); the resize and crop are inverted there,
    then the canonical reorientation is undone.
    """
    import nibabel as nib
    from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

    ref = nib.load(str(reference)) if isinstance(reference, (str, Path)) else reference
    disk_shape = tuple(int(s) for s in ref.shape[:3])
    ornt = io_orientation(ref.affine)  # disk axes -> RAS (what as_closest_canonical applies)
    ras_shape = tuple(int(disk_shape[int(a)]) for a in np.argsort(ornt[:, 0]))  # RAS axis k <- disk axis
    x, y, nz = ras_shape
    slices = np.asarray(slices)
    if slices.shape[0] != nz:
        raise UserError(f"{slices.shape[0]} slices for a volume of {nz} axial (RAS z) slices "
                        f"({getattr(ref, 'get_filename', lambda: '')()})")
    ras = unresize_slices(slices, x, y).astype(np.uint8)  # (X, Y, Z) RAS
    canonical = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    back = ornt_transform(canonical, ornt)  # RAS axes -> disk axes
    disk = apply_orientation(ras, back)
    if tuple(disk.shape) != disk_shape:  # pragma: no cover - would be a bug in the inversion
        raise RuntimeError(f"inverse orientation gave shape {disk.shape}, expected {disk_shape}")
    return np.ascontiguousarray(disk, dtype=np.uint8)


def save_nifti(mask: np.ndarray, reference: Any, path: str | Path) -> Path:
    """Write a uint8 mask with the reference file's affine and header (qform/sform kept)."""
    import gzip

    import nibabel as nib

    from wsss_bench.cache import atomic_write_bytes

    ref = nib.load(str(reference)) if isinstance(reference, (str, Path)) else reference
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(np.asarray(mask, dtype=np.uint8), ref.affine, header)
    img.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]) or 1)
    img.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]) or 1)
    img.header.set_slope_inter(1.0, 0.0)
    path = Path(path)
    data = img.to_bytes()
    atomic_write_bytes(path, gzip.compress(data, mtime=0) if path.name.endswith(".gz") else data)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=+-]+", "_", text).strip("_")[:120] or "method"


def case_stack(pred: Predictions, masks: np.ndarray, case_id: str, n_z: int) -> tuple[np.ndarray, list[int]]:
    """(Z, S, S) of one case from the stored rows (unpredicted slices empty), predicted z list."""
    size = masks.shape[-1]
    out = np.zeros((n_z, size, size), dtype=bool)
    rows = np.flatnonzero(pred.case_ids == str(case_id))
    zs = [int(pred.z[r]) for r in rows]
    for r, zi in zip(rows, zs):
        out[zi] = masks[r]
    return out, sorted(zs)


def export_masks(run_dirs: str | Path | Sequence[str | Path], method: str, out: str | Path, *,
                 task: str | None = None, gate: str = "none", seed: int | None = None,
                 ground_truth: bool = False, cache_dir: str | Path | None = None) -> list[Path]:
    """Write ``method``'s predicted masks per test case as NIfTI under ``out/<task>/<method>/``.

    ``gate`` blanks what the gate blanked in the results (default none: the raw prediction).
    ``ground_truth`` exports the run's preprocessed ground truth of the same cases through the
    same path instead (to check the geometry in a viewer).  Returns the written files.
    """
    from wsss_bench.cache import atomic_write_json

    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    frame = load_results(dirs)
    manifests = load_manifests(dirs)
    stored = load_predictions(dirs)
    if not stored:
        raise UserError(f"{', '.join(map(str, dirs))} holds no stored predictions ({PREDICTIONS_DIR}/*.npz); "
                        "the run predates mask storage: re-run it (finished stages come from the cache)")
    from wsss_bench.labels import resolve_method
    from wsss_bench.plugins import load_plugins

    method = resolve_method(load_plugins(), method, sorted({m for (_, m, _) in stored}))  # any spelling
    cells = [p for (t, m, s), p in stored.items() if m == method and (task is None or t == task)
             and (seed is None or s == seed)]
    if not cells:
        have = sorted({f"{m} ({t}, seed {s})" for (t, m, s) in stored})
        raise UserError(f"no stored predictions for method {method!r}" + (f" on task {task!r}" if task else "")
                        + f"; the run stored: {', '.join(have)}")
    if seed is None:  # one seed per task: the smallest
        first: dict[str, Predictions] = {}
        for p in sorted(cells, key=lambda p: p.seed):
            first.setdefault(p.task, p)
        cells = list(first.values())
    written: list[Path] = []
    for pred in cells:
        data = RunSlices(manifests, pred.task, pred.seed, cache_dir=cache_dir)
        masks = gated(pred, frame, gate)
        folder = Path(out) / pred.task / _slug("ground-truth" if ground_truth else method)
        info: dict[str, Any] = {"task": pred.task, "method": method, "seed": pred.seed, "gate": gate,
                                "ground_truth": ground_truth, "image_size": data.size, "cases": {}}
        for case in sorted(set(pred.case_ids.tolist())):
            ref_path = data.label_path(case)
            imgs, gt = data.case(case)
            stack, zs = case_stack(pred, masks, case, len(gt))
            if ground_truth:
                stack = gt
            vol = to_source_space(stack, ref_path)
            path = save_nifti(vol, ref_path, folder / f"{case}.nii.gz")
            written.append(path)
            info["cases"][case] = {"file": path.name, "source": str(ref_path),
                                   "predicted_z": "all" if ground_truth else zs, "voxels": int(vol.sum())}
        info["note"] = ("RAS z slices not in the test set are background; z counts slices of the "
                        "RAS-reoriented volume (docs/metrics.md)")
        atomic_write_json(folder / "export.json", info)
    return written
